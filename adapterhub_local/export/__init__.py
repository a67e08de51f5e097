"""Hand-off to other serving engines: write what they load, after checking their limits.

:mod:`.vllm_limits` knows vLLM's LoRA limits (ranks, features, target modules per architecture),
:mod:`.vllm_export` writes a verified version as the PEFT LoRA directory vLLM loads, and
:mod:`.vllm_resolver` is a vLLM ``LoRAResolver`` plugin that resolves request ``model`` names against a
registry.
"""

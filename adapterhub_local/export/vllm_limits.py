"""vLLM's limits for LoRA adapters, checked before an export so nothing is handed over that vLLM would
refuse — or, worse, load and serve with different outputs.

Sources (vLLM's own code, read for this module):

- ``vllm/config/lora.py``: ``MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]`` — the
  engine's ``--max-lora-rank`` must be one of these and at least the adapter's rank, so 512 is the
  highest rank vLLM serves.
- ``vllm/lora/peft_helper.py`` (``PEFTHelper._validate_features`` / ``validate_legal``): no DoRA, no
  ``lora_bias``, ``bias`` must be ``none``, ``modules_to_save`` only ``classifier``/``score`` on
  classification models, no init that rewrites the base (PiSSA, OLoRA, CorDA, LoftQ), no aLoRA, no layer
  replication; ``use_rslora`` is honoured (scale ``alpha/sqrt(r)``).
- ``vllm/lora/utils.py`` (``parse_fine_tuned_lora_name``): tensor names ``….lora_A.weight`` /
  ``….lora_B.weight`` (``lora_embedding_A``/``_B`` for embeddings); anything else is "unsupported LoRA
  weight".
- the model files' ``packed_modules_mapping``: Llama-family models run ``q_proj``/``k_proj``/``v_proj``
  as one ``qkv_proj`` and ``gate_proj``/``up_proj`` as one ``gate_up_proj``; an adapter's separate
  A/B pairs are stacked into the packed layer by vLLM's loader (a slice the adapter lacks is zero).

vLLM has no soft prompts (its prompt-adapter support was removed), and it does not read
``fan_in_fan_out``, ``rank_pattern``/``alpha_pattern`` in every release: adapters using those are
refused here, since a reader that ignores them computes a different (wrong) delta.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""``MaxLoRARanks`` in ``vllm/config/lora.py``."""

_LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PACKED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
"""vLLM's ``packed_modules_mapping`` for the Llama-family models in :data:`LORA_MODULES`."""

LORA_MODULES: dict[str, tuple[str, ...]] = {
    "LlamaForCausalLM": _LLAMA_MODULES,
    "MistralForCausalLM": _LLAMA_MODULES,
    "Qwen2ForCausalLM": _LLAMA_MODULES,
    "Qwen3ForCausalLM": _LLAMA_MODULES,
}
"""Architectures whose vLLM model class supports LoRA, and the (HF) module names it applies LoRA to."""

_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(lora_A|lora_B)\.weight$")


@dataclass
class VllmCheck:
    """The outcome of checking one adapter version against vLLM's limits."""

    refusals: list[str] = field(default_factory=list)
    """What vLLM would refuse or serve with different outputs (each names the fix)."""
    notes: list[str] = field(default_factory=list)
    """What the hand-off does not carry, or what the vLLM side must be told (never changes the weights)."""
    max_lora_rank: int | None = None
    """The smallest ``--max-lora-rank`` vLLM accepts for this adapter."""

    @property
    def ok(self) -> bool:
        return not self.refusals


def smallest_max_rank(rank: int) -> int | None:
    """The smallest vLLM ``--max-lora-rank`` choice that serves ``rank`` (None: above vLLM's highest)."""
    return next((choice for choice in VLLM_MAX_LORA_RANKS if choice >= rank), None)


def check_vllm(kind: str, config: dict[str, Any], tensor_names: list[str], architecture: str) -> VllmCheck:
    """Check a stored version (its card's ``kind``, PEFT config, tensor names and base architecture)."""
    check = VllmCheck()
    if kind == "prompt":
        check.refusals.append("a soft prompt (prompt tuning) cannot be served by vLLM: it has no prompt adapters — "
                              "serve it with `adapterhub serve`, or train a LoRA adapter for vLLM")
        return check
    if kind == "full":
        check.refusals.append("a full fine-tune is a whole model, not a LoRA adapter — export it with "
                              "`--target peft` and serve that directory with `vllm serve DIR`")
        return check
    if kind not in ("lora", "head"):
        check.refusals.append(f"adapter kind {kind!r} is not a LoRA adapter — only LoRA versions go to vLLM")
        return check
    _check_features(config, check)
    _check_rank(config, check)
    _check_targets(config, tensor_names, architecture, check)
    return check


def _check_features(config: dict[str, Any], check: VllmCheck) -> None:
    refuse = check.refusals.append
    if config.get("use_dora") is True:
        refuse("the adapter uses DoRA (use_dora=true); vLLM does not support DoRA — retrain it as plain LoRA")
    if config.get("lora_bias") is True or config.get("bias", "none") not in ("none", None):
        refuse("the adapter trains biases (bias/lora_bias); vLLM does not load them — retrain with bias='none'")
    saved = config.get("modules_to_save") or []
    if saved:
        refuse(f"modules_to_save {saved}: these are whole trained modules (a classifier head, an embedding), not "
               "LoRA pairs; vLLM takes them only as classifier/score of a classification model and refuses them "
               "on a generative model, and dropping them would change the outputs — serve this version with "
               "`adapterhub serve`, or retrain without modules_to_save")
    if config.get("fan_in_fan_out") is True:
        refuse("fan_in_fan_out=true (GPT-2 Conv1D weights): vLLM's loader does not transpose the pairs, so "
               "the delta would be applied transposed — retrain on a Linear-layer base")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            refuse(f"{key} is set (per-module rank/alpha); vLLM releases that ignore it would scale those modules "
                   f"wrongly — retrain with one r and lora_alpha")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        refuse(f"init_lora_weights={init!r} rewrites the base weights when PEFT loads the adapter; vLLM serves "
               "the unmodified base — convert it to plain LoRA with PEFT's "
               "path_initial_model_for_weight_conversion first")
    for key, what in (("alora_invocation_tokens", "activated LoRA"), ("layer_replication", "layer replication")):
        if config.get(key):
            refuse(f"{key} is set: vLLM does not support {what} — retrain without it")
    if config.get("use_rslora") is True:
        check.notes.append("rsLoRA: vLLM scales by lora_alpha/sqrt(r), as PEFT does")


def _check_rank(config: dict[str, Any], check: VllmCheck) -> None:
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        check.refusals.append(f"r={rank!r} is not a positive integer — the stored config is damaged; run "
                              "`adapterhub verify`")
        return
    check.max_lora_rank = smallest_max_rank(rank)
    if check.max_lora_rank is None:
        check.refusals.append(f"rank {rank} is above vLLM's highest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}, "
                              f"choices {list(VLLM_MAX_LORA_RANKS)}) — truncate it with `adapterhub truncate` "
                              "to rank <= 512, or serve it with `adapterhub serve`")
    else:
        check.notes.append(f"start vLLM with --enable-lora --max-lora-rank {check.max_lora_rank} (or higher)")


def _check_targets(config: dict[str, Any], tensor_names: list[str], architecture: str, check: VllmCheck) -> None:
    allowed = LORA_MODULES.get(architecture)
    if allowed is None:
        check.refusals.append(f"base architecture {architecture!r} is not one whose vLLM LoRA target modules "
                              f"adapterhub knows ({', '.join(sorted(LORA_MODULES))}); vLLM serves LoRA only on "
                              "models that implement SupportsLoRA — export with `--target peft` and check vLLM's "
                              "supported-models list")
        return
    stray = sorted(n for n in tensor_names if _LORA_KEY.match(n) is None)
    if stray:
        check.refusals.append(f"{len(stray)} tensor(s) are not LoRA A/B pairs (e.g. {stray[0]}); vLLM's loader "
                              "refuses them as 'unsupported LoRA weight' — serve this version with "
                              "`adapterhub serve`")
    modules = {m.group("module").rsplit(".", 1)[-1] for n in tensor_names if (m := _LORA_KEY.match(n))}
    unknown = sorted(modules - set(allowed))
    if unknown:
        check.refusals.append(f"target modules {unknown} are not LoRA targets of vLLM's {architecture} (it applies "
                              f"LoRA to {', '.join(allowed)}) — retrain targeting those modules")
    packed = [f"{'+'.join(m for m in parts if m in modules)} -> {name}"
              for name, parts in PACKED_MODULES.items() if modules & set(parts)]
    if packed:
        check.notes.append("vLLM packs the pairs into its fused layers (" + "; ".join(packed)
                           + "); a slice the adapter does not train stays zero, as in PEFT")

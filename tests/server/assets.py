"""Tiny servable assets built on the spot: a 2-layer Llama with a character-level tokenizer and a chat
template, registered as a base, and real PEFT adapters for it (LoRA of varied ranks and targets, a soft
prompt, a classifier). Used by the server tests and by ``benchmarks/server_load.py``.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

from adapterhub_local.registry import CardInfo, Registry
from tests.peft_factory import save_lora, save_prompt

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
VOCAB = len(SPECIALS) + len(CHARS)
TARGET_SETS: tuple[tuple[str, ...], ...] = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
                                             ("gate_proj", "up_proj", "down_proj"), ("v_proj",))


def char_tokenizer() -> Any:
    """A character-level fast tokenizer (one token per printable ASCII character) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_chat_base(path: Path, seed: int = 0, hidden: int = 32, context: int = 256, layers: int = 2) -> Path:
    """Save a random-weight Llama (vocab = the character tokenizer's) and its tokenizer to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=context, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def add_loras(registry: Registry, base: str, work: Path, count: int, prefix: str = "lora") -> list[str]:
    """Register ``count`` LoRA adapters on ``base`` (ranks 1..32, four target sets); returns their names."""
    base_dir = registry.base(base).path
    names = []
    for i in range(count):
        name = f"{prefix}{i}"
        out = work / name
        save_lora(base_dir, out, rank=2 ** (i % 6), targets=TARGET_SETS[i % len(TARGET_SETS)], seed=100 + i,
                  alpha=8)
        registry.register_adapter(name, out, base, CardInfo(task="demo", task_type="causal_lm"))
        names.append(name)
    return names


def add_prompt(registry: Registry, base: str, work: Path, name: str = "soft", n_virtual: int = 4) -> str:
    base_dir = registry.base(base).path
    save_prompt(base_dir, work / name, n_virtual=n_virtual, seed=7)
    registry.register_adapter(name, work / name, base, CardInfo(task="demo", task_type="causal_lm"))
    return name


def add_classifier(registry: Registry, base: str, work: Path, name: str = "sentiment",
                   labels: tuple[str, ...] = ("negative", "positive")) -> str:
    """A LoRA + trained-head classifier, saved the project's way (``modules_to_save=["score"]``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base_dir = registry.base(base).path
    torch.manual_seed(11)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=len(labels))
    model.config.pad_token_id = 0
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="SEQ_CLS", modules_to_save=["score"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if "modules_to_save" in param_name:
                param.normal_()
    peft_model.save_pretrained(str(work / name))
    registry.register_adapter(name, work / name, base, CardInfo(task="sentiment",
                                                                task_type="sequence_classification",
                                                                labels=list(labels)))
    return name


def build_registry(root: Path, adapters: int = 16, extras: bool = True) -> Registry:
    """A registry with base ``tiny`` and ``adapters`` LoRAs (``lora0`` …); with ``extras`` also a soft
    prompt ``soft``, a classifier ``sentiment``, and base ``other`` with its own adapter ``foreign``."""
    registry = Registry(root / "registry")
    work = root / "work"
    registry.add_base("tiny", str(make_chat_base(work / "tiny-base")))
    add_loras(registry, "tiny", work, adapters)
    if extras:
        add_prompt(registry, "tiny", work)
        add_classifier(registry, "tiny", work)
        registry.add_base("other", str(make_chat_base(work / "other-base", seed=5)))
        add_loras(registry, "other", work, 1, prefix="foreign")
    return registry

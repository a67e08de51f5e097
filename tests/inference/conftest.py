"""Tiny bases with a character-level tokenizer, and a registry holding many kinds of adapters."""

from __future__ import annotations

import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from adapterhub_local.registry import CardInfo, Registry

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a shared, loaded machine the threads'
    spin-waits make them an order of magnitude slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def char_tokenizer(chat: bool = True) -> Any:
    """A character-level fast tokenizer: printable ASCII plus <pad>, <s>, </s> (ids 0, 1, 2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in string.printable[:95]:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_llama(path: Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger logits make greedy decoding less tie-prone
        model.lm_head.weight.mul_(8)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def make_bert(path: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, pad_token_id=0)
    BertModel(config).save_pretrained(path)
    char_tokenizer(chat=False).save_pretrained(path)
    return path


def lora_dir(base_dir: Path, out: Path, rank: int, targets: list[str], seed: int, alpha: int | None = None,
             task: str = "CAUSAL_LM", num_labels: int = 0, **extra: Any) -> Path:
    """Save a PEFT LoRA adapter with random non-zero weights (also A and B) and return its directory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if task == "SEQ_CLS":
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=targets,
                        init_lora_weights=False, task_type=task, **extra)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3 / rank ** 0.5)
            elif "modules_to_save" in name and param.requires_grad:
                param.normal_(0, 0.5)
    model.save_pretrained(str(out))
    return out


def prompt_dir(base_dir: Path, out: Path, n_virtual: int, seed: int) -> Path:
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual))
    with torch.no_grad():
        cast(torch.nn.Embedding, model.prompt_encoder["default"].embedding).weight.normal_()
    model.save_pretrained(str(out))
    return out


ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
# name -> (rank, targets); ranks 1..64, different target sets
LORA_SPECS: dict[str, tuple[int, list[str]]] = {
    "r1-q": (1, ["q_proj"]),
    "r2-v": (2, ["v_proj"]),
    "r4-qv": (4, ["q_proj", "v_proj"]),
    "r8-attn": (8, ATTN),
    "r16-mlp": (16, ["gate_proj", "up_proj", "down_proj"]),
    "r32-all": (32, [*ATTN, "gate_proj", "up_proj", "down_proj"]),
    "r64-ko": (64, ["k_proj", "o_proj"]),
}


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """A registry with base ``tiny`` (Llama), base ``enc`` (BERT), seven LoRA adapters, a soft prompt,
    two classifiers. Session-scoped: tests must not modify it."""
    root = tmp_path_factory.mktemp("zoo")
    registry = Registry(root / "registry")
    llama = make_llama(root / "llama")
    registry.add_base("tiny", str(llama))
    for seed, (name, (rank, targets)) in enumerate(LORA_SPECS.items(), start=10):
        registry.register_adapter(name, lora_dir(llama, root / name, rank, targets, seed), "tiny",
                                  CardInfo(task="test", task_type="causal_lm"))
    registry.register_adapter("soft", prompt_dir(llama, root / "soft", 6, 3), "tiny",
                              CardInfo(task="test", task_type="causal_lm"))
    registry.register_adapter(
        "llama-cls", lora_dir(llama, root / "llama-cls", 4, ["q_proj", "v_proj"], 5, task="SEQ_CLS", num_labels=3),
        "tiny", CardInfo(task="cls", task_type="sequence_classification", labels=["neg", "neu", "pos"]))
    bert = make_bert(root / "bert")
    registry.add_base("enc", str(bert))
    registry.register_adapter(
        "bert-cls", lora_dir(bert, root / "bert-cls", 4, ["query", "value"], 6, task="SEQ_CLS", num_labels=2,
                             modules_to_save=["classifier"]),
        "enc", CardInfo(task="sentiment", task_type="sequence_classification", labels=["negative", "positive"]))
    return registry

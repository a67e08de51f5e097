"""Embedding LoRA, trainable tokens and ``modules_to_save`` copies served exactly: swap and merge logits equal
PEFT's (fp32, atol 1e-5), a mixed batch of these kinds with plain-LoRA, soft-prompt and base rows gives each row
its solo answer (dynamic and static decoders), unmerge restores the base bit for bit, swap mode refuses a head
copy with the reason, and an export is the PEFT directory unchanged (PEFT loads it to the same state dict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from adapterhub_local.errors import UnsupportedError
from adapterhub_local.inference import Engine, Request, SamplingParams
from adapterhub_local.registry import CardInfo, Registry
from adapterhub_local.registry.maintenance import export
from tests.inference.conftest import lora_dir, make_llama, prompt_dir


def peft_dir(base_dir: Path, out: Path, seed: int, **config: Any) -> Path:
    """A PEFT LoRA adapter with random weights everywhere (embedding LoRA B, token rows and head copies too)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM", **config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_embedding_B" in name or "trainable_tokens_delta" in name:
                param.normal_(0, 0.5)
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param))
    model.save_pretrained(str(out))
    return out


KINDS: dict[str, dict[str, Any]] = {
    "emb": {"target_modules": ["embed_tokens", "q_proj"]},
    "tokens": {"target_modules": ["v_proj"], "trainable_token_indices": [18, 19, 21, 40]},
    "head": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
}
TEXT = "ef ghn"  # the char tokenizer: ids 14+ are letters, so the listed token ids occur


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("kinds")
    registry = Registry(root / "registry")
    llama = make_llama(root / "llama")
    registry.add_base("tiny", str(llama))
    info = CardInfo(task="test", task_type="causal_lm")
    for k, (name, config) in enumerate(KINDS.items()):
        registry.register_adapter(name, peft_dir(llama, root / name, 10 + k, **config), "tiny", info)
    registry.register_adapter("lora", lora_dir(llama, root / "lora", 4, ["q_proj", "v_proj"], 3), "tiny", info)
    registry.register_adapter("soft", prompt_dir(llama, root / "soft", 4, 4), "tiny", info)
    # The other kinds, so one mixed batch holds every kind the engine serves per row.
    from tests.inference.test_dora import dora_dir

    registry.register_adapter("dora", dora_dir(llama, root / "dora", 2, ["q_proj", "v_proj"], 7), "tiny", info)
    registry.register_adapter("rslora", peft_dir(llama, root / "rslora", 8, target_modules=["k_proj"],
                                                 use_rslora=True), "tiny", info)
    return registry


def peft_logits(registry: Registry, ref: str, ids: list[int], merged: bool = False) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, path = registry.verified_path(ref, "tiny")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(registry.base("tiny").path), path)
    model = model.merge_and_unload() if merged else model
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([ids])).logits[0]


def test_token_ids_are_exercised(zoo: Registry) -> None:
    ids = Engine(zoo, "tiny").runner.encode(Request(prompt=TEXT))
    assert set(KINDS["tokens"]["trainable_token_indices"]) & set(ids)


@pytest.mark.parametrize("ref", ["emb", "tokens"])
def test_swap_logits_match_peft(zoo: Registry, ref: str) -> None:
    engine = Engine(zoo, "tiny")
    ids = engine.runner.encode(Request(prompt=TEXT))
    got = engine.logits([Request(prompt="other", adapter="lora"), Request(prompt=ids, adapter=ref)])[1].logits
    torch.testing.assert_close(got, peft_logits(zoo, ref, ids), atol=1e-5, rtol=0)
    assert not torch.allclose(got, engine.logits([Request(prompt=ids)])[0].logits, atol=1e-3)  # it does change


@pytest.mark.parametrize("ref", ["emb", "tokens", "head"])
def test_merge_logits_match_peft_and_unmerge_is_exact(zoo: Registry, ref: str) -> None:
    engine = Engine(zoo, "tiny", mode="merge")
    before = {k: v.clone() for k, v in engine.runner.model.state_dict().items()}
    modules = dict(engine.runner.model.named_modules())
    ids = engine.runner.encode(Request(prompt=TEXT))
    got = engine.logits([Request(prompt=ids, adapter=ref)])[0].logits
    assert engine.merged == zoo.resolve(ref).ref
    torch.testing.assert_close(got, peft_logits(zoo, ref, ids), atol=1e-5, rtol=0)
    engine.unmerge()
    after = engine.runner.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(dict(engine.runner.model.named_modules())[n] is m for n, m in modules.items())


def test_swap_refuses_a_head_copy_with_the_reason(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny")
    with pytest.raises(UnsupportedError, match=r"lm_head.*mode='merge'"):
        engine.logits([Request(prompt=TEXT, adapter="head")])
    assert engine.pool.tier(zoo.resolve("head").ref) != "device"


@pytest.mark.parametrize("decoder", ["dynamic", "static"])
def test_mixed_batch_rows_equal_solo(zoo: Registry, decoder: str) -> None:
    engine = Engine(zoo, "tiny", decoder=decoder)
    refs = ["emb", "tokens", "lora", "soft", None, "emb", "dora", "rslora", "lora*0.5+rslora*0.5"]
    prompts = [TEXT, "hg fe", "a lora row", "soft row", TEXT, "gh", "a dora row", TEXT, "composed"]
    sampling = SamplingParams(max_new_tokens=6)
    pairs = list(zip(prompts, refs, strict=True))
    batch = engine.generate([Request(prompt=p, adapter=r, sampling=sampling) for p, r in pairs])
    logits = engine.logits([Request(prompt=p, adapter=r) for p, r in zip(prompts, refs, strict=True)])
    for k, (prompt, ref) in enumerate(zip(prompts, refs, strict=True)):
        solo = Engine(zoo, "tiny", decoder=decoder)
        alone = solo.generate([Request(prompt=prompt, adapter=ref, sampling=sampling)])[0]
        assert alone.token_ids == batch[k].token_ids
        torch.testing.assert_close(logits[k].logits, solo.logits([Request(prompt=prompt, adapter=ref)])[0].logits,
                                   atol=1e-5, rtol=0)


def test_eviction_leaves_other_rows_exact(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny")
    ids = engine.runner.encode(Request(prompt=TEXT))
    first = engine.logits([Request(prompt=ids, adapter="tokens")])[0].logits
    engine.load("emb")
    engine.unload("emb")
    engine.unload("tokens")
    torch.testing.assert_close(engine.logits([Request(prompt=ids, adapter="tokens")])[0].logits, first, atol=0, rtol=0)
    base = engine.logits([Request(prompt=ids)])[0].logits
    assert torch.equal(base, Engine(zoo, "tiny").logits([Request(prompt=ids)])[0].logits)


@pytest.mark.parametrize("ref", list(KINDS))
def test_export_is_the_peft_directory_unchanged(zoo: Registry, ref: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = export(zoo, ref, tmp_path / ref)
    _, stored = zoo.verified_path(ref, "tiny")
    assert (out / "adapter_model.safetensors").read_bytes() == (stored / "adapter_model.safetensors").read_bytes()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo.base("tiny").path), out)
    saved = load_file(str(out / "adapter_model.safetensors"))
    from peft import get_peft_model_state_dict

    reloaded = get_peft_model_state_dict(model)
    assert set(reloaded) == set(saved)
    assert all(torch.equal(reloaded[k], saved[k]) for k in saved)


@pytest.mark.parametrize("ref", list(KINDS))
def test_parity_check_passes_on_the_paths_that_serve_each_kind(zoo: Registry, ref: str) -> None:
    from adapterhub_local.check.parity import run_check

    result = run_check(zoo, ref, prompts=2, max_new_tokens=3, record=False)
    assert result.passed and result.max_logit_diff <= 1e-5
    assert ("swap" in result.paths) == (ref != "head") and "merge" in result.paths
    assert result.paths["static_agreement"] == result.paths["dynamic_agreement"] == 1.0


@pytest.mark.parametrize("decoder", ["dynamic", "static"])
def test_open_batch_rows_joining_late_equal_solo(zoo: Registry, decoder: str) -> None:
    """Continuous batching (the server's path): rows of every servable kind join a running batch at different
    steps (the growing cache or the static slab) and each gets its solo tokens."""
    from tests.inference.test_continuous import drive

    engine = Engine(zoo, "tiny", decoder=decoder)
    refs = ["lora", "emb", "soft", "tokens", None, "emb"]
    reqs = [Request(prompt=f"{TEXT} {k}", adapter=r, sampling=SamplingParams(max_new_tokens=5 + k))
            for k, r in enumerate(refs)]
    batch = engine.open_batch(max_wait_steps=0)
    results, _ = drive(batch, {0: [0, 1], 2: [2, 3], 4: [4, 5]}, reqs)
    for k, request in enumerate(reqs):
        assert results[k].token_ids == Engine(zoo, "tiny", decoder=decoder).generate([request])[0].token_ids, k
    batch.close()


def test_the_pool_budgets_embedding_rank_padding_and_compositions_refuse_the_new_kinds(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny")
    emb = engine.pool.resolve("emb")
    adapter = engine.pool.get(emb)
    pair = next(iter(adapter.extras.embeddings.values()))
    assert engine.pool.footprint({emb}) == adapter.nbytes  # alone: no padding
    engine.load("emb")
    assert engine.stats().resident_bytes == adapter.nbytes
    with pytest.raises(UnsupportedError, match="composition adds LoRA pairs only"):
        engine.logits([Request(prompt=TEXT, adapter="emb*0.5+lora*0.5")])
    assert pair.a.shape[1] == engine.runner.vocab_size

"""Prepacked bf16 linears change no bit: the layer against ``nn.Linear`` (shapes, rows, bias, 3-D input), the copy
following every in-place write of the weight (merge, unmerge, row writes through a tied embedding), each case it
must leave to ``F.linear`` (fp32, non-contiguous input, autograd, autocast), and a bf16 engine with packing
against the same engine with it switched off — prompt logits, mixed-batch generation on both decoders, merge and
unmerge — bit for bit."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from adapterhub_local.inference import Engine, Request, SamplingParams, packed_linear
from adapterhub_local.inference.packed_linear import (
    PackedLinear,
    pack_linears,
    packed_bytes,
    packed_linears,
    unavailable_reason,
)
from adapterhub_local.registry import CardInfo, Registry
from tests.inference.conftest import LORA_SPECS, lora_dir, make_llama, prompt_dir

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=f"packing unavailable: {unavailable_reason()}")

SHAPES = [(7, 5), (64, 128), (33, 97), (576, 1536), (1536, 576)]
ROWS = [1, 3, 32, 100]


@pytest.fixture
def packed_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the packed oneDNN calls made while the test runs."""
    calls: list[int] = []
    real = packed_linear._packed_call

    def counting(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, packed, bias)

    monkeypatch.setattr(packed_linear, "_packed_call", counting)
    yield calls


def _linear(d_in: int, d_out: int, bias: bool, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias).to(dtype)


@pytest.mark.parametrize(("d_in", "d_out"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_packed_layer_gives_the_plain_layers_bits(d_in: int, d_out: int, bias: bool,
                                                  packed_calls: list[int]) -> None:
    plain = _linear(d_in, d_out, bias)
    packed = PackedLinear(plain)
    assert packed.weight is plain.weight and packed.bias is plain.bias  # shared, not copied
    with torch.no_grad():
        for rows in ROWS:
            x = torch.randn(rows, d_in).to(torch.bfloat16)
            assert torch.equal(packed(x), plain(x))
        x3 = torch.randn(4, 9, d_in).to(torch.bfloat16)  # [batch, positions, features]
        assert torch.equal(packed(x3), plain(x3))
    assert len(packed_calls) == len(ROWS) + 1


def test_the_copy_follows_every_in_place_write_of_the_weight(packed_calls: list[int]) -> None:
    plain = _linear(64, 96, bias=True)
    packed = PackedLinear(plain)
    x = torch.randn(8, 64).to(torch.bfloat16)
    with torch.no_grad():
        before = packed(x)
        original = plain.weight.detach().clone()
        plain.weight.add_(0.25)  # what a merge does: an in-place write to the shared Parameter
        assert torch.equal(packed(x), nn.functional.linear(x, plain.weight, plain.bias))
        assert not torch.equal(packed(x), before)
        plain.weight.copy_(original)  # an unmerge: the original bytes back
        assert torch.equal(packed(x), before)
        plain.weight[3].zero_()  # a write through a view of the weight
        assert torch.equal(packed(x), nn.functional.linear(x, plain.weight, plain.bias))
        plain.bias.mul_(2)  # the bias is read at each call, never packed
        assert torch.equal(packed(x), nn.functional.linear(x, plain.weight, plain.bias))
    assert len(packed_calls) == 6


def test_data_writes_need_an_explicit_repack() -> None:
    plain = _linear(32, 48, bias=False)
    packed = PackedLinear(plain)
    x = torch.randn(4, 32).to(torch.bfloat16)
    with torch.no_grad():
        packed(x)
        plain.weight.data.mul_(-1)  # bypasses the version counter: the documented exception
        packed.repack()
        assert torch.equal(packed(x), nn.functional.linear(x, plain.weight))


@pytest.mark.parametrize("case", ["fp32", "non-contiguous", "autograd", "autocast", "suspended"])
def test_what_the_packed_call_does_not_cover_is_plain_linear(case: str, packed_calls: list[int]) -> None:
    plain = _linear(48, 40, bias=True, dtype=torch.float32 if case == "fp32" else torch.bfloat16)
    packed = PackedLinear(plain)
    dtype = plain.weight.dtype
    x = torch.randn(6, 48).to(dtype)
    if case == "non-contiguous":  # F.linear's own bits depend on the layout here: keep its call
        x = torch.randn(48, 6).to(dtype).T
    if case == "autograd":
        x.requires_grad_(True)
        out = packed(x)
        out.float().sum().backward()
        assert x.grad is not None and plain.weight.grad is not None
        assert torch.equal(out, plain(x))
    elif case == "autocast":
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(packed(x), plain(x))
    elif case == "suspended":  # the benchmark's baseline
        with torch.no_grad(), packed_linear.suspended():
            assert torch.equal(packed(x), plain(x))
    else:
        with torch.no_grad():
            assert torch.equal(packed(x), plain(x))
    assert packed_calls == []


def test_a_deep_copy_packs_its_own_weight() -> None:
    plain = _linear(32, 32, bias=False)
    packed = PackedLinear(plain)
    x = torch.randn(5, 32).to(torch.bfloat16)
    with torch.no_grad():
        packed(x)
        twin = copy.deepcopy(packed)  # what merge mode does to a module it replaces (modules_to_save)
        twin.weight.mul_(3)
        assert torch.equal(twin(x), nn.functional.linear(x, twin.weight))
        assert torch.equal(packed(x), nn.functional.linear(x, plain.weight))


def _tied_llama(path: Path) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model: torch.nn.Module = LlamaForCausalLM(config)
    return model.to(torch.bfloat16).eval()


def test_pack_linears_keeps_tied_weights_tied(tmp_path: Path) -> None:
    model = _tied_llama(tmp_path)
    ids = torch.tensor([[5, 17, 33, 2, 64]])
    with torch.no_grad():
        plain_logits = model(ids).logits
        count = pack_linears(model)
        assert count == sum(isinstance(m, PackedLinear) for m in model.modules()) == 7 + 1  # 7 per layer + head
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert torch.equal(model(ids).logits, plain_logits)
        model.model.embed_tokens.weight[33].fill_(0.5)  # a trainable-token write: the embedding's row, the head's
        expected = nn.functional.linear(model.model(ids).last_hidden_state, model.model.embed_tokens.weight)
        assert torch.equal(model(ids).logits, expected)
    weights = sum(m.weight.numel() * 2 for m in model.modules() if isinstance(m, PackedLinear))
    assert packed_bytes(model) == weights


def test_packed_linears_block_puts_the_original_modules_back(tmp_path: Path) -> None:
    model = _tied_llama(tmp_path)
    ids = torch.tensor([[5, 17, 33, 2, 64]])
    head = model.lm_head
    hooked = model.model.layers[0].mlp.down_proj
    hooked.register_forward_hook(lambda module, args, out: out * 2)  # a hook a replacement would not run
    before = dict(model.named_modules())
    with torch.no_grad():
        plain_logits = model(ids).logits
        with packed_linears(model) as count:
            assert count == 7 and isinstance(model.lm_head, PackedLinear) and model.lm_head.weight is head.weight
            assert model.model.layers[0].mlp.down_proj is hooked
            assert torch.equal(model(ids).logits, plain_logits)
        assert dict(model.named_modules()) == before
        assert torch.equal(model(ids).logits, plain_logits)
    with pytest.raises(KeyError), packed_linears(model):  # put back on the way out of an error too
        raise KeyError("boom")
    assert dict(model.named_modules()) == before


def test_pack_linears_leaves_fp32_models_and_the_switched_off_alone(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    fp32 = _tied_llama(tmp_path).float()
    assert pack_linears(fp32) == 0 and packed_bytes(fp32) == 0
    monkeypatch.setenv(packed_linear.SWITCH_ENV, "off")
    assert unavailable_reason() == f"disabled by {packed_linear.SWITCH_ENV}"
    assert pack_linears(_tied_llama(tmp_path)) == 0


# --------------------------------------------------------------------------- the engine, packed vs switched off
@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """A Llama base of hidden 96 with three LoRA adapters (ranks 4–32, attention and MLP targets) and a soft
    prompt."""
    root = tmp_path_factory.mktemp("packed")
    registry = Registry(root / "registry")
    llama = make_llama(root / "llama", hidden=96)
    registry.add_base("tiny", str(llama))
    info = CardInfo(task="test", task_type="causal_lm")
    for seed, name in enumerate(("r4-qv", "r16-mlp", "r32-all"), start=20):
        rank, targets = LORA_SPECS[name]
        registry.register_adapter(name, lora_dir(llama, root / name, rank, targets, seed), "tiny", info)
    registry.register_adapter("soft", prompt_dir(llama, root / "soft", 4, 3), "tiny", info)
    return registry


def _engine(registry: Registry, packed: bool, monkeypatch: pytest.MonkeyPatch, **options: Any) -> Engine:
    with monkeypatch.context() as patch:
        if not packed:
            patch.setenv(packed_linear.SWITCH_ENV, "off")
        engine = Engine(registry, "tiny", dtype=torch.bfloat16, **options)
    linears = [m for m in engine.runner.model.modules() if type(m) in (nn.Linear, PackedLinear)]
    assert all(isinstance(m, PackedLinear) for m in linears) == packed and linears
    assert (engine.packed_weight_bytes > 0) == packed
    return engine


PROMPTS = ["the cat sat", "on a mat and then", "x", "hello there, friend"]
ADAPTERS = ["r4-qv", "r16-mlp", None, "soft", "r32-all", "r4-qv"]


def _requests(new_tokens: int = 12) -> list[Request]:
    return [Request(prompt=PROMPTS[i % len(PROMPTS)], adapter=ref,
                    sampling=SamplingParams(max_new_tokens=new_tokens, stop_at_eos=False))
            for i, ref in enumerate(ADAPTERS)]


@pytest.mark.parametrize("decoder", ["dynamic", "static"])
def test_packed_engine_generates_the_switched_off_engines_tokens(
        registry: Registry, decoder: str, monkeypatch: pytest.MonkeyPatch, packed_calls: list[int]) -> None:
    texts = {}
    for packed in (True, False):
        engine = _engine(registry, packed, monkeypatch, decoder=decoder)
        results = engine.generate(_requests())
        texts[packed] = [r.token_ids for r in results]
        if packed:
            assert any(rows == len(ADAPTERS) for rows in packed_calls)  # the mixed decode steps went packed
    assert texts[True] == texts[False]


def test_packed_engine_logits_merge_and_unmerge_bit_for_bit(registry: Registry,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    packed = _engine(registry, True, monkeypatch, mode="merge")
    plain = _engine(registry, False, monkeypatch, mode="merge")

    def logits(engine: Engine, ref: str | None) -> list[torch.Tensor]:
        if ref is None:
            engine.unmerge()
        else:
            engine.merge(ref)
        results = [r.logits for r in engine.logits([Request(prompt=p, adapter=ref) for p in PROMPTS])]
        assert engine.merged == (None if ref is None else f"{ref}@1")  # served merged, not in swap mode
        return results

    base = logits(packed, None)
    for ref in ("r32-all", "r16-mlp", None, "r4-qv", None):  # merge, re-merge another, unmerge, again
        got, want = logits(packed, ref), logits(plain, ref)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), ref
        if ref is None:
            assert all(torch.equal(g, b) for g, b in zip(got, base, strict=True))
        else:
            assert not all(torch.equal(g, b) for g, b in zip(got, base, strict=True))

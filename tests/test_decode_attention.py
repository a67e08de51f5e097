"""decode_attention: one query token on a CPU goes to the C kernel in bf16 (at least as close to the exact attention
as torch's, each row its own) or to torch's packed call (sdpa's bits); everything else to sdpa, unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from adapterhub_local import decode_attention as da
from adapterhub_local.inference import cpu_lora_kernel
from adapterhub_local.models import load_base_model
from adapterhub_local.registry import Registry
from tests.conftest import make_tiny_llama


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
          **kwargs: Any) -> torch.Tensor:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups = query.shape[1] // key.shape[1]  # type: ignore[assignment]
    out: torch.Tensor = sdpa_attention_forward(module, query, key, value, mask, **kwargs)[0]
    return out


def _qkv(batch: int, heads: int, kv_heads: int, queries: int, keys: int, dtype: torch.dtype,
         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, 16, generator=generator).to(dtype)
    k = torch.randn(batch, kv_heads, keys, 16, generator=generator).to(dtype)
    v = torch.randn(batch, kv_heads, keys, 16, generator=generator).to(dtype)
    return q, k, v


def _masks(batch: int, heads: int, keys: int) -> dict[str, torch.Tensor | None]:
    """The mask forms transformers hands an attention function: none, boolean per row or per head, additive,
    and one wider than the keys (a static cache's mask before slicing)."""
    generator = torch.Generator().manual_seed(1)
    allowed = torch.rand(batch, 1, 1, keys, generator=generator) > 0.3
    allowed[..., -1] = True  # the query attends at least to itself
    per_head = torch.rand(batch, heads, 1, keys, generator=generator) > 0.3
    per_head[..., -1] = True
    additive = torch.zeros(batch, 1, 1, keys).masked_fill(~allowed, torch.finfo(torch.float32).min)
    wider = torch.cat([allowed, torch.zeros(batch, 1, 1, 5, dtype=torch.bool)], dim=-1)
    return {"none": None, "row": allowed, "head": per_head, "additive": additive, "wider": wider}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("keys", [1, 9, 100, 200])
def test_an_unpadded_decode_step_in_half_precision_is_bit_identical_to_sdpa(dtype: torch.dtype, keys: int) -> None:
    q, k, v = _qkv(6, 9, 3, 1, keys, dtype)
    ours, _ = da.decode_attention_forward(torch.nn.Module(), q, k, v, None, scaling=0.25)
    assert ours.shape == (6, 1, 9, 16)
    assert torch.equal(ours, _sdpa(q, k, v, None, scaling=0.25))


@pytest.mark.parametrize("mask_kind", ["none", "row", "head", "additive", "wider"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_mask_form_gives_sdpa_s_answer(mask_kind: str, dtype: torch.dtype) -> None:
    q, k, v = _qkv(5, 8, 2, 1, 40, dtype)
    mask = _masks(5, 8, 40)[mask_kind]
    ours, _ = da.decode_attention_forward(torch.nn.Module(), q, k, v, mask, scaling=None)
    reference_mask = None if mask is None else mask[..., :40]
    if reference_mask is not None and reference_mask.is_floating_point():
        reference_mask = reference_mask.double()
    reference = _sdpa(q.double(), k.double(), v.double(), reference_mask, scaling=None)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.double(), reference, atol=tolerance, rtol=0)
    if mask is not None and mask_kind != "wider":  # sdpa packs masked steps itself: the same call, the same bits
        assert torch.equal(ours, _sdpa(q, k, v, mask, scaling=None))


@pytest.mark.parametrize("case", ["prefill", "dropout", "softcap", "sinks", "equal_heads", "meta"])
def test_what_the_packed_call_does_not_cover_goes_to_sdpa_unchanged(case: str, monkeypatch: pytest.MonkeyPatch
                                                                     ) -> None:
    import transformers.integrations.sdpa_attention as sdpa_module

    seen: list[str] = []

    def spy(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        seen.append(case)
        return torch.zeros(1), None

    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", spy)
    q, k, v = _qkv(2, 4, 2, 3 if case == "prefill" else 1, 8, torch.float32)
    kwargs: dict[str, Any] = {"dropout": 0.1 if case == "dropout" else 0.0}
    if case == "softcap":
        kwargs["softcap"] = 30.0
    if case == "sinks":
        kwargs["s_aux"] = torch.zeros(4)
    if case == "equal_heads":
        q, k, v = _qkv(2, 4, 4, 1, 8, torch.float32)
    if case == "meta":
        q, k, v = q.to("meta"), k.to("meta"), v.to("meta")
    da.decode_attention_forward(torch.nn.Module(), q, k, v, None, **kwargs)
    assert seen == [case]


def test_a_decode_step_takes_the_packed_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of the module: no ``enable_gqa`` call with one query row per head."""
    calls: list[tuple[tuple[int, ...], bool]] = []
    real = F.scaled_dot_product_attention

    def spy(query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append((tuple(query.shape), bool(kwargs.get("enable_gqa", False))))
        return real(query, *args, **kwargs)

    monkeypatch.setattr(da.F, "scaled_dot_product_attention", spy)
    q, k, v = _qkv(3, 9, 3, 1, 20, torch.bfloat16)
    da.decode_attention_forward(torch.nn.Module(), q, k, v, None)
    assert calls == [((3, 3, 3, 16), False)]


@pytest.fixture
def tiny(tmp_path: Path) -> Registry:
    registry = Registry(tmp_path / "registry")
    registry.add_base("tl", str(make_tiny_llama(tmp_path / "tl", hidden=64)))
    return registry


def test_a_causal_base_loaded_on_a_cpu_attends_with_it_and_other_kinds_keep_sdpa(tiny: Registry) -> None:
    causal: Any = load_base_model(tiny.base("tl"))
    assert causal.config._attn_implementation == da.DECODE_ATTENTION
    feature: Any = load_base_model(tiny.base("tl"), task_type="feature")
    assert feature.config._attn_implementation == "sdpa"


def test_only_sdpa_models_are_switched() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    eager: Any = LlamaForCausalLM._from_config(config, attn_implementation="eager")
    assert not da.use_decode_attention(eager)
    assert eager.config._attn_implementation == "eager"
    assert not da.use_decode_attention(torch.nn.Linear(2, 2))
    sdpa: Any = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    assert da.use_decode_attention(sdpa)
    assert da.use_decode_attention(sdpa) is False  # already switched: nothing to do


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_generate_gives_sdpa_s_tokens_padded_or_not(tiny: Registry, dtype: torch.dtype) -> None:
    ours: Any = load_base_model(tiny.base("tl"), dtype=dtype)
    theirs: Any = load_base_model(tiny.base("tl"), dtype=dtype)
    theirs.set_attn_implementation("sdpa")
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 96, (4, 12), generator=generator)
    padded = torch.ones_like(ids)
    padded[1, :5] = 0
    padded[3, :2] = 0
    for mask in (torch.ones_like(ids), padded):
        kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 24, "do_sample": False,
                  "pad_token_id": 0}
        assert torch.equal(ours.generate(**kwargs), theirs.generate(**kwargs))


def test_a_model_saved_from_it_names_no_implementation(tiny: Registry, tmp_path: Path) -> None:
    model: Any = load_base_model(tiny.base("tl"))
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text(encoding="utf-8"))
    assert da.DECODE_ATTENTION not in json.dumps(config)


# --------------------------------------------------------------------------- the C kernel (bf16 decode steps)
needs_kernel = pytest.mark.skipif(cpu_lora_kernel.attention_function() is None,
                                  reason=f"no CPU kernels here: {cpu_lora_kernel.unavailable_reason()}")


def _cache_view(batch: int, kv_heads: int, keys: int, room: int, dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Keys and values as the growing cache hands them over: the first ``keys`` columns of a larger buffer."""
    generator = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, kv_heads, room, dim, generator=generator).to(torch.bfloat16)
    v = torch.randn(batch, kv_heads, room, dim, generator=generator).to(torch.bfloat16)
    return k[:, :, :keys], v[:, :, :keys]


def _exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    mask = None if mask is None else mask[..., : k.shape[2]]
    out = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(group, 1),
                                         v.double().repeat_interleave(group, 1), attn_mask=mask)
    return out.transpose(1, 2)


@needs_kernel
@pytest.mark.parametrize("keys", [1, 9, 100, 333])
@pytest.mark.parametrize("mask_kind", ["none", "row", "wider", "one_row_for_all"])
def test_the_kernel_is_at_least_as_close_to_exact_attention_as_torch(keys: int, mask_kind: str) -> None:
    batch, heads, kv_heads, dim = 6, 9, 3, 64
    q = torch.randn(batch, heads, 1, dim, generator=torch.Generator().manual_seed(keys)).to(torch.bfloat16)
    k, v = _cache_view(batch, kv_heads, keys, keys + 17, dim, seed=keys)
    masks = _masks(batch, heads, keys)
    mask = {"none": None, "row": masks["row"], "wider": masks["wider"],
            "one_row_for_all": None if masks["row"] is None else masks["row"][:1]}[mask_kind]
    ours = da.kernel_decode(q, k, v, mask, None)
    assert ours is not None and ours.shape == (batch, 1, heads, dim)
    with cpu_lora_kernel.attention_suspended():
        torch_call = da.packed_decode(q, k, v, mask, None)
    exact = _exact(q, k, v, mask)
    ours_error, torch_error = (ours.double() - exact).abs(), (torch_call.double() - exact).abs()
    assert ours_error.mean() <= torch_error.mean() * 1.02 + 1e-6
    assert ours_error.max() <= max(2 * torch_error.max().item(), 1e-2)


@needs_kernel
def test_each_row_of_a_batch_gets_its_solo_answer() -> None:
    batch, heads, kv_heads, dim = 7, 8, 2, 32
    q = torch.randn(batch, heads, 1, dim, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    k, v = _cache_view(batch, kv_heads, 50, 80, dim, seed=5)
    mask = _masks(batch, heads, 50)["row"]
    assert mask is not None
    together = da.kernel_decode(q, k, v, mask, 0.3)
    assert together is not None
    for row in range(batch):
        alone = da.kernel_decode(q[row : row + 1], k[row : row + 1], v[row : row + 1], mask[row : row + 1], 0.3)
        assert alone is not None and torch.equal(alone, together[row : row + 1])


@needs_kernel
@pytest.mark.parametrize("case", ["meta", "fp32", "fp16", "per_head_mask", "additive_mask", "nothing_to_attend",
                                  "autograd", "query_not_contiguous", "values_strided_differently", "head_too_wide",
                                  "suspended", "traced"])
def test_what_the_kernel_does_not_take_goes_to_torch(case: str) -> None:
    batch, heads, kv_heads, keys = 4, 6, 2, 12
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(case, torch.bfloat16)
    q, k, v = _qkv(batch, heads, kv_heads, 1, keys, dtype)
    masks = _masks(batch, heads, keys)
    mask = {"per_head_mask": masks["head"], "additive_mask": masks["additive"]}.get(case)
    if case == "nothing_to_attend":
        mask = torch.ones(batch, 1, 1, keys, dtype=torch.bool)
        mask[2] = False
    if case == "autograd":
        q.requires_grad_(True)
    if case == "query_not_contiguous":
        q = torch.randn(batch, heads, 1, 32).to(dtype)[..., :16]
    if case == "meta":  # not CPU memory: never handed to C
        q, k, v = q.to("meta"), k.to("meta"), v.to("meta")
    if case == "head_too_wide":  # past the kernel's buffers (head size 256)
        generator = torch.Generator().manual_seed(2)
        q, k, v = (torch.randn(batch, h, n, 272, generator=generator).to(dtype)
                   for h, n in ((heads, 1), (kv_heads, keys), (kv_heads, keys)))
    if case == "values_strided_differently":
        v = v.contiguous().transpose(2, 3).contiguous().transpose(2, 3)
    if case == "suspended":
        with cpu_lora_kernel.attention_suspended():
            assert da.kernel_decode(q, k, v, mask, None) is None
        return
    if case == "traced":
        from torch.fx.experimental.proxy_tensor import make_fx

        seen: list[torch.Tensor | None] = []

        def traced(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            seen.append(da.kernel_decode(a, b, c, None, None))
            return a

        make_fx(traced)(q, k, v)
        assert seen == [None]
        return
    assert da.kernel_decode(q, k, v, mask, None) is None


def test_the_engine_opts_into_the_kernel_and_training_models_do_not(tiny: Registry,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterhub_local.inference import Engine, Request, SamplingParams

    answered: list[bool] = []
    real = da.kernel_decode

    def spy(*args: Any) -> torch.Tensor | None:
        answer = real(*args)
        answered.append(answer is not None)
        return answer

    monkeypatch.setattr(da, "kernel_decode", spy)
    engine = Engine(tiny, "tl", dtype=torch.bfloat16)
    assert engine.runner.model.config._attn_implementation == da.KERNEL_ATTENTION
    engine.generate([Request(prompt=[5, 6, 7], sampling=SamplingParams(max_new_tokens=4, stop_at_eos=False))])
    assert len(answered) == 3 * 2  # three decode steps, two layers
    assert all(answered) == (cpu_lora_kernel.attention_function() is not None)
    answered.clear()
    model: Any = load_base_model(tiny.base("tl"), dtype=torch.bfloat16)  # what training and evaluation load
    assert model.config._attn_implementation == da.DECODE_ATTENTION
    model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert answered == []
    assert da.use_decode_attention(model, kernel=True) and model.config._attn_implementation == da.KERNEL_ATTENTION
    assert da.use_decode_attention(model) and model.config._attn_implementation == da.DECODE_ATTENTION

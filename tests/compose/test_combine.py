"""``combine``: the exact ``cat`` equals PEFT's and the weighted sum of the deltas; the other methods run through
PEFT and are registered with their lineage; every bad combination is refused with its reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from adapterhub_local.compose.combine import CombineOptions, combine
from adapterhub_local.errors import (
    ConfigError,
    FingerprintMismatchError,
    InvalidReferenceError,
    UnsupportedError,
)
from adapterhub_local.lora import lora_pairs
from adapterhub_local.registry import Registry
from tests.conftest import make_tiny_llama
from tests.peft_factory import save_lora

IDS = torch.tensor([[1, 5, 9, 13, 2, 7, 40, 3]])


def _base(registry: Registry) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(registry.base("tiny").path).eval()


def _peft_cat_logits(registry: Registry, refs: list[str], weights: list[float]) -> tuple[torch.Tensor, Any]:
    from peft import PeftModel

    paths = [registry.path_of(registry.resolve(r)) for r in refs]
    model = PeftModel.from_pretrained(_base(registry), str(paths[0]), adapter_name="p0")
    for i, path in enumerate(paths[1:], 1):
        model.load_adapter(str(path), adapter_name=f"p{i}")
    model.add_weighted_adapter([f"p{i}" for i in range(len(refs))], weights, "c", combination_type="cat")
    model.set_adapter("c")
    with torch.no_grad():
        return model(IDS).logits, model


def _stored_logits(registry: Registry, ref: str) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base(registry), str(registry.path_of(registry.resolve(ref)))).eval()
    with torch.no_grad():
        return model(IDS).logits


def test_cat_equals_peft_add_weighted_adapter(composed_registry: Registry) -> None:
    card = combine(composed_registry, ["ta", "tb"], [0.7, 0.3], "mix")
    ours = _stored_logits(composed_registry, card.ref)
    theirs, peft_model = _peft_cat_logits(composed_registry, ["ta", "tb"], [0.7, 0.3])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert card.rank == 6 and card.alpha == 6  # Σ rᵢ, scale folded in
    # the stored tensors are PEFT's, entry for entry
    from peft import get_peft_model_state_dict

    peft_state = get_peft_model_state_dict(peft_model, adapter_name="c")
    stored = composed_registry.load_adapter(card.ref).tensors
    assert set(stored) == set(peft_state)
    for key, value in peft_state.items():
        assert torch.equal(stored[key], value), key
    # and it changes the base's answer (the test can fail)
    with torch.no_grad():
        assert not torch.allclose(ours, _base(composed_registry)(IDS).logits, atol=1e-4)


def test_cat_is_the_weighted_sum_of_the_deltas(composed_registry: Registry) -> None:
    weights = [0.7, -0.4]
    child = composed_registry.load_adapter(combine(composed_registry, ["ta", "tb"], weights, "mix").ref)
    parents = [composed_registry.load_adapter(r) for r in ("ta", "tb")]
    by_hand: dict[str, torch.Tensor] = {}
    for parent, weight in zip(parents, weights, strict=True):
        for module, pair in lora_pairs(parent.tensors, parent.config).items():
            by_hand[module] = by_hand.get(module, 0) + weight * pair.delta()
    combined = lora_pairs(child.tensors, child.config)
    assert set(combined) == set(by_hand) == {f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "qkv"}
    for module, delta in by_hand.items():
        torch.testing.assert_close(combined[module].delta(), delta, rtol=0, atol=1e-6)


def test_card_names_every_parent_method_and_params(composed_registry: Registry) -> None:
    card = combine(composed_registry, ["ta@1", "tc"], [0.5, 0.5], "mix",
                   CombineOptions(method="dare_ties", density=0.5, seed=7))
    ta, tc = composed_registry.resolve("ta"), composed_registry.resolve("tc")
    assert card.composition == {
        "method": "dare_ties", "params": {"density": 0.5, "seed": 7},
        "parents": [{"name": "ta", "version": 1, "content_hash": ta.content_hash, "weight": 0.5},
                    {"name": "tc", "version": 1, "content_hash": tc.content_hash, "weight": 0.5}]}
    again = combine(composed_registry, ["ta", "tc"], [0.5, 0.5], "mix", CombineOptions("dare_ties", density=0.5,
                                                                                        seed=7))
    other = combine(composed_registry, ["ta", "tc"], [0.5, 0.5], "mix", CombineOptions("dare_ties", density=0.5,
                                                                                        seed=8))
    assert again.weights_sha256 == card.weights_sha256  # the seed fixes DARE's random drops
    assert other.weights_sha256 != card.weights_sha256


def test_svd_at_full_rank_keeps_the_sum(composed_registry: Registry) -> None:
    cat = combine(composed_registry, ["ta", "tb"], [0.7, 0.3], "mix")
    svd = combine(composed_registry, ["ta", "tb"], [0.7, 0.3], "mix", CombineOptions("svd", rank=6))
    low = combine(composed_registry, ["ta", "tb"], [0.7, 0.3], "mix", CombineOptions("svd", rank=1))
    assert svd.composition is not None and svd.composition["params"] == {"rank": 6}
    exact = _stored_logits(composed_registry, cat.ref)
    torch.testing.assert_close(_stored_logits(composed_registry, svd.ref), exact, rtol=0, atol=1e-4)
    assert not torch.allclose(_stored_logits(composed_registry, low.ref), exact, atol=1e-4)


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear"])
def test_peft_methods_register(composed_registry: Registry, method: str) -> None:
    options = CombineOptions(method, density=None if method == "linear" else 0.6)
    card = combine(composed_registry, ["ta", "tc"], [0.6, 0.4], f"m-{method}", options)
    assert card.kind == "lora" and card.rank == 4
    assert composed_registry.load_adapter(card.ref).tensors  # admitted and loadable


def test_bad_combinations_are_refused(composed_registry: Registry, tmp_path: Path) -> None:
    registry = composed_registry
    cases: list[tuple[list[str], list[float], CombineOptions, type[Exception], str]] = [
        (["ta", "sp"], [1, 1], CombineOptions(), UnsupportedError, "soft prompt"),
        (["ta", "tb"], [1, float("nan")], CombineOptions(), ConfigError, "not finite"),
        (["ta", "tb"], [1, 0], CombineOptions(), ConfigError, "adds nothing"),
        (["ta", "tb"], [1], CombineOptions(), ConfigError, "1 weight(s) for 2"),
        (["ta"], [1], CombineOptions(), ConfigError, "give 2 to"),
        (["ta", "tc"], [1, -1], CombineOptions("ties", density=0.5), ConfigError, "negative weight"),
        (["ta", "tc"], [1, 1], CombineOptions("ties"), ConfigError, "needs --density"),
        (["ta", "tc"], [1, 1], CombineOptions("cat", rank=3), ConfigError, "--rank applies to svd"),
        (["ta", "tc"], [1, 1], CombineOptions("mean"), ConfigError, "not one of"),
        (["ta", "tb"], [1, 1], CombineOptions("linear"), UnsupportedError, "same r"),
        (["ta", "ta@1"], [1, 1], CombineOptions(), InvalidReferenceError, "more than once"),
    ]
    for refs, weights, options, error, text in cases:
        with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
            combine(registry, refs, [float(w) for w in weights], "bad", options)
    registry.add_base("other", str(make_tiny_llama(tmp_path / "other", seed=9)))
    save_lora(registry.base("other").path, tmp_path / "oa", seed=4)
    registry.register_adapter("oa", tmp_path / "oa", "other")
    with pytest.raises(FingerprintMismatchError, match="combine adapters of one base"):
        combine(registry, ["ta", "oa"], [1.0, 1.0], "bad")
    assert "bad" not in registry.adapter_names()  # nothing published by any refusal

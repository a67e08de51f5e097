"""LoRA-family kinds trained from a recipe: ``method.use_dora`` trains DoRA, the registered version carries its
magnitudes, and the engine (swap and merge) reproduces the trained model's logits; likewise an embedding LoRA
(``target_modules`` naming the embedding), trainable tokens and an ``lm_head`` copy (merge only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterhub_local.inference import Engine, Request
from adapterhub_local.registry import Registry
from adapterhub_local.train import runner
from adapterhub_local.train.checks import check
from tests.train.conftest import build_recipe, gen_raw


def test_a_dora_recipe_trains_registers_and_serves_exactly(tmp_path: Path, llama_tok_registry: Registry,
                                                           gen_data: Path) -> None:
    recipe = build_recipe(gen_raw(gen_data, tmp_path / "runs", use_dora=True))
    result = runner.run(recipe, check(recipe), llama_tok_registry, progress=False)
    assert result.card is not None and result.model is not None
    loaded = llama_tok_registry.load_adapter(result.card.ref)
    assert loaded.config["use_dora"] is True
    assert sum(k.endswith("lora_magnitude_vector") for k in loaded.tensors) == 2 * 2  # 2 layers × q, v
    ids = torch.randint(5, 60, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        trained = result.model.eval()(input_ids=torch.tensor([ids])).logits[0].float()
    for mode in ("swap", "merge"):
        engine = Engine(llama_tok_registry, "tllama", mode=mode)
        got = engine.logits([Request(prompt=ids, adapter=result.card.ref)])[0].logits
        torch.testing.assert_close(got, trained, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora", "eva", "gaussian"])
def test_each_init_is_stored_on_the_unchanged_base_and_reproduces_the_trained_model(
        tmp_path: Path, llama_tok_registry: Registry, gen_data: Path, init: str) -> None:
    from peft import PeftModel

    from adapterhub_local.models import load_base_model

    recipe = build_recipe(gen_raw(gen_data, tmp_path / "runs", init=init))
    result = runner.run(recipe, check(recipe), llama_tok_registry, progress=False)
    assert result.card is not None and result.model is not None
    converted = init in ("pissa", "olora")
    assert result.card.rank == (8 if converted else 4)  # PiSSA/OLoRA: ΔW = B·A - B0·A0 has rank 2r
    assert result.card.recipe["method"]["init"] == init
    assert ("rank 8 on the unchanged base" in (result.card.extra["method_note"] or "")) == converted
    ids = torch.randint(5, 60, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        trained = result.model.eval()(input_ids=torch.tensor([ids])).logits[0].float()
    _, path = llama_tok_registry.verified_path(result.card.ref, "tllama")
    clean = load_base_model(llama_tok_registry.base("tllama"))
    reloaded = PeftModel.from_pretrained(clean, str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=torch.tensor([ids])).logits[0], trained, atol=1e-5, rtol=0)
    for mode in ("swap", "merge"):
        engine = Engine(llama_tok_registry, "tllama", mode=mode)
        got = engine.logits([Request(prompt=ids, adapter=result.card.ref)])[0].logits
        torch.testing.assert_close(got, trained, atol=1e-5, rtol=0)


def test_eva_initialises_a_from_the_activations_svd(tmp_path: Path, llama_tok_registry: Registry,
                                                   gen_data: Path) -> None:
    """EVA's A rows are the top right-singular vectors of each module's inputs: orthonormal (Kaiming A is not)."""
    from adapterhub_local.models import load_base_model
    from adapterhub_local.train.methods import apply_method, initialize_eva

    recipe = build_recipe(gen_raw(gen_data, tmp_path / "runs", init="eva"))
    record = llama_tok_registry.base("tllama")
    trained = apply_method(load_base_model(record), recipe, record.path)
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(5, 60, (4, 12), generator=generator),
                "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(4)]
    initialize_eva(trained, batches)
    a_matrices = [p for n, p in trained.model.named_parameters() if "lora_A" in n]
    assert a_matrices
    for a in a_matrices:
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("method", "needle"), [({"init": "pissa", "use_dora": True}, "DoRA"),
                                                 ({"init": "olora", "name": "qlora"}, "4-bit base"),
                                                 ({"init": "loftq"}, "method.init")])
def test_inits_that_cannot_be_stored_exactly_are_refused_by_the_recipe_check(tmp_path: Path, gen_data: Path,
                                                                            method: dict[str, object],
                                                                            needle: str) -> None:
    from adapterhub_local.config import parse_recipe

    _, problems = parse_recipe(gen_raw(gen_data, tmp_path / "runs", **method))
    assert any(needle in p for p in problems), problems


@pytest.mark.parametrize("method", [{"use_dora": True}, {"init": "pissa"}, {"init": "eva"}])
def test_a_concurrent_sweep_refuses_what_its_joint_plain_lora_cannot_train(
        tmp_path: Path, llama_tok_registry: Registry, gen_data: Path, method: dict[str, object]) -> None:
    from adapterhub_local.errors import UnsupportedError
    from adapterhub_local.sweep.driver import run_sweep
    from adapterhub_local.sweep.plan import SweepConfig

    recipe = build_recipe(gen_raw(gen_data, tmp_path / "runs", **method))
    config = SweepConfig(ranks=[1, 2], mode="concurrent", sweep_id="sw", e2e_metrics=False)
    with pytest.raises(UnsupportedError, match="concurrent sweeps train plain LoRA"):
        run_sweep(llama_tok_registry, recipe, config, progress=False, log=lambda _: None)


EMBEDDING_RECIPES: dict[str, dict[str, object]] = {
    "embedding LoRA": {"target_modules": ["q_proj", "embed_tokens"]},
    "trainable tokens": {"trainable_tokens": [5, 6, 7, 8, 20, 30]},
    "lm_head copy": {"modules_to_save": ["lm_head"]},
}
STORED_AS = {"embedding LoRA": "embed_tokens.lora_embedding_B", "trainable tokens": "trainable_tokens_delta",
             "lm_head copy": "base_model.model.lm_head.weight"}


@pytest.mark.parametrize("kind", sorted(EMBEDDING_RECIPES))
def test_embedding_and_module_recipes_train_register_and_serve_exactly(
        tmp_path: Path, llama_tok_registry: Registry, gen_data: Path, kind: str) -> None:
    from adapterhub_local.errors import UnsupportedError

    recipe = build_recipe(gen_raw(gen_data, tmp_path / "runs", **EMBEDDING_RECIPES[kind]))
    result = runner.run(recipe, check(recipe), llama_tok_registry, progress=False)
    assert result.card is not None and result.model is not None
    stored = llama_tok_registry.load_adapter(result.card.ref).tensors
    assert [k for k in stored if k.endswith(STORED_AS[kind])], sorted(stored)
    ids = torch.randint(5, 60, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        trained = result.model.eval()(input_ids=torch.tensor([ids])).logits[0].float()
    modes = ["merge"] if kind == "lm_head copy" else ["swap", "merge"]
    for mode in modes:
        engine = Engine(llama_tok_registry, "tllama", mode=mode)  # type: ignore[arg-type]
        got = engine.logits([Request(prompt=ids, adapter=result.card.ref)])[0].logits
        torch.testing.assert_close(got, trained, atol=1e-5, rtol=0)
        plain = engine.logits([Request(prompt=ids)])[0].logits
        assert not torch.allclose(got, plain, atol=1e-4)  # training moved the new parts
    if kind == "lm_head copy":
        with pytest.raises(UnsupportedError, match="mode='merge'"):
            Engine(llama_tok_registry, "tllama").logits([Request(prompt=ids, adapter=result.card.ref)])


@pytest.mark.parametrize(("method", "needle"), [
    ({"name": "prompt", "trainable_tokens": [1]}, "is for method lora"),
    ({"init": "pissa", "modules_to_save": ["lm_head"]}, "conversion to the unchanged base"),
    ({"trainable_tokens": [3, 3]}, "lists an id twice"),
    ({"trainable_tokens": [1], "target_modules": ["q_proj", "embed_tokens"]}, "train one of them"),
])
def test_embedding_recipe_mistakes_are_refused_before_training(tmp_path: Path, gen_data: Path,
                                                              method: dict[str, object], needle: str) -> None:
    from adapterhub_local.config import parse_recipe

    _, problems = parse_recipe(gen_raw(gen_data, tmp_path / "runs", **method))
    assert any(needle in p for p in problems), problems

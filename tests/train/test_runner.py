"""The runner end to end on tiny models: the base never changes, registered versions load in PEFT with
the trained model's logits, baselines are stored as the method allows, and ``eval`` agrees with the run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from adapterhub_local.inference import Engine, Request
from adapterhub_local.models import load_base_model, load_tokenizer
from adapterhub_local.registry import Registry
from adapterhub_local.train import methods, runner
from adapterhub_local.train.checks import check
from adapterhub_local.train.eval_ref import EvalOptions, evaluate_ref
from adapterhub_local.train.loop import train_loop
from adapterhub_local.train.restore import predict_full, restore
from adapterhub_local.train.runner import encode_splits
from adapterhub_local.train.tasks import collate_classification, collate_generation
from tests.conftest import make_tiny_bert
from tests.test_pooling import declare
from tests.train.conftest import build_recipe, classification_rows, cls_raw, gen_raw, save_tokenizer, write_jsonl


def _file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}


@pytest.mark.parametrize(("kind", "method"), [("cls", "lora"), ("cls", "head_only"), ("gen", "lora"),
                                              ("gen", "prompt")])
def test_base_weights_are_bit_identical_after_training(tmp_path: Path, request: pytest.FixtureRequest,
                                                       kind: str, method: str) -> None:
    registry: Registry = request.getfixturevalue("bert_registry" if kind == "cls" else "llama_tok_registry")
    data = request.getfixturevalue("cls_data" if kind == "cls" else "gen_data")
    make = cls_raw if kind == "cls" else gen_raw
    extra = {"prompt_init": "vocab", "num_virtual_tokens": 4} if method == "prompt" else {}
    recipe = build_recipe(make(data, tmp_path / "runs", name=method, **extra))
    record = registry.base(recipe.base)
    on_disk = _file_hashes(record.path)
    prepared = check(recipe)
    from adapterhub_local.models import load_tokenizer

    tokenizer = load_tokenizer(record)
    model = load_base_model(record, "sequence_classification" if kind == "cls" else "causal_lm", 2 if kind == "cls"
                            else None)
    # Keep the parameter objects themselves: PEFT wraps modules but the base layers keep using them.
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    trained = methods.apply_method(model, recipe, record.path)
    encoded = encode_splits(recipe, prepared, tokenizer)
    collate = collate_classification if kind == "cls" else collate_generation
    train_loop(trained.model, encoded.train, lambda ex: collate(ex, 0), recipe.train, tmp_path, lambda m: {},
               "none", True, progress=False)
    live = {id(p) for p in trained.model.parameters()}
    for name, (param, value) in before.items():
        assert id(param) in live, name  # still the tensor the base layer computes with
        assert torch.equal(param.detach(), value), name  # bit-identical, not merely close
    moved = [n for n, p in trained.model.named_parameters() if p.requires_grad]
    assert moved, "something must have been trained"
    assert _file_hashes(record.path) == on_disk


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("method", ["lora", "head_only"])
def test_registered_classifier_loads_in_peft_with_equal_logits(tmp_path: Path, bert_registry: Registry,
                                                               cls_data: Path, method: str) -> None:
    recipe = build_recipe(cls_raw(cls_data, tmp_path / "runs", name=method))
    result = runner.run(recipe, check(recipe), bert_registry, progress=False)
    assert result.card is not None and result.model is not None
    card = result.card
    assert card.labels == ["negative", "positive"] and card.task_type == "sequence_classification"
    assert "classifier" in card.modules_to_save and card.extra["pooling"] == "native"
    assert card.kind == ("head" if method == "head_only" else "lora")
    assert card.training["trainable_params"] > 0 and card.training["tokens_per_s"] > 0
    assert card.dataset_fingerprint and card.metrics["accuracy"] == result.metrics["accuracy"]
    _, path = bert_registry.verified_path(card.ref, "tbert")
    base = load_base_model(bert_registry.base("tbert"), "sequence_classification", 2)
    loaded = PeftModel.from_pretrained(base, str(path)).eval()
    ids = torch.randint(5, 60, (3, 9), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_logits(loaded, ids), _logits(result.model, ids), atol=1e-6)
    fresh = load_base_model(bert_registry.base("tbert"), "sequence_classification", 2)
    assert not torch.allclose(_logits(fresh, ids), _logits(loaded, ids), atol=1e-4)  # the head did change


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_registered_generator_loads_in_peft_with_equal_logits(tmp_path: Path, llama_tok_registry: Registry,
                                                              gen_data: Path, method: str) -> None:
    extra = {"prompt_init": "vocab", "num_virtual_tokens": 4} if method == "prompt" else {}
    recipe = build_recipe(gen_raw(gen_data, tmp_path / "runs", name=method, **extra))
    result = runner.run(recipe, check(recipe), llama_tok_registry, progress=False)
    assert result.card is not None and result.model is not None
    forgetting = result.card.training["forgetting"]
    assert forgetting["base_perplexity"] > 0 and forgetting["adapter_perplexity"] > 0
    assert {"bleu", "rougeL", "exact_match", "token_f1", "test_val_loss"} <= set(result.card.metrics)
    _, path = llama_tok_registry.verified_path(result.card.ref, "tllama")
    loaded = PeftModel.from_pretrained(load_base_model(llama_tok_registry.base("tllama")), str(path)).eval()
    ids = torch.randint(5, 60, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(_logits(loaded, ids), _logits(result.model, ids), atol=1e-5)
    log = (result.run_dir / "metrics.jsonl").read_text()
    assert '"eval"' in log and '"loss"' in log
    assert (result.run_dir / "recipe.yaml").exists() and (result.run_dir / "final_metrics.json").exists()


@pytest.mark.parametrize("method", ["full", "freeze_first_k"])
def test_full_fine_tunes_are_registered_as_kind_full(tmp_path: Path, bert_registry: Registry, cls_data: Path,
                                                     method: str) -> None:
    recipe = build_recipe(cls_raw(cls_data, tmp_path / "runs", name=method, k=1))
    result = runner.run(recipe, check(recipe), bert_registry, progress=False)
    card = result.card
    assert card is not None and result.model is not None and result.not_registered is None
    assert card.kind == "full" and sorted(card.files) == ["config.json", "model.safetensors"]
    assert card.base_fingerprint == bert_registry.base("tbert").fingerprint
    assert card.dataset_fingerprint and card.recipe["method"]["name"] == method
    assert card.metrics["accuracy"] == result.metrics["accuracy"] and card.extra["method"] == method
    assert [r.kind for r in bert_registry.list_adapters()] == ["full"]
    total = result.training["total_params"]
    if method == "full":
        assert result.training["trainable_params"] == total
    else:
        assert 0 < result.training["trainable_params"] < total
    # The version is a plain transformers model directory whose logits are the trained model's.
    _, path = bert_registry.verified_path(card.ref, "tbert")
    plain = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    ids = torch.randint(5, 60, (3, 9), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_logits(plain, ids), _logits(result.model, ids), atol=1e-6)
    assert plain.config.id2label == {0: "negative", 1: "positive"}


def test_full_fine_tune_evaluates_and_predicts_on_a_new_file(tmp_path: Path, bert_registry: Registry,
                                                             cls_data: Path) -> None:
    raw = cls_raw(cls_data, tmp_path / "runs", name="full")
    test_file = write_jsonl(tmp_path / "test.jsonl", classification_rows(4, 6))
    raw["data"]["test"] = str(test_file)
    recipe = build_recipe(raw)
    result = runner.run(recipe, check(recipe), bert_registry, progress=False)
    assert result.card is not None and result.model is not None
    again = evaluate_ref(bert_registry, result.card.ref, test_file, EvalOptions())
    assert again["accuracy"] == pytest.approx(result.metrics["accuracy"])
    assert again["confusion_matrix"] == result.metrics["confusion_matrix"]
    other = write_jsonl(tmp_path / "other.jsonl", classification_rows(3, 5)[::-1])
    assert evaluate_ref(bert_registry, "tcls", other, EvalOptions())["n"] == 15
    tokenizer = load_tokenizer(bert_registry.base("tbert"))
    ids = torch.tensor([tokenizer("very good acting")["input_ids"]])
    expected = torch.softmax(_logits(result.model, ids)[0], -1)
    predicted = predict_full(bert_registry, "tcls@1", "very good acting")
    assert predicted is not None
    assert predicted["probabilities"]["positive"] == pytest.approx(float(expected[1]), abs=1e-5)
    assert predicted["label"] == ["negative", "positive"][int(expected.argmax())]


def test_eval_command_agrees_with_the_run(tmp_path: Path, bert_registry: Registry, cls_data: Path) -> None:
    raw = cls_raw(cls_data, tmp_path / "runs")
    test_file = write_jsonl(tmp_path / "test.jsonl", classification_rows(4, 6))
    raw["data"]["test"] = str(test_file)
    recipe = build_recipe(raw)
    result = runner.run(recipe, check(recipe), bert_registry, progress=False)
    assert result.card is not None
    again = evaluate_ref(bert_registry, result.card.ref, test_file, EvalOptions())
    assert again["accuracy"] == pytest.approx(result.metrics["accuracy"])
    assert again["confusion_matrix"] == result.metrics["confusion_matrix"]


@pytest.mark.parametrize("method", ["head_only", "lora", "full"])
def test_declared_mean_pooling_is_trained_stored_and_reproduced(tmp_path: Path, cls_data: Path, method: str) -> None:
    """A base declaring mean pooling (sentence-transformers files) gets a mean-pooled head under ``auto``; the
    card says so, and eval, PEFT/transformers loading and the serving engine all reproduce the trained logits."""
    source = declare(make_tiny_bert(tmp_path / "st-bert"), mean_tokens=True)
    save_tokenizer(source)
    registry = Registry(tmp_path / "registry")
    registry.add_base("tbert", str(source))
    raw = cls_raw(cls_data, tmp_path / "runs", name=method)
    raw["data"]["test"] = str(write_jsonl(tmp_path / "test.jsonl", classification_rows(4, 6)))
    recipe = build_recipe(raw)
    assert recipe.task.pooling == "auto"
    result = runner.run(recipe, check(recipe), registry, progress=False)
    assert result.card is not None and result.model is not None
    assert result.card.extra["pooling"] == "mean"
    ids = torch.randint(5, 60, (3, 9), generator=torch.Generator().manual_seed(0))
    trained = _logits(result.model, ids)
    restored = restore(registry, result.card.ref)
    assert torch.allclose(_logits(restored.model, ids), trained, atol=1e-5)
    native = load_base_model(registry.base("tbert"), "sequence_classification", 2)
    if method == "full":
        native = AutoModelForSequenceClassification.from_pretrained(str(registry.verified_path(result.card.ref)[1]))
    else:
        native = PeftModel.from_pretrained(native, str(registry.verified_path(result.card.ref)[1]))
    assert not torch.allclose(_logits(native.eval(), ids), trained, atol=1e-4)  # the pooler's logits differ
    again = evaluate_ref(registry, result.card.ref, Path(raw["data"]["test"]), EvalOptions())
    assert again["accuracy"] == pytest.approx(result.metrics["accuracy"])
    if method == "full":
        return
    text = "very good acting"
    tokenizer = load_tokenizer(registry.base("tbert"))
    expected = torch.softmax(_logits(result.model, torch.tensor([tokenizer(text)["input_ids"]]))[0], -1)
    served = Engine(registry, "tbert", device="cpu").classify([Request(prompt=text, adapter=result.card.ref)])[0]
    assert served.probabilities["positive"] == pytest.approx(float(expected[1]), abs=1e-5)


def test_a_full_fine_tune_of_a_decoder_is_registered_and_evaluated(tmp_path: Path, llama_tok_registry: Registry,
                                                                   gen_data: Path) -> None:
    recipe = build_recipe(gen_raw(gen_data, tmp_path / "runs", name="full"))
    result = runner.run(recipe, check(recipe), llama_tok_registry, progress=False)
    assert result.card is not None and result.model is not None
    assert result.card.kind == "full" and result.card.task_type == "causal_lm"
    restored = restore(llama_tok_registry, result.card.ref)
    ids = torch.randint(5, 60, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(_logits(restored.model, ids), _logits(result.model, ids), atol=1e-5)
    again = evaluate_ref(llama_tok_registry, result.card.ref, gen_data, EvalOptions(max_examples=6))
    assert again["ref"] == result.card.ref and again["val_loss"] > 0 and "bleu" in again

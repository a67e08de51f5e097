"""The runner: a checked recipe → a trained, evaluated adapter in the registry.

Run directory (``runs/<name>-<UTC time>/``): ``recipe.yaml`` (resolved), ``metrics.jsonl`` (training log and
periodic evaluations), ``checkpoint/`` (for ``--resume``), ``best/`` (best evaluation's tensors),
``adapter/`` (the final PEFT directory, or the whole model of a full / partial fine-tune) and
``final_metrics.json`` (test metrics, run facts, registered reference or why it was not registered).

What is registered, by method: ``lora`` / ``qlora`` / ``prompt`` adapters; ``head_only`` as kind ``head``;
``full`` / ``freeze_first_k`` as kind ``full`` (``registry/model_kinds.py``). Classifiers read the pooling
``task.pooling`` resolves to (``auto`` = the base's declared pooling), recorded on the card.
"""

from __future__ import annotations

import json
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

from adapterhub_local import assets, runtime
from adapterhub_local.config import Recipe, recipe_values_off_default
from adapterhub_local.errors import ConfigError, NotFoundError
from adapterhub_local.models import load_base_model, load_tokenizer
from adapterhub_local.pooling import resolve_pooling, with_pooling
from adapterhub_local.registry import AdapterCard, BaseRecord, CardInfo, Registry
from adapterhub_local.registry.model_kinds import register_full, register_head
from adapterhub_local.task_spec import SPEC_KEY
from adapterhub_local.train import distributed, sharding, tasks
from adapterhub_local.train import evaluate as ev
from adapterhub_local.train.checks import PreparedData
from adapterhub_local.train.data import read_rows, render
from adapterhub_local.train.loop import load_best, train_loop
from adapterhub_local.train.methods import (
    FULL_METHODS,
    Trainable,
    apply_method,
    initialize_eva,
    save_result,
    trainable_state,
)

RECIPE_FILE = "recipe.yaml"
FROZEN_BASE_METHODS = ("lora", "prompt", "head_only")
FINAL = "final_metrics.json"


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    training: dict[str, Any]
    card: AdapterCard | None
    samples: list[dict[str, Any]] = field(default_factory=list)
    not_registered: str | None = None
    model: torch.nn.Module | None = None
    """The trained model (eval mode, best checkpoint loaded), for callers that keep working with it."""


def ensure_base(registry: Registry, recipe: Recipe) -> BaseRecord:
    """The recipe's base; registered from ``base_source`` (a path or ``asset:<name>``) when missing."""
    try:
        return registry.base(recipe.base)
    except NotFoundError:
        if not recipe.base_source:
            raise
    return registry.add_base(recipe.base, str(assets.resolve(recipe.base_source)))


def make_trainable(recipe: Recipe, record: BaseRecord, model: torch.nn.Module,
                   labels: list[str] | None) -> Trainable:
    """The recipe's method on ``model``: a classifier pooled as the recipe (or the base) says, trainable
    parameters in fp32 whatever the base's dtype. The sweep builds its runs with this too."""
    pooling = resolve_pooling(recipe.task.pooling, record.path) if labels else "native"
    trained = apply_method(with_pooling(model, pooling), recipe, record.path)
    trained.pooling = pooling
    runtime.upcast_trainable(trained.model)
    return trained


def load_model(recipe: Recipe, record: BaseRecord, num_labels: int | None) -> torch.nn.Module:
    task_type = "sequence_classification" if recipe.task.type == "classification" else "causal_lm"
    if recipe.method.name != "qlora":
        # Frozen-base methods keep the base in the precision's dtype (bf16 under bf16); methods that train
        # base weights load them in fp32, which the loop keeps as master weights.
        frozen = recipe.method.name in FROZEN_BASE_METHODS
        dtype = runtime.base_dtype(recipe.train.precision) if frozen else torch.float32
        return load_base_model(record, task_type, num_labels, dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    device_map = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    if task_type == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(str(record.path), quantization_config=quant,
                                                     device_map=device_map)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(record.path), quantization_config=quant, device_map=device_map, num_labels=num_labels)
    module: torch.nn.Module = model
    return module


def _new_run_dir(recipe: Recipe) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    path = Path(recipe.output.runs_dir) / f"{recipe.name}-{stamp}"
    path.mkdir(parents=True)
    return path


def find_resumable(recipe: Recipe) -> Path:
    """The newest unfinished run directory of this recipe that holds a checkpoint."""
    root = Path(recipe.output.runs_dir)
    candidates = sorted(p for p in root.glob(f"{recipe.name}-*")
                        if (p / "checkpoint" / "state.json").exists() and not (p / FINAL).exists()) \
        if root.is_dir() else []
    if not candidates:
        raise ConfigError([f"no interrupted run of {recipe.name!r} under {root}"], "start it without --resume",
                          what="resume")
    return candidates[-1]


def _same_recipe(run_dir: Path, recipe: Recipe) -> None:
    """Refuse to resume a run under another recipe; fields added since it started (at their defaults) agree."""
    saved = _dotted(recipe_values_off_default(yaml.safe_load((run_dir / RECIPE_FILE).read_text(encoding="utf-8"))))
    current = _dotted(recipe.non_default_fields())
    differ = [f"{k} ({saved.get(k)!r} then, {current.get(k)!r} now)" for k in sorted(saved.keys() | current.keys())
              if saved.get(k) != current.get(k)]
    if differ:
        raise ConfigError([f"the recipe differs from the interrupted run's in {', '.join(differ)}"],
                          f"resume with the recipe saved in {run_dir / RECIPE_FILE}", what="resume")


def _dotted(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _peak_memory_mb() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is a dependency, but seeding it is only a courtesy
        pass


@dataclass
class EncodedSplits:
    train: list[tasks.Example]
    validation: list[tasks.Example]
    test: list[tasks.Example]
    prompts: list[tasks.GenerationPrompt]
    test_rows: list[dict[str, Any]]


def encode_splits(recipe: Recipe, data: PreparedData, tokenizer: Any) -> EncodedSplits:
    d = recipe.data
    cap_val, cap_test = d.max_eval_examples, recipe.eval.max_test_examples
    if recipe.task.type == "classification":
        assert data.labels is not None
        src = data.sources[0]
        train_rows = src.splits.train[: d.max_train_examples] if d.max_train_examples else src.splits.train
        test_rows = src.splits.test[:cap_test] if cap_test else src.splits.test

        def enc(rows: list[dict[str, Any]]) -> list[tasks.Example]:
            return tasks.encode_classification(rows, src.spec, tokenizer, data.labels or [], d.max_length)

        val_rows = src.splits.validation[:cap_val] if cap_val else src.splits.validation
        return EncodedSplits(enc(train_rows), enc(val_rows), enc(test_rows), [], test_rows)
    per_source: dict[str, list[tasks.Example]] = {}
    validation: list[tasks.Example] = []
    test: list[tasks.Example] = []
    prompts: list[tasks.GenerationPrompt] = []
    for src in data.sources:
        rows = src.splits.train[: d.max_train_examples] if d.max_train_examples else src.splits.train
        per_source[src.name] = tasks.encode_generation(rows, src.spec, tokenizer, d.max_length)
        val_rows = src.splits.validation[:cap_val] if cap_val else src.splits.validation
        validation += tasks.encode_generation(val_rows, src.spec, tokenizer, d.max_length)
        source_prompts = tasks.generation_prompts(src.splits.test, src.spec)
        source_prompts = source_prompts[:cap_test] if cap_test else source_prompts
        prompts += source_prompts
        # The test loss covers every reference of the prompts evaluated (all of them without a cap).
        kept = {p.prompt for p in source_prompts}
        test_rows = [r for r in src.splits.test if render(src.spec.template or "", r) in kept]
        test += tasks.encode_generation(test_rows, src.spec, tokenizer, d.max_length)
    if len(per_source) > 1:
        train = tasks.mix(per_source, {s.name: s.weight for s in data.sources}, recipe.train.seed)
    else:
        train = next(iter(per_source.values()))
    if d.packing:
        train = tasks.pack(train, d.max_length)
    return EncodedSplits(train, validation, test, prompts, [])


def run(recipe: Recipe, data: PreparedData, registry: Registry, *, resume: bool = False,
        run_dir: Path | None = None, progress: bool = True,
        on_step: Callable[[int], None] | None = None) -> RunResult:
    """Train, evaluate, save and (for PEFT methods) register; see the module docstring for the run directory."""
    started = time.perf_counter()
    processes = distributed.current()  # one process unless started by accelerate launch / torchrun
    if processes.fsdp:
        sharding.check_supported(recipe.method.name, runtime.resolve_precision(recipe.train.precision),
                                 recipe.method.init)
    record = ensure_base(registry, recipe) if processes.is_main else None
    processes.barrier()  # a missing base is registered once, by the main process
    record = record or ensure_base(registry, recipe)
    runtime.configure_recipe_threads(recipe.train.num_threads)
    seed_everything(recipe.train.seed)
    tokenizer = load_tokenizer(record)
    classification = recipe.task.type == "classification"
    labels = data.labels if classification else None
    model = load_model(recipe, record, len(labels) if labels else None)
    if labels:
        model_config: Any = model.config
        model_config.id2label = dict(enumerate(labels))
        model_config.label2id = {label: i for i, label in enumerate(labels)}
    trained = make_trainable(recipe, record, model, labels)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = encode_splits(recipe, data, tokenizer)

    if resume:
        run_dir = run_dir or find_resumable(recipe)
        _same_recipe(run_dir, recipe)
    elif processes.is_main:
        run_dir = run_dir or _new_run_dir(recipe)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RECIPE_FILE).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
    run_dir = processes.main_path(run_dir)
    bs = recipe.eval.batch_size

    if classification:
        assert labels is not None

        def periodic(m: torch.nn.Module) -> dict[str, Any]:
            result, _ = ev.classification_eval(m, encoded.validation, labels, bs, pad_id)
            return {k: v for k, v in result.items() if k != "confusion_matrix"}

        collate: Callable[[Any], tasks.Batch] = lambda ex: tasks.collate_classification(ex, pad_id)  # noqa: E731
        metric, greater = recipe.train.metric_for_best or "accuracy", True
    else:
        def periodic(m: torch.nn.Module) -> dict[str, Any]:
            return dict(ev.loss_eval(m, encoded.validation, bs, pad_id))

        collate = lambda ex: tasks.collate_generation(ex, pad_id)  # noqa: E731
        metric = recipe.train.metric_for_best or "val_loss"
        greater = metric not in ("val_loss", "perplexity")
    if recipe.method.init == "eva":  # a data pass before the first step (methods.initialize_eva)
        size = recipe.train.batch_size
        initialize_eva(trained, [collate(encoded.train[i: i + size]).tensors
                                 for i in range(0, len(encoded.train), size)])
    with processes.guard():
        result = train_loop(trained.model, encoded.train, collate, recipe.train, run_dir, periodic, metric, greater,
                            resume=resume, progress=progress, on_step=on_step, processes=processes)
    not_main = RunResult(run_dir, {}, {}, None, not_registered=f"process {processes.rank} of {processes.world_size}")
    if not (processes.is_main or processes.fsdp):  # the main process evaluates, saves and registers (distributed.py)
        return not_main
    model = trained.model
    load_best(run_dir, model)
    model.eval()
    with processes.guard():  # under FSDP every process evaluates (a forward is a collective) and gathers the result
        final, samples = final_eval(recipe, trained, tokenizer, encoded, labels, pad_id)
        gathered = trainable_state(model) if processes.fsdp else None
    if not processes.is_main:
        return not_main
    peak, peak_kind = _peak_memory_mb()
    training = {
        "method": trained.method, "trainable_params": trained.trainable_params, "total_params": trained.total_params,
        "trainable_fraction": trained.trainable_params / max(trained.total_params, 1),
        "steps": result.state.step, "planned_steps": result.total_steps, "epochs_completed": result.state.epoch,
        "best_step": result.state.best_step, "best_metric": {metric: result.state.best_metric},
        "stopped_early": result.state.stopped_early, "train_seconds": result.state.train_seconds,
        "train_tokens": result.state.train_tokens, "tokens_per_s": result.tokens_per_s,
        "wall_time_s": time.perf_counter() - started, "peak_memory_mb": peak, "peak_memory_kind": peak_kind,
        "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
        "processes": processes.world_size,
        "strategy": "single" if processes.world_size == 1 else "fsdp" if processes.fsdp else "ddp",
        "precision": runtime.resolve_precision(recipe.train.precision),
        "train_examples": len(encoded.train), "validation_examples": len(encoded.validation),
        "test_examples": len(encoded.test) or len(encoded.prompts),
    }
    if labels:
        training["pooling"] = trained.pooling
    forgetting = final.pop("forgetting", None)
    if forgetting is not None:
        training["forgetting"] = forgetting
    card, why_not = finish_run(recipe, data, registry, trained, run_dir, final, training, samples, labels, gathered)
    return RunResult(run_dir, final, training, card, samples, why_not, model)


def finish_run(recipe: Recipe, data: PreparedData, registry: Registry, trained: Trainable, run_dir: Path,
               final: dict[str, Any], training: dict[str, Any], samples: list[dict[str, Any]],
               labels: list[str] | None, state: dict[str, torch.Tensor] | None = None,
               ) -> tuple[AdapterCard | None, str | None]:
    """A run's tail, whoever trained it: save the result (from ``state``, the full trainable tensors, where the
    model holds shards of them), register it, write ``final_metrics.json`` (last, so its presence means the run is
    finished)."""
    save_result(trained, run_dir / "adapter", state)
    card, why_not = register_result(recipe, data, registry, trained, run_dir, final, training, labels)
    summary = {"metrics": final, "training": training, "registered": card.ref if card else None,
               "not_registered": why_not, "dataset_fingerprint": data.fingerprint,
               "splits": {s.name: s.splits.sources for s in data.sources}, "samples": samples}
    (run_dir / FINAL).write_text(json.dumps(summary, indent=2, default=float), encoding="utf-8")
    return card, why_not


def is_finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` completed (its final metrics are written)."""
    return (run_dir / FINAL).exists()


def is_resumable(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds an interrupted run with a checkpoint to continue from."""
    return (run_dir / "checkpoint" / "state.json").exists() and not is_finished(run_dir)


def final_eval(recipe: Recipe, trained: Trainable, tokenizer: Any, encoded: EncodedSplits, labels: list[str] | None,
                pad_id: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with runtime.autocast(recipe.train.precision):  # the precision the model was trained in
        return _final_eval(recipe, trained, tokenizer, encoded, labels, pad_id)


def _final_eval(recipe: Recipe, trained: Trainable, tokenizer: Any, encoded: EncodedSplits, labels: list[str] | None,
                pad_id: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    model, bs, show = trained.model, recipe.eval.batch_size, recipe.eval.show_predictions
    if labels is not None:
        result, predicted = ev.classification_eval(model, encoded.test, labels, bs, pad_id)
        samples = [{"text": tasks.classification_text(row, tasks.TemplateSpec(recipe.data.template, None,
                                                                               recipe.data.text_field)),
                    "label": labels[int(ex.labels)], "predicted": labels[p]}  # type: ignore[arg-type]
                   for row, ex, p in zip(encoded.test_rows[:show], encoded.test[:show], predicted[:show], strict=False)]
        return result, samples
    result = {f"test_{k}": v for k, v in ev.loss_eval(model, encoded.test, bs, pad_id).items()}
    gen, hypotheses = ev.generation_eval(model, tokenizer, encoded.prompts, recipe.eval.max_new_tokens, bs)
    result.update(gen)
    if recipe.eval.compare_base and trained.is_peft:
        with ev.adapter_disabled(model):
            base_gen, _ = ev.generation_eval(model, tokenizer, encoded.prompts, recipe.eval.max_new_tokens, bs)
            result["base_test_val_loss"] = ev.loss_eval(model, encoded.test, bs, pad_id)["val_loss"]
        result["base"] = {k: v for k, v in base_gen.items()
                          if not k.startswith("per_source") and k not in ("per_example", "baseline_copy_input")}
    if recipe.eval.forgetting and trained.is_peft:
        rows = read_rows(recipe.eval.forgetting_data)
        texts = [str(r.get("text", "")) for r in random.Random(0).sample(rows, min(len(rows),
                                                                                   recipe.eval.forgetting_samples))]
        result["forgetting"] = ev.forgetting(model, tokenizer, texts, recipe.data.max_length, bs)
    samples = [{"prompt": p.prompt, "generated": h, "reference": p.references[0]}
               for p, h in zip(encoded.prompts[:show], hypotheses[:show], strict=False)]
    return result, samples


def register_result(recipe: Recipe, data: PreparedData, registry: Registry, trained: Trainable, run_dir: Path,
              final: dict[str, Any], training: dict[str, Any],
              labels: list[str] | None) -> tuple[AdapterCard | None, str | None]:
    if not recipe.output.register:
        return None, "output.register is false"
    info = CardInfo(
        task=recipe.task_name,
        task_type="sequence_classification" if labels is not None else "causal_lm",
        recipe=recipe.to_dict(), dataset_fingerprint=data.fingerprint, metrics=final, labels=labels,
        training=training,
        extra={"pooling": trained.pooling, "method": trained.method, "run_dir": str(run_dir),
               "method_note": trained.note, "splits": {s.name: s.splits.sources for s in data.sources},
               SPEC_KEY: tasks.task_spec(labels is not None, [(s.spec, s.splits.train) for s in data.sources],
                                         labels, trained.pooling).to_dict()},
    )
    if trained.method in FULL_METHODS:
        card = register_full(registry, recipe.name, run_dir / "adapter", recipe.base, info)
    elif trained.method == "head_only":
        card = register_head(registry, recipe.name, run_dir / "adapter", recipe.base, info)
    else:
        card = registry.register_adapter(recipe.name, run_dir / "adapter", recipe.base, info)
    if recipe.output.tag:
        registry.tag(card.ref, recipe.output.tag)
    return card, None

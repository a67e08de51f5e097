"""The loop: schedule shape, and interrupt + ``--resume`` ending in the same adapter as one straight run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from adapterhub_local.registry import Registry
from adapterhub_local.train import runner
from adapterhub_local.train.checks import check
from adapterhub_local.train.loop import epoch_batches, epoch_order, linear_schedule
from tests.train.conftest import build_recipe, gen_raw


def test_linear_schedule_warms_up_then_decays_to_zero() -> None:
    f = linear_schedule(4, 20)
    values = [f(s) for s in range(21)]
    assert values[:4] == sorted(values[:4]) and values[3] == pytest.approx(1.0)
    assert values[4:] == sorted(values[4:], reverse=True) and values[20] == 0.0


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    torch.manual_seed(123)
    a = epoch_order(50, 7, 2)
    torch.manual_seed(999)
    assert a == epoch_order(50, 7, 2) and a != epoch_order(50, 7, 3) and sorted(a) == list(range(50))


class _Stop(KeyboardInterrupt):
    pass


def _adapter(result: runner.RunResult) -> dict[str, torch.Tensor]:
    return load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_interrupt_and_resume_give_the_same_adapter(tmp_path: Path, llama_tok_registry: Registry,
                                                    gen_data: Path, grad_accum: int) -> None:
    raw = gen_raw(gen_data, tmp_path / "runs")
    raw["train"].update({"max_steps": 8, "eval_every": 4, "grad_accum": grad_accum, "batch_size": 2})
    raw["output"]["register"] = False
    raw["eval"]["forgetting"] = False
    recipe = build_recipe(raw)
    data = check(recipe)
    straight = runner.run(recipe, data, llama_tok_registry, run_dir=tmp_path / "straight", progress=False)

    def interrupt(step: int) -> None:
        if step == 3:  # between evaluations and checkpoints: resume must come from the interrupt's checkpoint
            raise _Stop()

    with pytest.raises(KeyboardInterrupt):
        runner.run(recipe, data, llama_tok_registry, run_dir=tmp_path / "cut", progress=False, on_step=interrupt)
    resumed = runner.run(recipe, data, llama_tok_registry, run_dir=tmp_path / "cut", resume=True, progress=False)

    a, b = _adapter(straight), _adapter(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.training["steps"] == straight.training["steps"] == 8
    assert resumed.metrics["test_val_loss"] == straight.metrics["test_val_loss"]


def test_resume_refuses_a_changed_recipe(tmp_path: Path, llama_tok_registry: Registry, gen_data: Path) -> None:
    raw = gen_raw(gen_data, tmp_path / "runs")
    raw["output"]["register"] = False
    raw["eval"]["forgetting"] = False
    recipe = build_recipe(raw)

    def interrupt(step: int) -> None:
        raise _Stop()

    with pytest.raises(KeyboardInterrupt):
        runner.run(recipe, check(recipe), llama_tok_registry, run_dir=tmp_path / "cut", progress=False,
                   on_step=interrupt)
    # As an older version saved it: without a field added since (at its default), which must not count as a change.
    saved = tmp_path / "cut" / runner.RECIPE_FILE
    older = yaml.safe_load(saved.read_text())
    del older["method"]["use_dora"]
    saved.write_text(yaml.safe_dump(older))
    raw["train"]["lr"] = 1e-2
    changed = build_recipe(raw)
    from adapterhub_local.errors import ConfigError

    with pytest.raises(ConfigError, match=r"interrupted run's in train\.lr \([^)]* then, 0\.01 now\) —"):
        runner.run(changed, check(changed), llama_tok_registry, run_dir=tmp_path / "cut", resume=True,
                   progress=False)


@pytest.mark.parametrize("grouped", [False, True])
def test_epoch_batches_cover_every_example_once(grouped: bool) -> None:
    lengths = [(i * 37) % 50 + 1 for i in range(203)]
    batches = epoch_batches(lengths, 8, seed=3, epoch=1, group_by_length=grouped)
    assert sorted(i for b in batches for i in b) == list(range(203))
    assert batches == epoch_batches(lengths, 8, seed=3, epoch=1, group_by_length=grouped)
    assert batches != epoch_batches(lengths, 8, seed=3, epoch=2, group_by_length=grouped)
    if grouped:  # less padding than a plain shuffle
        def padded(bs: list[list[int]]) -> int:
            return sum(len(b) * max(lengths[i] for i in b) for b in bs)

        assert padded(batches) < padded(epoch_batches(lengths, 8, 3, 1, False))


def test_early_stopping_keeps_the_best_evaluation(tmp_path: Path) -> None:
    from adapterhub_local.config import TrainConfig
    from adapterhub_local.train.loop import load_best, train_loop
    from adapterhub_local.train.tasks import Example, collate_classification

    torch.manual_seed(0)
    model = _TinyClassifier()
    examples = [Example([i % 7 + 1, 3], i % 2) for i in range(64)]
    scores = iter([0.5, 0.9, 0.8, 0.7, 0.6, 0.5])
    snapshots: list[torch.Tensor] = []

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        snapshots.append(m.head.weight.detach().clone())  # type: ignore[union-attr, operator]
        return {"accuracy": next(scores)}

    cfg = TrainConfig(lr=0.1, batch_size=4, max_steps=100, eval_every=2, early_stopping_patience=2, log_every=1)
    result = train_loop(model, examples, lambda ex: collate_classification(ex, 0), cfg, tmp_path, evaluate,
                        "accuracy", True, progress=False)
    assert result.state.stopped_early and result.state.step == 8  # evals at 2, 4 (best), 6, 8 → stop
    assert result.state.best_step == 4 and result.state.best_metric == 0.9
    assert load_best(tmp_path, model)
    assert torch.equal(model.head.weight, snapshots[1])
    log = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(log) == 4


class _TinyClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> object:
        logits = self.head(self.embed(input_ids).mean(1))
        from types import SimpleNamespace

        return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits, labels), logits=logits)


def test_each_epoch_uses_its_own_batch_order(tmp_path: Path) -> None:
    from adapterhub_local.config import TrainConfig
    from adapterhub_local.train.loop import train_loop
    from adapterhub_local.train.tasks import Batch, Example, collate_classification

    torch.manual_seed(0)
    examples = [Example([i % 9 + 1, 3], i % 2) for i in range(16)]
    seen: list[list[int]] = []

    def recording_collate(batch: Sequence[Example]) -> Batch:
        seen.append(sorted(examples.index(ex) for ex in batch))
        return collate_classification(batch, 0)

    cfg = TrainConfig(lr=0.1, batch_size=4, max_steps=8, eval_every=100, log_every=100, seed=5)
    train_loop(_TinyClassifier(), examples, recording_collate, cfg, tmp_path, lambda m: {"accuracy": 0.0},
               "accuracy", True, progress=False)
    lengths = [len(ex.input_ids) for ex in examples]
    plans = [[sorted(b) for b in epoch_batches(lengths, 4, 5, epoch, False)] for epoch in (0, 1)]
    assert plans[0] != plans[1]
    assert seen == plans[0] + plans[1]  # epoch 1 is not a replay of epoch 0


def test_bf16_run_keeps_a_bf16_frozen_base_and_fp32_trainables(tmp_path: Path, llama_tok_registry: Registry,
                                                                gen_data: Path) -> None:
    from adapterhub_local.models import load_base_model

    raw = gen_raw(gen_data, tmp_path / "runs")
    raw["train"].update({"precision": "bf16", "max_steps": 4, "eval_every": 2})
    raw["output"]["register"] = False
    raw["eval"]["forgetting"] = False
    recipe = build_recipe(raw)
    result = runner.run(recipe, check(recipe), llama_tok_registry, run_dir=tmp_path / "run", progress=False)
    assert result.model is not None and result.training["precision"] == "bf16"
    frozen = {n: p for n, p in result.model.named_parameters() if not p.requires_grad}
    trainable = {n: p for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen.values())
    # The base never changes in training: equal to a fresh bf16 load of it.
    fresh = dict(load_base_model(llama_tok_registry.base("tllama"), dtype=torch.bfloat16).named_parameters())
    for name, param in frozen.items():
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(param, fresh[key]), name
    saved = torch.load(result.run_dir / "checkpoint" / "optimizer.pt", weights_only=True)
    moments = [s["exp_avg"] for s in saved["optimizer"]["state"].values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)  # optimizer state in fp32
    adapter = _adapter(result)
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    assert all(math.isfinite(v) for v in (result.metrics["test_val_loss"],))
    assert any(float(t.abs().max()) > 0 for k, t in adapter.items() if "lora_B" in k)  # it did train


def test_note_evaluation_counts_patience_from_the_last_best() -> None:
    from adapterhub_local.train.loop import LoopState, note_evaluation

    state = LoopState()
    flags = []
    for step, value in enumerate([0.5, 0.4, 0.6, 0.6, 0.55], start=1):
        state.step = step
        flags.append((note_evaluation(state, value, True, 2), state.stopped_early))
    assert flags == [(True, False), (False, False), (True, False), (False, False), (False, True)]
    assert state.best_metric == 0.6 and state.best_step == 3
    lower = LoopState()
    assert note_evaluation(lower, float("nan"), False, None) is False and not lower.stopped_early
    assert note_evaluation(lower, 2.0, False, None) and not note_evaluation(lower, 2.5, False, None)


def test_prefetcher_returns_what_collate_returns() -> None:
    from adapterhub_local.train.loop import Prefetcher
    from adapterhub_local.train.tasks import Example, collate_generation

    examples = [Example(list(range(1, 2 + i % 5)), list(range(1, 2 + i % 5))) for i in range(12)]
    prefetch = Prefetcher(lambda ex: collate_generation(ex, 0), examples)
    try:
        prefetch.want([3, 4, 5])
        for indices in ([0, 1, 2], [3, 4, 5], [11, 7]):
            got, expected = prefetch.get(indices), collate_generation([examples[i] for i in indices], 0)
            assert got.real_tokens == expected.real_tokens
            assert all(torch.equal(got.tensors[k], expected.tensors[k]) for k in expected.tensors)
    finally:
        prefetch.close()


def test_logged_loss_is_the_mean_of_the_steps_losses(tmp_path: Path) -> None:
    """The loss leaves the device only at log time; what is logged is still each window's mean step loss."""
    import json

    from adapterhub_local.config import TrainConfig
    from adapterhub_local.train.loop import train_loop
    from adapterhub_local.train.tasks import Example, collate_classification

    examples = [Example([i % 7 + 1, 3], i % 2) for i in range(32)]
    logs = {}
    for every in (1, 4):
        torch.manual_seed(0)
        cfg = TrainConfig(lr=0.05, batch_size=4, max_steps=8, grad_accum=2, eval_every=100, log_every=every,
                          precision="fp32")
        run = tmp_path / f"log{every}"
        run.mkdir()
        train_loop(_TinyClassifier(), examples, lambda ex: collate_classification(ex, 0), cfg, run,
                   lambda m: {"accuracy": 0.0}, "accuracy", True, progress=False)
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        logs[every] = [x["loss"] for x in lines if "loss" in x]
    assert len(logs[1]) == 8 and len(logs[4]) == 2
    for window in range(2):
        assert logs[4][window] == pytest.approx(sum(logs[1][4 * window : 4 * window + 4]) / 4, rel=1e-6)

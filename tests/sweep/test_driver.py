"""End-to-end sweeps on tiny models: concurrent ≡ sequential, resume, registration, report, truncated curve."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from adapterhub_local.lora import lora_pairs
from adapterhub_local.registry import Registry
from adapterhub_local.sweep.driver import run_sweep
from adapterhub_local.sweep.plan import SweepConfig
from tests.sweep.conftest import recipe_for


def _deltas(registry: Registry, ref: str) -> dict[str, torch.Tensor]:
    loaded = registry.load_adapter(ref)
    out = {m: p.delta() for m, p in lora_pairs(loaded.tensors, dict(loaded.config)).items()}
    out.update({k: v for k, v in loaded.tensors.items() if ".lora_" not in k})  # a classifier head
    return out


@pytest.mark.parametrize("kind", ["gen", "cls"])
def test_concurrent_and_sequential_sweeps_give_the_same_adapters(
    kind: str, sweep_registry: Registry, gen_data: Path, cls_data: Path, tmp_path: Path
) -> None:
    data = gen_data if kind == "gen" else cls_data
    ranks = [1, 4, 64]  # 64 is over-complete on the 32-wide tiny bases
    summaries = {}
    for mode in ("sequential", "concurrent"):
        # Accumulation, a mid-run evaluation (best-state keeping) and a final one, all inside the first epoch.
        recipe = recipe_for(kind, data, tmp_path / f"runs-{mode}", grad_accum=2, max_steps=3, eval_every=2,
                            group_by_length=kind == "cls")
        config = SweepConfig(ranks=ranks, mode=mode, sweep_id=f"sw-{mode}", e2e_metrics=False)
        summaries[mode] = run_sweep(sweep_registry, recipe, config, progress=False, log=lambda _: None)
    rows = {mode: json.loads((Path(s["directory"]) / "results.json").read_text())["points"]
            for mode, s in summaries.items()}
    for seq, con in zip(rows["sequential"], rows["concurrent"], strict=True):
        assert seq["rank"] == con["rank"]
        a, b = _deltas(sweep_registry, seq["adapter"]), _deltas(sweep_registry, con["adapter"])
        assert a.keys() == b.keys()
        for module in a:
            scale = float(a[module].abs().max()) + 1e-12
            assert torch.allclose(a[module], b[module], atol=1e-4 * scale, rtol=1e-3), (seq["rank"], module)
        # The adapters did train (ΔW is not the zero of the B = 0 init).
        assert any(float(d.abs().max()) > 0 for k, d in a.items() if "lora" not in k and "." in k)
    for mode in ("sequential", "concurrent"):
        for row in rows[mode]:
            card = sweep_registry.resolve(row["adapter"])
            assert sweep_registry.resolve(f"{card.name}:sw-{mode}").ref == card.ref  # tagged with the sweep
            assert card.rank == row["rank"]
            if kind == "cls":  # test accuracy from the card, validation accuracy from the run's log
                assert row["accuracy"] == pytest.approx(card.metrics["accuracy"]) and "val_accuracy" in row
            assert bool(row["over_complete"]) == (row["rank"] > 16)  # v_proj / value is 32→16 or 32→32


def test_report_files_knee_and_resume(sweep_registry: Registry, gen_data: Path, tmp_path: Path) -> None:
    recipe = recipe_for("gen", gen_data, tmp_path / "runs", max_steps=2)
    config = SweepConfig(ranks=[1, 2, 8], sweep_id="sw-report", truncate_from=8)
    summary = run_sweep(sweep_registry, recipe, config, progress=False, log=lambda _: None)
    directory = Path(summary["directory"])
    for name in ("results.csv", "results.json", "results.md", "metric_vs_rank.png", "params_vs_rank.png"):
        assert (directory / name).stat().st_size > 0, name
    with (directory / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    trained = [r for r in table if r["series"] == "trained"]
    truncated = [r for r in table if r["series"] == "truncated"]
    assert [int(r["rank"]) for r in trained] == [1, 2, 8]
    assert sorted(int(r["rank"]) for r in truncated) == [1, 2]
    # Validation (the kept best evaluation) and held-out test figures are separate columns.
    assert all(float(r["val_loss"]) > 0 and float(r["test_loss"]) > 0 and r["val_loss"] != r["test_loss"]
               for r in trained)
    assert all(r["bleu"] != "" and r["val_perplexity"] != "" for r in trained)
    params = [int(r["trainable_params"]) for r in trained]
    assert params[1] == 2 * params[0] and params[2] == 8 * params[0]  # LoRA parameters are linear in r
    # Two training steps cannot separate ranks: the report must say so rather than name a knee.
    report = (directory / "results.md").read_text()
    assert summary["knee"] in (None, 1, 2, 8)
    assert (f"Knee: r = {summary['knee']}" if summary["knee"] else "Knee: not separable") in report
    # Every row states how it was trained, and the E2E metrics are there (METEOR where Java runs).
    from adapterhub_local.metrics import meteor_available

    for row in trained:
        assert row["steps"] == "2" and int(row["examples_seen"]) == 2 * recipe.train.batch_size
        assert float(row["data_fraction"]) == 1.0 and int(row["train_examples"]) > 0
        assert float(row["nist"]) >= 0 and float(row["cider"]) >= 0
        assert (row.get("meteor") not in (None, "")) == (meteor_available() is None)
    # Every row (trained and truncated) keeps its per-example records: test outputs, BLEU statistics, and the test
    # and validation losses' per-example sums, so every one of these metrics can be judged example by example.
    results = json.loads((directory / "state.json").read_text())["results"]
    assert len(results) == 5
    for row in results.values():
        kept = row["per_example"].keys()
        assert {"hypothesis", "bleu_stats", "stopped", "test_nll", "test_tokens", "val_nll"} <= kept
    # Truncated adapters name their parent: the trained r=8 adapter.
    parent = next(r["adapter"] for r in trained if r["rank"] == "8")
    for row in truncated:
        assert sweep_registry.resolve(row["adapter"]).parent == parent
    # Running the same sweep again trains nothing new: every point is already done.
    before = len(sweep_registry.list_adapters())
    again = run_sweep(sweep_registry, recipe, config, progress=False, log=lambda _: None)
    assert len(sweep_registry.list_adapters()) == before
    assert again["knee"] == summary["knee"]


def _interrupt_runs_at(monkeypatch: pytest.MonkeyPatch, rank: int) -> list[int]:
    """Make every training run record its rank, and the one of ``rank`` stop as a Ctrl-C would; returns the ranks."""
    from adapterhub_local.train import runner

    real_run = runner.run
    calls: list[int] = []

    def interrupted(recipe_: object, *args: object, **kwargs: object) -> object:
        calls.append(recipe_.method.r)  # type: ignore[attr-defined]
        if recipe_.method.r == rank:  # type: ignore[attr-defined]
            raise KeyboardInterrupt
        return real_run(recipe_, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "run", interrupted)
    return calls


def test_interrupted_sweep_resumes_from_the_registry_and_state(
    sweep_registry: Registry, gen_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapterhub_local.train import runner

    recipe = recipe_for("gen", gen_data, tmp_path / "runs", max_steps=2)
    config = SweepConfig(ranks=[1, 2, 4], sweep_id="sw-resume", e2e_metrics=False)
    real_run = runner.run
    calls = _interrupt_runs_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep_registry, recipe, config, progress=False, log=lambda _: None)
    assert calls == [1, 2]
    def counting(recipe_: object, *args: object, **kwargs: object) -> object:
        calls.append(recipe_.method.r)  # type: ignore[attr-defined]
        return real_run(recipe_, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "run", counting)
    summary = run_sweep(sweep_registry, recipe, config, progress=False, log=lambda _: None)
    assert calls == [1, 2, 2, 4]  # r=1 was not trained again
    ranks = [r["rank"] for r in json.loads((Path(summary["directory"]) / "results.json").read_text())["points"]]
    assert sorted(ranks) == [1, 2, 4]


def test_a_points_extra_scores_and_truncations_are_kept_as_it_trains(
    sweep_registry: Registry, gen_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long sweep interrupted later keeps what each finished point needed its adapter for (beam search, E2E
    metrics, the source's truncations): computed when the point is trained, they are in the state at once."""
    recipe = recipe_for("gen", gen_data, tmp_path / "runs", max_steps=2)
    config = SweepConfig(ranks=[1, 2, 4, 8], sweep_id="sw-scored-as-trained", truncate_from=4, num_beams=2)
    _interrupt_runs_at(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep_registry, recipe, config, progress=False, log=lambda _: None)
    results = json.loads((tmp_path / "runs" / "sw-scored-as-trained" / "state.json").read_text())["results"]
    trained = {k: v for k, v in results.items() if k.startswith("trained:")}
    truncated = {k: v for k, v in results.items() if k.startswith("truncated:")}
    assert sorted(v["rank"] for v in trained.values()) == [1, 2, 4]
    assert sorted(v["rank"] for v in truncated.values()) == [1, 2]
    assert all("beam_bleu" in v["metrics"] and "beam_nist" in v["metrics"] for v in trained.values())
    assert all("nist" in v["metrics"] and "cider" in v["metrics"] for v in results.values())

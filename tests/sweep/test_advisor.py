"""The rank advisor and rank × data size on tiny models, end to end through ``run_sweep``: the advisor trains only
the highest rank, predicts the rest from its truncations, recommends a rank with its cost, and is checked
against the trained ranks once the same sweep is run in full; data fractions train on nested subsets and
share the held-out split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterhub_local.cli import main
from adapterhub_local.registry import Registry
from adapterhub_local.sweep.driver import run_sweep
from adapterhub_local.sweep.plan import SweepConfig
from tests.sweep.conftest import recipe_for


def test_advisor_trains_one_rank_predicts_the_rest_and_is_checked_later(
    sweep_registry: Registry, cls_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapterhub_local.train import runner

    recipe = recipe_for("cls", cls_data, tmp_path / "runs", max_steps=24, lr=5e-2)
    trained: list[int] = []
    real_run = runner.run

    def counting(recipe_: object, *args: object, **kwargs: object) -> object:
        trained.append(recipe_.method.r)  # type: ignore[attr-defined]
        return real_run(recipe_, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "run", counting)
    config = SweepConfig(ranks=[1, 2, 8], sweep_id="sw-advise", advise=True)
    summary = run_sweep(sweep_registry, recipe, config, progress=False, log=lambda _: None)
    assert trained == [8]  # only the highest rank is trained
    directory = Path(summary["directory"])
    stored = (directory / "advice.json").read_text()
    advice = json.loads(stored)
    assert advice["recommended_rank"] in (1, 2, 8) and advice["source_rank"] == 8
    assert [c["rank"] for c in advice["curve"]] == [1, 2, 8]
    # Cost: the LoRA part is linear in rank, on top of the classifier head the r=8 run also trained.
    costs = [c["trainable_params"] for c in advice["curve"]]
    per_rank = advice["spectrum"]["lora_params_per_rank"]
    assert costs[1] - costs[0] == per_rank and costs[2] - costs[0] == 7 * per_rank
    assert advice["expected"]["trainable_params"] == costs[[1, 2, 8].index(advice["recommended_rank"])]
    spectrum = advice["spectrum"]
    assert 1 <= spectrum["energy_rank_90"] <= spectrum["energy_rank_99"] <= 8 and spectrum["entropy_rank"] >= 1
    assert advice["check"] is None
    text = (directory / "results.md").read_text()
    assert "## Rank advisor" in text and f"Recommended rank: r = {advice['recommended_rank']}" in text
    # The full sweep (same options, no --advise) trains the other ranks only and checks the prediction.
    summary = run_sweep(sweep_registry, recipe, SweepConfig(ranks=[1, 2, 8], sweep_id="sw-advise"),
                        progress=False, log=lambda _: None)
    assert trained == [8, 1, 2]
    check = json.loads((directory / "advice.json").read_text())["check"]
    assert [c["rank"] for c in check["per_rank"]] == [1, 2]  # r=8 is its own prediction: left out
    assert check["mean_abs_error"] >= 0 and "Prediction against trained ranks" in (directory / "results.md").read_text()
    # The report of the sweep as it stands judges a stored advice again on the points trained since it was
    # written (here: the advice-only run's, which had nothing to check against).
    (directory / "advice.json").write_text(stored)
    assert main(["sweep-report", str(directory), "--json"]) == 0
    interim = json.loads((directory / "interim" / "results.json").read_text())["advice"]
    assert interim["check"] == check and interim["recommended_rank"] == advice["recommended_rank"]
    assert "Prediction against trained ranks" in (directory / "interim" / "results.md").read_text()
    # Every run kept its per-example record: the verdict pairs runs example by example.
    verdict = json.loads((directory / "results.json").read_text())["verdicts"][0]
    assert "paired bootstrap over evaluation examples" in verdict["test"]


def test_data_fractions_train_nested_subsets_on_one_held_out_split(
    sweep_registry: Registry, cls_data: Path, tmp_path: Path
) -> None:
    recipe = recipe_for("cls", cls_data, tmp_path / "runs", max_steps=2)
    config = SweepConfig(ranks=[1, 4], sweep_id="sw-frac", data_fractions=[0.5, 1.0])
    summary = run_sweep(sweep_registry, recipe, config, progress=False, log=lambda _: None)
    directory = Path(summary["directory"])
    points = json.loads((directory / "results.json").read_text())["points"]
    assert sorted((p["fraction"], p["rank"]) for p in points) == [(0.5, 1), (0.5, 4), (1.0, 1), (1.0, 4)]
    rows = {p["fraction"]: p["train_examples"] for p in points}
    assert rows[0.5] == round(rows[1.0] / 2)
    # The same held-out examples for every fraction (so the heatmap compares like with like).
    tests = {sweep_registry.resolve(p["adapter"]).training["test_examples"] for p in points}
    assert len(tests) == 1
    assert (directory / "rank_by_data.png").stat().st_size > 0
    assert "## Data fraction 0.5" in (directory / "results.md").read_text()


def test_no_rank_is_recommended_from_a_flagged_adapter() -> None:
    from adapterhub_local.sweep.advisor import recommend
    from adapterhub_local.sweep.verdict import flag_rows, judge
    from tests.sweep.test_report import _classifier_row

    labels = [0] * 250 + [1] * 150
    collapsed = [_classifier_row(r, 0, 0.0, labels=labels, predicted=[0] * 400) for r in (1, 2, 8)]
    for row in collapsed:
        row.series = "truncated"
    flag_rows(collapsed, "accuracy")
    rank, why = recommend(judge(collapsed, "accuracy", 0.0, series="truncated"), [collapsed[-1]], 8)
    assert rank is None and "flagged (below_baseline, collapsed)" in why
    # A healthy curve with a clear knee recommends it; an inseparable one the smallest rank, with the caveat.
    clear = [_classifier_row(r, 0, a, labels=labels) for r, a in [(1, 0.7), (2, 0.95), (8, 0.95)]]
    same = [_classifier_row(r, 0, 0.8, labels=labels) for r in (1, 2, 8)]
    for rows in (clear, same):
        for row in rows:
            row.series = "truncated"
        flag_rows(rows, "accuracy")
    assert recommend(judge(clear, "accuracy", 0.0, series="truncated"), [clear[-1]], 8)[0] == 2
    rank, why = recommend(judge(same, "accuracy", 0.0, series="truncated"), [same[-1]], 8)
    assert rank == 1 and "could not separate" in why


@pytest.mark.parametrize("kind", ["cls", "gen"])
def test_the_advisor_evaluates_bf16_runs_as_training_did(kind: str, sweep_registry: Registry, cls_data: Path,
                                                        gen_data: Path, tmp_path: Path) -> None:
    """A bf16 run (bf16 base, fp32 adapter and classifier head) is re-evaluated from its truncations under the
    precision it trained in — the truncated curve's validation once failed on a bf16 × fp32 matmul in the head —
    and beam search decodes it the same way."""
    data = cls_data if kind == "cls" else gen_data
    recipe = recipe_for(kind, data, tmp_path / "runs", max_steps=2, precision="bf16")
    config = SweepConfig(ranks=[1, 4], sweep_id=f"sw-bf16-{kind}", advise=True,
                         num_beams=2 if kind == "gen" else 1)
    summary = run_sweep(sweep_registry, recipe, config, progress=False, log=lambda _: None)
    advice = json.loads((Path(summary["directory"]) / "advice.json").read_text())
    assert [c["rank"] for c in advice["curve"]] == [1, 4]


def test_the_advice_agrees_with_a_trained_sweep_that_says_the_same() -> None:
    from adapterhub_local.sweep.advisor import advice_agrees

    assert advice_agrees(4, True, 4, True) and advice_agrees(1, False, None, False)  # same knee; both cannot separate
    assert advice_agrees(4, True, 8, True) is False and advice_agrees(1, False, 4, True) is False
    assert advice_agrees(4, True, None, False) is False and advice_agrees(None, False, None, False) is None

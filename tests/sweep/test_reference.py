"""A published rank table beside a sweep's (``adapterhub sweep-report --reference``): reading the table, refusing
bad ones with every problem named, and comparing the curves' shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterhub_local.cli import main
from adapterhub_local.errors import ConfigError, NotFoundError
from adapterhub_local.registry import Registry
from adapterhub_local.sweep.driver import run_sweep
from adapterhub_local.sweep.plan import SweepConfig
from adapterhub_local.sweep.reference import compare, load_reference, markdown, spearman
from tests.sweep.conftest import recipe_for

SHIPPED = Path(__file__).resolve().parents[2] / "recipes" / "references" / "lora-paper-table18-e2e.csv"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ref.csv"
    path.write_text(text)
    return path


def test_the_shipped_table_18_reads_whole() -> None:
    table = load_reference(SHIPPED)
    assert sorted(table.rows) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    assert table.metrics == ["val_loss", "bleu", "nist", "meteor", "rougeL", "cider"]
    assert all(len(values) == 6 for values in table.rows.values())
    assert "2106.09685" in table.facts["source"] and "Table 18" in table.title
    # The paper's own reading: BLEU peaks at r = 4, validation loss bottoms out from r = 16.
    assert max(table.rows, key=lambda r: table.rows[r]["bleu"]) == 4
    assert min(table.rows, key=lambda r: table.rows[r]["val_loss"]) == 16


@pytest.mark.parametrize(("text", "expected"), [
    ("r,bleu\n1,2\n", "not 'rank'"),
    ("rank\n1\n", "no metric columns"),
    ("rank,bleu,bleu\n1,2,3\n", "appears twice"),
    ("rank,bleu\n1,abc\n", "'abc' is not a number"),
    ("rank,bleu\n1,nan\n", "bleu is nan"),
    ("rank,bleu\n0,1\n", "not a positive integer"),
    ("rank,bleu\n1,2\n1,3\n", "rank 1 appears twice"),
    ("rank,bleu\n1,2,3\n", "3 cells, the header 2"),
    ("rank,bleu\n", "no rows"),
    ("# title: only facts\n", "no header"),
])
def test_a_bad_table_is_refused_naming_the_problem(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_reference(_write(tmp_path, text))
    assert expected in str(caught.value) and "rank,<metric>" in str(caught.value)


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_reference(_write(tmp_path, "rank,bleu\n1,x\n1,2\n-3,4\n"))
    assert len(caught.value.problems) == 3


def test_a_missing_table_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        load_reference(tmp_path / "absent.csv")


def test_an_empty_cell_is_a_value_the_source_did_not_give(tmp_path: Path) -> None:
    table = load_reference(_write(tmp_path, "rank,bleu,cider\n1,60,\n2,61,2.0\n"))
    assert table.rows == {1: {"bleu": 60.0}, 2: {"bleu": 61.0, "cider": 2.0}}


def _per_rank(values: dict[int, float], column: str = "bleu", **extra: dict[int, float]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = [{"rank": r, column: v} for r, v in values.items()]
    for name, by_rank in extra.items():
        for row in rows:
            row[name] = by_rank[int(row["rank"])]  # type: ignore[call-overload]
    return rows


def test_the_same_ordering_at_another_scale_correlates_fully_and_peaks_alike(tmp_path: Path) -> None:
    table = load_reference(_write(tmp_path, "rank,bleu,val_loss\n1,60,1.3\n2,64,1.2\n4,70,1.1\n8,66,1.15\n"))
    ours = _per_rank({1: 30.0, 2: 32.0, 4: 35.0, 8: 33.0}, val_loss={1: 2.3, 2: 2.2, 4: 2.1, 8: 2.15},
                     beam_bleu={1: 40.0, 2: 39.0, 4: 38.0, 8: 37.0})
    truncated = _per_rank({1: 20.0, 2: 25.0, 4: 31.0})
    found = {(c["metric"], c["curve"]): c for c in compare(ours, table, truncated)}
    greedy = found["bleu", "greedy"]
    assert greedy["spearman"] == pytest.approx(1.0)
    assert greedy["ours_best_rank"] == greedy["reference_best_rank"] == 4
    assert greedy["ours_range"] == pytest.approx(5.0) and greedy["reference_range"] == pytest.approx(10.0)
    # A loss is best at its minimum.
    assert found["val_loss", "greedy"]["ours_best_rank"] == 4
    # The beam column (falling with rank) orders the ranks nearly the other way round.
    beam = found["bleu", "beam"]
    assert beam["ours_best_rank"] == 1 and beam["spearman"] < 0
    # The truncated curve (the advisor's) is compared on the ranks it has.
    assert found["bleu", "truncated"]["ranks"] == [1, 2, 4] and found["bleu", "truncated"]["ours_best_rank"] == 4
    assert ("val_loss", "truncated") not in found  # the truncations carry no val_loss here
    text = markdown(table, list(found.values()))
    assert "| 4 | 35 | 38 | 31 | 70 |" in text and "| 8 | 33 | 37 |  | 66 |" in text and "Spearman" in text


def test_spearman_needs_three_ranks_and_two_values() -> None:
    assert spearman([1.0, 2.0], [1.0, 2.0]) is None
    assert spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None
    assert spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)


def test_a_table_sharing_no_metric_with_the_sweep_is_refused(tmp_path: Path) -> None:
    table = load_reference(_write(tmp_path, "rank,BLEU\n1,60\n2,61\n"))
    with pytest.raises(ConfigError) as caught:
        compare(_per_rank({1: 30.0, 2: 31.0}), table)
    assert "bleu" in str(caught.value) and "BLEU" in str(caught.value)


def test_sweep_report_sets_the_reference_beside_a_real_sweep(
    sweep_registry: Registry, gen_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = recipe_for("gen", gen_data, tmp_path / "runs", max_steps=2)
    summary = run_sweep(sweep_registry, recipe, SweepConfig(ranks=[1, 2, 4], sweep_id="sw-ref", e2e_metrics=False,
                                                            truncate_from=4),
                        progress=False, log=lambda _: None)
    sweep_dir = Path(summary["directory"])
    capsys.readouterr()
    bad = _write(tmp_path, "rank,bleu\n1,x\n")
    assert main(["sweep-report", str(sweep_dir), "--reference", str(bad)]) != 0
    assert "is not a number" in capsys.readouterr().err
    assert not (sweep_dir / "interim").exists()  # a bad table is refused before anything is written

    assert main(["sweep-report", str(sweep_dir), "--reference", str(SHIPPED)]) == 0
    out = capsys.readouterr().out
    written = (sweep_dir / "interim" / "reference.md").read_text()
    assert "Beside the LoRA paper's Table 18" in written and "beside the reference" in out
    assert (sweep_dir / "interim" / "reference.png").stat().st_size > 10_000
    comparison = json.loads((sweep_dir / "interim" / "reference.json").read_text())["comparison"]
    assert {c["metric"] for c in comparison} >= {"bleu", "val_loss", "rougeL"}
    assert {c["curve"] for c in comparison} == {"greedy", "truncated"}
    assert all(c["ranks"] == ([1, 2, 4] if c["curve"] == "greedy" else [1, 2]) for c in comparison)

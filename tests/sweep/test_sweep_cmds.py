"""``compare``, ``truncate`` and ``sweep`` through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterhub_local.cli import main
from tests.peft_factory import save_lora
from tests.sweep.conftest import make_tiny_llama_with_tokenizer


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_truncate_then_compare(capsys: pytest.CaptureFixture[str], tiny_llama_dir: Path, tmp_path: Path) -> None:
    reg = str(tmp_path / "reg")
    save_lora(tiny_llama_dir, tmp_path / "lora", rank=8)
    assert run(capsys, "-R", reg, "base", "add", "tiny", str(tiny_llama_dir))[0] == 0
    assert run(capsys, "-R", reg, "import", str(tmp_path / "lora"), "--name", "ad", "--base", "tiny")[0] == 0
    code, out, _ = run(capsys, "-R", reg, "truncate", "ad@1", "--rank", "2")
    assert code == 0 and "ad-trunc-r2@1" in out
    code, out, _ = run(capsys, "-R", reg, "show", "ad-trunc-r2", "--json")
    assert json.loads(out)["parent"] == "ad@1" and json.loads(out)["rank"] == 2
    code, out, _ = run(capsys, "-R", reg, "compare", "ad@1", "ad@1", "ad-trunc-r2", "--out", str(tmp_path / "cmp"),
                       "--json")
    assert code == 0
    data = json.loads(out)
    self_pair = data["pairs"][0]
    assert self_pair["a"] == self_pair["b"] == "ad@1" and self_pair["phi_k_mean"] == pytest.approx(1.0)
    # The truncation's 2 directions are the parent's top 2: φ(2, 2) between them is 1 as well.
    trunc_pair = data["pairs"][1]
    assert trunc_pair["b"] == "ad-trunc-r2@1" and trunc_pair["phi_k_mean"] == pytest.approx(1.0, abs=1e-6)
    assert (tmp_path / "cmp" / "spectra.png").exists() and len(list((tmp_path / "cmp").glob("similarity-*.png"))) == 3


def generation_recipe(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> tuple[Path, Path]:
    """A one-row generation recipe on base ``tiny``, registered in a fresh registry: (recipe, registry)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nbase: tiny\ntask: {type: generation}\n"
                      f"data: {{train: {tmp_path / 'd.jsonl'}, template: '{{a}}', completion: '{{b}}'}}\n")
    (tmp_path / "d.jsonl").write_text('{"a": "x", "b": "y"}\n')
    reg = tmp_path / "reg"
    assert run(capsys, "-R", str(reg), "base", "add", "tiny",
               str(make_tiny_llama_with_tokenizer(tmp_path / "tiny")))[0] == 0
    return recipe, reg


def test_bad_sweep_options_fail_with_every_problem(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    recipe, reg = generation_recipe(capsys, tmp_path)
    code, _, err = run(capsys, "-R", str(reg), "sweep", str(recipe), "--ranks", "1,0,x", "--alpha-policy", "odd")
    assert code != 0 and "rank '0'" in err and "rank 'x'" in err
    code, _, err = run(capsys, "-R", str(reg), "sweep", str(recipe), "--ranks", "1,2", "--alpha-policy", "odd",
                       "--mode", "both", "--truncate-from", "8")
    assert code != 0
    for needle in ("alpha policy 'odd'", "mode 'both'", "--truncate-from 8"):
        assert needle in err
    code, _, err = run(capsys, "-R", str(reg), "sweep", str(recipe), "--executor", "cluster", "--address", "h:1",
                       "--ray-cpus", "0", "--max-retries", "-1", "--group-size", "0")
    assert code != 0
    for needle in ("executor 'cluster'", "--address names a Ray cluster", "num_cpus=0", "--max-retries -1",
                   "--group-size 0"):
        assert needle in err


def test_truncate_refuses_a_rank_at_or_above_the_adapters(capsys: pytest.CaptureFixture[str], tiny_llama_dir: Path,
                                                           tmp_path: Path) -> None:
    reg = str(tmp_path / "reg")
    save_lora(tiny_llama_dir, tmp_path / "lora", rank=4)
    assert run(capsys, "-R", reg, "base", "add", "tiny", str(tiny_llama_dir))[0] == 0
    assert run(capsys, "-R", reg, "import", str(tmp_path / "lora"), "--name", "ad", "--base", "tiny")[0] == 0
    for too_high in ("4", "8"):
        code, _, err = run(capsys, "-R", reg, "truncate", "ad@1", "--rank", too_high)
        assert code != 0 and f"to rank {too_high}" in err and "below 4" in err
    code, out, _ = run(capsys, "-R", reg, "list", "--json")
    assert "ad-trunc" not in out  # nothing was registered
    assert run(capsys, "-R", reg, "truncate", "ad@1", "--rank", "3")[0] == 0


@pytest.mark.parametrize("form", ["positional", "set"])
def test_sweep_takes_overrides_positionally_and_with_set(form: str, capsys: pytest.CaptureFixture[str],
                                                         tmp_path: Path) -> None:
    recipe, reg = generation_recipe(capsys, tmp_path)
    # The override turns the recipe into a soft-prompt one, which a rank sweep refuses: proof it was applied.
    override = ["method.name=prompt"] if form == "positional" else ["--set", "method.name=prompt"]
    code, _, err = run(capsys, "-R", str(reg), "sweep", str(recipe), *override, "--ranks", "1,2")
    assert code != 0 and "method is 'prompt'" in err
    code, _, err = run(capsys, "-R", str(reg), "sweep", str(recipe), "method.r", "--ranks", "1,2")
    assert code != 0 and "key=value" in err


def test_bad_data_fractions_and_beam_widths_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nbase: tiny\ntask: {type: generation}\n"
                      f"data: {{train: {tmp_path / 'd.jsonl'}, template: '{{a}}', completion: '{{b}}'}}\n")
    (tmp_path / "d.jsonl").write_text('{"a": "x", "b": "y"}\n')
    reg = str(tmp_path / "reg")
    code, _, err = run(capsys, "-R", reg, "sweep", str(recipe), "--data-fractions", "0,1.5,x")
    assert code != 0 and "'0' is not in (0, 1]" in err and "'1.5'" in err and "'x' is not a number" in err
    code, _, err = run(capsys, "-R", reg, "sweep", str(recipe), "--seeds", "0,a")
    assert code != 0 and "seed 'a'" in err


def test_a_bad_reference_table_is_refused_before_the_sweep_trains(capsys: pytest.CaptureFixture[str],
                                                                  tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nbase: tiny\ntask: {type: generation}\n"
                      f"data: {{train: {tmp_path / 'd.jsonl'}, template: '{{a}}', completion: '{{b}}'}}\n"
                      f"output: {{runs_dir: {tmp_path / 'runs'}}}\n")
    (tmp_path / "d.jsonl").write_text('{"a": "x", "b": "y"}\n')
    (tmp_path / "ref.csv").write_text("rank,bleu\n1,high\n")
    code, _, err = run(capsys, "-R", str(tmp_path / "reg"), "sweep", str(recipe), "--reference",
                       str(tmp_path / "ref.csv"))
    assert code != 0 and "'high' is not a number" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reg").exists()

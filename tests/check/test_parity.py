"""``adapterhub check``: every kind passes against PEFT on every path, a deliberately wrong scale fails loudly
(and is on file), results land in the append-only sidecar, and ``import``/``show`` run and report it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapterhub_local import lora
from adapterhub_local.check.parity import ParityError, run_check, tolerance
from adapterhub_local.check.sidecar import CheckRecord, append, history, sidecar_path, summary
from adapterhub_local.cli import main
from adapterhub_local.registry import CardInfo, Registry
from tests.inference.conftest import lora_dir, make_llama, prompt_dir
from tests.inference.test_dora import dora_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Registry, Path]:
    root = tmp_path_factory.mktemp("parity")
    registry = Registry(root / "registry")
    llama = make_llama(root / "llama")
    registry.add_base("tiny", str(llama))
    info = CardInfo(task="test", task_type="causal_lm")
    registry.register_adapter("lora", lora_dir(llama, root / "lora", 4, ["q_proj", "v_proj"], 3), "tiny", info)
    registry.register_adapter("rs", lora_dir(llama, root / "rs", 8, ["o_proj"], 4, use_rslora=True), "tiny", info)
    registry.register_adapter("dora", dora_dir(llama, root / "dora", 4, ["q_proj", "down_proj"], 1), "tiny", info)
    registry.register_adapter("soft", prompt_dir(llama, root / "soft", 4, 4), "tiny", info)
    for name, seed in (("cls", 5), ("cls2", 6)):
        registry.register_adapter(
            name, lora_dir(llama, root / name, 4, ["q_proj", "v_proj"], seed, task="SEQ_CLS", num_labels=3),
            "tiny", CardInfo(task="cls", task_type="sequence_classification", labels=["neg", "neu", "pos"]))
    return registry, llama


@pytest.mark.parametrize("ref", ["lora", "rs", "dora", "soft", "cls"])
def test_every_kind_passes_on_every_path(world: tuple[Registry, Path], ref: str) -> None:
    registry, _ = world
    record = run_check(registry, ref, prompts=2, max_new_tokens=3)
    assert record.passed and record.max_logit_diff <= record.tolerance
    assert record.mixed_with is not None and record.mixed_with != registry.resolve(ref).ref
    expected = {"swap", "mixed"} | ({"merge"} if ref != "soft" else set())
    expected |= {"label_agreement"} if ref == "cls" else {"dynamic_agreement", "static_agreement"}
    assert set(record.paths) == expected
    assert record.greedy_agreement == 1.0
    assert history(registry, registry.resolve(ref)).latest == record


def test_a_wrong_scale_fails_loudly_and_is_recorded(world: tuple[Registry, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    registry, _ = world
    card = registry.resolve("lora")
    right = lora.lora_scale
    monkeypatch.setattr(lora, "lora_scale", lambda alpha, rank, rs=False: 1.1 * right(alpha, rank, rs))
    with pytest.raises(ParityError, match=r"largest logit difference .* > tolerance .*swap"):
        run_check(registry, "lora", prompts=1, max_new_tokens=1)
    latest = history(registry, card).latest
    assert latest is not None and not latest.passed and latest.max_logit_diff > latest.tolerance


def test_tolerance_depends_on_dtype_and_scale() -> None:
    assert tolerance(torch.float32, 1.0) < tolerance(torch.float16, 1.0) < tolerance(torch.bfloat16, 1.0)
    assert tolerance(torch.float32, 40.0) == pytest.approx(40 * tolerance(torch.float32, 1.0))


def test_sidecar_is_append_only_and_reads_strictly(world: tuple[Registry, Path]) -> None:
    registry, _ = world
    card = registry.resolve("rs")
    before = history(registry, card).records
    path = sidecar_path(registry, card.content_hash)
    path.parent.mkdir(exist_ok=True)
    old = path.read_text() if path.exists() else ""
    path.write_text(old + '{"ref": "rs@1", "passed": "yes"}\nnot json\n')
    other_base = CheckRecord(ref=card.ref, content_hash=card.content_hash, base="x", base_fingerprint="f" * 64,
                             dtype="float32", device="cpu", prompts=1, tolerance=1.0, max_logit_diff=0.0,
                             greedy_agreement=1.0, passed=True)
    append(registry, other_base)
    assert path.read_text().startswith(old + '{"ref": "rs@1", "passed": "yes"}\nnot json\n')
    found = history(registry, card)
    assert found.records == before and found.unreadable == 2  # the other base's record is not this card's
    shown = summary(registry, card)
    assert shown is None or shown["unreadable_lines"] == 2


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().out


def test_import_checks_by_default_and_show_reports_it(world: tuple[Registry, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    registry, llama = world
    reg = str(registry.root)
    source = lora_dir(llama, tmp_path / "new", 2, ["k_proj"], 9)
    code, out = run(capsys, "-R", reg, "import", str(source), "--name", "imported", "--base", "tiny")
    assert code == 0 and "parity passed for imported@1" in out
    code, out = run(capsys, "-R", reg, "show", "imported", "--json")
    parity = json.loads(out)["parity"]
    assert parity["passed"] is True and parity["checks"] == 1 and parity["dtype"] == "float32"
    code, out = run(capsys, "-R", reg, "import", str(source), "--name", "copy", "--base", "tiny", "--no-check")
    assert code == 0 and "parity" not in out
    code, out = run(capsys, "-R", reg, "show", "copy", "--json")
    assert json.loads(out)["parity"]["checks"] == 1  # the same bytes on the same base: the same check applies
    other = lora_dir(llama, tmp_path / "other", 2, ["k_proj"], 10)
    code, out = run(capsys, "-R", reg, "import", str(other), "--name", "unchecked", "--base", "tiny", "--no-check")
    assert code == 0 and "parity" not in out
    code, out = run(capsys, "-R", reg, "show", "unchecked", "--json")
    assert json.loads(out)["parity"] is None
    code, out = run(capsys, "-R", reg, "check", "unchecked", "--json", "--prompts", "1", "--device", "cpu")
    assert code == 0 and json.loads(out)["passed"] is True


def test_check_command_exits_nonzero_on_a_wrong_scale(world: tuple[Registry, Path], monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    registry, _ = world
    right = lora.lora_scale
    monkeypatch.setattr(lora, "lora_scale", lambda alpha, rank, rs=False: 0.5 * right(alpha, rank, rs))
    code = main(["-R", str(registry.root), "check", "dora", "--prompts", "1", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code != 0 and "not served as PEFT runs it" in captured.out + captured.err


def test_v1_models_reports_each_versions_latest_check(world: tuple[Registry, Path]) -> None:
    from fastapi.testclient import TestClient

    from tests.server.conftest import make_app

    registry, _ = world
    run_check(registry, "cls2", prompts=1)
    with TestClient(make_app(registry)) as client:
        by_id = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert by_id["cls2@1"]["parity"]["passed"] is True and by_id["cls2"]["parity"] == by_id["cls2@1"]["parity"]
    assert by_id["tiny"]["parity"] is None
    assert summary(registry, registry.resolve("cls2")) == by_id["cls2@1"]["parity"]


def test_a_classifier_imported_without_labels_is_checked_with_its_heads_outputs(world: tuple[Registry, Path],
                                                                                 tmp_path: Path) -> None:
    registry, llama = world
    source = lora_dir(llama, tmp_path / "nolabels", 2, ["q_proj"], 11, task="SEQ_CLS", num_labels=5)
    registry.register_adapter("nolabels", source, "tiny", CardInfo(task_type="sequence_classification"))
    record = run_check(registry, "nolabels", prompts=1)
    assert record.passed and "label_agreement" in record.paths


@pytest.mark.parametrize("ref", ["lora", "dora"])
def test_bf16_checks_pass_within_the_bf16_tolerance(world: tuple[Registry, Path], ref: str) -> None:
    registry, _ = world
    record = run_check(registry, ref, dtype=torch.bfloat16, prompts=2, max_new_tokens=2, record=False)
    assert record.passed and record.dtype == "bfloat16"
    assert record.tolerance > tolerance(torch.float32, 1.0)

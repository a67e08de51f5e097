"""``generate``, ``predict``, ``eval`` and ``merge`` through the real command line on tiny trained adapters:
adapters carry their task (template, prefix, stops, labels) and use it by default, ``--raw`` opts out,
``merge --out`` replaces only with ``--force``, and a missing device is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from adapterhub_local.cli import main
from adapterhub_local.task_spec import TaskSpec
from tests.cli.tiny import CLS_TEMPLATE, GEN_TEMPLATE, World, make_world, run


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """The tiny world with ``tgen@1`` and ``tcls@1`` trained from recipes with templates."""
    made = make_world(tmp_path_factory.mktemp("infer"))
    for recipe in (made.gen_recipe, made.cls_recipe):
        assert main(["-R", made.reg, "train", str(recipe), "--json", "--no-progress"]) == 0
    return made


def test_training_writes_the_task_on_the_card(world: World) -> None:
    gen = world.registry.resolve("tgen@1").extra["task_spec"]
    assert gen == {"type": "generation", "template": GEN_TEMPLATE, "completion_prefix": " ",
                   "stop": ["\n", "restaurant :"], "labels": None, "pooling": None}
    cls = world.registry.resolve("tcls@1").extra["task_spec"]
    assert cls == {"type": "classification", "template": CLS_TEMPLATE, "completion_prefix": "",
                   "stop": [], "labels": ["negative", "positive"], "pooling": "native"}


def test_generate_fills_the_template_with_raw_text(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    raw_input = "name[pub], area[riverside]"
    templated = run(capsys, "generate", "tgen", raw_input, "-n", "6", "--json", "-R", world.reg)
    assert templated.code == 0, templated.err
    shown = templated.json()
    assert shown["prompt"] == GEN_TEMPLATE.format(mr=raw_input) and shown["template_applied"]
    assert shown["stop"] == ["\n", "restaurant :"]
    # The same model input sent with --raw gives the same generation, before the spec cleans it.
    by_hand = run(capsys, "generate", "tgen", GEN_TEMPLATE.format(mr=raw_input), "-n", "6", "--raw", "--json",
                  "--stop", "\n", "--stop", "restaurant :", "-R", world.reg).json()
    assert by_hand["prompt"] == shown["prompt"] and not by_hand["template_applied"]
    assert shown["text"] == TaskSpec("generation", GEN_TEMPLATE, " ").clean_output(by_hand["text"])
    # --raw sends the input unchanged: another prompt, fewer tokens.
    raw = run(capsys, "generate", "tgen", raw_input, "-n", "6", "--raw", "--json", "-R", world.reg).json()
    assert raw["prompt"] == raw_input and raw["stop"] == []
    assert raw["prompt_tokens"] < shown["prompt_tokens"]


def test_stream_prints_what_generate_returns(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    whole = run(capsys, "generate", "tgen", "name[pub]", "-n", "5", "-R", world.reg)
    streamed = run(capsys, "generate", "tgen", "name[pub]", "-n", "5", "--stream", "-R", world.reg)
    assert whole.code == streamed.code == 0
    assert streamed.out == whole.out


def test_verbose_shows_the_model_input(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "generate", "tgen", "name[pub]", "-n", "2", "--verbose", "-R", world.reg)
    assert result.code == 0
    assert repr(GEN_TEMPLATE.format(mr="name[pub]")) in result.err


def test_predict_uses_the_classifier_template_unless_raw(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    templated = run(capsys, "predict", "tcls", "good movie", "--json", "-R", world.reg).json()
    assert templated["input"] == CLS_TEMPLATE.format(text="good movie")
    assert set(templated["probabilities"]) == {"negative", "positive"}
    raw = run(capsys, "predict", "tcls", "good movie", "--raw", "--json", "-R", world.reg).json()
    assert raw["input"] == "good movie"
    assert raw["probabilities"] != templated["probabilities"]  # the template changes what the model sees


def test_eval_applies_the_template_and_raw_reads_preformatted_rows(world: World, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rows = [json.loads(line) for line in world.cls_data.read_text().splitlines()]
    formatted = tmp_path / "formatted.jsonl"
    formatted.write_text("".join(json.dumps({"text": CLS_TEMPLATE.format(**r), "label": r["label"]}) + "\n"
                                 for r in rows))
    by_template = run(capsys, "eval", "tcls", "--data", world.cls_data, "--json", "-R", world.reg).json()
    by_raw = run(capsys, "eval", "tcls", "--data", formatted, "--raw", "--json", "-R", world.reg).json()
    assert by_raw["accuracy"] == by_template["accuracy"]
    assert by_raw["val_loss"] == pytest.approx(by_template["val_loss"])
    plain = run(capsys, "eval", "tcls", "--data", world.cls_data, "--raw", "--json", "-R", world.reg).json()
    assert plain["val_loss"] != pytest.approx(by_template["val_loss"])  # without the template: other inputs


def test_merge_out_replaces_only_with_force(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "merged"
    assert run(capsys, "merge", "tgen", "--out", out, "-R", world.reg).code == 0
    (out / "stale.txt").write_text("from an earlier run")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    refused = run(capsys, "merge", "tgen", "--out", out, "-R", world.reg)
    assert refused.code != 0 and "not empty" in refused.err and "--force" in refused.err
    assert len(refused.err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    failed = run(capsys, "merge", "tgen", "--out", out, "--force", "--dtype", "int8", "-R", world.reg)
    assert failed.code != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # a failed --force leaves the old output
    assert run(capsys, "merge", "tgen", "--out", out, "--force", "-R", world.reg).code == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]  # no staging left behind
    file_target = tmp_path / "a-file"
    file_target.write_text("x")
    assert run(capsys, "merge", "tgen", "--out", file_target, "--force", "-R", world.reg).code != 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["generate", "tgen", "x"], ["predict", "tcls", "x"]])
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps", "tpu"])
def test_an_unavailable_device_is_one_line(world: World, capsys: pytest.CaptureFixture[str], command: list[str],
                                           device: str) -> None:
    result = run(capsys, *command, "--device", device, "-R", world.reg)
    assert result.code != 0
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and device.split(":")[0] in lines[0]
    assert "Traceback" not in result.err


@pytest.mark.parametrize("native", [True, False])
def test_generate_and_serve_auto_dtype_is_bf16_where_the_cpu_multiplies_it_natively(
        monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    from adapterhub_local import runtime
    from adapterhub_local.cli.infer_cmds import _dtype

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda flags=None: native)
    assert _dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert _dtype("float32", "cpu") == torch.float32 and _dtype("bfloat16", "cpu") == torch.bfloat16


@pytest.mark.parametrize("command", [["generate", "tgen", "hello"], ["predict", "tcls", "hello"]])
def test_an_unknown_dtype_is_refused_before_loading(world: World, capsys: pytest.CaptureFixture[str],
                                                    command: list[str]) -> None:
    failed = run(capsys, *command, "--dtype", "bf16", "-R", world.reg)
    assert failed.code != 0 and "dtype 'bf16' is not one of auto, float32, bfloat16, float16" in failed.err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_predict_runs_its_engine_in_the_asked_dtype(world: World, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    import adapterhub_local.inference as inference

    seen: list[torch.dtype] = []
    real = inference.Engine

    def engine(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["dtype"])
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "Engine", engine)
    result = run(capsys, "predict", "tcls", "good movie", "--dtype", dtype, "--json", "-R", world.reg).json()
    assert seen == [getattr(torch, dtype)]
    assert set(result["probabilities"]) == {"negative", "positive"}
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-2)

"""``adapterhub generate / predict / merge`` end to end through the real CLI entry point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from adapterhub_local.cli import main
from adapterhub_local.inference import Engine, Request, SamplingParams
from adapterhub_local.registry import Registry


@pytest.fixture(scope="module")
def reg(zoo: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A private copy of the zoo registry (the CLI writes nothing, but tests must not share state)."""
    target = tmp_path_factory.mktemp("cli") / "registry"
    shutil.copytree(zoo.root, target)
    return str(target)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_matches_the_engine(capsys: pytest.CaptureFixture[str], reg: str) -> None:
    expected = Engine(Registry(reg), "tiny").generate(
        [Request(prompt="Hello", adapter="r8-attn", sampling=SamplingParams(max_new_tokens=8))])[0]
    code, out, err = run(capsys, "-R", reg, "generate", "r8-attn", "Hello", "-n", "8", "--json", "--device", "cpu")
    assert code == 0, err
    data = json.loads(out)
    assert data["text"] == expected.text and data["adapter"] == "r8-attn@1" and data["merged"] is None
    code, out, _ = run(capsys, "-R", reg, "generate", "r8-attn", "Hello", "-n", "8", "--merge", "--json")
    assert code == 0 and json.loads(out)["text"] == expected.text and json.loads(out)["merged"] == "r8-attn@1"
    code, out, _ = run(capsys, "-R", reg, "generate", "r8-attn", "Hello", "-n", "8", "--stream")
    assert code == 0 and out == expected.text + "\n"
    code, out, _ = run(capsys, "-R", reg, "generate", "r8-attn", "Hello", "-n", "8", "--decoder", "static", "--json")
    assert code == 0 and json.loads(out)["text"] == expected.text


def test_generate_decoder_errors_name_the_fix(capsys: pytest.CaptureFixture[str], reg: str) -> None:
    code, _, err = run(capsys, "-R", reg, "generate", "r8-attn", "Hi", "--decoder", "graph", "--device", "cpu")
    assert code != 0 and "CUDA graphs need a CUDA device" in err and "decoder='static'" in err
    code, _, err = run(capsys, "-R", reg, "generate", "r8-attn", "Hi", "--decoder", "turbo")
    assert code != 0 and "unknown decoder 'turbo'" in err


def test_generate_sampling_options_and_bare_base(capsys: pytest.CaptureFixture[str], reg: str) -> None:
    args = ["-R", reg, "generate", "base:tiny", "Hi", "-n", "6", "--temperature", "0.9", "--top-k", "20",
            "--top-p", "0.9", "--repetition-penalty", "1.2", "--seed", "4", "--chat", "--json"]
    first, second = run(capsys, *args), run(capsys, *args)
    assert first[0] == 0 and first[1] == second[1]
    assert json.loads(first[1])["adapter"] is None


def test_generate_soft_prompt_with_merge_is_a_clear_error(capsys: pytest.CaptureFixture[str], reg: str) -> None:
    code, _, err = run(capsys, "-R", reg, "generate", "soft", "Hi", "--merge")
    assert code != 0 and "soft prompt" in err and "swap" in err


def test_predict_classifier_and_generator(capsys: pytest.CaptureFixture[str], reg: str) -> None:
    code, out, err = run(capsys, "-R", reg, "predict", "bert-cls", "a fine film", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert set(data["probabilities"]) == {"negative", "positive"}
    assert data["label"] == max(data["probabilities"], key=data["probabilities"].get)
    assert sum(data["probabilities"].values()) == pytest.approx(1.0)
    code, out, _ = run(capsys, "-R", reg, "predict", "bert-cls", "a fine film")
    assert code == 0 and data["label"] in out
    code, out, _ = run(capsys, "-R", reg, "predict", "r2-v", "Hello", "-n", "5", "--json")
    assert code == 0 and json.loads(out)["finish_reason"] in ("stop", "length")


def test_merge_writes_a_model_transformers_loads(capsys: pytest.CaptureFixture[str], reg: str,
                                                 tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    code, _, err = run(capsys, "-R", reg, "merge", "r32-all", "--out", str(tmp_path / "m"))
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    engine = Engine(Registry(reg), "tiny")
    ids = engine.runner.encode(Request(prompt="merged"))
    with torch.no_grad():
        got = model(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, engine.logits([Request(prompt=ids, adapter="r32-all")])[0].logits,
                               atol=1e-5, rtol=0)
    code, _, err = run(capsys, "-R", reg, "merge", "soft", "--out", str(tmp_path / "s"))
    assert code != 0 and "soft prompt" in err

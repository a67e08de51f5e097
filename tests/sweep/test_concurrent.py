"""The concurrent sweep's loop: bf16 base with fp32 adapters, and the training loop's own early stopping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterhub_local.config import AutoSwitch, TrainConfig
from adapterhub_local.lora import lora_scale
from adapterhub_local.sweep.concurrent import train_concurrent
from adapterhub_local.sweep.multi_lora import Slot, build_joint_model
from adapterhub_local.train.tasks import Example, collate_generation
from tests.conftest import make_tiny_llama


def _examples(n: int = 24) -> list[Example]:
    return [Example([(i * 7 + j) % 90 + 3 for j in range(4 + i % 5)], [(i * 7 + j) % 90 + 3 for j in range(4 + i % 5)])
            for i in range(n)]


def _joint(tmp_path: Path, dtype: torch.dtype, ranks: list[int]) -> object:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "tl"), dtype=dtype)
    joint = build_joint_model(base, ["q_proj", "v_proj"], [Slot(r, lora_scale(8, r)) for r in ranks])
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero B so that every adapter changes the output from the first step
        for i in range(len(ranks)):  # each adapter's own tensors: views that leave the rank padding zero
            for p in joint.named_parameters_of(i).values():
                p.normal_(0, 0.02)
    return joint


def test_bf16_joint_run_keeps_the_base_bf16_and_unchanged_and_trains_fp32_adapters(tmp_path: Path) -> None:
    joint = _joint(tmp_path, torch.bfloat16, [1, 4])
    model = joint.model  # type: ignore[attr-defined]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.bfloat16 for p in frozen.values())
    assert all(p.dtype == torch.float32 for p in trainable.values())  # fp32 from construction on
    cfg = TrainConfig(lr=1e-2, batch_size=4, max_steps=3, eval_every=100, precision="bf16", warmup_steps=0)
    seen: list[torch.Tensor] = []
    result = train_concurrent(joint, _examples(), lambda ex: collate_generation(ex, 0), cfg, [0, 1], 0,  # type: ignore[arg-type]
                              lambda m: {"val_loss": 1.0}, "val_loss", False,
                              on_step=lambda step, loss: seen.append(loss))
    assert [r.step for r in result.runs] == [3, 3]
    assert len(seen) == 3 and all(isinstance(x, torch.Tensor) and torch.isfinite(x) for x in seen)
    for name, param in model.named_parameters():
        if name in frozen:
            assert param.dtype == torch.bfloat16 and torch.equal(param, frozen[name]), name
        else:
            assert param.dtype == torch.float32, name
    # Each adapter kept its best (only) evaluation, the last one: the adapters did move.
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_matches_the_training_loop(tmp_path: Path, patience: int) -> None:
    """Scripted evaluations: both adapters stop where the loop's ``note_evaluation`` says, keeping their best."""
    from adapterhub_local.train.loop import LoopState, note_evaluation

    scores = [0.5, 0.4, 0.45, 0.3, 0.2, 0.1]
    expected = LoopState()
    for step, value in enumerate(scores, start=1):
        expected.step = step
        note_evaluation(expected, value, True, patience)
        if expected.stopped_early:
            break
    joint = _joint(tmp_path, torch.float32, [2, 2])
    calls = {0: 0, 1: 0}

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        i = joint.segments.solo  # type: ignore[attr-defined]
        calls[i] += 1
        return {"accuracy": scores[calls[i] - 1]}

    cfg = TrainConfig(lr=1e-3, batch_size=4, max_steps=6, eval_every=1, early_stopping_patience=patience,
                      precision="fp32")
    result = train_concurrent(joint, _examples(), lambda ex: collate_generation(ex, 0), cfg, [0, 1], 0,  # type: ignore[arg-type]
                              evaluate, "accuracy", True)
    for run in result.runs:
        assert (run.step, run.best_step, run.best_metric, run.stopped_early) == (
            expected.step, expected.best_step, expected.best_metric, expected.stopped_early)


def test_rank_padding_stays_zero_through_training_and_clipping(tmp_path: Path) -> None:
    """Ranks 60 and 64 share one stacked parameter padded to rank 64: the padding never moves (weight decay,
    clipping and AdamW included), so adapter 0 stays a rank-60 adapter."""
    joint = _joint(tmp_path, torch.float32, [60, 64])
    cfg = TrainConfig(lr=1e-2, batch_size=4, max_steps=3, eval_every=100, precision="fp32", warmup_steps=0,
                      weight_decay=0.1, max_grad_norm=1e-3)
    modules = joint.lora_modules.values()  # type: ignore[attr-defined]
    assert all(len(m.lora_A) == 1 and m.lora_A[0].shape[1] == 64 for m in modules)  # one group, padded
    before = joint.peft_state(0)  # type: ignore[attr-defined]
    train_concurrent(joint, _examples(), lambda ex: collate_generation(ex, 0), cfg, [0, 1], 0,  # type: ignore[arg-type]
                     lambda m: {"val_loss": 1.0}, "val_loss", False)
    for m in modules:
        assert not m.lora_A[0][0, 60:].any() and not m.lora_B[0][0, :, 60:].any()
    after = joint.peft_state(0)  # type: ignore[attr-defined]
    assert any(not torch.equal(after[k], before[k]) for k in before)  # the real rank-1 part did train


@pytest.mark.parametrize("fast", [True, False])
def test_segment_losses_equal_each_adapters_own_loss_alone(tmp_path: Path, fast: bool) -> None:
    from adapterhub_local.sweep.concurrent import concat_batches, segment_losses

    joint = _joint(tmp_path, torch.float32, [1, 4, 4])
    model = joint.model  # type: ignore[attr-defined]
    examples = _examples(9)
    # Prompt positions unlabelled in some rows, so labelled counts differ from token counts.
    examples = [Example(e.input_ids, [-100] * (k % 3) + list(e.labels)[k % 3:]) for k, e in enumerate(examples)]  # type: ignore[arg-type]
    batches = [collate_generation(examples[i : i + 3], 0) for i in (0, 3, 6)]
    joined = concat_batches(batches, 0)
    labels = joined.pop("labels")
    sizes = [3, 3, 3]
    owner = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    counts = torch.tensor([float((b.tensors["labels"][:, 1:] != -100).sum()) for b in batches])
    with joint.segments.use(sizes):  # type: ignore[attr-defined]
        losses = segment_losses(model, joined, labels, owner, counts, fast)
    for i, batch in enumerate(batches):
        with joint.segments.only(i):  # type: ignore[attr-defined]
            alone = model(**batch.tensors).loss
        assert torch.allclose(losses[i], alone, atol=1e-5), i


def test_a_compiled_joint_run_trains_the_adapters_an_eager_one_does(tmp_path: Path) -> None:
    """``train.compile: true`` runs the blocks, multi-adapter layers included, compiled for training steps (and
    eagerly for evaluations); the adapters equal the eager run's within floating-point noise."""
    from torch._dynamo.utils import counters

    adapters = {}
    modes_seen: dict[bool, list[bool]] = {}
    for compiled in (False, True):
        joint = _joint(tmp_path / str(compiled), torch.float32, [1, 4, 4])
        block = joint.model.model.layers[0]  # type: ignore[attr-defined]
        seen: list[bool] = []

        def evaluate(m: torch.nn.Module, block: torch.nn.Module = block, seen: list[bool] = seen) -> dict[str, float]:
            seen.append("forward" in vars(block))  # a compiled forward is an instance attribute
            return {"val_loss": 1.0}

        cfg = TrainConfig(lr=1e-2, batch_size=4, max_steps=4, eval_every=2, precision="fp32", warmup_steps=0,
                          compile=AutoSwitch("true" if compiled else "false"))
        torch._dynamo.reset()
        counters.clear()
        train_concurrent(joint, _examples(), lambda ex: collate_generation(ex, 0), cfg, [0, 1, 2], 0,  # type: ignore[arg-type]
                         evaluate, "val_loss", False)
        assert (counters["frames"]["ok"] > 0) == compiled  # the blocks really ran compiled, or not at all
        assert "forward" not in vars(block)  # switched off once training is over
        adapters[compiled] = [joint.peft_state(i) for i in range(3)]  # type: ignore[attr-defined]
        modes_seen[compiled] = seen
    assert modes_seen[True] and not any(modes_seen[True])  # every evaluation ran eagerly
    for eager, compiled_state in zip(adapters[False], adapters[True], strict=True):
        for key in eager:
            assert torch.allclose(eager[key], compiled_state[key], atol=1e-5, rtol=1e-4), key

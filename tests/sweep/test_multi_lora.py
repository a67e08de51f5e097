"""The joint multi-adapter model: every segment's output and gradients equal its adapter run alone in PEFT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterhub_local.errors import UnsupportedError
from adapterhub_local.lora import lora_scale
from adapterhub_local.sweep.multi_lora import Slot, build_joint_model, rank_groups


def _peft(base_dir: Path, kind: str, rank: int, seed: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if kind == "causal":
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        config = LoraConfig(r=rank, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                            lora_dropout=0.0)
    else:
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=3)
        config = LoraConfig(r=rank, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False,
                            lora_dropout=0.0, modules_to_save=["classifier"])
    model = get_peft_model(base, config)
    model.eval()
    return model


def _joint(base_dir: Path, kind: str, ranks: list[int]) -> tuple[object, list[torch.nn.Module]]:
    from peft.utils.save_and_load import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    singles = [_peft(base_dir, kind, r, seed=10 + i) for i, r in enumerate(ranks)]
    if kind == "causal":
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        targets, saved = ["q_proj", "v_proj"], None
    else:
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=3)
        targets, saved = ["query", "value"], ["classifier"]
    joint = build_joint_model(base, targets, [Slot(r, lora_scale(8, r)) for r in ranks], saved)
    for i, single in enumerate(singles):
        joint.load_peft_state(i, get_peft_model_state_dict(single))
    joint.model.eval()
    return joint, singles


@pytest.mark.parametrize(("kind", "ranks", "sizes"), [
    ("causal", [1, 4, 64], [2, 3, 1]),  # 1 and 4 share a group padded to 4; unequal segments; 64 over-complete
    ("classifier", [1, 4, 64], [2, 3, 1]),
    ("causal", [4, 4, 4], [2, 2, 2]),  # one group covering the batch in order: no gathering
    ("causal", [2, 2, 8], [2, 0, 2]),  # an adapter without rows (stopped early) inside a group
    ("causal", [1, 4, 64], [2, 2, 2]),  # groups tile the batch: views of x and one cat
    ("causal", [64, 1, 4], [2, 2, 2]),  # a group's adapters apart in the batch: gather and scatter
])
def test_each_segment_matches_its_adapter_alone_forward_and_backward(
    kind: str, ranks: list[int], sizes: list[int], tiny_llama_dir: Path, tiny_bert_dir: Path
) -> None:
    base_dir = tiny_llama_dir if kind == "causal" else tiny_bert_dir
    joint, singles = _joint(base_dir, kind, ranks)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 96, (n, 7), generator=g) for n in sizes]
    with joint.segments.use(sizes):  # type: ignore[attr-defined]
        out = joint.model(input_ids=torch.cat(inputs)).logits  # type: ignore[attr-defined]
    losses = []
    start = 0
    for i, (single, ids) in enumerate(zip(singles, inputs, strict=True)):
        if sizes[i] == 0:
            continue
        alone = single(input_ids=ids).logits
        mine = out[start : start + sizes[i]]
        assert torch.allclose(mine, alone, atol=1e-5), f"adapter {i}"
        losses.append(mine.square().mean())
        alone.square().mean().backward()
        start += sizes[i]
    torch.stack(losses).sum().backward()
    for i, single in enumerate(singles):
        if sizes[i] == 0:
            assert all(g is None or not g.any() for g in joint.gradients_of(i).values())  # type: ignore[attr-defined]
            continue
        # PEFT's live names → its saved names: drop the adapter name ("default").
        peft_grads = {_saved_name(n): p.grad for n, p in single.named_parameters() if p.requires_grad}
        ours = joint.gradients_of(i)  # type: ignore[attr-defined]
        assert ours.keys() == peft_grads.keys()
        for name, grad in ours.items():
            assert grad is not None and torch.allclose(grad, peft_grads[name], atol=1e-6), name  # type: ignore[arg-type]


def _saved_name(name: str) -> str:
    return name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.").replace(
        ".modules_to_save.default.", ".")


def test_round_trip_of_peft_state(tiny_llama_dir: Path) -> None:
    from peft.utils.save_and_load import get_peft_model_state_dict

    joint, singles = _joint(tiny_llama_dir, "causal", [2, 8])
    for i, single in enumerate(singles):
        theirs = get_peft_model_state_dict(single)
        ours = joint.peft_state(i)  # type: ignore[attr-defined]
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_forward_refuses_a_batch_the_segments_do_not_cover(tiny_llama_dir: Path) -> None:
    joint, _ = _joint(tiny_llama_dir, "causal", [2])
    with pytest.raises(UnsupportedError):
        joint.model(input_ids=torch.zeros(2, 3, dtype=torch.long))  # type: ignore[attr-defined]
    with joint.segments.use([1]), pytest.raises(UnsupportedError):  # type: ignore[attr-defined]
        joint.model(input_ids=torch.zeros(2, 3, dtype=torch.long))  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["causal", "classifier"])
def test_solo_mode_runs_one_adapter_on_every_row(kind: str, tiny_llama_dir: Path, tiny_bert_dir: Path) -> None:
    joint, singles = _joint(tiny_llama_dir if kind == "causal" else tiny_bert_dir, kind, [1, 8])
    ids = torch.randint(0, 96, (3, 6), generator=torch.Generator().manual_seed(1))
    for i, single in enumerate(singles):
        with joint.segments.only(i):  # type: ignore[attr-defined]
            ours = joint.model(input_ids=ids).logits  # type: ignore[attr-defined]
        assert torch.allclose(ours, single(input_ids=ids).logits, atol=1e-5)


def test_rank_groups_are_few_whatever_the_number_of_adapters() -> None:
    geometric = [2**k for k in range(11)]
    groups = rank_groups(geometric)
    assert sorted(i for g in groups for i in g) == list(range(11))
    assert len(groups) == 5 and groups[-1] == [10]  # small ranks pad up together, large ones stay apart
    assert len(rank_groups(geometric * 3)) == 5  # three seeds of each rank: still 5 groups
    assert rank_groups([8, 8, 8]) == [[0, 1, 2]]
    padded = sum(len(g) * max(geometric[i] for i in g) for g in groups)
    assert padded <= 1.25 * sum(geometric)


def test_forward_makes_one_matmul_pair_per_rank_group_not_per_adapter(tiny_llama_dir: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    joint, _ = _joint(tiny_llama_dir, "causal", [2] * 6)
    calls = []
    real_bmm = torch.bmm

    def counting(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append(a.shape[0])
        return real_bmm(a, b)

    monkeypatch.setattr(torch, "bmm", counting)
    with joint.segments.use([1] * 6):  # type: ignore[attr-defined]
        joint.model(input_ids=torch.zeros(6, 4, dtype=torch.long))  # type: ignore[attr-defined]
    modules = len(joint.lora_modules)  # type: ignore[attr-defined]
    assert len(calls) == 2 * modules and set(calls) == {6}


def test_per_adapter_clipping_equals_clip_grad_norm_on_each_adapter_alone(tiny_llama_dir: Path) -> None:
    joint, _ = _joint(tiny_llama_dir, "causal", [1, 4, 64])
    sizes = [2, 1, 2]
    ids = torch.randint(0, 96, (5, 6), generator=torch.Generator().manual_seed(2))
    with joint.segments.use(sizes):  # type: ignore[attr-defined]
        out = joint.model(input_ids=ids).logits  # type: ignore[attr-defined]
    (out.square().mean() * 1e3).backward()
    before = [{k: g.clone() for k, g in joint.gradients_of(i).items()} for i in range(3)]  # type: ignore[attr-defined]
    norms = joint.clip_grad_norms_(0.5)  # type: ignore[attr-defined]
    for i in range(3):
        expected = [g.clone().requires_grad_() for g in before[i].values()]
        for t in expected:
            t.grad = t.detach().clone()
        norm = torch.nn.utils.clip_grad_norm_(expected, 0.5)
        assert torch.allclose(norms[i], norm, rtol=1e-5)
        for got, want in zip(joint.gradients_of(i).values(), expected, strict=True):  # type: ignore[attr-defined]
            assert torch.allclose(got, want.grad, rtol=1e-5, atol=1e-9)
        assert float(norm) > 0.5  # the clip did something


def test_bf16_base_under_autocast_matches_peft_alone(tiny_llama_dir: Path) -> None:
    from peft.utils.save_and_load import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from adapterhub_local import runtime

    ranks = [1, 8]
    singles = [_peft(tiny_llama_dir, "causal", r, seed=20 + i) for i, r in enumerate(ranks)]
    for single in singles:
        single.to(torch.bfloat16)
        runtime.upcast_trainable(single)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    joint = build_joint_model(base, ["q_proj", "v_proj"], [Slot(r, lora_scale(8, r)) for r in ranks])
    for i, single in enumerate(singles):
        joint.load_peft_state(i, get_peft_model_state_dict(single))
    joint.model.eval()
    ids = torch.randint(0, 96, (4, 6), generator=torch.Generator().manual_seed(5))
    with runtime.autocast("bf16", "cpu"), joint.segments.use([2, 2]):
        ours = joint.model(input_ids=ids).logits
    for i, single in enumerate(singles):
        with runtime.autocast("bf16", "cpu"):
            alone = single(input_ids=ids[2 * i : 2 * i + 2]).logits
        assert torch.allclose(ours[2 * i : 2 * i + 2].float(), alone.float(), atol=2e-2), i


def test_groups_that_tile_the_batch_are_read_as_views(tiny_llama_dir: Path) -> None:
    joint, _ = _joint(tiny_llama_dir, "causal", [1, 4, 64])  # groups {1, 4} and {64}
    segments = joint.segments  # type: ignore[attr-defined]
    with segments.use([2, 2, 2]):
        assert segments.tiles(6) == [(0, 0, 4), (1, 4, 6)]
    with segments.use([2, 3, 1]):  # unequal sizes inside a group: padded, so gathered
        assert segments.tiles(6) is None
    joint, _ = _joint(tiny_llama_dir, "causal", [1, 64, 4])  # group {1, 4} split by the rank-64 adapter
    with joint.segments.use([2, 2, 2]):  # type: ignore[attr-defined]
        assert joint.segments.tiles(6) is None  # type: ignore[attr-defined]

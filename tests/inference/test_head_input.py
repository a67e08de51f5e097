"""The LM head sees contiguous inputs while HF ``generate`` runs, and generation is unchanged by it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from adapterhub_local.inference.head_input import contiguous_head_inputs, output_head
from tests.conftest import make_tiny_llama


def _generate_recording(model: Any, head: torch.nn.Module, num_beams: int) -> tuple[torch.Tensor, list[bool]]:
    """Greedy or beam-search tokens of a left-padded batch, and whether each LM-head input was contiguous
    (recorded by a hook registered last, so it sees what the head will multiply)."""
    seen: list[bool] = []
    handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 13, 14, 15, 16]])
    mask = (torch.arange(5)[None, :] >= torch.tensor([[2], [0], [1]])).long()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                 num_beams=num_beams, pad_token_id=0)
    finally:
        handle.remove()
    return out, seen


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("wrapped", [False, True])
def test_generate_feeds_the_head_contiguous_inputs_and_decodes_the_same_tokens(
        tmp_path: Path, num_beams: int, wrapped: bool) -> None:
    model: Any = AutoModelForCausalLM.from_pretrained(str(make_tiny_llama(tmp_path / "tl", hidden=64)),
                                                      dtype=torch.bfloat16).eval()
    if wrapped:  # through a PEFT wrapper, as evaluation runs it
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False)).eval()
    head = output_head(model)
    assert head is not None
    plain, plain_seen = _generate_recording(model, head, num_beams)
    assert not all(plain_seen)  # the prefill's last-position slice: what the hook exists for
    with contiguous_head_inputs(model):
        hooked, hooked_seen = _generate_recording(model, head, num_beams)
    assert all(hooked_seen) and len(hooked_seen) == len(plain_seen)
    assert torch.equal(hooked, plain)  # bf16 logits bit-identical: the same tokens
    after, after_seen = _generate_recording(model, head, num_beams)  # the hook is gone after the block
    assert after_seen == plain_seen and torch.equal(after, plain)


def test_a_model_without_an_lm_head_passes_through() -> None:
    encoder = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert output_head(encoder) is None
    with contiguous_head_inputs(encoder):
        assert encoder(torch.ones(2, 4)).shape == (2, 4)

"""Soft prompts: virtual tokens prepended per row, with masks and positions right under left padding."""

from __future__ import annotations

import torch

from adapterhub_local.inference import Engine, Request
from adapterhub_local.inference.soft_prompt import Row, build_batch, positions
from adapterhub_local.registry import Registry


def test_soft_prompt_logits_match_peft_prompt_tuning(zoo: Registry) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, path = zoo.verified_path("soft", "tiny")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo.base("tiny").path), path).eval()
    engine = Engine(zoo, "tiny")
    ids = engine.runner.encode(Request(prompt="virtual tokens first"))
    with torch.no_grad():
        expected = peft_model(input_ids=torch.tensor([ids])).logits[0, -len(ids):]
    # padded among longer and shorter rows, with and without adapters
    batch = [Request(prompt="a much longer prompt than the soft one, to force padding", adapter="r8-attn"),
             Request(prompt=ids, adapter="soft"), Request(prompt="s")]
    got = engine.logits(batch)[1].logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_layout_virtual_tokens_sit_right_before_the_prompt() -> None:
    embeddings = torch.nn.Embedding(10, 3)
    virtual = torch.full((2, 3), 7.0)
    batch = build_batch([Row([4, 5, 6]), Row([8], virtual), Row([1, 2, 3, 4, 5])], embeddings, pad_id=0)
    assert batch.attention_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 0, 0, 1, 2], [0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert batch.prompt_start == [2, 4, 0] and batch.virtual == [0, 2, 0]
    assert batch.inputs_embeds is not None
    assert torch.equal(batch.inputs_embeds[1, 2:4], virtual)
    assert torch.equal(batch.inputs_embeds[1, 4], embeddings.weight[8])
    assert torch.equal(batch.inputs_embeds[0, 2:], embeddings(torch.tensor([4, 5, 6])))


def test_right_padding_for_encoders_keeps_positions() -> None:
    batch = build_batch([Row([4, 5, 6]), Row([8])], torch.nn.Embedding(10, 3), pad_id=0, left=False)
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.position_ids[1, 0].item() == 0 and batch.inputs_embeds is None


def test_positions_count_real_tokens_only() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 0, 1]])
    assert positions(mask).tolist() == [[0, 0, 0, 1, 1, 2]]


def test_soft_prompt_generation_counts_prompt_tokens_without_virtual(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny")
    request = Request(prompt="count me")
    result = engine.generate([Request(prompt="count me", adapter="soft")])[0]
    assert result.prompt_tokens == len(engine.runner.encode(request))
    assert engine.count_tokens(Request(prompt="count me", adapter="soft")) == result.prompt_tokens + 6

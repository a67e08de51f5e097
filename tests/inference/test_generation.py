"""Generation: greedy equals Hugging Face generate on the PEFT model, KV cache equals full recompute,
stop strings, EOS, length limits, streaming and chat templates."""

from __future__ import annotations

import pytest
import torch

from adapterhub_local.inference import Engine, Request, SamplingParams
from adapterhub_local.registry import Registry


@pytest.fixture(params=["dynamic", "static"])
def decoder(request: pytest.FixtureRequest) -> str:
    """Every generation behaviour holds for both decoders (the fixed-shape one is what CUDA graphs replay)."""
    return str(request.param)


def test_greedy_equals_hf_generate_with_peft_adapter(zoo: Registry, decoder: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, path = zoo.verified_path("r8-attn", "tiny")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo.base("tiny").path), path).eval()
    engine = Engine(zoo, "tiny", decoder=decoder)
    ids = engine.runner.encode(Request(prompt="Once upon"))
    with torch.no_grad():
        mask = torch.ones(1, len(ids), dtype=torch.long)
        out = peft_model.generate(input_ids=torch.tensor([ids]), attention_mask=mask,
                                  max_new_tokens=20, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
    expected = out[0, len(ids):].tolist()
    result = engine.generate([Request(prompt=ids, adapter="r8-attn",
                                      sampling=SamplingParams(max_new_tokens=20, stop_at_eos=False))])[0]
    assert result.token_ids == expected
    assert result.finish_reason == "length" and result.completion_tokens == 20


def test_kv_cache_decoding_equals_recomputing_the_prefix(zoo: Registry, decoder: str) -> None:
    engine = Engine(zoo, "tiny", decoder=decoder)
    prompt = engine.runner.encode(Request(prompt="cache check"))
    result = engine.generate([Request(prompt=prompt, adapter="r32-all",
                                      sampling=SamplingParams(max_new_tokens=8, stop_at_eos=False))])[0]
    sequence = list(prompt)
    for token in result.token_ids:  # each generated token is the argmax of a full forward over the prefix
        logits = engine.logits([Request(prompt=sequence, adapter="r32-all")])[0].logits
        assert int(logits[-1].argmax()) == token
        sequence.append(token)


def test_stop_strings_cut_the_text(zoo: Registry, decoder: str) -> None:
    engine = Engine(zoo, "tiny", decoder=decoder)
    free = engine.generate([Request(prompt="stop test", sampling=SamplingParams(max_new_tokens=20))])[0]
    assert len(free.text) >= 4, "the tiny model should produce some text"
    stop = free.text[2:4]
    cut = engine.generate([Request(prompt="stop test", sampling=SamplingParams(max_new_tokens=20, stop=[stop]))])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)]
    assert stop not in cut.text


def test_stream_concatenates_to_the_final_text(zoo: Registry, decoder: str) -> None:
    engine = Engine(zoo, "tiny", decoder=decoder)
    requests = [Request(prompt="stream one", adapter="r4-qv", sampling=SamplingParams(max_new_tokens=12)),
                Request(prompt="two", adapter="soft", sampling=SamplingParams(max_new_tokens=7))]
    pieces = {0: "", 1: ""}
    finals = {}
    for event in engine.generate_stream(requests):
        pieces[event.index] += event.text
        if event.finished:
            assert event.result is not None
            finals[event.index] = event.result
    assert set(finals) == {0, 1}
    for i, result in finals.items():
        assert pieces[i] == result.text
    assert [r.text for r in engine.generate(requests)] == [finals[0].text, finals[1].text]


def test_stream_never_shows_text_a_stop_string_removes(zoo: Registry, decoder: str) -> None:
    engine = Engine(zoo, "tiny", decoder=decoder)
    free = engine.generate([Request(prompt="hold back", sampling=SamplingParams(max_new_tokens=16))])[0]
    stop = free.text[3:6]
    request = Request(prompt="hold back", sampling=SamplingParams(max_new_tokens=16, stop=[stop]))
    streamed = "".join(e.text for e in engine.generate_stream([request]))
    assert streamed == engine.generate([request])[0].text


def test_eos_ends_a_row(zoo: Registry, decoder: str) -> None:
    engine = Engine(zoo, "tiny", decoder=decoder)
    ids = engine.runner.encode(Request(prompt="eos"))
    first = int(engine.logits([Request(prompt=ids)])[0].logits[-1].argmax())
    engine.runner.eos_ids = {first}  # make the first greedy token the EOS token
    result = engine.generate([Request(prompt=ids, sampling=SamplingParams(max_new_tokens=10))])[0]
    assert (result.finish_reason, result.token_ids, result.text) == ("stop", [], "")


def test_context_length_bounds_new_tokens(zoo: Registry, decoder: str) -> None:
    engine = Engine(zoo, "tiny", decoder=decoder)
    ids = [5] * (engine.context_length - 3)
    result = engine.generate([Request(prompt=ids, sampling=SamplingParams(max_new_tokens=50, stop_at_eos=False))])[0]
    assert result.completion_tokens == 3 and result.finish_reason == "length"


def test_chat_template_is_applied(zoo: Registry, decoder: str) -> None:
    engine = Engine(zoo, "tiny", decoder=decoder)
    messages = [{"role": "user", "content": "hi"}]
    ids = engine.runner.encode(Request(messages=messages))
    assert engine.runner.tokenizer.decode(ids) == "<user>hi|<assistant>"
    assert engine.runner.encode(Request(prompt="hi", chat=True)) == ids
    plain = engine.generate([Request(prompt=ids, sampling=SamplingParams(max_new_tokens=5))])[0]
    chat = engine.generate([Request(messages=messages, sampling=SamplingParams(max_new_tokens=5))])[0]
    assert chat.token_ids == plain.token_ids

"""Engine API: classifiers match PEFT's sequence-classification models, auto mode switches and logs,
errors are clear, and the public surface the server relies on works."""

from __future__ import annotations

import pytest
import torch

from adapterhub_local.errors import ConfigError, UnsupportedError
from adapterhub_local.inference import Engine, Request, SamplingParams
from adapterhub_local.registry import Registry


def peft_probabilities(zoo: Registry, base: str, ref: str, num_labels: int, ids: list[int]) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    _, path = zoo.verified_path(ref, base)
    model = AutoModelForSequenceClassification.from_pretrained(zoo.base(base).path, num_labels=num_labels,
                                                               pad_token_id=0)
    peft_model = PeftModel.from_pretrained(model, path).eval()
    with torch.no_grad():
        return peft_model(input_ids=torch.tensor([ids])).logits[0].softmax(-1)


@pytest.mark.parametrize(("base", "ref", "labels"), [("enc", "bert-cls", ["negative", "positive"]),
                                                      ("tiny", "llama-cls", ["neg", "neu", "pos"])])
def test_classifier_matches_peft(zoo: Registry, base: str, ref: str, labels: list[str]) -> None:
    engine = Engine(zoo, base)
    texts = ["a fine film", "dull", "not what I hoped for at all"]
    results = engine.classify([Request(prompt=t, adapter=ref) for t in texts])
    for text, result in zip(texts, results, strict=True):
        ids = engine.runner.encode(Request(prompt=text))
        expected = peft_probabilities(zoo, base, ref, len(labels), ids)
        assert list(result.probabilities) == labels
        torch.testing.assert_close(torch.tensor(list(result.probabilities.values())), expected, atol=1e-5, rtol=0)
        assert result.label == labels[int(expected.argmax())]


def test_classifier_rows_mixed_with_generation_adapters_stay_exact(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny")
    alone = engine.classify([Request(prompt="mixed", adapter="llama-cls")])[0]
    engine.logits([Request(prompt="load others", adapter=r) for r in ("r32-all", "r8-attn")])
    again = engine.classify([Request(prompt="a longer row first", adapter="llama-cls"),
                             Request(prompt="mixed", adapter="llama-cls")])[1]
    assert alone.probabilities == pytest.approx(again.probabilities, abs=1e-6)


def test_classify_refuses_generation_adapters(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny")
    with pytest.raises(UnsupportedError, match="not a classifier"):
        engine.classify([Request(prompt="x", adapter="r2-v")])


def test_encoder_base_cannot_generate(zoo: Registry) -> None:
    engine = Engine(zoo, "enc")
    with pytest.raises(UnsupportedError, match="cannot generate"):
        list(engine.generate_stream([Request(prompt="x")]))


def test_public_surface(zoo: Registry) -> None:
    engine = Engine(zoo, "tiny", pool_bytes=1 << 24)
    assert engine.context_length == 256 and engine.can_generate
    info = engine.load("r4-qv", pin=True)
    assert (info.kind, info.rank, info.tier, info.pinned) == ("lora", 4, "device", True)
    assert engine.count_tokens(Request(prompt="abc")) == 4  # BOS + 3 characters
    engine.set_mode("merge")
    assert engine.merge("r4-qv") >= 0 and engine.merged == info.ref
    engine.set_mode("swap")
    assert engine.merged is None
    with pytest.raises(ConfigError):
        engine.set_mode("fast")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        engine.generate([Request(prompt="x", sampling=SamplingParams(max_new_tokens=0))])
    stats = engine.stats()
    assert stats.resident == 1 and stats.capacity_bytes == 1 << 24


def test_classify_in_merge_mode_equals_swap_mode(zoo: Registry) -> None:
    requests = [Request(prompt=t, adapter="llama-cls") for t in ("good", "bad movie")]
    merged_engine = Engine(zoo, "tiny", mode="merge")
    merged = merged_engine.classify(requests)
    assert merged_engine.merged == "llama-cls@1"
    swapped = Engine(zoo, "tiny").classify(requests)
    for m, s in zip(merged, swapped, strict=True):
        assert m.label == s.label
        assert m.probabilities == pytest.approx(s.probabilities, abs=1e-5)


def test_stats_do_not_wait_for_a_running_stream(zoo: Registry) -> None:
    import threading

    engine = Engine(zoo, "tiny")
    stream = engine.generate_stream([Request(prompt="long", adapter="r2-v", sampling=SamplingParams(max_new_tokens=5))])
    next(stream)  # the stream now holds the engine lock
    seen = []
    reader = threading.Thread(target=lambda: seen.append(engine.stats()))
    reader.start()
    reader.join(timeout=10)
    assert seen and seen[0].misses == 1
    stream.close()  # closing a stream releases the lock: another thread can take it
    listed: list[object] = []
    other = threading.Thread(target=lambda: listed.append(engine.adapters()))
    other.start()
    other.join(timeout=10)
    assert listed and not other.is_alive()

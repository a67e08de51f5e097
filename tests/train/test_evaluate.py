"""Evaluation helpers: batched greedy generation equals one-at-a-time generation (prompt tuning, where PEFT
ignores position ids, is batched without padding), forgetting compares base with base + adapter, generation
records whether each output stopped on EOS, beam search is a decoding option, and the per-example record and
copy-the-input baseline come with every generation evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from adapterhub_local.train.evaluate import forgetting, generate, generate_with_stops, generation_eval, loss_eval
from adapterhub_local.train.tasks import GenerationPrompt
from tests.conftest import make_tiny_llama
from tests.train.conftest import save_tokenizer

PROMPTS = ["good movie", "bad", "very good acting", "the plot", "good film", "not really"]


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[torch.nn.Module, object]:
    directory = make_tiny_llama(tmp_path / "tl", vocab=48)  # = the word-level tokenizer's size: every id decodes
    save_tokenizer(directory)
    return AutoModelForCausalLM.from_pretrained(str(directory)), AutoTokenizer.from_pretrained(str(directory))


def test_prompt_tuned_batches_generate_like_single_prompts(tiny: tuple[torch.nn.Module, object]) -> None:
    model, tokenizer = tiny
    torch.manual_seed(0)
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    batched = generate(peft_model, tokenizer, PROMPTS, 6, 8)
    solo = [generate(peft_model, tokenizer, [p], 6, 1)[0] for p in PROMPTS]
    assert batched == solo


def test_forgetting_is_neutral_for_an_adapter_that_changes_nothing(tiny: tuple[torch.nn.Module, object]) -> None:
    model, tokenizer = tiny
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).eval()  # B = 0: no change
    out = forgetting(peft_model, tokenizer, ["the good movie was fine", "a bad plot"], 32, 2)
    assert out["ratio"] == pytest.approx(1.0) and out["base_perplexity"] > 1
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    changed = forgetting(peft_model, tokenizer, ["the good movie was fine", "a bad plot"], 32, 2)
    assert changed["base_perplexity"] == pytest.approx(out["base_perplexity"])
    assert changed["adapter_perplexity"] != pytest.approx(out["adapter_perplexity"])


def test_prompt_tuned_generation_is_plain_greedy_decoding(tiny: tuple[torch.nn.Module, object]) -> None:
    model, tokenizer = tiny
    torch.manual_seed(0)
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    with torch.no_grad():
        cast(torch.nn.Embedding, peft_model.prompt_encoder["default"].embedding).weight.normal_(0, 1)
    prompt = "the good movie was very"
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])  # type: ignore[operator]
    with torch.no_grad():
        for _ in range(10):  # greedy by full forward passes: the reference
            logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    expected = tokenizer.decode(ids[0, -10:], skip_special_tokens=True).strip()  # type: ignore[attr-defined]
    assert generate(peft_model, tokenizer, [prompt], 10, 1) == [expected]


def _always(model: torch.nn.Module, token: int) -> torch.nn.Module:
    """Make ``model`` predict ``token`` at every position (a biased, weightless LM head)."""
    lm_head = cast(torch.nn.Linear, model.lm_head)
    head = torch.nn.Linear(lm_head.in_features, lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[token] = 10.0
    model.lm_head = head
    return model.eval()


def test_stop_flags_tell_eos_endings_from_runaway_generations(tiny: tuple[torch.nn.Module, object]) -> None:
    model, tokenizer = tiny
    eos = tokenizer.eos_token_id  # type: ignore[attr-defined]
    runaway = next(i for i in range(5, 40) if i != eos)
    texts, stops = generate_with_stops(_always(model, runaway), tokenizer, PROMPTS, 5, 4)
    assert stops == [False] * len(PROMPTS) and all(texts)
    texts, stops = generate_with_stops(_always(model, eos), tokenizer, PROMPTS, 5, 4)
    assert stops == [True] * len(PROMPTS) and texts == [""] * len(PROMPTS)


def test_beam_search_is_a_decoding_option(tiny: tuple[torch.nn.Module, object]) -> None:
    model, tokenizer = tiny
    model.eval()
    greedy = generate(model, tokenizer, PROMPTS, 6, 3)
    assert generate(model, tokenizer, PROMPTS, 6, 3, num_beams=1) == greedy
    beams = generate(model, tokenizer, PROMPTS, 6, 3, num_beams=3)
    assert len(beams) == len(PROMPTS) and all(isinstance(b, str) for b in beams)
    with pytest.raises(ValueError, match="num_beams"):
        generate(model, tokenizer, PROMPTS, 6, 3, num_beams=0)


def test_generation_eval_keeps_per_example_scores_and_the_copy_baseline(tiny: tuple[torch.nn.Module, object]
                                                                        ) -> None:
    model, tokenizer = tiny
    model.eval()
    prompts = [GenerationPrompt(p, [f"{p} ok", "fine"]) for p in PROMPTS]
    result, hypotheses = generation_eval(model, tokenizer, prompts, 4, 3)
    record = result["per_example"]
    assert record["hypothesis"] == hypotheses and len(record["stopped"]) == len(PROMPTS)
    assert sum(record["rougeL"]) / len(PROMPTS) == pytest.approx(result["rougeL"])
    assert len(record["bleu_stats"]) == len(PROMPTS) and 0.0 <= result["stopped_fraction"] <= 1.0
    # Copying the prompt overlaps its own reference ("<prompt> ok"): a baseline well above zero.
    assert result["baseline_copy_input"]["rougeL"] > 0.5


def test_loss_eval_keeps_per_example_sums_that_add_up_to_the_loss(tiny: tuple[torch.nn.Module, object]) -> None:
    """The per-example record sums to the reported loss, and batching does not change an example's own sums."""
    from adapterhub_local.train.tasks import Example

    model, _ = tiny
    model.eval()
    examples = [Example([1, 5, 6, 7], [-100, -100, 6, 7]), Example([1, 8, 9], [-100, 8, 9]),
                Example([1, 10, 11, 12, 13], [-100, -100, -100, 12, 13])]
    result = loss_eval(model, examples, 2, 0)
    record = result["per_example"]
    assert record["tokens"] == [2, 2, 2]
    assert sum(record["nll"]) / sum(record["tokens"]) == pytest.approx(result["val_loss"])
    alone = [loss_eval(model, [e], 1, 0)["per_example"]["nll"][0] for e in examples]
    assert alone == pytest.approx(record["nll"], rel=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_validation_loss_through_the_labelled_positions_is_the_full_forwards(
        tiny: tuple[torch.nn.Module, object], precision: str) -> None:
    """The LM head runs on the labelled positions only (a LoRA model, padded batches of several lengths), and
    every example's summed NLL is the one through the model's full-vocabulary logits: the same per-token
    cross entropy, up to the GEMM's rounding of a head run on fewer rows (bit-identical on the E2E study's
    bf16 SmolLM2 evaluation; here within a few fp32 ulps)."""
    from adapterhub_local import runtime
    from adapterhub_local.train import evaluate as ev
    from adapterhub_local.train.tasks import Example

    base, _ = tiny
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    model.eval()
    gen = torch.Generator().manual_seed(3)
    examples = []
    for n in [3, 9, 2, 7, 5, 8, 4, 6, 10, 3]:
        ids = torch.randint(1, 48, (n,), generator=gen).tolist()
        cut = max(1, n // 2)
        examples.append(Example(ids, [-100] * cut + ids[cut:]))
    head_rows: list[int] = []
    hook = cast(PreTrainedModel, base).get_output_embeddings().register_forward_hook(
        lambda _m, args, _o: head_rows.append(int(args[0].reshape(-1, args[0].shape[-1]).shape[0])))
    with runtime.autocast(precision):
        fast, fast_counts = ev.token_nll_per_example(model, examples, 4, 0)
        hook.remove()
        full, full_counts = ev.token_nll_per_example(model, examples, 4, 0, head_on_labelled=False)
    assert fast_counts == full_counts
    assert fast == pytest.approx(full, rel=1e-6)
    assert fast_counts == [len(e.input_ids) - max(1, len(e.input_ids) // 2) for e in examples]
    assert sum(head_rows) == sum(fast_counts)  # the head saw only the labelled positions


def test_length_sorted_evaluation_keeps_each_examples_result(tiny: tuple[torch.nn.Module, object]) -> None:
    """Evaluation batches by length (less padding); predictions still come back in the examples' order and the
    summed token loss is the one-at-a-time sum."""
    from adapterhub_local.train.evaluate import classify, token_nll
    from adapterhub_local.train.tasks import Example

    model, _ = tiny
    model.eval()
    lengths = [3, 9, 2, 7, 5, 8, 1, 6]
    gen = [Example(list(range(2, 2 + n)), [-100, *range(3, 2 + n)]) for n in lengths]
    nll, count = token_nll(model, gen, 3, 0)
    solo = [token_nll(model, [e], 1, 0) for e in gen]
    assert count == sum(c for _, c in solo) and nll == pytest.approx(sum(t for t, _ in solo), rel=1e-5)

    class Head(torch.nn.Module):  # a stand-in classifier: class = parity of the first token id
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> object:
            from types import SimpleNamespace

            logits = torch.nn.functional.one_hot(input_ids[:, 0] % 2, 2).float() + 0 * attention_mask[:, :1]
            return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits, labels), logits=logits)

        def parameters(self, recurse: bool = True):  # type: ignore[no-untyped-def]
            yield torch.zeros(1)

    cls = [Example([i + 1] * n, i % 2) for i, n in enumerate(lengths)]
    predicted, _ = classify(Head(), cls, 3, 0)
    assert predicted == [(i + 1) % 2 for i in range(len(lengths))]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_bf16_generation_packs_the_base_for_the_call_only_and_changes_no_token(
        tiny: tuple[torch.nn.Module, object], monkeypatch: pytest.MonkeyPatch, num_beams: int) -> None:
    from adapterhub_local.inference import packed_linear

    if packed_linear.unavailable_reason() is not None:
        pytest.skip(f"packing unavailable: {packed_linear.unavailable_reason()}")
    model, tokenizer = tiny
    torch.manual_seed(0)
    peft_model = get_peft_model(model.to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                      init_lora_weights=False)).eval()
    modules = dict(peft_model.named_modules())
    calls: list[int] = []
    real = packed_linear._packed_call

    def counted(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        calls.append(1)
        return real(x, w, b)

    monkeypatch.setattr(packed_linear, "_packed_call", counted)
    packed = generate_with_stops(peft_model, tokenizer, PROMPTS, 6, 4, num_beams)
    assert calls  # the base linears (and the head) answered from packed copies ...
    assert dict(peft_model.named_modules()) == modules  # ... and the model holds its own modules again
    with monkeypatch.context() as patch:
        patch.setenv(packed_linear.SWITCH_ENV, "off")
        calls.clear()
        assert generate_with_stops(peft_model, tokenizer, PROMPTS, 6, 4, num_beams) == packed
        assert not calls

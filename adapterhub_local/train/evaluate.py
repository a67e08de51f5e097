"""Evaluation: classification predictions and metrics, validation loss / perplexity, greedy or beam-search
generation with BLEU / ROUGE / EM / token F1, and the forgetting check (perplexity on general text with and
without the adapter).

Every task evaluation also keeps its per-example record under ``per_example`` (classification: truth,
prediction, correct; generation: hypothesis, whether it stopped on EOS, ROUGE-L, token F1, BLEU statistics),
so that a sweep can put bootstrap intervals on a score and compare runs example by example; and a generation
evaluation reports the trivial copy-the-input baseline beside its own scores.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from adapterhub_local import metrics
from adapterhub_local.train import lm_loss
from adapterhub_local.train.tasks import IGNORE, Example, GenerationPrompt, collate_classification, collate_generation


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _length_order(examples: Sequence[Example]) -> list[int]:
    """Indices of ``examples`` longest first: batches of similar lengths pad little. Evaluation results are
    per example (or sums over them), so the order changes nothing but the time."""
    return sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))


@torch.no_grad()
def classify(model: torch.nn.Module, examples: Sequence[Example], batch_size: int,
             pad_id: int) -> tuple[list[int], float]:
    """Predicted class indices and the mean cross-entropy over ``examples``."""
    device = _device(model)
    order = _length_order(examples)
    predictions = [0] * len(examples)
    loss_sum = 0.0
    for indices in _chunks(order, batch_size):
        batch = collate_classification([examples[i] for i in indices], pad_id)
        inputs = {k: v.to(device) for k, v in batch.tensors.items()}
        out = model(**inputs)
        loss_sum += float(out.loss) * len(indices)
        for i, predicted in zip(indices, out.logits.argmax(-1).tolist(), strict=True):
            predictions[i] = predicted
    return predictions, loss_sum / max(len(examples), 1)


def classification_eval(model: torch.nn.Module, examples: Sequence[Example], labels: Sequence[str],
                        batch_size: int, pad_id: int) -> tuple[dict[str, Any], list[int]]:
    """Metrics (accuracy, macro/micro P/R/F1, confusion matrix, ``val_loss``) and the predictions."""
    predicted, loss = classify(model, examples, batch_size, pad_id)
    names = [labels[i] for i in predicted]
    truth = [labels[int(e.labels)] for e in examples]  # type: ignore[arg-type]
    result = metrics.classification_metrics(names, truth, labels)
    result["val_loss"] = loss
    result["per_example"] = {"label": [int(e.labels) for e in examples],  # type: ignore[arg-type]
                             "predicted": list(predicted),
                             "correct": [int(p == int(e.labels)) for p, e in zip(predicted, examples, strict=True)]}  # type: ignore[arg-type]
    return result, predicted


@torch.no_grad()
def token_nll_per_example(model: torch.nn.Module, examples: Sequence[Example], batch_size: int,
                          pad_id: int, *, head_on_labelled: bool = True) -> tuple[list[float], list[int]]:
    """Per example: the summed negative log-likelihood of its labelled tokens and their count (causal LM, shifted).

    Where the model is a plain causal LM (:func:`lm_loss.supports`), the LM head runs on the labelled positions
    only — the prompt and padding positions' ``vocab``-wide logits were most of the cost — and each token's
    loss is the same fp32 cross entropy of the same logits row as through the model's full forward
    (``head_on_labelled=False``: that full forward, the reference the fast path is checked against)."""
    device = _device(model)
    nll = [0.0] * len(examples)
    counts = [0] * len(examples)
    # Causal-LM batches always carry 2-D labels: whether the model allows the fast path is decided once.
    labelled_only = head_on_labelled and lm_loss.supports(model, {"labels": torch.zeros(1, 1)})
    for indices in _chunks(_length_order(examples), batch_size):
        batch = collate_generation([examples[i] for i in indices], pad_id)
        if labelled_only:
            losses, mask = _labelled_token_losses(model, batch.tensors, device)
        else:
            losses, mask = _full_token_losses(model, batch.tensors, device)
        for i, value, count in zip(indices, losses.sum(1).tolist(), mask.sum(1).tolist(), strict=True):
            nll[i], counts[i] = float(value), int(count)  # back in the examples' own order
    return nll, counts


def _labelled_token_losses(model: torch.nn.Module, tensors: dict[str, torch.Tensor], device: torch.device
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``([rows, width - 1]`` per-token NLL, zero where unlabelled; the labelled mask``)`` through the LM head
    on the labelled positions only; the losses land in the full grid so each row sums in the same order as
    :func:`_full_token_losses`'."""
    labels = tensors["labels"]
    targets = lm_loss.label_targets(labels)
    inputs = {k: v.to(device) for k, v in tensors.items() if k != "labels"}
    on_device = targets.to(device)
    hidden, head = lm_loss.labelled_hidden(model, inputs, on_device)
    # The cross entropy over a [1, vocab, n] view: the same CPU log-softmax kernel (over a non-last dimension) as
    # the full path's [rows, vocab, width], so every token's loss is bit-identical to it and validation losses
    # stay comparable with runs evaluated before (the last-dimension kernel is nearer float64 by ~1e-4 per
    # token — a change to make in both paths at once, not in one).
    logits = head(hidden).float().t().unsqueeze(0)
    token = torch.nn.functional.cross_entropy(logits, on_device.tokens.unsqueeze(0), reduction="none")[0]
    rows, width = labels.shape[0], labels.shape[1] - 1
    grid = torch.zeros(rows * width, dtype=token.dtype, device=device).index_copy_(0, on_device.positions, token)
    return grid.view(rows, width), (labels[:, 1:] != IGNORE)


def _full_token_losses(model: torch.nn.Module, tensors: dict[str, torch.Tensor], device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as :func:`_labelled_token_losses` through the model's own forward (every position's logits)."""
    inputs = {k: v.to(device) for k, v in tensors.items()}
    labels = inputs.pop("labels")
    logits = model(**inputs).logits.float()
    # A prompt-tuning model prepends virtual tokens to the logits; the real positions are the last ones.
    logits = logits[:, -labels.shape[1] :, :]
    shift_labels = labels[:, 1:]  # [B, T-1]
    mask = shift_labels != IGNORE
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), shift_labels.clamp_min(0),
                                               reduction="none")  # [B, T-1]
    return losses * mask, mask.cpu()


def token_nll(model: torch.nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int) -> tuple[float, int]:
    """Summed negative log-likelihood of the labelled tokens and their count (causal LM, shifted)."""
    nll, counts = token_nll_per_example(model, examples, batch_size, pad_id)
    return float(sum(nll)), int(sum(counts))


def loss_eval(model: torch.nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int) -> dict[str, Any]:
    """``val_loss`` (mean NLL per completion token), ``perplexity`` and the per-example record (summed NLL and
    token count of each example: the loss of any resample is the ratio of their sums)."""
    nll, counts = token_nll_per_example(model, examples, batch_size, pad_id)
    total, count = float(sum(nll)), int(sum(counts))
    return {"val_loss": total / count if count else math.nan, "perplexity": metrics.perplexity(total, count),
            "per_example": {"nll": nll, "tokens": counts}}


def generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
             batch_size: int, num_beams: int = 1) -> list[str]:
    """Greedy (``num_beams=1``) or beam-search completions of ``prompts``."""
    return generate_with_stops(model, tokenizer, prompts, max_new_tokens, batch_size, num_beams)[0]


def left_padded(token_ids: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of prompts padded on the left to the longest (as ``generate`` wants)."""
    width = max(len(e) for e in token_ids)
    ids = torch.full((len(token_ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(token_ids):
        ids[i, width - len(e) :] = torch.tensor(list(e), dtype=torch.long)
        mask[i, width - len(e) :] = 1
    return ids, mask


@torch.no_grad()
def generate_with_stops(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                        batch_size: int, num_beams: int = 1) -> tuple[list[str], list[bool]]:
    """Completions of ``prompts`` (left-padded batches, prompts tokenized as in training) and, per prompt,
    whether it stopped on EOS (False: it ran to ``max_new_tokens``). ``num_beams > 1`` decodes with beam
    search (length penalty 1, stopping when every beam has finished), as the LoRA paper's E2E results did."""
    from adapterhub_local.inference.head_input import contiguous_head_inputs  # not the engine at import time
    from adapterhub_local.inference.packed_linear import packed_linears

    if num_beams < 1:
        raise ValueError(f"num_beams must be at least 1, got {num_beams}")
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    all_ids = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    prompt_learning = _prompt_learning(model)
    if prompt_learning:
        # PEFT ignores position ids under prompt tuning, so left padding would shift the real tokens'
        # positions: batch only prompts of equal length (no padding at all).
        by_length: dict[int, list[int]] = {}
        for i, token_ids in enumerate(all_ids):
            by_length.setdefault(len(token_ids), []).append(i)
        groups = [g[k : k + batch_size] for g in by_length.values() for k in range(0, len(g), batch_size)]
    else:
        groups = [list(range(k, min(k + batch_size, len(prompts)))) for k in range(0, len(prompts), batch_size)]
    outputs: dict[int, str] = {}
    stopped: dict[int, bool] = {}
    eos = tokenizer.eos_token_id
    for group in groups:
        ids, mask = left_padded([all_ids[i] for i in group], pad)
        width = ids.shape[1]
        # bf16 CPU base linears from prepacked weights (same bits; packed_linear.py); the head's hook after that
        with packed_linears(model), contiguous_head_inputs(model):  # the prefill's last-position slice (head_input.py)
            generated = model.generate(  # type: ignore[operator]
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, num_beams=num_beams,
                **({"early_stopping": True} if num_beams > 1 else {}),
                # With the KV cache, PEFT 0.21 prompt-tuning generation drifts from plain greedy decoding after
                # a few tokens (tests/train/test_evaluate.py); recomputing without the cache is slower but exact.
                use_cache=not prompt_learning,
            )
        generated = generated.cpu()
        # Plain models return prompt + new tokens; some PEFT wrappers (prompt tuning) return only new ones.
        echoes = generated.shape[1] >= width and torch.equal(generated[:, :width], ids)
        new = generated[:, width:] if echoes else generated
        # Generation ends early only when every row has finished; otherwise a row stopped iff it holds EOS.
        finished = (new == eos).any(1) if eos is not None else torch.zeros(len(group), dtype=torch.bool)
        all_done = new.shape[1] < max_new_tokens
        for row, (i, text) in enumerate(zip(group, tokenizer.batch_decode(new, skip_special_tokens=True),
                                            strict=True)):
            outputs[i] = text.strip()
            stopped[i] = bool(all_done or finished[row])
    order = range(len(prompts))
    return [outputs[i] for i in order], [stopped[i] for i in order]


def _prompt_learning(model: torch.nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def generation_eval(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[GenerationPrompt],
                    max_new_tokens: int, batch_size: int, num_beams: int = 1) -> tuple[dict[str, Any], list[str]]:
    """BLEU (all references of a prompt together), ROUGE-1/2/L, EM, token F1 — overall and per source —, the
    fraction of generations that stopped on EOS, the copy-the-input baseline (each prompt as its own
    output) and the per-example record (see the module docstring)."""
    hypotheses, stops = generate_with_stops(model, tokenizer, [p.prompt for p in prompts], max_new_tokens,
                                            batch_size, num_beams)
    refs = [p.references for p in prompts]
    result: dict[str, Any] = dict(metrics.generation_metrics(hypotheses, refs))
    result["stopped_fraction"] = sum(stops) / max(len(stops), 1)
    if num_beams > 1:
        result["num_beams"] = num_beams
    copied = [p.prompt for p in prompts]
    result["baseline_copy_input"] = {"bleu": metrics.bleu(copied, refs), **metrics.rouge(copied, refs)}
    result["per_example"] = {
        "hypothesis": hypotheses, "stopped": [int(s) for s in stops],
        "rougeL": metrics.rouge_per_example(hypotheses, refs)["rougeL"],
        "token_f1": metrics.token_f1_per_example(hypotheses, refs),
        "bleu_stats": metrics.bleu_stats(hypotheses, refs),
    }
    sources = sorted({p.source for p in prompts})
    if len(sources) > 1:
        for source in sources:
            picked = [i for i, p in enumerate(prompts) if p.source == source]
            result[f"per_source/{source}"] = metrics.generation_metrics(
                [hypotheses[i] for i in picked], [refs[i] for i in picked])
    return result, hypotheses


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run a PEFT model as its base (no-op context for plain models)."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        yield
        return
    with disable():
        yield


@torch.no_grad()
def text_perplexity(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int,
                    batch_size: int) -> float:
    """Perplexity of whole texts (every token after the first is a target)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"])
        if len(ids) >= 2:
            examples.append(Example(ids, [-100, *ids[1:]]))
    nll, count = token_nll(model, examples, batch_size, pad)
    return metrics.perplexity(nll, count)


def forgetting(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int,
               batch_size: int) -> dict[str, float]:
    """Base vs base+adapter perplexity on general text; ``ratio`` > 1 means the adapter made it worse."""
    adapted = text_perplexity(model, tokenizer, texts, max_length, batch_size)
    with adapter_disabled(model):
        base = text_perplexity(model, tokenizer, texts, max_length, batch_size)
    return {"base_perplexity": base, "adapter_perplexity": adapted, "ratio": adapted / base if base else math.nan,
            "samples": float(len(texts))}

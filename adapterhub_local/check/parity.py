"""``adapterhub check``: does the engine serve a registered adapter exactly as PEFT runs it?

The adapter runs on a few prompts of its own task (the card's task spec fills the template with short
probe texts) through PEFT (``PeftModel.from_pretrained`` on the base, the reference) and through the engine
on every path a request can take:

* ``swap`` — alone in a batch, base weights clean;
* ``mixed`` — in one batch with another adapter of the same base (and a base row), rows of other lengths;
* ``merge`` — merged into the weights (LoRA-family adapters; soft prompts have nothing to merge);
* ``dynamic`` / ``static`` — greedy decoding with transformers' cache and with the fixed-shape decoder
  (causal LMs): the fraction of greedy tokens equal to PEFT's greedy tokens.

An adapter that swap mode refuses (a full module copy such as an ``lm_head`` in ``modules_to_save``) is checked
on the paths that serve it: ``merge`` and greedy decoding merged (its record has no ``swap``/``mixed``).

Classifiers compare log-probabilities (softmax is shift-invariant, so that is what a head's logits mean)
and the predicted labels. The largest difference must stay within a tolerance that depends on the dtype
(:func:`tolerance`); the result is appended to the version's sidecar (:mod:`adapterhub_local.check.sidecar`)
and a failure raises :class:`ParityError` naming the path and the size of the difference.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from adapterhub_local.check.sidecar import CHECKABLE_KINDS, CheckRecord, append
from adapterhub_local.errors import AdapterHubError, UnsupportedError
from adapterhub_local.inference import Engine, Request, SamplingParams
from adapterhub_local.models import load_base_model
from adapterhub_local.registry import AdapterCard, Registry
from adapterhub_local.registry.peft_config import HEAD_MODULES
from adapterhub_local.task_spec import spec_from_card

PROBES = ("a short input", "the second probe is a little longer than the first one", "x y z", "fine")
"""Texts that fill the task template's field(s): different lengths, so batches pad."""
RELATIVE_TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
"""Allowed |engine − PEFT| per unit of logit scale: a few rounding steps of the dtype through the network
(the reference runs in the same dtype, so only the order of operations differs)."""


class ParityError(AdapterHubError):
    """The engine's output differs from PEFT's by more than the dtype allows."""


def tolerance(dtype: torch.dtype, scale: float) -> float:
    """The largest allowed logit difference in ``dtype`` when the reference logits reach ``scale`` in size."""
    if dtype not in RELATIVE_TOLERANCE:
        raise UnsupportedError(f"no parity tolerance for {dtype}", "check in float32, bfloat16 or float16")
    return RELATIVE_TOLERANCE[dtype] * max(1.0, scale)


@dataclass
class Probe:
    """The prompts a check runs and the adapter it mixes with."""

    texts: list[str]
    partner: str | None


def probe_texts(card: AdapterCard, count: int) -> list[str]:
    """``count`` model inputs in the adapter's task format (template filled with probe texts)."""
    spec = spec_from_card(card.extra, card.recipe, card.labels, where=f"card of {card.ref}")
    texts = [PROBES[i % len(PROBES)] for i in range(count)]
    if spec is None or spec.template is None or not spec.fields:
        return texts
    return [spec.apply_template({name: text for name in spec.fields}) for text in texts]


def pick_partner(registry: Registry, card: AdapterCard) -> str | None:
    """Another adapter of the same base to share batches with (a classifier for a classifier)."""
    classifier = card.task_type == "sequence_classification"
    for row in registry.list_adapters():
        if row.name == card.name or row.base != card.base or row.kind not in ("lora", "head"):
            continue
        other = registry.resolve(row.ref)
        if any(m.rpartition(".")[2] not in HEAD_MODULES for m in other.modules_to_save or []):
            continue  # a module copy (lm_head) is served in merge mode only: it cannot share a batch
        if (other.task_type == "sequence_classification") == classifier:
            return other.ref
    return None


def run_check(registry: Registry, ref: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
              prompts: int = 3, max_new_tokens: int = 4, record: bool = True) -> CheckRecord:
    """Check ``ref`` on its base; append the result to its sidecar (``record``); raise :class:`ParityError`
    when a path differs by more than :func:`tolerance` (after recording, so the failure is on file too)."""
    card = registry.resolve(ref)
    if card.kind not in CHECKABLE_KINDS:
        raise UnsupportedError(f"{card.ref} is a {card.kind} version; parity compares adapters with PEFT",
                               "check LoRA, soft-prompt or head adapters")
    if prompts < 1:
        raise UnsupportedError(f"prompts={prompts}", "check at least one prompt")
    probe = Probe(probe_texts(card, prompts), pick_partner(registry, card))
    if card.task_type == "sequence_classification":
        paths, agreement, scale = _check_classifier(registry, card, probe, dtype, device)
    else:
        paths, agreement, scale = _check_causal(registry, card, probe, dtype, device, max_new_tokens)
    diffs = {k: v for k, v in paths.items() if not k.endswith("agreement")}
    worst = max(diffs.values(), default=0.0)
    allowed = tolerance(dtype, scale)
    result = CheckRecord(
        ref=card.ref, content_hash=card.content_hash, base=card.base, base_fingerprint=card.base_fingerprint,
        dtype=str(dtype).removeprefix("torch."), device=str(device), prompts=len(probe.texts), tolerance=allowed,
        max_logit_diff=worst, greedy_agreement=agreement, passed=worst <= allowed, paths=paths,
        mixed_with=probe.partner, created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    if record:
        append(registry, result)
    if not result.passed:
        bad = {k: f"{v:.3g}" for k, v in diffs.items() if v > allowed}
        raise ParityError(f"{card.ref} is not served as PEFT runs it: largest logit difference {worst:.3g} > "
                          f"tolerance {allowed:.3g} ({result.dtype}) on {bad}",
                          "do not serve this version; report it with `adapterhub show --json` output "
                          "(the engine's maths for this adapter kind disagrees with PEFT's)")
    return result


def _encode(engine: Engine, text: str) -> list[int]:
    """Token ids of a probe; a base without a tokenizer gets ids derived from the characters (in range)."""
    if engine.runner.tokenizer is None:
        vocab = engine.runner.vocab_size
        return [3 + ord(c) % (vocab - 3) for c in text]
    return engine.runner.encode(Request(prompt=text))


# ------------------------------------------------------------------ causal LMs
def _peft_model(registry: Registry, card: AdapterCard, task_type: str, dtype: torch.dtype, device: str,
                num_labels: int | None = None) -> Any:
    from peft import PeftModel

    _, path = registry.verified_path(card.ref, card.base)
    base = load_base_model(registry.base(card.base), task_type, num_labels=num_labels, dtype=dtype, device=device)
    if task_type == "sequence_classification":
        # The head reads the pooling it was trained on (mean for sentence-transformers bases), as the engine does.
        from adapterhub_local.pooling import with_pooling
        from adapterhub_local.train.restore import card_pooling

        base = with_pooling(base, card_pooling(card))
    try:
        return PeftModel.from_pretrained(base, str(path)).eval()
    except (RuntimeError, ValueError, KeyError) as exc:  # PEFT's own refusal: there is no reference to compare
        problem = f"PEFT cannot load {card.ref} on base {card.base} for the parity check ({exc})"[:500]
        fix = "check the adapter's config and card (labels for classifiers), or pass --no-check"
        raise UnsupportedError(problem, fix) from exc


def _head_outputs(registry: Registry, card: AdapterCard) -> int | None:
    """How many outputs the adapter's saved classification head has (when the card lists no labels)."""
    tensors = registry.load_adapter(card.ref, base=card.base).tensors
    heads = [v for k, v in tensors.items() if k.endswith((".classifier.weight", ".score.weight"))]
    return int(heads[0].shape[0]) if heads else None


@torch.inference_mode()
def _reference_causal(model: Any, ids: list[int], steps: int, device: str) -> tuple[torch.Tensor, list[int]]:
    """PEFT's prompt logits (``[len(ids), vocab]``, virtual tokens dropped) and its greedy continuation."""
    tokens = list(ids)
    logits = model(input_ids=torch.tensor([tokens], device=device)).logits[0, -len(ids):].float().cpu()
    greedy: list[int] = []
    step_logits = logits[-1]
    for _ in range(steps):
        greedy.append(int(step_logits.argmax()))
        tokens.append(greedy[-1])
        step_logits = model(input_ids=torch.tensor([tokens], device=device)).logits[0, -1].float().cpu()
    return logits, greedy


def _agreement(got: list[list[int]], want: list[list[int]]) -> float:
    """Fraction of positions equal, counting each row up to its first divergence (after it, the prefixes
    differ, so later tokens no longer compare like with like)."""
    total = sum(len(w) for w in want)
    same = 0
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=False):
            if a != b:
                break
            same += 1
    return same / total if total else 1.0


def _check_causal(registry: Registry, card: AdapterCard, probe: Probe, dtype: torch.dtype, device: str,
                  steps: int) -> tuple[dict[str, float], float, float]:
    swap = Engine(registry, card.base, mode="swap", device=device, dtype=dtype, decoder="dynamic")
    ids = [_encode(swap, text) for text in probe.texts]
    model = _peft_model(registry, card, "causal_lm", dtype, device)
    reference = [_reference_causal(model, row, steps, device) for row in ids]
    del model
    want_logits = [r[0] for r in reference]
    want_tokens = [r[1] for r in reference]
    scale = max(float(w.abs().max()) for w in want_logits)

    def worst(got: list[torch.Tensor]) -> float:
        return max(float((g - w).abs().max()) for g, w in zip(got, want_logits, strict=True))

    paths: dict[str, float] = {}
    # Module copies (an lm_head in modules_to_save) are served in merge mode only: swap refuses them at load,
    # so their check runs the merge path and decodes merged (the absent swap/mixed paths say so on the record).
    swappable = swap.pool.get(swap.pool.resolve(card.ref)).extras.swap_refusal is None
    if swappable:
        _swap_paths(swap, card, probe, ids, worst, paths)
    if card.kind != "prompt":
        merge = Engine(registry, card.base, mode="merge", device=device, dtype=dtype, decoder="dynamic")
        paths["merge"] = worst([merge.logits([Request(prompt=row, adapter=card.ref)])[0].logits for row in ids])
    greedy = SamplingParams(max_new_tokens=steps, temperature=0.0, stop_at_eos=False)
    requests = [Request(prompt=row, adapter=card.ref, sampling=greedy) for row in ids]
    if probe.partner is not None and swappable:
        requests.append(Request(prompt=ids[0], adapter=probe.partner, sampling=greedy))
    agreements = []
    for decoder in ("dynamic", "static"):
        engine = swap if decoder == "dynamic" and swappable else Engine(
            registry, card.base, mode="swap" if swappable else "merge", device=device, dtype=dtype, decoder=decoder)
        got = [r.token_ids for r in engine.generate(requests)[: len(ids)]]
        paths[f"{decoder}_agreement"] = _agreement(got, want_tokens)
        agreements.append(paths[f"{decoder}_agreement"])
    return paths, min(agreements), scale


def _swap_paths(swap: Engine, card: AdapterCard, probe: Probe, ids: list[list[int]],
                worst: Callable[[list[torch.Tensor]], float], paths: dict[str, float]) -> None:
    """The ``swap`` (alone) and ``mixed`` (with a partner adapter and a base row) logit differences."""
    paths["swap"] = worst([swap.logits([Request(prompt=row, adapter=card.ref)])[0].logits for row in ids])
    mixed: list[torch.Tensor] = []
    for k, row in enumerate(ids):
        batch = [Request(prompt=row, adapter=card.ref), Request(prompt=ids[(k + 1) % len(ids)] + row[:3])]
        if probe.partner is not None:
            batch.insert(0, Request(prompt=row + row[:2], adapter=probe.partner))
        mixed.append(swap.logits(batch)[1 if probe.partner is not None else 0].logits)
    paths["mixed"] = worst(mixed)


# ------------------------------------------------------------------ classifiers
def _check_classifier(registry: Registry, card: AdapterCard, probe: Probe, dtype: torch.dtype,
                      device: str) -> tuple[dict[str, float], float, float]:
    outputs = len(card.labels) if card.labels else _head_outputs(registry, card)
    swap = Engine(registry, card.base, mode="swap", device=device, dtype=dtype)
    ids = [_encode(swap, text) for text in probe.texts]
    model = _peft_model(registry, card, "sequence_classification", dtype, device, num_labels=outputs)
    with torch.inference_mode():
        want = [model(input_ids=torch.tensor([row], device=device)).logits[0].float().cpu().log_softmax(-1)
                for row in ids]
    del model
    scale = max(float(w.abs().max()) for w in want)

    def log_probs(results: list[Any]) -> list[torch.Tensor]:
        return [torch.tensor(list(r.probabilities.values()), dtype=torch.float64).log().float() for r in results]

    def worst(got: list[torch.Tensor]) -> float:
        return max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))

    paths: dict[str, float] = {}
    solo = log_probs([swap.classify([Request(prompt=row, adapter=card.ref)])[0] for row in ids])
    paths["swap"] = worst(solo)
    if probe.partner is not None:
        mixed = [swap.classify([Request(prompt=row + row[:2], adapter=probe.partner),
                                Request(prompt=row, adapter=card.ref)])[1] for row in ids]
        paths["mixed"] = worst(log_probs(mixed))
    merge = Engine(registry, card.base, mode="merge", device=device, dtype=dtype)
    paths["merge"] = worst(log_probs([merge.classify([Request(prompt=row, adapter=card.ref)])[0] for row in ids]))
    agree = sum(int(g.argmax()) == int(w.argmax()) for g, w in zip(solo, want, strict=True)) / len(want)
    paths["label_agreement"] = agree
    return paths, agree, scale

"""Task metrics: classification (accuracy, macro/micro P/R/F1, confusion matrix) and generation
(corpus BLEU with all references of an input together, ROUGE-1/2/L, exact match and token F1 with
SQuAD normalisation, perplexity).

Everything here is a pure function of predictions and references; well-kept libraries do the
counting (scikit-learn, sacrebleu, rouge-score).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any


def classification_metrics(predictions: Sequence[str], references: Sequence[str],
                           labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro and micro precision/recall/F1, and the confusion matrix (rows = true label,
    columns = predicted label, both in ``labels`` order)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return {"accuracy": 0.0, "n": 0}
    label_list = list(labels)
    correct = sum(p == r for p, r in zip(predictions, references, strict=True))
    out: dict[str, Any] = {"accuracy": correct / len(references), "n": len(references)}
    for average in ("macro", "micro"):
        p, r, f, _ = precision_recall_fscore_support(
            references, predictions, labels=label_list, average=average, zero_division=0
        )
        out[f"{average}_precision"] = float(p)
        out[f"{average}_recall"] = float(r)
        out[f"{average}_f1"] = float(f)
    matrix = confusion_matrix(references, predictions, labels=label_list)
    out["confusion_matrix"] = {"labels": label_list, "matrix": matrix.tolist()}
    return out


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu, 0–100); ``references[i]`` holds *all* references of input ``i``.

    sacrebleu wants reference streams (``refs[k][i]`` = k-th reference of input i), so inputs with fewer
    references are padded with ``None``, which sacrebleu skips.
    """
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference sets")
    if not hypotheses:
        return 0.0
    depth = max(len(r) for r in references)
    if depth == 0:
        raise ValueError("every input needs at least one reference")
    streams: list[list[str | None]] = [
        [refs[k] if k < len(refs) else None for refs in references] for k in range(depth)
    ]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)  # type: ignore[arg-type]


def rouge(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (rouge-score, stemming); with several references, the best one counts."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hyp, refs in zip(hypotheses, references, strict=True):
        scores = scorer.score_multi(list(refs), hyp)
        for key in totals:
            totals[key] += scores[key].fmeasure
    n = max(len(hypotheses), 1)
    return {key: value / n for key, value in totals.items()}


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, squeeze whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(hypothesis: str, reference: str) -> float:
    """SQuAD token-overlap F1 between two strings (after normalisation)."""
    hyp = normalize_answer(hypothesis).split()
    ref = normalize_answer(reference).split()
    if not hyp or not ref:
        return float(hyp == ref)
    common = Counter(hyp) & Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(hyp)
    recall = overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match_and_f1(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match and token F1, each taking the best over an input's references (SQuAD style)."""
    em = f1 = 0.0
    for hyp, refs in zip(hypotheses, references, strict=True):
        em += max(float(normalize_answer(hyp) == normalize_answer(r)) for r in refs)
        f1 += max(token_f1(hyp, r) for r in refs)
    n = max(len(hypotheses), 1)
    return {"exact_match": em / n, "token_f1": f1 / n}


def perplexity(total_nll: float, total_tokens: int) -> float:
    """``exp(mean negative log-likelihood per token)``; inf for an empty sample or an overflow."""
    if total_tokens <= 0:
        return math.inf
    mean = total_nll / total_tokens
    return math.exp(mean) if mean < 700 else math.inf


def generation_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU, ROUGE-1/2/L, exact match and token F1 in one dict."""
    out = {"bleu": bleu(hypotheses, references)}
    out.update(rouge(hypotheses, references))
    out.update(exact_match_and_f1(hypotheses, references))
    out["n"] = float(len(hypotheses))
    return out

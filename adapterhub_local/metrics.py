"""Task metrics: classification (accuracy, macro/micro P/R/F1, confusion matrix) and generation
(corpus BLEU with all references of an input together, ROUGE-1/2/L, exact match and token F1 with
SQuAD normalisation, perplexity), plus the E2E NLG challenge's set (BLEU, NIST, METEOR, ROUGE-L, CIDEr).

Everything here is a pure function of predictions and references; well-kept libraries do the
counting (scikit-learn, sacrebleu, rouge-score, nltk's NIST, pycocoevalcap's METEOR 1.5 and CIDEr-D — the
implementations the E2E challenge's own scoring script used).

Per-example scores are kept wherever a corpus score is a mean (ROUGE, token F1, accuracy) or can be rebuilt
from per-example sufficient statistics (BLEU: n-gram matches and totals, hypothesis and reference lengths),
so that a bootstrap over evaluation examples recomputes the corpus score exactly.
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


BLEU_STATS = 10
"""Per-example BLEU statistics: ``[hyp_len, ref_len, matches_1..4, totals_1..4]``."""


def bleu_stats(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[float]]:
    """Per-example BLEU sufficient statistics (sacrebleu's 13a tokenisation, closest reference length, all
    references of an input together); their column sums give corpus BLEU through :func:`bleu_from_stats`."""
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference sets")
    scorer = BLEU(effective_order=True)  # only the raw counts are used; this silences sacrebleu's advice
    out = []
    for hyp, refs in zip(hypotheses, references, strict=True):
        score = scorer.sentence_score(hyp, list(refs))
        out.append([float(score.sys_len), float(score.ref_len), *map(float, score.counts), *map(float, score.totals)])
    return out


def bleu_from_stats(stats: Sequence[Sequence[float]]) -> float:
    """Corpus BLEU (0–100, sacrebleu's default ``exp`` smoothing) from summed per-example statistics."""
    from sacrebleu.metrics import BLEU

    if not stats:
        return 0.0
    sums = [sum(row[k] for row in stats) for k in range(BLEU_STATS)]
    return float(BLEU.compute_bleu([int(v) for v in sums[2:6]], [int(v) for v in sums[6:10]], int(sums[0]),
                                   int(sums[1]), smooth_method="exp").score)


def rouge_per_example(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, list[float]]:
    """ROUGE-1/2/L F-measure of each hypothesis (rouge-score, stemming); the best reference counts."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    out: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for hyp, refs in zip(hypotheses, references, strict=True):
        scores = scorer.score_multi(list(refs), hyp)
        for key, values in out.items():
            values.append(float(scores[key].fmeasure))
    return out


def rouge(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (rouge-score, stemming); with several references, the best one counts."""
    n = max(len(hypotheses), 1)
    return {key: sum(values) / n for key, values in rouge_per_example(hypotheses, references).items()}


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


def token_f1_per_example(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Token F1 of each hypothesis against its best reference."""
    return [max(token_f1(hyp, r) for r in refs) for hyp, refs in zip(hypotheses, references, strict=True)]


def exact_match_and_f1(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match and token F1, each taking the best over an input's references (SQuAD style)."""
    em = sum(max(float(normalize_answer(hyp) == normalize_answer(r)) for r in refs)
             for hyp, refs in zip(hypotheses, references, strict=True))
    f1 = sum(token_f1_per_example(hypotheses, references))
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


def _e2e_tokens(text: str) -> str:
    """The E2E scoring script's normalisation for METEOR / CIDEr: lower case, mteval-13a tokenisation."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return str(Tokenizer13a()(text.lower())).strip()


def nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 5) -> float:
    """Corpus NIST (nltk, ``n``-grams up to 5 as mteval), 13a-tokenised; all references of an input together."""
    from nltk.translate.nist_score import corpus_nist
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    if not hypotheses:
        return 0.0
    tok = Tokenizer13a()
    hyps = [tok(h).split() for h in hypotheses]
    refs = [[tok(r).split() for r in rs] for rs in references]
    if not any(hyps):
        return 0.0
    try:
        return float(corpus_nist(refs, hyps, n=n))
    except ZeroDivisionError:  # nltk divides by the hypothesis n-gram count, zero for all-empty outputs
        return 0.0


def meteor_available() -> str | None:
    """None when METEOR can run here, else why not (pycocoevalcap's METEOR 1.5 is a Java program)."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("pycocoevalcap") is None:
        return "pycocoevalcap is not installed (pip install pycocoevalcap)"
    if shutil.which("java") is None:
        return "METEOR 1.5 (pycocoevalcap) needs a Java runtime on PATH (e.g. apt-get install default-jre-headless)"
    return None


def meteor(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """METEOR 1.5 (pycocoevalcap's jar with its paraphrase tables, offline), all references of an input
    together: ``(corpus score, per-example scores)``. Raises :class:`UnsupportedError` where it cannot run."""
    return meteor_many([hypotheses], references)[0]


def meteor_many(runs: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> list[tuple[float, list[float]]]:
    """:func:`meteor` of several runs' hypotheses on the same references, in one Java process (starting one
    takes about 10 s: it loads the paraphrase tables)."""
    from adapterhub_local.errors import UnsupportedError

    why = meteor_available()
    if why is not None:
        raise UnsupportedError(f"METEOR cannot run here: {why}", "install what is named, or leave METEOR out")
    from pycocoevalcap.meteor.meteor import Meteor

    # METEOR's wire protocol separates fields with ' ||| '; a '|' in the text would break it.
    gts = {i: [_e2e_tokens(r).replace("|", " ") for r in refs] for i, refs in enumerate(references)}
    out: list[tuple[float, list[float]]] = []
    scorer = None
    for hypotheses in runs:
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference sets")
        if not hypotheses:
            out.append((0.0, []))
            continue
        scorer = scorer or Meteor()
        res = {i: [_e2e_tokens(h).replace("|", " ") or "."] for i, h in enumerate(hypotheses)}
        corpus, per_example = scorer.compute_score(gts, res)
        out.append((float(corpus), [float(v) for v in per_example]))
    del scorer  # the scorer closes its Java process when freed
    return out


def cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """CIDEr-D as the COCO / E2E scoring scripts compute it (pycocoevalcap; document frequencies from this
    set's references): ``(corpus score, per-example scores)``."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    if not hypotheses:
        return 0.0, []
    scorer = CiderScorer(n=4, sigma=6.0)
    for hyp, refs in zip(hypotheses, references, strict=True):
        scorer += (_e2e_tokens(hyp), [_e2e_tokens(r) for r in refs])
    corpus, per_example = scorer.compute_score()
    return float(corpus), [float(v) for v in per_example]


def e2e_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                with_meteor: bool = True) -> tuple[dict[str, float], dict[str, list[float]], dict[str, str]]:
    """The E2E challenge's five metrics: ``(corpus scores, per-example scores, metric → why unavailable)``.

    BLEU (sacrebleu, 0–100), NIST (nltk), METEOR (pycocoevalcap 1.5, needs Java), ROUGE-L (rouge-score,
    F-measure, best reference) and CIDEr-D (pycocoevalcap); every reference of an input is used together.
    """
    stats = bleu_stats(hypotheses, references)
    scores = {"bleu": bleu_from_stats(stats), "nist": nist(hypotheses, references)}
    per_example: dict[str, list[float]] = {}
    unavailable: dict[str, str] = {}
    rouge_l = rouge_per_example(hypotheses, references)["rougeL"]
    scores["rougeL"] = sum(rouge_l) / max(len(rouge_l), 1)
    per_example["rougeL"] = rouge_l
    scores["cider"], per_example["cider"] = cider(hypotheses, references)
    why = meteor_available() if with_meteor else "not asked for"
    if why is None:
        scores["meteor"], per_example["meteor"] = meteor(hypotheses, references)
    else:
        unavailable["meteor"] = why
    return scores, per_example, unavailable

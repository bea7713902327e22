"""The caption metrics on small cases worked out by hand, and the wrong-image control beside them."""

import math

import pytest

import data
import evaluation as ev


def test_bleu4_on_hand_worked_cases():
    assert ev.bleu4(["the cat sat on the mat"], [["The cat sat on the mat."]]) == pytest.approx(1.0)
    # 8 words against 9: 1-grams 8/8, 2-grams 6/7 ("a blue" is not in the reference), 3-grams 4/6, 4-grams 3/5,
    # brevity penalty exp(1 - 9/8)
    want = math.exp(1 - 9 / 8) * (1 * 6 / 7 * 4 / 6 * 3 / 5) ** 0.25
    got = ev.bleu4(["a small red circle and a blue square"], [["a small red circle and a large blue square"]])
    assert got == pytest.approx(want)
    # no 4-gram in common: 0; the closest reference length is the one used for the brevity penalty
    assert ev.bleu4(["a red ball"], [["a red ball"]]) == 0.0
    assert ev.bleu4(["one two three four five"], [["one two three four five six seven eight nine ten",
                                                   "one two three four five"]]) == pytest.approx(1.0)


def test_cider_d_on_hand_worked_cases():
    # two images, one reference each, predictions equal to them: "a" is in every reference (idf 0), every other
    # n-gram in one (idf log 2); the 1-, 2- and 3-gram cosines are 1, there are no 4-grams: 10 * 3 / 4
    assert ev.cider_d(["a red ball", "a blue box"], [["a red ball"], ["a blue box"]]) == pytest.approx(7.5)
    # a prediction two words too long: the same cosines for 1-3, damped by exp(-2^2 / (2 * 6^2))
    got = ev.cider_d(["a red ball a ball", "a blue box"], [["a red ball"], ["a blue box"]])
    first = 10 / 4 * math.exp(-4 / 72) * sum(_cosines_for_long_red_ball())
    assert got == pytest.approx((first + 7.5) / 2)
    assert ev.cider_d(["a green cone", "a green cone"], [["a red ball"], ["a blue box"]]) == 0.0


def _cosines_for_long_red_ball():
    """By hand: prediction "a red ball a ball" against "a red ball", idf: a -> 0, the rest log 2."""
    l2 = math.log(2)
    # unigrams: prediction {a: 0, red: l2, ball: 2 l2}, reference {a: 0, red: l2, ball: l2}; "ball" is clipped
    # to the reference's weight: (l2 * l2 + l2 * l2) / (|(l2, 2 l2)| |(l2, l2)|) = 2 / sqrt(10)
    uni = (l2 * l2 + l2 * l2) / (math.sqrt(l2 ** 2 + (2 * l2) ** 2) * math.sqrt(2 * l2 ** 2))
    # bigrams: prediction {a red, red ball, ball a, a ball} each once; reference {a red, red ball}; clipped products
    bi = 2 * l2 * l2 / (math.sqrt(4 * l2 ** 2) * math.sqrt(2 * l2 ** 2))
    # trigrams: prediction {a red ball, red ball a, ball a ball}, reference {a red ball}
    tri = l2 * l2 / (math.sqrt(3 * l2 ** 2) * l2)
    return uni, bi, tri


def test_token_f1():
    assert ev.token_f1("a red ball", ["the red ball"]) == pytest.approx(2 / 3)
    assert ev.token_f1("red red", ["red"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert ev.token_f1("nothing alike", ["a red ball", "a blue box"]) == 0.0
    assert ev.token_f1("a blue box", ["a red ball", "a blue box"]) == 1.0      # the best reference counts


def test_caption_metrics_group_references_by_image_and_report_the_wrong_image():
    samples = [data.Sample(f"{name}.png", [("", caption)]) for name, caption in
               (("a", "a red ball"), ("a", "one red ball"), ("b", "a blue box"), ("c", "a green cone"))]
    predictions = ["a red ball", "ignored: the second sample of the same image", "a blue box", "a green cone"]
    m = ev.caption_metrics(samples, predictions)
    assert m["token F1"] == pytest.approx(1.0) and m["token F1 (wrong image)"] < 0.5
    assert m["CIDEr-D"] > 5 and m["CIDEr-D (wrong image)"] < 1
    assert m["BLEU-4"] == 0.0               # three-word captions have no 4-grams

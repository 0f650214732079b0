"""Tests for captioning/evaluation/coco_metrics.py: CIDEr-D and ROUGE-L worked out by hand, the fast CiderD
against pycocoevalcap's, the pure-Python tokenisation against the PTB (Java) one, bad input.

Java tests skip, with the reason, where no `java` is on PATH."""
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from captioning.evaluation import coco_metrics as cm
from captioning.utils import PipelineError

SAMPLE_TOKENS = Path(__file__).resolve().parents[1] / "data" / "sample" / "Flickr8k_text" / "Flickr8k.token.txt"
needs_java = pytest.mark.skipif(not cm.java_available(),
                                reason="no working `java` on PATH (apt-get install default-jre-headless)")

# Two images. Every word is lowercase and unpunctuated, so both tokenisations leave them as they are.
REFS = {"A": ["a dog runs", "a dog sits"], "B": ["a cat sleeps", "the cat sleeps"]}
HYPS = {"A": "a dog runs", "B": "a cat"}
# CIDEr-D by hand. N = 2 images, idf(g) = ln N - ln max(1, df(g)), so with c = ln 2:
#   "a" is in both images' references: idf 0; every other n-gram (seen in one image or none): c.
# A "a dog runs": tf-idf 1-grams {a:0, dog:c, runs:c} (norm c*sqrt2), 2-grams {a dog:c, dog runs:c}
#   (norm c*sqrt2), 3-gram {a dog runs:c} (norm c), no 4-gram.
#   vs "a dog runs" (the same): cosines 1, 1, 1, 0; lengths equal, penalty 1.
#   vs "a dog sits": 1-grams share dog: c^2 / (2c^2) = 1/2; 2-grams share "a dog": 1/2; 0; 0.
#   per order summed over refs [1.5, 1.5, 1, 0]; mean over 4 orders 1.0; / 2 refs; x 10 -> 5.0
# B "a cat": {a:0, cat:c} (norm c), {a cat:c} (norm c). pycocoevalcap's length is the number of
#   bigrams: 1 for the hypothesis, 2 for each reference, so penalty p = exp(-1 / (2 * 6^2)).
#   vs "a cat sleeps": 1-grams {a:0, cat:c, sleeps:c} norm c*sqrt2, share cat: 1/sqrt2;
#                      2-grams {a cat:c, cat sleeps:c} norm c*sqrt2, share "a cat": 1/sqrt2
#   vs "the cat sleeps": 1-grams {the:c, cat:c, sleeps:c} norm c*sqrt3, share cat: 1/sqrt3;
#                        2-grams share nothing: 0
#   per order [1/sqrt2 + 1/sqrt3, 1/sqrt2, 0, 0] * p; mean / 2 refs * 10 = 1.25 p (sqrt2 + 1/sqrt3)
CIDER_A = 5.0
CIDER_B = 1.25 * math.exp(-1 / 72) * (math.sqrt(2) + 1 / math.sqrt(3))     # 2.45511...
# ROUGE-L (LCS F-measure, beta 1.2; precision and recall each the max over the references):
# A: identical to its first reference: P = R = 1 -> 1.
# B "a cat": vs "a cat sleeps" LCS 2: P 2/2, R 2/3; vs "the cat sleeps" LCS 1: P 1/2, R 1/3.
#   P = 1, R = 2/3: F = (1 + 1.44) P R / (R + 1.44 P) = (2.44 * 2/3) / (2/3 + 1.44) = 4.88 / 6.32
ROUGE_B = 4.88 / 6.32                                                     # 0.77215...


def close(a, b, tol=1e-9):
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def sample_references():
    """The bundled sample's 320 images x 5 original captions."""
    refs = defaultdict(list)
    for line in SAMPLE_TOKENS.read_text(encoding="utf-8").splitlines():
        name, caption = line.split("\t")
        refs[name.split("#")[0].rsplit(".", 1)[0]].append(caption)
    return dict(refs)


def sample_corpus():
    """A fixed corpus: per image, 4 references and a hypothesis that is its own 5th caption
    (even positions) or another image's (odd positions), raw text with punctuation."""
    refs = sample_references()
    ids = sorted(refs)
    hyps = {k: refs[k][0] if i % 2 == 0 else refs[ids[(i + 1) % len(ids)]][0] for i, k in enumerate(ids)}
    return {k: refs[k][1:] for k in ids}, hyps


# ---- hand-computed cases --------------------------------------------------------------------------
def test_hand_computed_cider_d_and_rouge_l():
    got = cm.score_captions(REFS, HYPS, java=False)
    assert close(got["cider_d"], (CIDER_A + CIDER_B) / 2), got
    assert close(got["cider_d"], 3.727557, tol=1e-6)
    assert close(got["rouge_l"], (1 + ROUGE_B) / 2), got
    assert got["tokenizer"] == "python" and got["n_images"] == 2
    assert got["meteor"] is None and "meteor" in got["not_computed"]
    assert got["spice"] is None and "offline" in got["not_computed"]["spice"]


def test_fast_cider_d_hand_case_with_words_and_with_ids():
    scorer = cm.CiderD(REFS)
    assert np.allclose(scorer.scores(["A", "B"], [["a", "dog", "runs"], "a cat"]), [CIDER_A, CIDER_B],
                       rtol=0, atol=1e-12)
    # the same captions as token ids (what a decoder returns): n-grams of ids, same numbers
    vocab = {w: i for i, w in enumerate(sorted({w for caps in REFS.values() for c in caps for w in c.split()}
                                               | {"runs"}), start=1)}
    id_refs = {k: [[vocab[w] for w in c.split()] for c in caps] for k, caps in REFS.items()}
    got = cm.CiderD(id_refs).scores(["A", "B", "A"], [np.array([vocab["a"], vocab["dog"], vocab["runs"]]),
                                                      [vocab["a"], vocab["cat"]], []])
    assert np.allclose(got, [CIDER_A, CIDER_B, 0.0], rtol=0, atol=1e-12)


def test_rouge_l_takes_best_precision_and_best_recall_from_different_references():
    # "a cat" vs "a big cat sleeps here" (LCS 2: P 1, R 2/5) and vs "cat" (LCS 1: P 1/2, R 1):
    # max P = 1 and max R = 1 come from different references, so F = 1 (pycocoevalcap's rule)
    got = cm.score_captions({"x": ["a big cat sleeps here", "cat"]}, {"x": "a cat"}, java=False)
    assert close(got["rouge_l"], 1.0)


def test_cider_d_document_frequencies_come_from_the_scored_images():
    # image A scored alone: N = 1, every idf = ln 1 - ln 1 = 0, so every vector is zero -> 0;
    # with B beside it (the same hypothesis and references) it is 5.0 (the hand case above)
    alone = cm.score_captions({"A": REFS["A"]}, {"A": HYPS["A"]}, java=False)
    assert alone["cider_d"] == 0.0
    # references of images that are not scored are ignored (the split scored = the hypotheses')
    assert cm.score_captions(REFS, {"A": HYPS["A"]}, java=False)["cider_d"] == 0.0


def test_hand_computed_bleu_matches_pycocoevalcap_closest_length():
    # "a cat" vs {"a cat sleeps", "the cat sleeps"}: p1 = 2/2, p2 = 1/1; closest ref length 3,
    # BP = exp(1 - 3/2). pycocoevalcap adds 1e-9 to the matches (tiny), so compare to 1e-6.
    got = cm.score_captions({"B": REFS["B"]}, {"B": "a cat"}, java=False)
    assert close(got["bleu_1"], math.exp(-0.5), tol=1e-6)
    assert close(got["bleu_2"], math.exp(-0.5), tol=1e-6)


# ---- the fast CiderD equals pycocoevalcap's CIDEr-D ----------------------------------------------
def test_fast_cider_d_equals_pycocoevalcap_on_the_sample_corpus():
    refs, hyps = sample_corpus()
    gts = {k: [cm.python_tokenize(c) for c in caps] for k, caps in refs.items()}
    res = {k: [cm.python_tokenize(hyps[k])] for k in refs}
    mean, per_image = Cider().compute_score(gts, res)
    ids = list(gts)
    ours = cm.CiderD(gts).scores(ids, [res[k][0] for k in ids])
    # same formula, different summation order: agreement to 1e-9 per image
    assert np.max(np.abs(ours - np.asarray(per_image))) < 1e-9
    assert abs(ours.mean() - mean) < 1e-9
    assert 0.1 < mean < 2.0 and ours.max() > 1.0      # a real spread, not all zeros


# ---- tokenisation ---------------------------------------------------------------------------------
# expected strings: the output of pycocoevalcap's PTBTokenizer (CoreNLP 3.4.1) on these lines
PTB_CASES = {
    "A dog's ball isn't red-and-white!": "a dog 's ball is n't red-and-white",
    "Two men (in hats) walk...": "two men -lrb- in hats -rrb- walk",
    '"Hello," she said.': "hello she said",
    "A crowd in Washington D.C.": "a crowd in washington d.c.",
    "a dog. a cat": "a dog a cat",
    "near 3rd St .": "near 3rd st",
    "a slip 'n' slide ;  two  kids\r\n": "a slip 'n' slide two kids",
}


@pytest.mark.parametrize("raw", list(PTB_CASES))
def test_python_tokenize_mimics_ptb(raw):
    assert cm.python_tokenize(raw) == PTB_CASES[raw]


@needs_java
def test_ptb_tokenizer_gives_the_same_cases():
    got = cm.ptb_tokenize({"x": list(PTB_CASES)})
    assert got["x"] == list(PTB_CASES.values())


@pytest.mark.slow
@needs_java
def test_python_and_ptb_tokenisation_agree_on_flickr8k_captions(flickr8k_dir):
    lines = (flickr8k_dir / "Flickr8k_text" / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines()
    captions = [line.split("\t", 1)[1] for line in lines if "\t" in line][::5]   # 8,092, for speed
    ptb = cm.ptb_tokenize({"all": captions})["all"]
    mismatches = sum(cm.python_tokenize(c) != p for c, p in zip(captions, ptb))
    # on all 40,460 captions 4 differ (rare forms such as "'s-eye-view", "RIF=ding"); here <= 2
    assert len(captions) == 8092 and mismatches <= 2, mismatches


@pytest.mark.slow
@needs_java
def test_java_and_pure_python_paths_agree_on_a_fixed_corpus():
    refs, hyps = sample_corpus()
    python = cm.score_captions(refs, hyps, java=False)
    ptb = cm.score_captions(refs, hyps, java=True, meteor=False)   # METEOR: tested below
    assert ptb["tokenizer"] == "ptb" and python["tokenizer"] == "python"
    # stated tolerance: 1e-3 absolute per metric (the tokenisations are identical on these 1,600
    # captions, so today the numbers are equal; a rare differing caption moves a corpus score
    # by far less than 1e-3)
    for metric in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d"):
        assert abs(python[metric] - ptb[metric]) <= 1e-3, metric


@pytest.mark.slow
@needs_java
def test_meteor_of_an_exact_match_is_one():
    # METEOR 1.5 scores a hypothesis equal to a reference (after PTB tokenisation) exactly 1: all
    # words matched and its fragmentation penalty is set to 0 for a perfect match
    got = cm.score_captions({"x": ["A dog runs on the grass .", "Two cats ."]}, {"x": "a dog runs on the grass"},
                            java=True)
    assert got["meteor"] == 1.0
    assert got["tokenizer"] == "ptb" and "meteor" not in got["not_computed"]


def test_java_auto_without_java_uses_python_and_says_so(monkeypatch):
    monkeypatch.setattr(cm, "java_available", lambda: False)
    got = cm.score_captions(REFS, HYPS)
    assert got["tokenizer"] == "python" and got["meteor"] is None
    assert "no working `java`" in got["not_computed"]["meteor"]
    with pytest.raises(PipelineError, match="default-jre-headless"):
        cm.score_captions(REFS, HYPS, java=True)


# ---- bad input: one-line PipelineError naming the image -------------------------------------------
@pytest.mark.parametrize("refs, hyps, message", [
    ({"A": ["a dog", "  "]}, {"A": "a dog"}, "image A has an empty reference caption (#2)"),
    ({"A": []}, {"A": "a dog"}, "image A has no reference captions"),
    ({"A": ["a dog"]}, {"A": "a dog", "Z": "a cat"}, "hypothesis for image Z has no references"),
    ({"A": ["a dog"]}, {}, "no hypotheses"),
    ({"A": ["a dog"]}, {"A": ["a", "dog"]}, "hypothesis for image A is not a string"),
])
def test_malformed_input_is_a_one_line_error(refs, hyps, message):
    with pytest.raises(PipelineError) as info:
        cm.score_captions(refs, hyps, java=False)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_fast_cider_d_bad_input():
    with pytest.raises(PipelineError, match=r"image B has an empty reference caption \(#1\)"):
        cm.CiderD({"A": ["a dog"], "B": [""]})
    scorer = cm.CiderD(REFS)
    with pytest.raises(PipelineError, match="image Z has no references"):
        scorer.scores(["A", "Z"], ["a dog", "a cat"])
    with pytest.raises(PipelineError, match="hypothesis tokens are int but the references' are str"):
        scorer.scores(["A"], [[1, 2, 3]])
    with pytest.raises(PipelineError, match="2 ids for 1 captions"):
        scorer.scores(["A", "B"], ["a dog"])

"""Tests for captioning/inference/consensus.py: nearest training images, the CIDEr-D agreement of
candidate captions with their captions, and the choice among a beam's candidates, on a
hand-made corpus of five training images."""
import json

import numpy as np
import pytest

from captioning.data.features import save_features
from captioning.evaluation.coco_metrics import CiderD
from captioning.inference.consensus import Consensus
from captioning.utils import PipelineError

# two dog images near the query (1, 0), three cat images far from it
VECTORS = {"d1": np.array([1.0, 0.0]), "d2": np.array([0.9, 0.2]), "c1": np.array([0.0, 1.0]),
           "c2": np.array([0.1, 0.9]), "c3": np.array([-0.2, 1.0]), "q": np.array([1.0, 0.05])}
CAPTIONS = {"d1": ["a dog runs on the grass", "a brown dog runs"],
            "d2": ["a dog runs in a field", "the dog is running"],
            "c1": ["a cat sleeps on a bed", "a cat is sleeping"],
            "c2": ["a cat sleeps", "a white cat lies on a sofa"],
            "c3": ["a black cat sleeps on a chair", "the cat sleeps"]}
TRAIN = ["d1", "d2", "c1", "c2", "c3"]
# the model prefers the cat caption; the dog images' captions agree with the dog one
OPTIONS = [("a cat sleeps".split(), -1.0), ("a dog runs".split(), -1.2)]


def corpus(k=2, weight=0.5):
    return Consensus(VECTORS, CAPTIONS, TRAIN, k, weight)


def test_nearest_training_images_and_no_vote_for_oneself():
    c = corpus(k=3)
    assert c.neighbours(np.array([[1.0, 0.05]])).tolist() == [[0, 1, 3]]   # d1, d2, then c2
    assert c.neighbours(np.array([[0.0, 1.0]])).tolist() == [[2, 3, 4]]
    # a training image as the query: its own captions are left out
    assert c.neighbours(np.array([VECTORS["d1"]]), ids=["d1"]).tolist() == [[1, 3, 2]]


def test_agreement_is_the_mean_cider_d_against_each_neighbour():
    c = corpus()
    agree = c.agreement([w for w, _ in OPTIONS], [0, 1])
    by_hand = CiderD({i: [s.split() for s in CAPTIONS[i]] for i in TRAIN})
    for row, (words, _) in enumerate(OPTIONS):
        assert agree[row] == pytest.approx((by_hand.score("d1", words) + by_hand.score("d2", words)) / 2)
    # "a" is in every training image (idf 0) and "cat sleeps" in none of the two: no agreement
    assert agree[0] == 0.0 and agree[1] > 1.0


@pytest.mark.parametrize("weight, pick", [(0.0, 1), (0.4, 1), (0.6, 0), (1.0, 0)])
def test_choice_by_weight(weight, pick):
    # two candidates: z(model) = (1, -1), z(agreement) = (-1, 1); W .5 would tie (the first wins)
    picks, agreements = corpus(weight=weight).choose(np.array([[1.0, 0.05]]), [OPTIONS])
    assert picks == [pick] and agreements[0][1] > agreements[0][0]


def test_one_candidate_or_equal_scores_keep_the_models_order():
    c = corpus(weight=0.0)
    assert c.choose(np.array([[1.0, 0.05]]), [OPTIONS[:1]])[0] == [0]
    same = [("a dog runs".split(), -1.0), ("a dog runs".split(), -2.0)]     # equal agreement
    assert c.choose(np.array([[1.0, 0.05]]), [same])[0] == [0]
    unfinished = [("a dog".split(), -np.inf)]
    assert corpus().choose(np.array([[1.0, 0.05]]), [unfinished])[0] == [0]


def test_from_files_and_one_line_errors(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "descriptions.txt").write_text("".join(f"{i} {c}\n" for i in TRAIN for c in CAPTIONS[i]))
    (data / "splits.json").write_text(json.dumps({"train": TRAIN, "dev": [], "test": ["q"]}))
    save_features(tmp_path / "f.pkl", {i: v.astype(np.float32) for i, v in VECTORS.items()})
    c = Consensus.from_files(tmp_path / "f.pkl", data, k=2, weight=0.0)
    assert c.choose(c.query_vectors(["q"]), [OPTIONS], ["q"])[0] == [1]
    with pytest.raises(PipelineError, match=r"^image x9 has no vector in .*f.pkl \(1 of 2 missing\)$"):
        c.query_vectors(["q", "x9"])
    with pytest.raises(PipelineError, match="query vectors are 3-d but .* holds 2-d vectors"):
        c.neighbours(np.ones((1, 3)))
    partial = {i: v.astype(np.float32) for i, v in VECTORS.items() if i != "c2"}
    save_features(tmp_path / "partial.pkl", partial)
    with pytest.raises(PipelineError, match=r"^training image c2 has no vector in .*partial.pkl \(1 of 5 missing\)$"):
        Consensus.from_files(tmp_path / "partial.pkl", data)
    with pytest.raises(PipelineError, match="between 0 and 1"):
        corpus(weight=1.5)

"""Tests for image-sentence retrieval: metrics, loss, index, training, evaluation, search.

Fast: the metrics, loss and index tests are pure numpy on hand-made numbers. The end-to-end
tests share one tiny embedding (d 32) trained for a few epochs on 300 training and 100 dev
images of the real Flickr8k split with the shared EfficientNet-Lite0 features (skipped where
the shared data is absent); the file runs in well under a minute on 2 CPU cores.
"""
import json
import pickle
import shutil

import numpy as np
import pytest
from scipy.special import logsumexp

import evaluate_retrieval
import search_images
import train_retrieval
from captioning.retrieval import caption_scoring, folder_search, protocol, rerank
from captioning.models import registry
from captioning.retrieval import ranking
from captioning.retrieval import vse
from captioning.retrieval import vector_index
from captioning.data import text
from captioning.data.features import load_features
from captioning.utils import PipelineError, run_cli, write_json

LITE0 = "features_efficientnet_lite0.pkl"
TINY = ["--embed-dim", "32", "--word-dim", "16", "--batch-size", "32", "--learning-rate", "2e-3",
        "--warmup-epochs", "1", "--verbose", "0", "--seed", "3"]


# ---- ranking metrics ---------------------------------------------------------------------------
# 3 images, 6 captions: captions 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2
TOY = np.array([[0.9, 0.1, 0.8, 0.2, 0.3, 0.4],     # image 0: caption 0 is first        -> rank 1
                [0.5, 0.6, 0.1, 0.3, 0.7, 0.2],     # image 1: best own 0.3, 3 above it  -> rank 4
                [0.2, 0.3, 0.4, 0.1, 0.35, 0.25]])  # image 2: best own 0.35, 1 above    -> rank 2
TOY_IMAGE = [0, 0, 1, 1, 2, 2]
# text -> image, column by column: caption j's own image score vs the other two images
#   c0 0.9 vs .5 .2 -> 1; c1 0.1 vs .6 .3 -> 3; c2 0.1 vs .8 .4 -> 3;
#   c3 0.3 vs .2 .1 -> 1; c4 0.35 vs .3 .7 -> 2; c5 0.25 vs .4 .2 -> 2
TOY_I2T, TOY_T2I = [1, 4, 2], [1, 3, 3, 1, 2, 2]


def test_ranks_of_the_toy_matrix():
    assert ranking.image_to_text_ranks(TOY, TOY_IMAGE).tolist() == TOY_I2T
    assert ranking.text_to_image_ranks(TOY, TOY_IMAGE).tolist() == TOY_T2I
    result = ranking.evaluate(TOY, TOY_IMAGE)
    a, s = result["image_to_text"], result["text_to_image"]
    assert (a["r1"], a["r5"], a["median_rank"], a["mean_rank"]) == (pytest.approx(100 / 3), 100.0, 2.0,
                                                                     pytest.approx(7 / 3))
    assert (s["r1"], s["r5"], s["median_rank"], s["mean_rank"]) == (pytest.approx(100 / 3), 100.0, 2.0,
                                                                     pytest.approx(2.0))
    assert result["rsum"] == pytest.approx(100 / 3 + 100 + 100 + 100 / 3 + 100 + 100, abs=1e-3)


def argsort_ranks(similarity, caption_image):
    """The VSE++ reference code's way, a loop of argsorts: (i2t ranks, t2i ranks), 1-based."""
    caption_image = np.asarray(caption_image)
    i2t = []
    for i in range(similarity.shape[0]):
        order = np.argsort(-similarity[i])
        i2t.append(1 + min(np.where(order == j)[0][0] for j in np.where(caption_image == i)[0]))
    t2i = []
    for j in range(similarity.shape[1]):
        order = np.argsort(-similarity[:, j])
        t2i.append(1 + np.where(order == caption_image[j])[0][0])
    return i2t, t2i


def test_ranks_agree_with_an_independent_argsort_computation():
    rng = np.random.default_rng(0)
    caption_image = np.repeat(np.arange(40), 5)
    similarity = rng.normal(size=(40, 200)) + 1.5 * (np.arange(40)[:, None] == caption_image[None])
    i2t, t2i = argsort_ranks(similarity, caption_image)
    assert ranking.image_to_text_ranks(similarity, caption_image).tolist() == i2t
    assert ranking.text_to_image_ranks(similarity, caption_image).tolist() == t2i
    r = ranking.summarize(t2i)
    assert r["r10"] == pytest.approx(100 * np.mean(np.array(t2i) <= 10))
    assert r["median_rank"] == np.median(t2i)
    assert TOY_I2T == argsort_ranks(TOY, TOY_IMAGE)[0] and TOY_T2I == argsort_ranks(TOY, TOY_IMAGE)[1]


# ---- loss --------------------------------------------------------------------------------------
def test_loss_on_a_hand_made_batch():
    # 2-d unit vectors; S = I T^T by hand
    images = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    texts = np.array([[1, 0], [0.6, 0.8], [0, 1]], np.float32)
    scores = images @ texts.T
    np.testing.assert_allclose(scores, [[1, .6, 0], [0, .8, 1], [.6, 1, .8]], atol=1e-6)
    # margin .2; diagonal 1, .8, .8
    # image 0: captions 1,2: .2+.6-1 < 0, .2+0-1 < 0           -> 0
    # image 1: captions 0,2: .2+0-.8 < 0, .2+1-.8 = .4          -> max .4, sum .4
    # image 2: captions 0,1: .2+.6-.8 = 0, .2+1-.8 = .4         -> max .4, sum .4
    # caption 0: images 1,2: .2+0-1 < 0, .2+.6-1 < 0            -> 0
    # caption 1: images 0,2: .2+.6-.8 = 0, .2+1-.8 = .4         -> max .4, sum .4
    # caption 2: images 0,1: .2+0-.8 < 0, .2+1-.8 = .4          -> max .4, sum .4
    ids = np.array([0, 1, 2])
    hardest = np.asarray(vse.contrastive_loss(images, texts, ids, 0.2, 1.0))
    summed = np.asarray(vse.contrastive_loss(images, texts, ids, 0.2, 0.0))
    np.testing.assert_allclose(hardest, [0.0, 0.8, 0.8], atol=1e-6)
    np.testing.assert_allclose(summed, [0.0, 0.8, 0.8], atol=1e-6)
    # the same image twice (rows 1 and 2): their pairs are not negatives of each other
    masked = np.asarray(vse.contrastive_loss(images, texts, np.array([0, 1, 1]), 0.2, 1.0))
    np.testing.assert_allclose(masked, [0.0, 0.0, 0.0], atol=1e-6)
    # a batch where the sum and the max differ: image 0 with two violating captions
    images2 = np.array([[1, 0], [1, 0], [1, 0]], np.float32)
    texts2 = np.array([[0.8, 0.6], [1, 0], [1, 0]], np.float32)
    # S rows all [.8, 1, 1]; image 0 (diag .8): captions 1,2 each .2+1-.8 = .4 -> max .4, sum .8
    #   caption 0 (diag .8): images 1,2 each .2+.8-.8=.2 -> max .2, sum .4
    np.testing.assert_allclose(np.asarray(vse.contrastive_loss(images2, texts2, ids, 0.2, 1.0))[0], 0.6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vse.contrastive_loss(images2, texts2, ids, 0.2, 0.0))[0], 1.2, atol=1e-6)


# ---- index -------------------------------------------------------------------------------------
def brute_force_top(vectors, query, k):
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = query / np.linalg.norm(query)
    return np.argsort(-(v @ q), kind="stable")[:k]


def test_numpy_index_matches_brute_force_and_cuts_k():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(500, 24)).astype(np.float32)
    index = vector_index.NumpyIndex(vectors)
    queries = rng.normal(size=(3, 24)).astype(np.float32)
    scores, rows = index.search(queries, 7)
    for q in range(3):
        assert rows[q].tolist() == brute_force_top(vectors, queries[q], 7).tolist()
    assert np.all(np.diff(scores, axis=1) <= 0)
    assert index.search(queries[:1], 10_000)[1].shape == (1, 500)
    with pytest.raises(PipelineError, match="unknown index backend"):
        vector_index.make_index(vectors, "annoy")


def test_faiss_and_numpy_give_the_same_top_k(flickr8k_dir):
    pytest.importorskip("faiss")
    table = load_lite0(flickr8k_dir)
    ids = sorted(table)[:3000]
    vectors = np.stack([table[i] for i in ids])
    queries = np.stack([table[i] for i in sorted(table)[3000:3020]])
    np_scores, np_rows = vector_index.make_index(vectors, "numpy").search(queries, 10)
    fa_scores, fa_rows = vector_index.make_index(vectors, "faiss").search(queries, 10)
    assert np_rows.tolist() == fa_rows.tolist()
    np.testing.assert_allclose(np_scores, fa_scores, atol=1e-5)


# ---- queries -----------------------------------------------------------------------------------
TOKENIZER = {"word_index": {"startseq": 1, "endseq": 2, "<unk>": 3, "a": 4, "dog": 5, "runs": 6},
             "oov_token": "<unk>", "start_token": "startseq", "end_token": "endseq", "pad_id": 0,
             "cleaning": "default"}


def test_encode_query_cleans_and_reports_unknown_words():
    assert vse.encode_query("A dog's zebra runs!", TOKENIZER, 10) == ([1, 4, 5, 3, 6, 2], ["zebra"])
    with pytest.raises(PipelineError, match="empty query"):
        vse.encode_query("  ?! 42 ", TOKENIZER, 10)
    with pytest.raises(PipelineError, match="unknown: zebra, giraffe"):
        vse.encode_query("zebra giraffe", TOKENIZER, 10)


# ---- the captioner as a ranker -----------------------------------------------------------------
def test_captioner_scores_fast_path_equals_the_keras_model():
    config = {"variant": "merge", "mode": "sequence", "feature_dim": 6, "vocab_size": 9,
              "max_length": 8, "embed_dim": 4, "units": 5, "dropout": 0.0}
    import keras
    keras.utils.set_random_seed(0)
    model = registry.build_model("merge", 6, 9, 8, embed_dim=4, units=5, dropout=0.0)
    features = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
    tokens = [[1, 4, 5, 2], [1, 6, 2], [1, 7, 8, 4, 3, 2]]
    fast = caption_scoring.caption_scores(model, config, features, tokens, pair_budget=200)
    slow = caption_scoring.caption_scores_keras(model, features, tokens)
    np.testing.assert_allclose(fast, slow, atol=1e-5)
    # by hand for one pair: mean log p of the words after startseq, endseq included
    probs = np.asarray(model({"image_input": features[1:2], "caption_input": np.array([[1, 6]])}))[0]
    assert fast[1, 1] == pytest.approx((np.log(probs[0, 6]) + np.log(probs[1, 2])) / 2, abs=1e-5)


@pytest.mark.parametrize("variant", ["merge", "inject"])
def test_pair_scores_are_the_full_matrix_at_those_pairs(variant):
    config = {"variant": variant, "mode": "sequence", "feature_dim": 6, "vocab_size": 9,
              "max_length": 8, "embed_dim": 4, "units": 5, "dropout": 0.0}
    import keras
    keras.utils.set_random_seed(0)
    model = registry.build_model(variant, 6, 9, 8, embed_dim=4, units=5, dropout=0.0)
    features = np.random.default_rng(2).normal(size=(4, 6)).astype(np.float32)
    tokens = [[1, 4, 5, 2], [1, 6, 2], [1, 7, 8, 4, 3, 2]]
    full = caption_scoring.caption_scores_keras(model, features, tokens)
    images, captions = np.array([3, 0, 1, 1, 2, 0, 3]), np.array([2, 0, 1, 2, 0, 2, 0])
    got = caption_scoring.pair_scores(model, config, features, tokens, images, captions,
                                      pair_budget=60, caption_chunk=2)
    np.testing.assert_allclose(got, full[images, captions], atol=1e-5)
    assert caption_scoring.pair_scores(model, config, features, tokens, [], []).shape == (0,)


# ---- re-ranking text -> image by a captioner -----------------------------------------------------
# log-likelihoods for TOY's pairs (only the top-2 candidates of each caption are read)
TOY_LL = np.array([[-2.0, -1.0, -1.0, -1.5, -1.0, -1.0],
                   [-1.0, -1.0, -2.0, -1.5, -3.0, -1.0],
                   [-1.0, -1.0, -1.5, -1.0, -1.0, -2.0]])


def reranked(cosine, likelihood, k, weight, caption_image=TOY_IMAGE):
    """Re-ranked text -> image ranks, the likelihood of every pair given as a full matrix."""
    rows = rerank.candidates(cosine, caption_image, k)
    return rerank.text_to_image_ranks(cosine, caption_image, rows,
                                      np.take_along_axis(likelihood, rows, axis=0), weight).tolist()


def test_reranking_the_toy_matrix_by_hand():
    # K = 2: two candidates per caption, so each z-score is +1 / -1 and the order flips at W = .5
    #   c0 (image 0, plain 1): candidates image 0 (.9), image 1 (.5); LL -2, -1
    #      W .4: image 0 = .4 - .6 = -.2, image 1 = -.4 + .6 = .2      -> rank 2 (moved down)
    #   c1, c2 (plain 3): own image not among the two candidates       -> 3, 3 unchanged
    #   c3 (image 1, plain 1): candidates image 1 (.3), image 0 (.2); LL equal, z 0 -> rank 1
    #   c4 (image 2, plain 2): candidates image 1 (.7), image 2 (.35); LL -3, -1
    #      W .4: image 1 = .4 - .6 = -.2, image 2 = .2                   -> rank 1 (moved up)
    #   c5 (image 2, plain 2): candidates image 0 (.4), image 2 (.25); LL -1, -2 -> stays 2
    assert reranked(TOY, TOY_LL, 2, 0.4) == [2, 3, 3, 1, 1, 2]
    assert reranked(TOY, TOY_LL, 2, 0.6) == TOY_T2I          # the embedding still outweighs
    assert rerank.candidates(TOY, TOY_IMAGE, 2)[:, 4].tolist() == [1, 2]
    # K = 3 on c2 (image 1, plain 3): candidates image 0 .8, image 2 .4, image 1 .1; the captioner
    # alone (W = 0) orders them by LL: -1, -1.5, -2 -> image 1 stays 3; given the best LL -> 1
    assert reranked(TOY, TOY_LL, 3, 0.0)[2] == 3
    better = TOY_LL.copy()
    better[1, 2] = 0.0
    assert reranked(TOY, better, 3, 0.0)[2] == 1


CAPTION_IMAGE = np.repeat(np.arange(30), 5)


def search_reranked(cosine, score, k, weight):
    """Re-ranked text -> image ranks of CAPTION_IMAGE, every pair's score as a full matrix."""
    return reranked(cosine, score, k, weight, CAPTION_IMAGE)


def annotation_reranked_all(cosine, score, k, weight):
    """Re-ranked image -> text ranks of CAPTION_IMAGE (annotation_reranked, below)."""
    return annotation_reranked(cosine, score, k, weight, CAPTION_IMAGE)


# per direction: seed, plain ranks, re-ranker, K values up to past the candidate count, the K of
# the check that W < 1 moves ranks, and a wrong candidates array with its score shape
DIRECTIONS = {
    "text_to_image": (4, ranking.text_to_image_ranks, search_reranked, (1, 5, 10, 30, 100), 5,
                      lambda c: (rerank.text_to_image_ranks, rerank.candidates(c[::-1], CAPTION_IMAGE, 5), (5, 150))),
    "image_to_text": (5, ranking.image_to_text_ranks, annotation_reranked_all, (1, 5, 10, 150, 500), 10,
                      lambda c: (rerank.image_to_text_ranks, rerank.caption_candidates(-c, CAPTION_IMAGE, 10),
                                 (30, 10))),
}


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_reranking_with_w_1_or_k_1_is_the_plain_ranking(direction):
    seed, plain_ranks, rerank_ranks, ks, k_moved, wrong = DIRECTIONS[direction]
    rng = np.random.default_rng(seed)
    # cosines rounded to one decimal: many ties, including ties with the correct item
    cosine = np.round(rng.normal(size=(30, 150)) + (np.arange(30)[:, None] == CAPTION_IMAGE[None]), 1)
    score = rng.normal(size=(30, 150))
    plain = plain_ranks(cosine, CAPTION_IMAGE).tolist()
    for k in ks:
        assert rerank_ranks(cosine, score, k, 1.0) == plain, k
    for weight in (0.0, 0.3, 0.9):
        assert rerank_ranks(cosine, score, 1, weight) == plain, weight
    # W < 1 with K > 1 does move ranks, but only inside the top K
    moved = np.array(rerank_ranks(cosine, score, k_moved, 0.2))
    assert moved.tolist() != plain
    plain = np.array(plain)
    assert np.all(moved[plain > k_moved] == plain[plain > k_moved]) and np.all(moved[plain <= k_moved] <= k_moved)
    ranks_of, candidates, shape = wrong(cosine)
    with pytest.raises(ValueError, match="candidates"):
        ranks_of(cosine, CAPTION_IMAGE, candidates, np.zeros(shape), 0.5)


# ---- re-ranking image -> text by the captioner's pointwise mutual information ---------------------
# PMI of TOY's pairs (only each image's top-4 captions by cosine are read)
TOY_PMI = np.array([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                    [-2.0, -2.0, 9.0, 0.0, -3.0, 9.0],
                    [-1.0, -1.0, 0.0, 9.0, -1.0, 1.0]])


def annotation_reranked(cosine, score, k, weight, caption_image=TOY_IMAGE):
    """Re-ranked image -> text ranks, the score of every pair given as a full matrix."""
    cols = rerank.caption_candidates(cosine, caption_image, k)
    return rerank.image_to_text_ranks(cosine, caption_image, cols,
                                      np.take_along_axis(score, cols, axis=1), weight).tolist()


def test_reranking_annotations_of_the_toy_matrix_by_hand():
    # K = 4. Image 0 (plain 1): equal PMI, z 0 -> the embedding's order, rank 1 at every W.
    # Image 1 (plain 4): candidates c4 .7, c1 .6, c0 .5, c3 .3 (own); PMI -3, -2, -2, 0
    #   z(cos) 1.183 .507 -.169 -1.521; z(PMI) -1.147 -.229 -.229 1.606
    #   W .3: own .668 above all -> 1; W .5: c1 .139 > own .042 -> 2; W .7: own last -> 4
    # Image 2 (plain 2): candidates c2 .4, c4 .35 (own), c1 .3, c5 .25 (own); PMI 0, -1, -1, 1
    #   z(cos) 1.342 .447 -.447 -1.342; z(PMI) .302 -.905 -.905 1.508
    #   W .3: c5 .653 > c2 .614 -> 1; W .5: c2 .822 > c5 .083 -> 2; W .7: c2 1.03 > c4 .041 -> 2
    # The 9s lie outside each image's K and are never read.
    assert rerank.caption_candidates(TOY, TOY_IMAGE, 4).tolist() == [[0, 2, 5, 4], [4, 1, 0, 3], [2, 4, 1, 5]]
    assert annotation_reranked(TOY, TOY_PMI, 4, 0.0) == [1, 1, 1]
    assert annotation_reranked(TOY, TOY_PMI, 4, 0.3) == [1, 1, 1]
    assert annotation_reranked(TOY, TOY_PMI, 4, 0.5) == [1, 2, 2]
    assert annotation_reranked(TOY, TOY_PMI, 4, 0.7) == TOY_I2T
    # K = 3: image 1's own caption is outside its candidates, so it keeps rank 4 at any W
    assert annotation_reranked(TOY, TOY_PMI, 3, 0.0)[1] == 4


def test_pointwise_mutual_information_of_hand_made_likelihoods():
    # a caption likely under every candidate image (c0) and one likely under one image only (c1):
    # p(c0 | i) = .5, .5; p(c1 | i) = .4, .1 over the two candidate images of each
    total = np.log([[0.5, 0.4], [0.5, 0.1]])
    prior = rerank.caption_prior(total)
    assert prior == pytest.approx(np.log([1.0, 0.5]))
    # image 0 with both captions as its candidates: likelihood prefers c0 (.5 > .4), PMI c1
    pmi = rerank.pointwise_mi(total[:1], prior, np.array([[0, 1]]))
    assert pmi[0] == pytest.approx([np.log(0.5), np.log(0.8)])


# ---- end to end on real data -------------------------------------------------------------------
def load_lite0(flickr8k_dir):
    path = flickr8k_dir / LITE0
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return load_features(path)


@pytest.fixture(scope="module")
def small_set(flickr8k_dir, tmp_path_factory):
    """prepare_text on the real text; splits cut to 300 train / 100 dev / 100 test images;
    a features pickle of those 500 images."""
    root = tmp_path_factory.mktemp("retrieval")
    data = root / "data"
    outputs, _ = text.prepare(flickr8k_dir / "Flickr8k_text")
    text.write_outputs(data, outputs)
    splits = text.load_splits(data)
    small = {"train": splits["train"][:300], "dev": splits["dev"][:100], "test": splits["test"][:100]}
    write_json(data / "splits.json", small)
    table = load_lite0(flickr8k_dir)
    subset = {i: table[i].astype(np.float16) for name in small for i in small[name]}
    with open(root / "lite0_small.pkl", "wb") as handle:
        pickle.dump(subset, handle)
    return root


@pytest.fixture(scope="module")
def tiny_model(small_set):
    code = train_retrieval.main(["--features", str(small_set / "lite0_small.pkl"), "--data-dir",
                                 str(small_set / "data"), "--output-dir", str(small_set / "models"),
                                 "--name", "tiny", "--backbone", "lite0", "--epochs", "4", *TINY])
    assert code == 0
    return small_set / "models" / "tiny"


@pytest.mark.slow
def test_training_beats_random_and_writes_its_files(tiny_model):
    config = json.loads((tiny_model / "model.json").read_text())
    assert config["feature_dim"] == 1280 and config["backbone"] == "lite0" and config["kind"] == "vse++"
    for name in ("model.keras", "current/last.keras", "current/state.json", "history.csv", "settings.json"):
        assert (tiny_model / name).is_file(), name
    history = (tiny_model / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,loss,max_violation,dev_i2t_r1")
    assert len(history) == 1 + config["epochs_trained"]
    best = config["best_dev"]
    # random ranking of 100 images: text->image R@10 = 10%; image->text (5 of 500 captions) ~ 9.6%
    assert best["text_to_image"]["r10"] >= 25.0, best
    assert best["image_to_text"]["r10"] >= 25.0, best
    assert best["rsum"] == pytest.approx(max(float(row.split(",")[9]) for row in history[1:]), abs=1e-3)


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one(tiny_model, small_set, capsys):
    import keras
    args = ["--features", str(small_set / "lite0_small.pkl"), "--data-dir", str(small_set / "data"),
            "--output-dir", str(small_set / "models"), "--backbone", "lite0", *TINY]
    # a rerun of the finished run has nothing to do
    best = json.loads((tiny_model / "model.json").read_text())
    capsys.readouterr()
    assert train_retrieval.main([*args, "--name", "tiny", "--epochs", "4"]) == 0
    assert (f"{tiny_model}: already trained 4 epochs (best dev rsum {best['best_dev_rsum']:.1f}, "
            f"epoch {best['best_epoch']}); nothing to do") in capsys.readouterr().out
    # another setting in the same folder is refused with one line naming both values
    assert run_cli(train_retrieval.main, [*args, "--name", "tiny", "--epochs", "4", "--margin", "0.3"]) == 1
    assert capsys.readouterr().err.strip() == (f"error: run folder holds a run with another margin "
                                               f"(0.2 there, 0.3 now); use another --name or remove it "
                                               f"({tiny_model})")
    # 1 epoch (the warm-up), then resumed for a second with hardest negatives: the same weights,
    # losses and dev ranks as an uninterrupted 2-epoch run (same seed), so weights, optimizer
    # state, the warm-up switch and the per-epoch shuffle were all restored
    assert train_retrieval.main([*args, "--name", "resumed", "--epochs", "1"]) == 0
    assert train_retrieval.main([*args, "--name", "resumed", "--epochs", "2"]) == 0
    assert f"resuming {small_set / 'models' / 'resumed'} after epoch 1" in capsys.readouterr().out
    assert train_retrieval.main([*args, "--name", "two", "--epochs", "2"]) == 0
    for name in ("current/last.keras", "model.keras"):
        resumed, two = (keras.models.load_model(small_set / "models" / run / name, compile=False).get_weights()
                        for run in ("resumed", "two"))
        assert all(np.array_equal(x, y) for x, y in zip(resumed, two)), name

    def rows(run):
        lines = (small_set / "models" / run / "history.csv").read_text().splitlines()
        return [line.split(",")[:10] for line in lines[1:]]     # all but seconds and lr
    assert rows("resumed") == rows("two") == rows("tiny")[:2]
    assert [r[2] for r in rows("resumed")] == ["0.0", "1.0"]   # max_violation: warm-up first
    state = json.loads((small_set / "models" / "resumed" / "current" / "state.json").read_text())
    assert (state["epoch"], state["best_epoch"], state["wait"]) == (2, 2, 0)


@pytest.mark.slow
def test_evaluate_writes_results_that_match_the_metrics(tiny_model, small_set, capsys):
    out = small_set / "results"
    assert evaluate_retrieval.main(["--model", str(tiny_model), "--split", "test", "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (results["images"], results["captions"]) == (100, 500)
    printed = capsys.readouterr().out
    assert "embedding, 100 images" in printed and f"{results['embedding']['rsum']:.1f}" in printed
    # recompute independently: embed, rank with argsort
    model, config, tokenizer = vse.load_embedding(tiny_model)
    table = load_features(small_set / "lite0_small.pkl")
    ids = text.load_splits(small_set / "data")["test"]
    desc = text.load_descriptions(small_set / "data" / "descriptions.txt")
    caps = [(k, c) for k, i in enumerate(ids) for c in desc[i]]
    sim = protocol.embedding_scores(model, config, tokenizer, np.stack([table[i] for i in ids]), caps)
    i2t, t2i = argsort_ranks(sim, [k for k, _ in caps])
    assert results["embedding"]["image_to_text"]["r5"] == pytest.approx(100 * np.mean(np.array(i2t) <= 5), abs=1e-3)
    assert results["embedding"]["text_to_image"]["mean_rank"] == pytest.approx(np.mean(t2i), abs=1e-3)


@pytest.fixture(scope="module")
def untrained_captioner(small_set):
    """(keras model, run folder): an untrained merge captioner in train.py's run-folder layout
    (its ranks are not the point: the wiring is)."""
    import keras
    keras.utils.set_random_seed(5)
    meta = text.load_meta(small_set / "data")
    captioner = registry.build_model("merge", 1280, meta["vocab_size"], meta["max_length"], embed_dim=8, units=8)
    folder = small_set / "models" / "cap"
    folder.mkdir(parents=True, exist_ok=True)
    captioner.save(folder / "model.keras")
    write_json(folder / "model.json", {"variant": "merge", "mode": "sequence", "feature_dim": 1280,
                                       "vocab_size": meta["vocab_size"], "max_length": meta["max_length"],
                                       "embed_dim": 8, "units": 8, "dropout": 0.5,
                                       "tokenizer_sha256": meta["tokenizer_sha256"],
                                       "data_dir": str(small_set / "data")})
    return captioner, folder


@pytest.mark.slow
def test_evaluate_with_a_captioner_on_a_subset(tiny_model, small_set, untrained_captioner, capsys):
    # the wiring: subset, columns, the captioner's own tokenizer, the fast scorer
    captioner, folder = untrained_captioner
    out = small_set / "results_cap"
    assert evaluate_retrieval.main(["--model", str(tiny_model), "--split", "test", "--output", str(out),
                                    "--captioner", str(folder), "--captioner-images", "20"]) == 0
    results = json.loads((out / "results.json").read_text())
    subset = results["subset"]
    assert (subset["images"], subset["captions"]) == (20, 100)
    assert "captioner log-lik, first 20 images" in capsys.readouterr().out
    # the same ranks from the whole Keras model, pair by pair
    table = load_features(small_set / "lite0_small.pkl")
    ids = text.load_splits(small_set / "data")["test"][:20]
    desc = text.load_descriptions(small_set / "data" / "descriptions.txt")
    tok = text.load_tokenizer(small_set / "data")
    caps = [(k, text.encode_caption(tok, c)) for k, i in enumerate(ids) for c in desc[i]]
    scores = caption_scoring.caption_scores_keras(captioner, np.stack([table[i] for i in ids]), [c for _, c in caps])
    expected = ranking.evaluate(scores, [k for k, _ in caps])
    for direction in ("image_to_text", "text_to_image"):
        assert subset["captioner"][direction]["mean_rank"] == pytest.approx(expected[direction]["mean_rank"])
        assert subset["captioner"][direction]["r5"] == pytest.approx(expected[direction]["r5"])
    # the embedding on the same subset is the full matrix's top-left block
    assert subset["embedding"]["text_to_image"]["queries"] == 100


def expected_reranking(tiny_model, small_set, captioners, weight):
    """(text -> image, image -> text summaries, distinct pairs) of re-ranking the test split
    with K = 5, computed independently: each captioner's full score matrix (caption_scores, not
    the pairs), averaged, then the candidates' entries of it and scipy's logsumexp."""
    model, config, tokenizer = vse.load_embedding(tiny_model)
    table = load_features(small_set / "lite0_small.pkl")
    ids = text.load_splits(small_set / "data")["test"]
    desc = text.load_descriptions(small_set / "data" / "descriptions.txt")
    caps = [(k, c) for k, i in enumerate(ids) for c in desc[i]]
    features = np.stack([table[i] for i in ids])
    cosine = protocol.embedding_scores(model, config, tokenizer, features, caps)
    tok = text.load_tokenizer(small_set / "data")
    tokens = [text.encode_caption(tok, c) for _, c in caps]
    full = np.mean([caption_scoring.caption_scores(c, json.loads((f / "model.json").read_text()), features, tokens)
                    for c, f in captioners], axis=0).astype(np.float64)
    total = full * np.array([len(t) - 1 for t in tokens])[None, :]
    caption_image = [k for k, _ in caps]
    rows = rerank.candidates(cosine, caption_image, 5)
    cols = rerank.caption_candidates(cosine, caption_image, 5)
    pairs = {(i, j) for j in range(len(caps)) for i in rows[:, j]} | {(i, j) for i in range(len(ids))
                                                                      for j in cols[i]}
    # the prior of caption j: log sum of p(j | i) over its 5 candidate images
    prior = logsumexp(np.take_along_axis(total, rows, axis=0), axis=0)
    pmi = np.take_along_axis(total, cols, axis=1) - prior[cols]
    search = rerank.text_to_image_ranks(cosine, caption_image, rows, np.take_along_axis(full, rows, axis=0), weight)
    annotation = rerank.image_to_text_ranks(cosine, caption_image, cols, pmi, weight)
    return ranking.summarize(search), ranking.summarize(annotation), len(pairs)


def assert_reranked(row, plain, expected):
    search, annotation, _ = expected
    for got, want in ((row["text_to_image"], search), (row["image_to_text"], annotation)):
        assert got["mean_rank"] == pytest.approx(want["mean_rank"], abs=1e-6)
        assert got["r1"] == pytest.approx(want["r1"], abs=1e-6)
    # R@5 and R@10 cannot move with K = 5
    assert row["text_to_image"]["r5"] == plain["text_to_image"]["r5"]
    assert row["image_to_text"]["r5"] == plain["image_to_text"]["r5"]


@pytest.mark.slow
def test_evaluate_reranks_both_directions_with_a_captioner(tiny_model, small_set, untrained_captioner, capsys):
    captioner, folder = untrained_captioner
    out = small_set / "results_rerank"
    assert evaluate_retrieval.main(["--model", str(tiny_model), "--split", "test", "--output", str(out),
                                    "--rerank-captioner", str(folder), "--rerank-top", "5",
                                    "--rerank-weight", "1", "0.3", "0"]) == 0
    results = json.loads((out / "results.json").read_text())
    plain, rr = results["embedding"], results["rerank"]
    assert rr["top_k"] == 5 and [row["weight"] for row in rr["by_weight"]] == [1.0, 0.3, 0.0]
    assert rr["captions_rescored"] == round(plain["text_to_image"]["r5"] * plain["text_to_image"]["queries"] / 100)
    assert rr["images_rescored"] == round(plain["image_to_text"]["r5"] * plain["image_to_text"]["queries"] / 100)
    printed = capsys.readouterr().out
    assert "re-ranked top 5, W 0.3" in printed and "embedding, 100 images" in printed
    # W = 1 is the embedding's ranking
    assert rr["by_weight"][0]["text_to_image"] == plain["text_to_image"]
    assert rr["by_weight"][0]["image_to_text"] == plain["image_to_text"]
    for row in rr["by_weight"][1:]:
        expected = expected_reranking(tiny_model, small_set, [untrained_captioner], row["weight"])
        assert rr["pairs"] == expected[2]
        assert_reranked(row, plain, expected)


@pytest.mark.slow
def test_several_rerank_captioners_act_as_one(tiny_model, small_set, untrained_captioner):
    import keras
    keras.utils.set_random_seed(6)
    meta = text.load_meta(small_set / "data")
    other = registry.build_model("merge", 1280, meta["vocab_size"], meta["max_length"], embed_dim=8, units=8)
    folder = small_set / "models" / "cap2"
    shutil.copytree(untrained_captioner[1], folder, dirs_exist_ok=True)
    other.save(folder / "model.keras")
    out = small_set / "results_rerank2"
    assert evaluate_retrieval.main(["--model", str(tiny_model), "--split", "test", "--output", str(out),
                                    "--rerank-captioner", str(untrained_captioner[1]), str(folder),
                                    "--rerank-top", "5", "--rerank-weight", "0.3"]) == 0
    results = json.loads((out / "results.json").read_text())
    row = results["rerank"]["by_weight"][0]
    assert results["rerank"]["captioner"] == f"{untrained_captioner[1]} + {folder}"
    assert_reranked(row, results["embedding"],
                    expected_reranking(tiny_model, small_set, [untrained_captioner, (other, folder)], 0.3))
    # and not what the first captioner alone gives
    alone = expected_reranking(tiny_model, small_set, [untrained_captioner], 0.3)
    moved = (row["image_to_text"]["mean_rank"] - alone[1]["mean_rank"],
             row["text_to_image"]["mean_rank"] - alone[0]["mean_rank"])
    assert max(abs(m) for m in moved) > 1e-3


def test_evaluate_checks_rerank_captioners_before_scoring(tiny_model, small_set, untrained_captioner,
                                                          tmp_path, capsys, monkeypatch):
    def no_scoring(*args):
        raise AssertionError("the embedding scored the split before the captioners were checked")
    monkeypatch.setattr(protocol, "embedding_scores", no_scoring)
    lite2 = tmp_path / "lite2"
    shutil.copytree(untrained_captioner[1], lite2)
    write_json(lite2 / "model.json", {**json.loads((lite2 / "model.json").read_text()), "backbone": "lite2"})
    base = ["--model", str(tiny_model), "--split", "test", "--output", str(tmp_path / "out")]
    assert run_cli(evaluate_retrieval.main, base + ["--rerank-captioner", str(untrained_captioner[1]),
                                           str(tmp_path / "absent")]) == 1
    assert capsys.readouterr().err.strip() == f"error: missing file {tmp_path / 'absent' / 'model.keras'}"
    assert run_cli(evaluate_retrieval.main, base + ["--rerank-captioner", str(lite2)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: captioner {lite2} was trained on lite2 features but the retrieval model on lite0 features")
    assert not (tmp_path / "out").exists()


def tiny_backbone(width):
    """A small stand-in for the model's backbone: 224x224 photos -> `width`-d vectors."""
    import keras
    from keras import layers
    keras.utils.set_random_seed(0)
    inputs = keras.Input((224, 224, 3))
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3, strides=8)(inputs))
    return keras.Model(inputs, layers.Dense(width)(x))


@pytest.mark.slow
def test_evaluate_from_photos_equals_a_features_file_of_the_same_extractor(tiny_model, small_set, flickr8k_dir,
                                                                           tmp_path, capsys, monkeypatch):
    from captioning.data.features import save_features
    monkeypatch.setattr(folder_search, "build_extractor", lambda backbone, weights, seed=0: (tiny_backbone(1280), "fake"))
    data = tmp_path / "data"
    shutil.copytree(small_set / "data", data)
    splits = text.load_splits(data)
    ids = splits["test"][:6]
    write_json(data / "splits.json", {**splits, "test": ids})
    photos = tmp_path / "photos"
    photos.mkdir()
    for image_id in ids:
        shutil.copy(flickr8k_dir / "Flicker8k_Dataset" / f"{image_id}.jpg", photos)
    base = ["--model", str(tiny_model), "--split", "test", "--data-dir", str(data)]
    assert evaluate_retrieval.main([*base, "--images", str(photos), "--output", str(tmp_path / "a")]) == 0
    from_photos = json.loads((tmp_path / "a" / "results.json").read_text())
    assert from_photos["images_dir"] == str(photos) and from_photos["features"] is None
    # the same extractor's vectors written to a features file: the same ranks
    config = json.loads((tiny_model / "model.json").read_text())
    vectors, failures = folder_search.extractor_source(config, "imagenet")([photos / f"{i}.jpg" for i in ids])
    assert not failures
    save_features(tmp_path / "same.pkl", vectors)
    assert evaluate_retrieval.main([*base, "--features", str(tmp_path / "same.pkl"), "--output", str(tmp_path / "b")]) == 0
    from_file = json.loads((tmp_path / "b" / "results.json").read_text())
    assert (from_photos["images"], from_photos["captions"]) == (6, 30)
    assert from_photos["embedding"] == from_file["embedding"]
    capsys.readouterr()
    # a missing photo of the split, then a corrupt one: one line naming the file, nothing written
    args = [*base, "--images", str(photos), "--output", str(tmp_path / "c")]
    (photos / f"{ids[2]}.jpg").rename(tmp_path / "aside.jpg")
    assert run_cli(evaluate_retrieval.main, args) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: missing photo {photos / (ids[2] + '.jpg')} of image {ids[2]} (split test)"
    (photos / f"{ids[2]}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert run_cli(evaluate_retrieval.main, args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot use photo {photos / (ids[2] + '.jpg')} of split test: cannot read image")
    assert "\n" not in err and not (tmp_path / "c").exists()


@pytest.fixture()
def photo_folder(flickr8k_dir, small_set, tmp_path):
    """8 real test images, a broken JPEG, an empty file and a text file."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for image_id in text.load_splits(small_set / "data")["test"][:8]:
        shutil.copy(flickr8k_dir / "Flicker8k_Dataset" / f"{image_id}.jpg", folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    return folder


def search(tiny_model, small_set, tmp_path, *extra):
    return run_cli(search_images.main, ["--model", str(tiny_model), "--cache-dir", str(tmp_path / "cache"),
                                        "--html", str(tmp_path / "sheet.html"), *extra])


def test_search_cli_with_precomputed_features(tiny_model, small_set, photo_folder, tmp_path, capsys):
    args = ["a dog runs through the grass", "--images", str(photo_folder), "--top", "3",
            "--features", str(small_set / "lite0_small.pkl")]
    assert search(tiny_model, small_set, tmp_path, *args) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["1", "2", "3"]
    scores = [float(line.split("\t")[1]) for line in lines]
    assert scores == sorted(scores, reverse=True)
    assert "skipped broken.jpg" in err and "skipped empty.png" in err and "8 images indexed, 2 skipped" in err
    assert "notes.txt" not in err
    # the printed order is the model's: recompute the cosines by hand
    model, config, tokenizer = vse.load_embedding(tiny_model)
    table = load_features(small_set / "lite0_small.pkl")
    names = sorted(p.name for p in photo_folder.glob("*.jpg") if p.name != "broken.jpg")
    img = vse.embed_images(vse.image_encoder(model), np.stack([table[n[:-4]] for n in names]))
    ids, _ = vse.encode_query(args[0], tokenizer, config["max_length"])
    txt = vse.embed_captions(vse.text_encoder(model), [ids])[0]
    expected = [names[k] for k in np.argsort(-(img @ txt))[:3]]
    assert [line.split("\t")[2] for line in lines] == expected
    sheet = (tmp_path / "sheet.html").read_text()
    assert sheet.count("data:image/jpeg;base64") == 3 and expected[0] in sheet
    # the second run reads the cache: nothing is embedded again, same answer
    assert search(tiny_model, small_set, tmp_path, *args) == 0
    out2, err2 = capsys.readouterr()
    assert out2 == out and "embedding" not in err2
    # a corrupt cache is rebuilt
    cache = next((tmp_path / "cache").glob("*.npz"))
    cache.write_bytes(b"garbage")
    assert search(tiny_model, small_set, tmp_path, *args) == 0
    out3, err3 = capsys.readouterr()
    assert out3 == out and "rebuilding" in err3


@pytest.mark.slow
def test_search_reranks_a_text_query_with_a_captioner(tiny_model, small_set, photo_folder, untrained_captioner,
                                                      tmp_path, capsys):
    captioner, folder = untrained_captioner
    query = "a dog runs through the grass"
    args = [query, "--images", str(photo_folder), "--top", "3", "--features", str(small_set / "lite0_small.pkl"),
            "--rerank-captioner", str(folder), "--rerank-top", "5", "--rerank-weight", "0.3"]
    assert search(tiny_model, small_set, tmp_path, *args) == 0
    out, err = capsys.readouterr()
    assert "top 5 re-ranked by" in err
    got = [line.split("\t")[2] for line in out.strip().splitlines()]
    # by hand: the embedding's top 5 of the 8 photos, then z-scores of cosine and of the
    # captioner's full score matrix (caption_scores) at those photos
    model, config, tokenizer = vse.load_embedding(tiny_model)
    table = load_features(small_set / "lite0_small.pkl")
    names = sorted(p.name for p in photo_folder.glob("*.jpg") if p.name != "broken.jpg")
    features = np.stack([table[n[:-4]] for n in names])
    img = vse.embed_images(vse.image_encoder(model), features)
    ids, _ = vse.encode_query(query, tokenizer, config["max_length"])
    cosine = img @ vse.embed_captions(vse.text_encoder(model), [ids])[0]
    top5 = np.argsort(-cosine, kind="stable")[:5]
    likelihood = caption_scoring.caption_scores(captioner, json.loads((folder / "model.json").read_text()),
                                                features[top5], [ids])[:, 0]
    combined = 0.3 * rerank.zscore(cosine[top5]) + 0.7 * rerank.zscore(likelihood)
    assert got == [names[top5[k]] for k in np.argsort(-combined, kind="stable")[:3]]
    assert "log-likelihood" in (tmp_path / "sheet.html").read_text()
    # W = 1 is the embedding's order
    assert search(tiny_model, small_set, tmp_path, *args[:-1], "1") == 0
    assert [line.split("\t")[2] for line in capsys.readouterr().out.strip().splitlines()] == [
        names[k] for k in top5[:3]]
    # a captioner of another backbone than the retrieval model's: one line naming both
    lite2 = tmp_path / "cap-lite2"
    shutil.copytree(folder, lite2)
    write_json(lite2 / "model.json", {**json.loads((folder / "model.json").read_text()), "backbone": "lite2"})
    assert search(tiny_model, small_set, tmp_path, *args[:7], "--rerank-captioner", str(lite2)) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: captioner {lite2} was trained on lite2 features but the retrieval model on lite0 features")


def test_search_bad_queries_are_one_line(tiny_model, small_set, photo_folder, tmp_path, capsys):
    base = ["--images", str(photo_folder), "--features", str(small_set / "lite0_small.pkl")]
    assert search(tiny_model, small_set, tmp_path, "   ", *base) == 1
    assert capsys.readouterr().err.strip() == "error: empty query: give a sentence to search for"
    assert search(tiny_model, small_set, tmp_path, "qwxz blorft", *base) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: no word of the query is in the model's vocabulary (unknown: qwxz, blorft)"
    assert not (tmp_path / "sheet.html").exists()
    assert search(tiny_model, small_set, tmp_path, "a dog qwxz", *base) == 0
    assert "not in the vocabulary, read as <unk>: qwxz" in capsys.readouterr().err


def test_search_with_an_extractor_skips_broken_files_and_checks_width(tiny_model, small_set, photo_folder,
                                                                      tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(folder_search, "build_extractor", lambda backbone, weights, seed=0: (tiny_backbone(1280), "fake"))
    assert search(tiny_model, small_set, tmp_path, "a dog", "--images", str(photo_folder), "--top", "2") == 0
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 2
    assert "skipped broken.jpg: cannot read image" in err and "8 images indexed, 2 skipped" in err
    # a backbone of another width than the model's features: one line, nothing written
    monkeypatch.setattr(folder_search, "build_extractor", lambda backbone, weights, seed=0: (tiny_backbone(64), "fake"))
    html = tmp_path / "other.html"
    code = run_cli(search_images.main, ["a dog", "--images", str(photo_folder), "--model", str(tiny_model),
                                        "--cache-dir", str(tmp_path / "cache2"), "--html", str(html)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0
    assert err.startswith("error: the model was trained on 1280-d features (backbone lite0)") and "64-d" in err
    assert not html.exists() and not (tmp_path / "cache2").exists()


@pytest.mark.slow
def test_search_with_the_real_lite0_extractor_matches_the_shared_features(tiny_model, small_set, photo_folder,
                                                                          tmp_path, capsys):
    # the model's backbone (lite0, from model.json) embeds the photos themselves: the same
    # matches as the shared reference features of those photos (cosine >= 0.999)
    from captioning.encoders import efficientnet_lite
    try:
        efficientnet_lite.checkpoint_path("lite0")
    except PipelineError as exc:
        pytest.skip(str(exc))
    query = ["two dogs play in the grass", "--images", str(photo_folder), "--top", "4"]
    assert search(tiny_model, small_set, tmp_path, *query) == 0
    out, err = capsys.readouterr()
    assert "skipped broken.jpg" in err and "8 images indexed, 2 skipped" in err
    assert search(tiny_model, small_set, tmp_path, *query, "--features", str(small_set / "lite0_small.pkl"),
                  "--cache-dir", str(tmp_path / "cache_reference")) == 0
    reference = capsys.readouterr().out
    assert [line.split("\t")[2] for line in out.splitlines()] == [line.split("\t")[2] for line in reference.splitlines()]
    np.testing.assert_allclose([float(line.split("\t")[1]) for line in out.splitlines()],
                               [float(line.split("\t")[1]) for line in reference.splitlines()], atol=0.02)


def test_search_without_a_model_uses_the_shipped_one(tiny_model, small_set, photo_folder, tmp_path, capsys,
                                                    monkeypatch):
    query = ["a dog runs through the grass", "--images", str(photo_folder), "--top", "3",
             "--features", str(small_set / "lite0_small.pkl"), "--cache-dir", str(tmp_path / "cache"),
             "--html", str(tmp_path / "sheet.html")]
    if not folder_search.PRETRAINED_MODEL.exists():
        assert run_cli(search_images.main, query) == 1
        assert capsys.readouterr().err.strip() == ("error: no retrieval model at pretrained/vse-lite0; train one "
                                                   "with train_retrieval.py or pass --model")
    shipped = tmp_path / "pretrained" / "vse-lite0"
    monkeypatch.setattr(folder_search, "PRETRAINED_MODEL", shipped)
    assert run_cli(search_images.main, query) == 1
    assert capsys.readouterr().err.strip() == (f"error: no retrieval model at {shipped}; train one with "
                                               f"train_retrieval.py or pass --model")
    # a shipped folder: the model files and the tokenizer beside them, no data_dir of the trainer's
    shipped.mkdir(parents=True)
    for name in ("model.keras", "model.json"):
        shutil.copy(tiny_model / name, shipped / name)
    shutil.copy(small_set / "data" / "tokenizer.json", shipped / "tokenizer.json")
    config = json.loads((shipped / "model.json").read_text())
    write_json(shipped / "model.json", {**config, "data_dir": str(tmp_path / "not-here")})
    assert run_cli(search_images.main, query) == 0
    shipped_out = capsys.readouterr().out
    assert search(tiny_model, small_set, tmp_path, *query[:7]) == 0
    assert capsys.readouterr().out == shipped_out and len(shipped_out.splitlines()) == 3


def test_a_model_of_unknown_backbone_needs_precomputed_features(tiny_model, photo_folder, small_set, tmp_path,
                                                                capsys):
    unknown = tmp_path / "unknown_model"
    shutil.copytree(tiny_model, unknown)
    config = json.loads((unknown / "model.json").read_text())
    write_json(unknown / "model.json", {**config, "backbone": "unknown"})
    assert search(unknown, small_set, tmp_path, "a dog", "--images", str(photo_folder)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no extractor for backbone 'unknown'") and "--features" in err


def test_reverse_search_finds_training_captions(tiny_model, small_set, flickr8k_dir, tmp_path, capsys):
    train_id = text.load_splits(small_set / "data")["train"][0]
    photo = flickr8k_dir / "Flicker8k_Dataset" / f"{train_id}.jpg"
    assert search(tiny_model, small_set, tmp_path, "--image", str(photo), "--top", "5",
                  "--features", str(small_set / "lite0_small.pkl"),
                  "--images", str(flickr8k_dir / "Flicker8k_Dataset")) == 0
    out = capsys.readouterr().out.splitlines()
    captions = out[1:6]
    images = out[7:12]
    assert out[0] == "closest training captions:" and out[6] == "closest training images:"
    # the photo is itself a training image: it is its own nearest training image, cosine 1
    assert images[0].split("\t")[2] == train_id and float(images[0].split("\t")[1]) == pytest.approx(1.0, abs=1e-4)
    assert all(len(line.split("\t")) == 4 for line in captions)
    assert (tmp_path / "sheet.html").read_text().count("data:image/jpeg;base64") >= 5


# ---- the web page's search view (serve.py --retrieval) -----------------------------------------
def test_web_search_ranks_every_feature_image_by_the_models_cosine(tiny_model, small_set):
    from fastapi.testclient import TestClient
    from captioning.retrieval.image_search import ImageSearch
    from captioning.apps.webapp import create_app
    features = small_set / "lite0_small.pkl"
    search = ImageSearch(tiny_model, features, small_set / "data")
    client = TestClient(create_app(None, retrieval=search))
    info = client.get("/api/info").json()["retrieval"]
    assert info["images"] == 500 and info["backbone"] == "lite0"
    body = client.get("/api/search", params={"q": "a dog runs through the grass", "top": 4}).json()
    # the same ranking by hand: all 500 images' embeddings against the query's
    model, config, tokenizer = vse.load_embedding(tiny_model)
    table = load_features(features)
    ids = sorted(table)
    img = vse.embed_images(vse.image_encoder(model), np.stack([table[i] for i in ids]))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    query, _ = vse.encode_query("a dog runs through the grass", tokenizer, config["max_length"])
    txt = vse.embed_captions(vse.text_encoder(model), [query])[0]
    txt /= np.linalg.norm(txt)
    order = np.argsort(-(img @ txt))[:4]
    assert [h["image_id"] for h in body["results"]] == [ids[k] for k in order]
    assert np.allclose([h["score"] for h in body["results"]], (img @ txt)[order], atol=1e-5)
    first = body["results"][0]
    assert first["captions"] == text.load_descriptions(small_set / "data")[first["image_id"]]
    # a query of unknown words is the page's one-line error, not a server error
    response = client.get("/api/search", params={"q": "qwxz blorft"})
    assert response.status_code == 400 and "qwxz" in response.json()["error"]


def test_web_search_refuses_features_of_another_width(tiny_model, small_set, tmp_path):
    from captioning.data.features import save_features
    from captioning.retrieval.image_search import ImageSearch
    save_features(tmp_path / "wide.pkl", {"x": np.zeros(7, np.float32)})
    with pytest.raises(PipelineError, match="1280-d features .* holds 7-d"):
        ImageSearch(tiny_model, tmp_path / "wide.pkl", small_set / "data")

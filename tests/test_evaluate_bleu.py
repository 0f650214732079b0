"""Tests for captioning/evaluation/metrics.py and evaluate_bleu.py: BLEU in both modes on hand-made
cases whose values are worked out by hand below (clipped n-gram precisions p_n, brevity penalty
BP = exp(1 - r/c) when c < r)."""
import math
from pathlib import Path

import pytest

import evaluate_bleu as eb
from captioning.evaluation import metrics
from captioning.evaluation.gallery import gallery_html, write_captions_tsv

S, E = "startseq", "endseq"


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def test_exact_match_is_one_in_both_modes():
    std = metrics.standard_bleu([["A dog runs on the grass."]], [["a", "dog", "runs", "on", "the", "grass"]])
    tut = metrics.tutorial_bleu([["a dog runs on the grass"]], [["a", "dog", "runs", "on", "the", "grass"]],
                           [True], S, E)
    assert all(close(v, 1.0) for v in std.values()), std
    # the tutorial's BLEU-3 weights sum to 0.9, but 1.0 ** anything is still 1
    assert all(close(v, 1.0) for v in tut.values()), tut


def test_standard_known_precisions_and_brevity_penalty():
    # hyp  "the cat sat on mat" (c=5) vs ref "the cat sat on the mat" (r=6):
    # p1 = 5/5, p2 = 3/4 (on-mat misses), p3 = 2/3, p4 = 1/2, BP = exp(1 - 6/5)
    hyp = "the cat sat on mat".split()
    got = metrics.standard_bleu([["The cat sat on the mat."]], [hyp])
    bp = math.exp(-0.2)
    assert close(got["bleu1"], bp)
    assert close(got["bleu2"], bp * (3 / 4) ** (1 / 2))
    assert close(got["bleu3"], bp * (3 / 4 * 2 / 3) ** (1 / 3))
    assert close(got["bleu4"], bp * (3 / 4 * 2 / 3 * 1 / 2) ** (1 / 4))


def test_standard_is_corpus_level_not_a_mean_of_sentences():
    # add an exact 4-word match: counts pool over the corpus:
    # p1 = 9/9, p2 = (3+3)/(4+3), p3 = (2+2)/(3+2), p4 = (1+1)/(2+1); c = 9, r = 10
    got = metrics.standard_bleu([["The cat sat on the mat."], ["A dog runs fast"]],
                           [["the", "cat", "sat", "on", "mat"], ["a", "dog", "runs", "fast"]])
    bp = math.exp(1 - 10 / 9)
    assert close(got["bleu2"], bp * (6 / 7) ** (1 / 2))
    assert close(got["bleu4"], bp * (6 / 7 * 4 / 5 * 2 / 3) ** (1 / 4))


def test_closest_reference_length_is_used():
    # refs of 6 and 9 words for a 5-word hypothesis: r = 6 (the closest), p1 = 5/5
    got = metrics.standard_bleu([["the cat sat on the mat", "one two three four five six seven eight nine"]],
                           [["the", "cat", "sat", "on", "mat"]])
    assert close(got["bleu1"], math.exp(1 - 6 / 5))


def test_tutorial_mode_keeps_sentinels_and_its_weights():
    # hyp "startseq the cat sat on mat endseq" (c=7) vs "startseq the cat sat on the mat endseq"
    # (r=8): p1 = 7/7, p2 = 5/6, p3 = 3/5, p4 = 2/4; BLEU-3 weights (.3, .3, .3, 0)
    got = metrics.tutorial_bleu([["the cat sat on the mat"]], [["the", "cat", "sat", "on", "mat"]], [True], S, E)
    bp = math.exp(1 - 8 / 7)
    assert close(got["bleu1"], bp)
    assert close(got["bleu2"], bp * (5 / 6) ** 0.5)
    assert close(got["bleu3"], bp * math.exp(0.3 * (math.log(5 / 6) + math.log(3 / 5))))
    assert close(got["bleu4"], bp * (5 / 6 * 3 / 5 * 2 / 4) ** 0.25)


def test_tutorial_mode_unfinished_caption_has_no_endseq():
    # "startseq the cat sat on mat" (c=6), r=8: p1 = 6/6, p2 = 4/5 (on-mat misses)
    got = metrics.tutorial_bleu([["the cat sat on the mat"]], [["the", "cat", "sat", "on", "mat"]], [False], S, E)
    bp = math.exp(1 - 8 / 6)
    assert close(got["bleu1"], bp)
    assert close(got["bleu2"], bp * (4 / 5) ** 0.5)


def test_standard_uses_original_captions_not_cleaned_ones():
    # a cleaning that drops "a"/"the": the model says "dog runs on grass"; against its own
    # cleaned reference that is a perfect score, against the original caption it is not
    hyp = ["dog", "runs", "on", "grass"]
    tut = metrics.tutorial_bleu([["dog runs on grass"]], [hyp], [True], S, E)
    std = metrics.standard_bleu([["A dog runs on the grass."]], [hyp])
    assert close(tut["bleu4"], 1.0)
    # p1 = 4/4, r = 6, c = 4 -> BP = exp(-0.5); p2 = 2/3 ("on grass" misses)
    assert close(std["bleu1"], math.exp(-0.5))
    assert close(std["bleu2"], math.exp(-0.5) * (2 / 3) ** 0.5)


def test_standard_tokens_are_words_a_captioner_can_say():
    """References must be tokenised as the default cleaning makes training words
    ("dog's" -> "dog", "T-shirt" -> "t shirt"), not into words no model ever saw ("dogs", "tshirt")."""
    assert metrics.standard_tokens("A dog's ball, red!  ") == ["a", "dog", "ball", "red"]
    assert metrics.standard_tokens("T-shirt.") == ["t", "shirt"]
    assert metrics.standard_tokens("Two dogs / 2 cats in the U.S.") == ["two", "dogs", "cats", "in", "the", "us"]
    # on the bundled sample: every reference token is a word of the cleaned captions' vocabulary
    from captioning.data import text
    sample = Path(__file__).resolve().parents[1] / "data" / "sample" / "Flickr8k_text" / "Flickr8k.token.txt"
    raw = [line.split("\t", 1)[1] for line in sample.read_text(encoding="utf-8").splitlines() if "\t" in line]
    words = {w for caption in raw for w in text.clean_caption(caption).split()}
    tokens = {t for caption in raw for t in metrics.standard_tokens(caption)}
    assert tokens <= words
    assert any("'" in caption or "-" in caption for caption in raw)   # the sample has such captions


def test_tutorial_reference_and_hypothesis_shapes():
    assert metrics.tutorial_reference("a dog", S, E) == [S, "a", "dog", E]
    assert metrics.tutorial_hypothesis(["a", "dog"], True, S, E) == [S, "a", "dog", E]
    assert metrics.tutorial_hypothesis(["a", "dog"], False, S, E) == [S, "a", "dog"]


def test_diagnostics_expose_repeated_and_copied_captions():
    generated = [["a", "dog"], ["a", "dog"], ["a", "cat", "runs"], ["a", "dog"]]
    d = metrics.diagnostics(generated, [True, True, False, True], {"a dog", "a cat"})
    assert d["distinct_captions"] == 2 and close(d["distinct_share"], 0.5)
    assert d["vocabulary_used"] == 4
    assert close(d["copied_from_training_share"], 0.75)
    assert close(d["unfinished_share"], 0.25)
    assert close(d["mean_length_words"], 9 / 4)


def test_captions_tsv_and_gallery(tmp_path):
    write_captions_tsv(tmp_path / "c.tsv", ["x1"], [["a", "dog"]], [["A dog.\tok", "r2", "r3", "r4", "r5"]])
    lines = (tmp_path / "c.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:3] == ["image_id", "generated", "reference_1"]
    assert lines[1].split("\t") == ["x1", "a dog", "A dog. ok", "r2", "r3", "r4", "r5"]
    page = gallery_html([("x1", None, "a <dog>", ["ref & one"])], "t")
    assert "a &lt;dog&gt;" in page and "ref &amp; one" in page and "image not found" in page


def test_main_writes_results_captions_and_gallery(tmp_path, capsys):
    import json
    from helpers import SAMPLE, make_tiny_run
    from captioning.utils import run_cli
    data_dir, model_dir, features, ids = make_tiny_run(tmp_path)
    out_dir = tmp_path / "results"
    rc = eb.main(["--features", str(features), "--data-dir", str(data_dir), "--model", str(model_dir),
                  "--split", "test", "--beam", "2", "--output", str(out_dir),
                  "--images", str(SAMPLE / "Flicker8k_Dataset"), "--gallery", "3", "--java", "no"])
    assert rc == 0
    results = json.loads((out_dir / "results.json").read_text())
    coco = results["coco"]      # the COCO metrics (tests/test_coco_metrics.py checks their values)
    assert coco["tokenizer"] == "python" and coco["meteor"] is None and coco["n_images"] == len(
        json.loads((data_dir / "splits.json").read_text())["test"])
    assert 0 <= coco["bleu_4"] <= coco["bleu_1"] <= 1 and 0 <= coco["rouge_l"] <= 1 and coco["cider_d"] >= 0
    test_ids = json.loads((data_dir / "splits.json").read_text())["test"]
    assert results["n_images"] == len(test_ids) and results["split"] == "test" and results["beam"] == 2
    assert results["features"] == "features.pkl" and results["seconds"] > 0
    for mode in ("tutorial", "standard"):
        assert sorted(results["bleu"][mode]) == ["bleu1", "bleu2", "bleu3", "bleu4"]
        assert all(0 <= v <= 1 for v in results["bleu"][mode].values())
    # the sentinels' free matches make tutorial BLEU-1 higher than standard for a random model
    assert results["bleu"]["tutorial"]["bleu1"] > results["bleu"]["standard"]["bleu1"]
    assert 0 < results["diagnostics"]["distinct_share"] <= 1
    rows = (out_dir / "captions.tsv").read_text().splitlines()
    assert len(rows) == len(test_ids) + 1 and rows[1].split("\t")[0] == test_ids[0]
    assert len(rows[1].split("\t")) == 7
    assert (out_dir / "gallery.html").read_text().count("data:image/jpeg;base64,") == 3

    # a split image without features: one-line error, nothing written
    from captioning.data.features import load_features, save_features
    feats = load_features(features)
    del feats[test_ids[5]]
    save_features(tmp_path / "partial.pkl", feats)
    capsys.readouterr()
    rc = run_cli(eb.main, ["--features", str(tmp_path / "partial.pkl"), "--data-dir", str(data_dir),
                           "--model", str(model_dir), "--output", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert rc == 1 and test_ids[5] in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "none").exists()


def test_consensus_reranking_chooses_from_the_beam(tmp_path, capsys):
    import json
    import numpy as np
    from helpers import make_beams_finish, make_tiny_run
    from captioning.data import text
    from captioning.data.features import load_features, save_features
    from captioning.inference.captioner import Captioner
    from captioning.inference.consensus import Consensus
    from captioning.utils import run_cli
    data_dir, model_dir, features, ids = make_tiny_run(tmp_path)
    make_beams_finish(model_dir, Captioner(model_dir, data_dir).end_id)
    base = ["--features", str(features), "--data-dir", str(data_dir), "--model", str(model_dir),
            "--split", "test", "--java", "no"]

    def captions(out):
        return [row.split("\t")[1] for row in (tmp_path / out / "captions.tsv").read_text().splitlines()[1:]]

    # W 1 keeps the beam's own choice
    assert eb.main(base + ["--beam", "3", "--output", str(tmp_path / "plain")]) == 0
    assert eb.main(base + ["--beam", "3", "--consensus", str(features), "--consensus-weight", "1",
                           "--output", str(tmp_path / "w1")]) == 0
    assert captions("w1") == captions("plain")
    results = json.loads((tmp_path / "w1" / "results.json").read_text())
    assert results["consensus"]["changed"] == 0 and results["consensus"]["k"] == 20
    # W 0 (beam 5 by default): every image gets the candidate its neighbours agree with most
    assert eb.main(base + ["--consensus", str(features), "--consensus-weight", "0", "--consensus-k", "4",
                           "--output", str(tmp_path / "w0")]) == 0
    results = json.loads((tmp_path / "w0" / "results.json").read_text())
    assert results["beam"] == 5 and results["consensus"]["candidates"] > 1
    test_ids = text.load_splits(data_dir)["test"]
    captioner = Captioner(model_dir, data_dir)
    table = load_features(features)
    n_best = captioner.caption_ids(np.stack([table[i] for i in test_ids]), 5, candidates=True)
    reranker = Consensus.from_files(features, data_dir, k=4, weight=0.0)
    options = [[(captioner.words(c), s) for c, s in o] for o in n_best]
    _, agreements = reranker.choose(reranker.query_vectors(test_ids), options, test_ids)
    expected = [" ".join(o[int(np.argmax(a))][0]) for o, a in zip(options, agreements)]
    assert captions("w0") == expected
    assert results["consensus"]["changed"] == sum(int(np.argmax(a)) != 0 for a in agreements) > 0

    # greedy cannot be re-ranked; a features file without a test image: one line, nothing written
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        eb.main(base + ["--beam", "1", "--consensus", str(features)])
    assert exited.value.code == 2
    assert "--consensus chooses among a beam's captions" in capsys.readouterr().err
    partial = {i: v for i, v in table.items() if i != test_ids[3]}
    save_features(tmp_path / "partial.pkl", partial)
    assert run_cli(eb.main, base + ["--consensus", str(tmp_path / "partial.pkl"),
                                    "--output", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: image {test_ids[3]} has no vector in {tmp_path / 'partial.pkl'} (1 of {len(test_ids)} missing)"
    assert not (tmp_path / "none").exists()

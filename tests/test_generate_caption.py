"""Tests for generate_caption.py and the merge/inject decoding it runs: the carried-state step
against the Keras model and the course's re-run-the-prefix loop, and the command line's
bad-input paths. The search itself (greedy, beam) is tested in test_decoding.py."""
import json

import numpy as np
import pytest

import generate_caption as gc
from captioning.inference import decoding
from helpers import SAMPLE, make_beams_finish, make_tiny_run, random_captioner


@pytest.mark.parametrize("variant", ["merge", "inject"])
def test_step_matches_keras_teacher_forced(variant):
    model = random_captioner(variant, "sequence")
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(5, 16)).astype(np.float32)
    tokens = rng.integers(1, 40, size=(5, 7)).astype(np.int32)
    expected = np.asarray(model.predict({"image_input": feats, "caption_input": tokens}, verbose=0))
    init_fn, step_fn = decoding.make_step_fn(model, {"variant": variant})
    states = init_fn(feats)
    for t in range(tokens.shape[1]):
        log_probs, states = step_fn(states, tokens[:, t])
        np.testing.assert_allclose(np.exp(log_probs), expected[:, t], atol=1e-5)
        assert (np.argmax(log_probs, axis=1) == np.argmax(expected[:, t], axis=1)).all()


@pytest.mark.slow
@pytest.mark.parametrize("variant, mode", [("merge", "sequence"), ("inject", "sequence"), ("merge", "pairs")])
def test_fast_greedy_equals_the_course_loop(variant, mode):
    model = random_captioner(variant, mode, seed=3)
    feats = np.random.default_rng(2).normal(size=(3, 16)).astype(np.float32)
    start, banned = 1, [0, 1, 3]
    init_fn, step_fn = decoding.make_step_fn(model, {"variant": variant})
    # pick as "endseq" a word the model says third in its second caption, so some captions
    # end early and others run to max_length
    end = decoding.greedy_decode(step_fn, init_fn(feats), start, -1, 9, banned)[1][2]
    fast = decoding.greedy_decode(step_fn, init_fn(feats), start, end, 9, banned)
    slow = [decoding.tutorial_greedy(model, f, start, end, 9, banned) for f in feats]
    assert fast == slow
    assert fast == decoding.beam_search(step_fn, init_fn(feats), start, end, 9, beam=1, banned_ids=banned)
    assert fast[1][-1] == end and len(fast[1]) <= 3
    assert len({tuple(c) for c in fast}) >= 2                     # not one caption for all


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("tiny"))


def test_cli_cached_features_and_unknown_id(tiny_run, capsys):
    data_dir, model_dir, features, ids = tiny_run
    rc = gc.main(["--model", str(model_dir), "--data-dir", str(data_dir), "--features",
                  str(features), "--ids", ids[0], "no_such_id", ids[1], "--beam", "2"])
    out, err = capsys.readouterr()
    assert rc == 1
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [ids[0], ids[1]]
    words = set(json.loads((data_dir / "tokenizer.json").read_text())["word_index"])
    for line in lines:
        caption = line.split("\t")[1].split()
        assert caption and set(caption) <= words - {"startseq", "endseq", "<unk>"}
    assert err.strip().splitlines() == [f"error: id not in {features} (no_such_id)"]


def test_cli_vocabulary_mismatch_is_one_line(tiny_run, tmp_path, capsys):
    import shutil
    from captioning.utils import run_cli
    data_dir, model_dir, features, ids = tiny_run
    bad = tmp_path / "bad_model"
    shutil.copytree(model_dir, bad)
    config = json.loads((bad / "model.json").read_text())
    config["vocab_size"] += 7
    (bad / "model.json").write_text(json.dumps(config))
    rc = run_cli(gc.main, ["--model", str(bad), "--data-dir", str(data_dir),
                           "--features", str(features), "--ids", ids[0]])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "does not match the tokenizer" in err


@pytest.mark.slow
def test_cli_images_bad_ones_named_others_captioned(tmp_path, capsys):
    # a model trained on 4096-d features, so the (random-weight) VGG16 fc2 extractor fits
    from captioning.utils import run_cli
    data_dir, model_dir, features, ids = make_tiny_run(tmp_path, feature_dim=4096)
    capsys.readouterr()                                    # prepare_text's summary lines
    import shutil
    photos, empty = tmp_path / "photos", tmp_path / "empty"
    photos.mkdir(), empty.mkdir()
    first, second = sorted((SAMPLE / "Flicker8k_Dataset").glob("*.jpg"))[:2]
    shutil.copy(second, photos / second.name)
    (photos / "notes.txt").write_text("not an image")     # ignored: not an image extension
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not a jpeg")
    rc = run_cli(gc.main, ["--model", str(model_dir), "--data-dir", str(data_dir), "--weights", "none",
                           str(first), str(tmp_path / "missing.jpg"), str(corrupt), str(photos),
                           str(empty)])
    out, err = capsys.readouterr()
    assert rc == 1
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(first), str(photos / second.name)]
    assert all(len(line.split("\t")[1].split()) >= 1 for line in lines)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3
    assert "missing.jpg" in errors[0] and "empty" in errors[1] and "corrupt.jpg" in errors[2]


@pytest.mark.slow
def test_cli_lite0_model_on_raw_images_says_use_features(tiny_run, capsys):
    from captioning.utils import run_cli
    data_dir, model_dir, features, ids = tiny_run          # a 16-d model, like a 1280-d Lite0 one
    image = sorted((SAMPLE / "Flicker8k_Dataset").glob("*.jpg"))[0]
    rc = run_cli(gc.main, ["--model", str(model_dir), "--data-dir", str(data_dir),
                           "--weights", "none", str(image)])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert "16-d" in err and "4096-d" in err and "--features" in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1


def test_cli_missing_photo_is_reported_before_a_missing_model(tmp_path, capsys):
    """The user's own inputs are checked first."""
    from captioning.utils import run_cli
    rc = run_cli(gc.main, [str(tmp_path / "missing.jpg"), "--model", str(tmp_path / "no_model"),
                           "--data-dir", str(tmp_path / "no_data")])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert err.strip().splitlines() == [f"error: no such file or folder ({tmp_path / 'missing.jpg'})"]


@pytest.mark.parametrize("script", ["train", "generate_caption", "evaluate_bleu"])
def test_help_states_each_default_once(script, capsys):
    import importlib
    module = importlib.import_module(script)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = capsys.readouterr().out
    options = [block for block in text.split("\n  -")[1:]]
    assert len(options) >= 5
    for block in options:
        assert block.count("default") <= 1, block
    assert "for --beam >= 2 only" in " ".join(text.split()) or script == "train"


def test_cli_consensus_on_cached_features(tmp_path, capsys):
    from captioning.data import text
    from captioning.data.features import load_features
    from captioning.inference import consensus
    from captioning.inference.captioner import Captioner
    data_dir, model_dir, features, ids = make_tiny_run(tmp_path)
    make_beams_finish(model_dir, Captioner(model_dir, data_dir).end_id)
    test_ids = text.load_splits(data_dir)["test"][:12]
    base = ["--model", str(model_dir), "--data-dir", str(data_dir), "--features", str(features),
            "--ids", *test_ids, "--consensus", str(features), "--consensus-data", str(data_dir)]

    def captions(argv):
        assert gc.main(argv) == 0
        return [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()]

    plain = captions(["--model", str(model_dir), "--data-dir", str(data_dir), "--features", str(features),
                      "--ids", *test_ids, "--beam", "5"])
    assert captions(base + ["--consensus-weight", "1"]) == plain
    chosen = captions(base + ["--consensus-weight", "0", "--consensus-k", "4"])
    captioner = Captioner(model_dir, data_dir)
    reranker = consensus.Consensus.from_files(features, data_dir, 4, 0.0)
    table = load_features(features)
    id_lists, n_best, picks = consensus.caption_ids(captioner, np.stack([table[i] for i in test_ids]), reranker,
                                                    reranker.query_vectors(test_ids), 5, decoding.ALPHA, test_ids)
    assert chosen == [" ".join(captioner.words(x)) for x in id_lists] and chosen != plain
    assert any(p != 0 for p in picks) and any(len(o) > 1 for o in n_best)
    with pytest.raises(SystemExit):
        gc.parse_args(base + ["--beam", "1"])
    assert "--consensus chooses among a beam's captions" in capsys.readouterr().err

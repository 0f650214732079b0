"""Tests for captioning/inference/decoding.py and generate_caption.py: decoding over a hand-written
next-word table, the carried-state step against the Keras model and the course's
re-run-the-prefix loop, and the command line's bad-input paths."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

import generate_caption as gc
from captioning.inference import decoding
from captioning.models import registry

# ---- a hand-written next-word table -----------------------------------------------------------
WORDS = ["<pad>", "startseq", "endseq", "<unk>", "a", "the", "one", "dog", "cat", "runs",
         "sleeps", "endless", "weekend"]
ID = {w: i for i, w in enumerate(WORDS)}
PAD, START, END, UNK = 0, ID["startseq"], ID["endseq"], ID["<unk>"]
BANNED = [PAD, START, UNK]
UNLISTED = 1e-9     # probability of every word a row of the table does not list

# prefix (words after startseq) -> next-word probabilities. Caption probabilities:
#   greedy: a .40 -> endless .40 -> dog .60 -> endseq 1      = .096   "a endless dog"
#   the .35 -> dog .90 -> endseq .55                          = .17325 "the dog"
#   the .35 -> dog .90 -> runs .45 -> endseq 1                = .14175 "the dog runs"
#   one .25 -> cat .95 -> sleeps 1 -> weekend 1 -> endseq 1   = .2375  "one cat sleeps weekend"
TABLE = {
    (): {"a": .40, "the": .35, "one": .25},
    ("a",): {"dog": .30, "cat": .30, "endless": .40},
    ("a", "endless"): {"dog": .60, "endseq": .40},
    ("a", "endless", "dog"): {"endseq": 1.0},
    ("the",): {"dog": .90, "cat": .10},
    ("the", "dog"): {"runs": .45, "endseq": .55},
    ("the", "dog", "runs"): {"endseq": 1.0},
    ("one",): {"cat": .95, "dog": .05},
    ("one", "cat"): {"sleeps": 1.0},
    ("one", "cat", "sleeps"): {"weekend": 1.0},
    ("one", "cat", "sleeps", "weekend"): {"endseq": 1.0},
    # the most likely next tokens are pad and <unk>: the decoder must skip them
    ("the", "cat"): {"<pad>": .5, "<unk>": .3, "startseq": .1, "sleeps": .06, "runs": .04},
    ("the", "cat", "sleeps"): {"endseq": 1.0},
}


def table_step(states, last_ids, table=None):
    """step_fn over TABLE; the state is the (N, t) array of tokens so far (startseq first)."""
    table = TABLE if table is None else table
    prefixes = np.concatenate([states, np.asarray(last_ids)[:, None]], axis=1)
    probs = np.full((len(prefixes), len(WORDS)), UNLISTED)
    for row, prefix in enumerate(prefixes):
        key = tuple(WORDS[i] for i in prefix[2:])          # drop the pad seed and startseq
        for word, p in table.get(key, {}).items():
            probs[row, ID[word]] = p
    return np.log(probs / probs.sum(axis=1, keepdims=True)), prefixes


def caption(ids):
    return " ".join(WORDS[i] for i in ids if i != END)


def run(beam, max_length, alpha=0.0, n=1):
    states = np.zeros((n, 1), dtype=np.int64)            # one pad "seed" column per caption
    return decoding.decode(table_step, states, START, END, max_length, beam, alpha, BANNED)


@pytest.mark.parametrize("beam, max_length, expected, finished", [
    (1, 10, "a endless dog", True),          # greedy; "endless" contains "end" and does not stop it
    (2, 10, "the dog", True),
    (3, 10, "one cat sleeps weekend", True),  # "weekend" does not stop it either
    (1, 2, "a", False),                       # max_length counts startseq: 1 generated token
    (1, 3, "a endless", False),
    (1, 4, "a endless dog", False),           # 3 tokens, no room for endseq
    (1, 5, "a endless dog", True),
    (2, 3, "the dog", False),                 # beam 2 truncated after 2 tokens: best partial
    (3, 5, "the dog", True),                  # "one cat sleeps weekend" has no room to finish
    (3, 6, "one cat sleeps weekend", True),
])
def test_table_captions(beam, max_length, expected, finished):
    ids = run(beam, max_length)[0]
    assert caption(ids) == expected
    assert (ids[-1] == END) == finished
    assert len(ids) <= max_length - 1


def test_beam_1_is_greedy_whatever_alpha():
    """Issue 9's table: the -> dog -> {endseq .52, runs .48}. Greedy stops at "the dog"; a
    one-beam search with length normalisation would say "the dog runs" (log .48 / 4**0.7 beats
    log .52 / 3**0.7). decode with beam 1 is greedy for any alpha; alpha acts from beam 2."""
    table = {(): {"the": 1.0}, ("the",): {"dog": 1.0}, ("the", "dog"): {"endseq": .52, "runs": .48},
             ("the", "dog", "runs"): {"endseq": 1.0}}

    def step(states, last_ids):
        return table_step(states, last_ids, table)

    states = np.zeros((1, 1), dtype=np.int64)
    for alpha in (0.0, 0.7, 1.0):
        assert caption(decoding.decode(step, states, START, END, 10, 1, alpha, BANNED)[0]) == "the dog"
    assert caption(decoding.decode(step, states, START, END, 10, 2, 0.7, BANNED)[0]) == "the dog runs"
    assert caption(decoding.decode(step, states, START, END, 10, 2, 0.0, BANNED)[0]) == "the dog"
    assert caption(decoding.beam_search(step, states, START, END, 10, 1, 0.7, BANNED)[0]) == "the dog runs"


def test_beam_beats_greedy_in_probability():
    def logp(ids):
        states, total = np.zeros((1, 1), dtype=np.int64), 0.0
        last = np.array([START])
        for i in ids:
            lp, states = table_step(states, last)
            total += lp[0, i]
            last = np.array([i])
        return total
    greedy, beam3 = run(1, 10)[0], run(3, 10)[0]
    assert math.isclose(math.exp(logp(greedy)), .096, rel_tol=1e-6)
    assert math.isclose(math.exp(logp(beam3)), .2375, rel_tol=1e-6)


def test_length_normalisation_changes_the_choice():
    # beam 2: "the dog" logp/3 = -0.584 loses to "the dog runs" logp/4 = -0.488 with alpha 1
    assert caption(run(2, 10, alpha=0.0)[0]) == "the dog"
    assert caption(run(2, 10, alpha=1.0)[0]) == "the dog runs"


def test_never_emits_pad_start_or_oov():
    states = np.array([[0, START, ID["the"]]])             # prefix "the", next "cat"
    for beam in (1, 2):
        ids = decoding.decode(table_step, states, ID["cat"], END, 10, beam, 0.0, BANNED)[0]
        assert caption(ids) == "sleeps", beam
    with_pad_allowed = decoding.greedy_decode(table_step, states, ID["cat"], END, 10, banned_ids=())[0]
    assert with_pad_allowed[0] == PAD                       # the table really prefers pad


def test_batched_images_decode_independently():
    # the state's first column tags the image: image 1 prefers "one", image 2 must say "the"
    tables = {0: TABLE, 1: {**TABLE, (): {"one": .6, "a": .4}}, 2: {**TABLE, (): {"the": 1.0}}}

    def step(states, last_ids):
        logps = np.empty((len(states), len(WORDS)))
        for row, tag in enumerate(states[:, 0]):
            logps[row], _ = table_step(states[row:row + 1], last_ids[row:row + 1], tables[int(tag)])
        return logps, np.concatenate([states, np.asarray(last_ids)[:, None]], axis=1)

    tags = np.array([[0], [1], [2], [0]])
    for beam, expected in [(1, ["a endless dog", "one cat sleeps weekend", "the dog", "a endless dog"]),
                           (3, ["one cat sleeps weekend"] * 2 + ["the dog", "one cat sleeps weekend"])]:
        together = decoding.decode(step, tags, START, END, 10, beam, 0.0, BANNED)
        alone = [decoding.decode(step, tags[i:i + 1], START, END, 10, beam, 0.0, BANNED)[0] for i in range(4)]
        assert [caption(ids) for ids in together] == expected
        assert together == alone


def test_beam1_equals_greedy_on_random_tables():
    rng = np.random.default_rng(0)
    vocab = 12
    weights = rng.normal(size=(vocab, vocab)) * 3

    def step(states, last_ids):
        # a random bigram model mixed with a per-caption bias carried in the state
        logits = weights[last_ids] + states
        logits = logits - logits.max(axis=1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)), states

    states = rng.normal(size=(40, vocab))
    greedy = decoding.greedy_decode(step, states, 1, 2, 9, [0])
    beam1 = decoding.beam_search(step, states, 1, 2, 9, beam=1, banned_ids=[0])
    assert greedy == beam1
    beam4 = decoding.beam_search(step, states, 1, 2, 9, beam=4, banned_ids=[0])
    assert all(len(b) <= 8 and 0 not in b for b in beam4)


# ---- the carried-state step against the Keras model and the course's loop ----------------------
def random_captioner(variant, mode, feature_dim=16, vocab=40, max_length=10, units=8, seed=0):
    """A train.build_model network with random weights, zero biases and kernels of std
    3/sqrt(fan_in) (6/sqrt(fan_in) for the output layer): varied, peaked distributions, so
    float rounding between the one-step and the whole-caption computation cannot flip an argmax."""
    import keras
    keras.utils.set_random_seed(seed)
    model = registry.build_model(variant, feature_dim, vocab, max_length, embed_dim=8, units=units,
                              dropout=0.5, mode=mode)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        gain = 6.0 if layer.name == "output" else 3.0
        layer.set_weights([np.zeros_like(w) if w.ndim == 1 else
                           rng.normal(0, gain / np.sqrt(w.shape[0]), w.shape).astype(np.float32)
                           for w in layer.get_weights()])
    return model


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


# ---- the command line, on a tiny random model over the tracked sample captions ----------------
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def make_tiny_run(root, feature_dim=16):
    """prepare_text.py on data/sample, a random merge model saved as train.py would, random
    features for every captioned image. Returns (data_dir, model_dir, features_path, ids)."""
    import prepare_text
    from captioning.data.features import save_features
    from captioning.data import text
    from captioning.utils import sha256_file, write_json
    data_dir, model_dir = root / "data", root / "model"
    assert prepare_text.main(["--text-dir", str(SAMPLE / "Flickr8k_text"),
                              "--output-dir", str(data_dir)]) == 0
    meta = text.load_meta(data_dir)
    model = random_captioner("merge", "sequence", feature_dim, meta["vocab_size"], meta["max_length"])
    model_dir.mkdir()
    model.save(model_dir / registry.MODEL_FILE)
    write_json(model_dir / "model.json", {
        "variant": "merge", "mode": "sequence", "feature_dim": feature_dim,
        "vocab_size": meta["vocab_size"], "max_length": meta["max_length"], "embed_dim": 8,
        "units": 8, "dropout": 0.5, "start_token": meta["start_token"],
        "end_token": meta["end_token"], "pad_id": 0,
        "tokenizer_sha256": sha256_file(data_dir / "tokenizer.json"), "data_dir": str(data_dir)})
    splits = text.load_splits(data_dir)
    ids = sorted(i for part in splits.values() for i in part)
    rng = np.random.default_rng(0)
    features = root / "features.pkl"
    save_features(features, {i: rng.normal(size=feature_dim).astype(np.float32)
                                              for i in ids})
    return data_dir, model_dir, features, ids


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
    """Issue 9: the user's own inputs are checked first."""
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

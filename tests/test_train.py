"""Tests for train.py on tiny fixtures (a dozen images with random features, a 20-word vocabulary).

The whole file runs in well under 90 s on a 2-core CPU: models are 8 units wide and every run
is one or two epochs over ~60 captions.
"""
import csv
import json
import os
import pickle

import numpy as np
import pytest

import train
from captioning.data import inputs
from captioning.models import registry
from captioning.training import trainer
from captioning.utils import PipelineError, run_cli, sha256_file, write_json

WORDS = "a dog cat runs sits on the grass red ball man rides bike in water jumps over".split()
TINY = ["--embed-dim", "8", "--units", "8", "--batch-size", "4", "--verbose", "0", "--seed", "3",
        "--recipe", "tutorial"]   # plain cross-entropy, epoch by dev loss: what these tests pin


def make_fixture(root, n_train=10, n_dev=3, n_test=2, dim=6, seed=0):
    """Contract-format data folder + features pickle. Returns (features_path, data_dir)."""
    rng = np.random.default_rng(seed)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    ids = [f"img{i:03d}" for i in range(n_train + n_dev + n_test)]
    splits = {"train": ids[:n_train], "dev": ids[n_train:n_train + n_dev], "test": ids[n_train + n_dev:]}
    references = {}
    with open(data / "descriptions.txt", "w", encoding="utf-8") as handle:
        for image_id in ids:
            for _ in range(5):
                n = int(rng.integers(2, 9))
                caption = " ".join(rng.choice(WORDS, n))
                references.setdefault(image_id, []).append(caption)
                handle.write(image_id + " " + caption + "\n")
    write_json(data / "references.json", references)
    vocab = ["startseq", "endseq", "<unk>"] + WORDS
    write_json(data / "tokenizer.json", {"word_index": {w: i + 1 for i, w in enumerate(vocab)},
                                         "oov_token": "<unk>", "start_token": "startseq",
                                         "end_token": "endseq", "pad_id": 0})
    write_json(data / "splits.json", splits)
    write_json(data / "meta.json", {"vocab_size": len(vocab) + 1, "max_length": 10,
                                    "start_token": "startseq", "end_token": "endseq", "pad_id": 0,
                                    "oov_token": "<unk>", "tokenizer_sha256": sha256_file(data / "tokenizer.json")})
    # float16, some (1, D) and some (D,): both layouts load_features accepts
    features = {i: rng.normal(size=(1, dim) if k % 2 else (dim,)).astype(np.float16) for k, i in enumerate(ids)}
    path = root / "features.pkl"
    with open(path, "wb") as handle:
        pickle.dump(features, handle)
    return path, data


def run(root, *extra, name="run"):
    features, data = root / "features.pkl", root / "data"
    return train.main(["--features", str(features), "--data-dir", str(data),
                       "--output-dir", str(root / "models"), "--name", name, *TINY, *extra])


@pytest.fixture()
def fixture_dir(tmp_path):
    make_fixture(tmp_path)
    return tmp_path


def tiny_examples(n=6, seed=1):
    rng = np.random.default_rng(seed)
    examples = [(i % 3, np.array([1] + list(rng.integers(4, 20, int(rng.integers(1, 8)))) + [2], np.int32))
                for i in range(n)]
    return examples, rng.normal(size=(3, 5)).astype(np.float32)


def test_build_model_names_shapes_and_variable_length():
    merge = registry.build_model("merge", 5, 20, 10, embed_dim=8, units=8)
    names = {layer.name for layer in merge.layers}
    assert {"image_input", "caption_input", "image_dropout", "image_dense", "embedding", "embed_dropout",
            "lstm", "image_expand", "add", "decoder_dense", "output"} <= names
    x = {"image_input": np.zeros((2, 5), np.float32), "caption_input": np.ones((2, 7), np.int32)}
    probs = np.asarray(merge(x))
    assert probs.shape == (2, 7, 20)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    x["caption_input"] = np.ones((2, 3), np.int32)          # any length: batches are trimmed
    assert np.asarray(merge(x)).shape == (2, 3, 20)
    inject = registry.build_model("inject", 5, 20, 10, embed_dim=8, units=8)
    assert "add" not in {layer.name for layer in inject.layers}
    pairs = registry.build_model("merge", 5, 20, 10, embed_dim=8, units=8, mode="pairs")
    assert pairs.output.shape == (None, 20)
    with pytest.raises(PipelineError, match="unknown variant"):
        registry.build_model("show_and_tell", 5, 20, 10)
    with pytest.raises(PipelineError, match="spatial grid"):   # a grid model given a pooled width
        registry.build_model("transformer", 5, 20, 10)


def test_inject_uses_image_as_initial_state():
    model = registry.build_model("inject", 5, 20, 10, embed_dim=8, units=8)
    image = np.random.default_rng(0).normal(size=(1, 5)).astype(np.float32)
    tokens = np.array([[1, 5, 6]], np.int32)
    # the LSTM's first output with h0 = c0 = image_dense(image), computed by hand
    h0 = np.maximum(image @ model.get_layer("image_dense").get_weights()[0]
                    + model.get_layer("image_dense").get_weights()[1], 0)
    kernel, recurrent, bias = model.get_layer("lstm").get_weights()
    z = model.get_layer("embedding").get_weights()[0][1] @ kernel + h0 @ recurrent + bias
    i, f, g, o = np.split(z[0], 4)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    h1 = sig(o) * np.tanh(sig(f) * h0[0] + sig(i) * np.tanh(g))
    import keras
    lstm_out = keras.Model(model.inputs, model.get_layer("lstm").output)(
        {"image_input": image, "caption_input": tokens})
    np.testing.assert_allclose(np.asarray(lstm_out)[0, 0], h1, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["merge", "inject"])
def test_sequence_and_pairs_modes_compute_the_same_loss(variant):
    examples, features = tiny_examples()
    config = {"variant": variant, "feature_dim": 5, "vocab_size": 20, "max_length": 10,
              "embed_dim": 8, "units": 8, "dropout": 0.5}
    seq = registry.build_model(variant, 5, 20, 10, 8, 8, 0.5, "sequence")
    registry.compile_model(seq, words_per_row=inputs.words_per_row(examples, "sequence"))
    pairs = registry.rebuild_for_mode(seq, config, "pairs")
    registry.compile_model(pairs, words_per_row=inputs.words_per_row(examples, "pairs"))
    everything = np.arange(len(examples))
    x_seq, y_seq = inputs.sequence_batch(examples, everything, features)       # post-padded
    x_pairs, y_pairs = inputs.pair_batch(examples, everything, features, 10)   # pre-padded prefixes
    n_words = sum(len(ids) - 1 for _, ids in examples)
    assert y_pairs.shape == (n_words,) and (y_seq > 0).sum() == n_words
    # evaluate() runs without dropout; one batch each, so the loss is the mean over all words
    loss_seq = seq.evaluate(x_seq, y_seq, batch_size=len(examples), verbose=0)
    loss_pairs = pairs.evaluate(x_pairs, y_pairs, batch_size=n_words, verbose=0)
    probs = np.asarray(seq.predict(x_seq, verbose=0))
    by_hand = -np.mean(np.log(np.take_along_axis(probs, y_seq[..., None], -1)[..., 0][y_seq > 0]))
    assert loss_seq == pytest.approx(by_hand, rel=1e-5)
    assert loss_pairs == pytest.approx(loss_seq, rel=1e-5)
    assert 2.0 < loss_seq < 4.0   # ~log(20) for an untrained model: a real number was compared
    # padding does not change the loss: add 5 empty columns
    x_wide = dict(x_seq, caption_input=np.pad(x_seq["caption_input"], ((0, 0), (0, 5))))
    loss_wide = seq.evaluate(x_wide, np.pad(y_seq, ((0, 0), (0, 5))), batch_size=len(examples), verbose=0)
    assert loss_wide == pytest.approx(loss_seq, rel=1e-5)


def test_plan_batches_buckets_and_covers_every_caption_once():
    lengths = np.random.default_rng(0).integers(3, 30, 500)
    batches = inputs.plan_batches(lengths, 16, np.random.default_rng(1), pool=10)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(500))
    padded = sum(len(b) * lengths[b].max() for b in batches)
    shuffled = np.random.default_rng(1).permutation(500)
    padded_random = sum(16 * lengths[shuffled[i:i + 16]].max() for i in range(0, 500, 16))
    assert padded < 0.75 * padded_random          # bucketing removes most of the padding
    again = inputs.plan_batches(lengths, 16, np.random.default_rng(1), pool=10)
    assert all((a == b).all() for a, b in zip(batches, again))
    ordered = inputs.plan_batches(lengths, 16)
    assert lengths[np.concatenate(ordered)].tolist() == sorted(lengths.tolist())


def test_sequence_batch_is_trimmed_and_shifted():
    examples = [(0, np.array([1, 5, 6, 2], np.int32)), (1, np.array([1, 7, 2], np.int32))]
    x, y = inputs.sequence_batch(examples, [0, 1], np.eye(2, dtype=np.float32))
    assert x["caption_input"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert y.tolist() == [[5, 6, 2], [7, 2, 0]]
    assert x["image_input"].tolist() == [[1, 0], [0, 1]]
    xp, yp = inputs.pair_batch(examples, [1], np.eye(2, dtype=np.float32), 4)
    assert xp["caption_input"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 7]] and yp.tolist() == [7, 2]


@pytest.mark.slow
def test_run_folder_same_seed_same_weights_resume_and_load_captioner(fixture_dir, capsys):
    import keras

    def weights(path):
        return keras.models.load_model(path, compile=False).get_weights()

    def same(x, y):
        return len(x) == len(y) and all(np.array_equal(u, v) for u, v in zip(x, y))

    assert run(fixture_dir, "--epochs", "1", name="a") == 0
    assert run(fixture_dir, "--epochs", "1", name="b") == 0
    folder = fixture_dir / "models" / "a"
    a = weights(folder / "current" / "last.keras")
    assert same(a, weights(fixture_dir / "models" / "b" / "current" / "last.keras"))   # same seed
    # rerunning with more epochs resumes run "a" from its last checkpoint ...
    capsys.readouterr()
    assert run(fixture_dir, "--epochs", "2", name="a") == 0
    assert f"resuming {folder} after epoch 1" in capsys.readouterr().out
    state = json.loads((folder / "current" / "state.json").read_text())
    assert state["epoch"] == 2 and [row["epoch"] for row in state["history"]] == [1, 2]
    resumed = weights(folder / "current" / "last.keras")
    assert not same(a, resumed)
    # ... and ends bit for bit where an uninterrupted 2-epoch run ends: weights, optimizer
    # state and the dropout RNG (dropout 0.5 here) were all restored
    assert run(fixture_dir, "--epochs", "2", name="c") == 0
    whole = fixture_dir / "models" / "c"
    whole_state = json.loads((whole / "current" / "state.json").read_text())
    assert same(resumed, weights(whole / "current" / "last.keras"))
    assert same(weights(folder / "model.keras"), weights(whole / "model.keras"))
    assert [dict(row, seconds=None) for row in state["history"]] == \
        [dict(row, seconds=None) for row in whole_state["history"]]
    assert (state["best_epoch"], state["wait"], state["rng"]) == \
        (whole_state["best_epoch"], whole_state["wait"], whole_state["rng"])
    assert json.loads((folder / "model.json").read_text()) == json.loads((whole / "model.json").read_text())
    # one checkpoint folder, and the published names lead into it
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint-0002", "current", "history.csv", "loss.png", "model.json", "model.keras",
        "settings.json"]
    assert os.readlink(folder / "current") == "checkpoint-0002"
    for name in ("model.keras", "model.json", "history.csv", "loss.png"):
        assert (folder / name).resolve() == (folder / "checkpoint-0002" / name).resolve(), name
    assert (folder / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((folder / "model.json").read_text())
    assert config["feature_dim"] == 6 and config["vocab_size"] == 21 and config["max_length"] == 10
    assert config["variant"] == "merge" and config["mode"] == "sequence"
    assert config["epochs_trained"] == config["best_epoch"] == state["best_epoch"]
    assert config["start_id"] == 1 and config["end_id"] == 2
    rows = list(csv.DictReader(open(folder / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert config["best_val_loss"] == pytest.approx(min(float(r["val_loss"]) for r in rows), rel=1e-4)
    # model.keras is the kept epoch's model: the same weights as that epoch's last.keras
    assert same(weights(folder / "model.keras"), a if state["best_epoch"] == 1 else resumed)
    # a third rerun has nothing to do; a changed setting is refused instead of mixing runs
    capsys.readouterr()
    assert run(fixture_dir, "--epochs", "2", name="a") == 0
    assert (f"{folder}: already trained 2 epochs (best epoch {state['best_epoch']}); nothing to do "
            f"(--overwrite starts again)") in capsys.readouterr().out
    assert json.loads((folder / "current" / "state.json").read_text()) == state
    with pytest.raises(PipelineError, match=r"another units \(8 there, 16 now\); use another --name, "
                                            r"or --overwrite to start again"):
        train.main(["--features", str(fixture_dir / "features.pkl"), "--data-dir", str(fixture_dir / "data"),
                    "--output-dir", str(fixture_dir / "models"), "--name", "a", "--units", "16",
                    "--embed-dim", "8", "--batch-size", "4", "--verbose", "0", "--seed", "3",
                    "--recipe", "tutorial"])
    # the decoder's loader takes the folder or its model.keras; checks the vocabulary by checksum
    model, loaded = registry.load_run(folder, fixture_dir / "data")
    assert loaded == config and model.get_layer("output").output.shape[-1] == 21
    assert registry.load_run(folder / "model.keras", fixture_dir / "data")[1] == config
    tok = json.loads((fixture_dir / "data" / "tokenizer.json").read_text())
    tok["word_index"]["dog"], tok["word_index"]["cat"] = tok["word_index"]["cat"], tok["word_index"]["dog"]
    other = fixture_dir / "other_tokenizer.json"
    other.write_text(json.dumps(tok))
    with pytest.raises(PipelineError, match="not the one"):
        registry.load_run(folder, other)
    # --overwrite starts again: one epoch, the same weights as the first run's first epoch
    assert run(fixture_dir, "--epochs", "1", "--overwrite", name="a") == 0
    assert os.readlink(folder / "current") == "checkpoint-0001"
    assert same(a, weights(folder / "current" / "last.keras"))


def test_missing_features_reported_and_thresholded(fixture_dir, capsys):
    path = fixture_dir / "features.pkl"
    features = pickle.loads(path.read_bytes())
    del features["img001"]                                  # 1 of 13 train+dev images
    path.write_bytes(pickle.dumps(features))
    with pytest.raises(PipelineError, match="1 of 13 split images have no features"):
        run(fixture_dir, "--epochs", "1")
    args = train.parse_args(["--features", str(path), "--data-dir", str(fixture_dir / "data"),
                             "--max-missing", "0.1"])
    matrix, examples, dev, config, _ = trainer.prepare_inputs(args)       # continues, without img001
    assert "1 of 13 train/dev images have no features" in capsys.readouterr().err
    assert matrix.shape == (12, 6) and len(examples) == 45 and len(dev) == 15
    with pytest.raises(PipelineError, match="no features"):
        run(fixture_dir, "--epochs", "1", "--max-missing", "0.1", "--fail-on-missing")


@pytest.mark.parametrize("bad", ["ragged", "matrix"])
def test_bad_feature_shapes_are_one_line_errors(fixture_dir, bad, capsys):
    path = fixture_dir / "features.pkl"
    features = pickle.loads(path.read_bytes())
    features["img004"] = np.zeros(7 if bad == "ragged" else (2, 6), np.float32)
    path.write_bytes(pickle.dumps(features))
    argv = ["--features", str(path), "--data-dir", str(fixture_dir / "data"),
            "--output-dir", str(fixture_dir / "models"), *TINY]
    assert run_cli(train.main, argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and ("ragged" in err or "shape" in err)
    assert not (fixture_dir / "models").exists()            # nothing half-written


def test_tokenizer_not_matching_meta_is_an_error(fixture_dir, capsys):
    tok_path = fixture_dir / "data" / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    tok["word_index"]["zebra"] = 21
    tok_path.write_text(json.dumps(tok))
    argv = ["--features", str(fixture_dir / "features.pkl"), "--data-dir", str(fixture_dir / "data"),
            "--output-dir", str(fixture_dir / "models"), *TINY]
    assert run_cli(train.main, argv) == 1
    assert "tokenizer" in capsys.readouterr().err
    # consistent checksum but vocab_size disagreeing with the ids: caught by train.py itself
    meta = json.loads((fixture_dir / "data" / "meta.json").read_text())
    meta["tokenizer_sha256"] = sha256_file(tok_path)
    write_json(fixture_dir / "data" / "meta.json", meta)
    with pytest.raises(PipelineError, match="vocab_size"):
        train.main(argv)


@pytest.mark.slow
def test_cross_validation_writes_table(fixture_dir, capsys):
    assert run(fixture_dir, "--cv", "2", "--variants", "merge,inject", "--cv-epochs", "1", name="cv") == 0
    rows = list(csv.DictReader(open(fixture_dir / "models" / "cv" / "cv.csv")))
    assert [(r["variant"], r["fold"]) for r in rows] == [
        ("merge", "0"), ("merge", "1"), ("inject", "0"), ("inject", "1"),
        ("merge", "mean"), ("merge", "std"), ("inject", "mean"), ("inject", "std")]
    merge_losses = [float(r["val_loss"]) for r in rows[:2]]
    assert float(rows[4]["val_loss"]) == pytest.approx(np.mean(merge_losses), rel=1e-4)
    assert all(2.0 < v < 4.0 for v in merge_losses)
    assert all(0.0 <= float(r["bleu4"]) <= 1.0 for r in rows)
    assert "±" in capsys.readouterr().out


@pytest.mark.slow
def test_every_predicted_word_weighs_the_same_across_length_buckets():
    """Length bucketing makes batches of short and of long captions. The loss must weigh every
    predicted word alike over the epoch (not each batch's mean alike, which gives a word of a
    short batch more weight and pulls captions towards ending early): Keras' aggregate of the
    batches is then exactly the mean over all words."""
    examples, features = tiny_examples(n=12)
    assert len({len(ids) for _, ids in examples}) >= 4
    model = registry.build_model("merge", 5, 20, 10, 8, 8, 0.0)
    registry.compile_model(model, words_per_row=inputs.words_per_row(examples, "sequence"))
    batches = inputs.plan_batches([len(ids) for _, ids in examples], 4)          # 3 length buckets
    reported = model.evaluate(inputs.make_dataset(examples, features, "sequence", 4, 10), verbose=0)
    word_losses, batch_means = [], []
    for index in batches:
        x, y = inputs.sequence_batch(examples, index, features)
        probs = np.asarray(model.predict(x, verbose=0))
        nll = -np.log(np.take_along_axis(probs, y[..., None], -1)[..., 0][y > 0])
        word_losses.extend(nll)
        batch_means.append(nll.mean())
    assert reported == pytest.approx(np.mean(word_losses), rel=1e-5)
    # what a per-batch mean would report instead, by rows, differs here
    assert abs(np.average(batch_means, weights=[len(b) for b in batches]) - np.mean(word_losses)) > 1e-3
    # a dev set with other caption lengths: dev_loss_scale turns Keras' number into its mean
    dev = examples[:5]
    dev_loss = model.evaluate(inputs.make_dataset(dev, features, "sequence", 4, 10), verbose=0)
    x, y = inputs.sequence_batch(dev, np.arange(5), features)
    probs = np.asarray(model.predict(x, verbose=0))
    by_hand = -np.log(np.take_along_axis(probs, y[..., None], -1)[..., 0][y > 0]).mean()
    assert dev_loss * trainer.dev_loss_scale(model, dev, "sequence") == pytest.approx(by_hand, rel=1e-5)


@pytest.mark.slow
def test_progress_is_one_line_per_epoch_when_not_on_a_terminal(fixture_dir, capsys):
    """No redrawn Keras bar (ANSI codes, carriage returns) in logs or CI output."""
    argv = ["--features", str(fixture_dir / "features.pkl"), "--data-dir", str(fixture_dir / "data"),
            "--output-dir", str(fixture_dir / "models"), "--epochs", "2",
            *[a for a in TINY if a not in ("--verbose", "0")]]
    assert "--verbose" not in argv
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out and "\r" not in out and "\x08" not in out
    keras_lines = [line for line in out.splitlines() if " - loss: " in line]
    assert len(keras_lines) == 2 and all("val_loss" in line for line in keras_lines)


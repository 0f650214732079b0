"""Tests for captioning/training/scst.py, scst_run.py and train_scst.py: sampling from a hand-written
next-word table, the forward pass's caption log-probabilities against the decoder's (pooled and
grid families), the direction of an SCST update, the reward references, the stage on a tiny model
(outputs, nothing to do, refusal, bad input), a resumed run on a model that has learnt (the same
weights as an uninterrupted one), and the stage on tiny attention and transformer models reading
a spatial grid file (runs, repeats, selection by beam, the wrong kind of file)."""
import json
from collections import Counter

import numpy as np
import pytest

import train_scst
from captioning.data import text
from captioning.data.features import load_features
from captioning.data.spatial import SpatialWriter
from captioning.inference import decoding
from captioning.models import registry
from captioning.training import scst
from captioning.utils import PipelineError, run_cli, sha256_file, write_json
from helpers import make_tiny_run, random_captioner, run_folder_listing

# ---- sampling from a hand-written table ---------------------------------------------------------
WORDS = ["<pad>", "startseq", "endseq", "<unk>", "a", "the", "dog", "cat", "runs"]
ID = {w: i for i, w in enumerate(WORDS)}
START, END, BANNED = ID["startseq"], ID["endseq"], [0, ID["startseq"], ID["<unk>"]]
# prefix -> next-word probabilities; <unk> is banned, so the first step is a 2/3, the 1/3.
# Whole captions: "a" (a, endseq) 2/3 * 1/2 = 1/3; "a dog" 2/3 * 1/2 = 1/3; "the cat" 1/3.
TABLE = {(): {"a": .6, "the": .3, "<unk>": .1}, ("a",): {"dog": .5, "endseq": .5},
         ("a", "dog"): {"endseq": 1.0}, ("the",): {"cat": 1.0}, ("the", "cat"): {"endseq": 1.0},
         ("runs",): {"runs": 1.0}, ("runs", "runs"): {"runs": 1.0},
         ("runs", "runs", "runs"): {"runs": 1.0}}


def table_step(states, last_ids):
    """step_fn over TABLE; the state is the (N, t) array of tokens so far (a pad seed first)."""
    prefixes = np.concatenate([states, np.asarray(last_ids)[:, None]], axis=1)
    probs = np.zeros((len(prefixes), len(WORDS)))
    for row, prefix in enumerate(prefixes):
        for word, p in TABLE.get(tuple(WORDS[i] for i in prefix[2:]), {}).items():
            probs[row, ID[word]] = p
    with np.errstate(divide="ignore"):
        return np.log(probs), prefixes


def sample(n, seed, max_length=6):
    return scst.sample_decode(table_step, np.zeros((n, 1), dtype=np.int64), START, END, max_length,
                              np.random.default_rng(seed), BANNED)


def test_sampling_follows_the_table_and_skips_banned_words():
    captions = Counter(" ".join(WORDS[i] for i in ids) for ids in sample(6000, seed=0))
    assert set(captions) == {"a endseq", "a dog endseq", "the cat endseq"}
    # each has probability 1/3: 2000 expected, standard deviation 36.5; allow 4 sd
    assert all(abs(count - 2000) < 150 for count in captions.values()), captions
    assert sample(50, seed=3) == sample(50, seed=3) and sample(50, seed=3) != sample(50, seed=4)


def test_sampling_stops_at_max_length_without_endseq():
    # after "runs" comes "runs" for ever: max_length 4 counts startseq, so 3 tokens, no endseq
    # (the state already holds pad, startseq; the "last token" fed first is "runs")
    states = np.array([[0, START]] * 2)
    got = scst.sample_decode(table_step, states, ID["runs"], END, 4, np.random.default_rng(0), BANNED)
    assert got == [[ID["runs"]] * 3] * 2


def test_teacher_arrays():
    inputs, targets = scst.teacher_arrays([[4, 6, 2], [5]], START)
    assert inputs.tolist() == [[START, 4, 6], [START, 0, 0]]
    assert targets.tolist() == [[4, 6, 2], [5, 0, 0]]


# ---- the forward pass against the decoder -------------------------------------------------------
@pytest.mark.parametrize("variant", ["merge", "inject"])
def test_caption_log_probs_equal_the_decoders_step_log_probs(variant):
    model = random_captioner(variant, "sequence", vocab=40, max_length=8)
    kernel, bias = model.get_layer("output").get_weights()
    bias[2] = 3.0            # make endseq (id 2) likely, so the captions' lengths differ
    model.get_layer("output").set_weights([kernel, bias])
    config = {"variant": variant, "max_length": 8}
    init_fn, step_fn = decoding.make_step_fn(model, config)
    features = np.random.default_rng(2).normal(size=(12, 16)).astype(np.float32)
    sampled = scst.sample_decode(step_fn, init_fn(features), 1, 2, 8, np.random.default_rng(0), [0, 1])
    # replay each caption through the decoder's step, summing log p of its tokens
    expected = []
    for row, ids in enumerate(sampled):
        states, last, total = init_fn(features[row:row + 1]), np.array([1]), 0.0
        for token in ids:
            log_probs, states = step_fn(states, last)
            total += log_probs[0, token]
            last = np.array([token])
        expected.append(total)
    inputs, targets = scst.teacher_arrays(sampled, 1)
    got = scst.caption_log_probs(model, features, inputs, targets).numpy()
    assert len({len(s) for s in sampled}) > 1          # padding is exercised
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_update_moves_log_prob_with_the_sign_of_the_advantage():
    import keras
    model = random_captioner("merge", "sequence", vocab=40, max_length=8)
    features = np.random.default_rng(0).normal(size=(2, 16)).astype(np.float32)
    inputs, targets = scst.teacher_arrays([[5, 9, 2], [7, 2]], 1)
    update = scst.make_update_fn(model, keras.optimizers.SGD(0.01))
    before = scst.caption_log_probs(model, features, inputs, targets).numpy()
    update(features, inputs, targets, np.array([1.0, -1.0], dtype=np.float32))
    after = scst.caption_log_probs(model, features, inputs, targets).numpy()
    assert after[0] > before[0] and after[1] < before[1]


def test_reward_references_are_ids_with_endseq_and_refuse_empty_captions():
    tokenizer = {"word_index": {"startseq": 1, "endseq": 2, "<unk>": 3, "a": 4, "dog": 5},
                 "start_token": "startseq", "end_token": "endseq", "oov_token": "<unk>"}
    refs = scst.reward_references({"x": ["a dog", "a zebra"]}, ["x"], tokenizer)
    assert refs == {"x": [[4, 5, 2], [4, 3, 2]]}
    with pytest.raises(PipelineError, match=r"image y has an empty caption \(#2\)"):
        scst.reward_references({"y": ["a dog", " "]}, ["y"], tokenizer)
    with pytest.raises(PipelineError, match="image z has no captions"):
        scst.reward_references({}, ["z"], tokenizer)


def test_advantages_of_both_baselines_on_hand_made_rewards():
    # 2 images x 3 samples; greedy rewards 0.5 and 0.0
    rewards = [0.2, 0.5, 0.8, 0.0, 0.3, 0.0]
    greedy = scst.advantages(rewards, np.array([0.5, 0.0]), 3, "greedy")
    np.testing.assert_allclose(greedy, [-0.3, 0.0, 0.3, 0.0, 0.3, 0.0], atol=1e-7)
    # mean of the image's other samples: image 1 -> 0.2 - 0.65, 0.5 - 0.5, 0.8 - 0.35
    mean = scst.advantages(rewards, np.array([0.5, 0.0]), 3, "mean")
    np.testing.assert_allclose(mean, [-0.45, 0.0, 0.45, -0.15, 0.3, -0.15], atol=1e-7)
    assert abs(mean[:3].sum()) < 1e-7 and abs(mean[3:].sum()) < 1e-7    # zero mean per image
    with pytest.raises(PipelineError, match="at least 2"):
        scst.advantages([0.1, 0.2], np.array([0.0, 0.0]), 1, "mean")


# ---- the stage on a tiny model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("scst"))


def run_stage(tiny, out_dir, *extra):
    data_dir, model_dir, features, _ = tiny
    return run_cli(train_scst.main, ["--init", str(model_dir), "--features", str(features),
                                     "--data-dir", str(data_dir), "--output-dir", str(out_dir),
                                     "--samples", "2", "--batch-images", "80", "--learning-rate",
                                     "1e-3", *extra])


@pytest.mark.slow
def test_stage_writes_the_run_folder_resumes_and_repeats(tiny, tmp_path, capsys):
    assert run_stage(tiny, tmp_path / "a", "--epochs", "1") == 0
    run_dir = tmp_path / "a" / "model-scst"
    state = json.loads((run_dir / "current" / "state.json").read_text())
    assert state["epoch"] == 1 and [r["epoch"] for r in state["history"]] == [0, 1]
    rows = (run_dir / "history.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["epoch", "sample_reward", "greedy_reward"] and len(rows) == 3
    config = json.loads((run_dir / "model.json").read_text())
    assert config["scst"]["epochs_trained"] == 1 and config["scst"]["samples"] == 2
    assert config["scst"]["best_dev_cider_d"] == max(r["dev_cider_d"] for r in state["history"])
    # the run folder is a captioner like any other (evaluate_bleu.py / generate_caption.py read it)
    model, loaded, _ = registry.load_captioner(run_dir, tiny[0])
    assert loaded["variant"] == "merge"
    # the same command again: nothing to do; a higher --epochs continues
    capsys.readouterr()
    assert run_stage(tiny, tmp_path / "a", "--epochs", "1") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert run_stage(tiny, tmp_path / "a", "--epochs", "2") == 0
    assert json.loads((run_dir / "current" / "state.json").read_text())["epoch"] == 2
    # settings that differ from the folder's run are refused
    capsys.readouterr()
    assert run_stage(tiny, tmp_path / "a", "--epochs", "3", "--seed", "7") == 1
    assert capsys.readouterr().err.strip() == (f"error: run folder holds an SCST run with another seed "
                                               f"(1 there, 7 now); use another --name or remove it ({run_dir})")


def test_stage_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, capsys):
    from captioning.data.features import load_features, save_features
    data_dir, model_dir, features, ids = tiny
    feats = load_features(features)
    train_id = json.loads((data_dir / "splits.json").read_text())["train"][3]
    partial = dict(feats)
    del partial[train_id]
    save_features(tmp_path / "partial.pkl", partial)
    save_features(tmp_path / "wide.pkl", {k: np.zeros(20, np.float32) for k in feats})
    cases = [
        (["--init", str(tmp_path / "nope")], "missing file"),
        (["--features", str(tmp_path / "partial.pkl")], train_id),
        (["--features", str(tmp_path / "wide.pkl")], "width 20"),
    ]
    for extra, message in cases:
        args = {"--init": str(model_dir), "--features": str(features)}
        args.update(dict(zip(extra[::2], extra[1::2])))
        capsys.readouterr()
        rc = run_cli(train_scst.main, [*sum(args.items(), ()), "--data-dir", str(data_dir),
                                       "--output-dir", str(tmp_path / "out"), "--epochs", "1"])
        err = capsys.readouterr().err
        assert rc == 1 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def learnt(tmp_path_factory):
    """A model 3 epochs into learning tests/learnable_data.py: its samples differ and some match
    the references, so SCST rewards and updates are not zero (a random model's CIDEr-D is 0)."""
    import train
    from learnable_data import TRAIN_ARGS, make_learnable
    root = tmp_path_factory.mktemp("learnt")
    features, data_dir, _ = make_learnable(root)
    assert train.main(["--features", str(features), "--data-dir", str(data_dir), *TRAIN_ARGS,
                       "--epochs", "3", "--output-dir", str(root / "models"), "--name", "m"]) == 0
    return data_dir, root / "models" / "m", features


def run_learnt(learnt, out_dir, *extra):
    data_dir, model_dir, features = learnt
    return run_cli(train_scst.main, ["--init", str(model_dir), "--features", str(features),
                                     "--data-dir", str(data_dir), "--output-dir", str(out_dir),
                                     "--samples", "3", "--batch-images", "8", "--learning-rate",
                                     "0.01", *extra])


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one(learnt, tmp_path, capsys):
    """One SCST epoch, then the same command with --epochs 2: bit for bit the weights (last and
    kept model), model.json, history and files of an uninterrupted 2-epoch run."""
    assert run_learnt(learnt, tmp_path / "whole", "--epochs", "2") == 0

    def outcome(folder):
        weights = [registry.load_keras(folder / "current" / name, compile=False).get_weights()
                   for name in ("last.keras", "model.keras")]
        state = json.loads((folder / "current" / "state.json").read_text())
        history = [dict(row, seconds=None, cpu_seconds=None) for row in state.pop("history")]
        return (weights, json.loads((folder / "model.json").read_text()), history, state,
                [row[0] for row in run_folder_listing(folder)])

    expected = outcome(tmp_path / "whole" / "m-scst")
    assert "checkpoint-0002/last.keras" in expected[4] and "current" in expected[4]
    assert [row["epoch"] for row in expected[2]] == [0, 1, 2] and expected[3]["epoch"] == 2
    assert expected[1]["scst"]["best_epoch"] == expected[3]["best_epoch"]
    assert expected[3]["best_dev_cider_d"] == max(row["dev_cider_d"] for row in expected[2])
    # the rewards were not all zero and the weights moved: the comparison below can fail
    assert any(row["sample_reward"] != 0 for row in expected[2][1:]), expected[2]
    init = registry.load_keras(learnt[1] / "model.keras", compile=False).get_weights()
    assert not all(np.array_equal(x, y) for x, y in zip(init, expected[0][0]))
    assert run_learnt(learnt, tmp_path / "split", "--epochs", "1") == 0
    capsys.readouterr()
    assert run_learnt(learnt, tmp_path / "split", "--epochs", "2") == 0
    assert f"resuming {tmp_path / 'split' / 'm-scst'} after SCST epoch 1" in capsys.readouterr().out
    weights, *rest = outcome(tmp_path / "split" / "m-scst")
    for got, want in zip(weights, expected[0]):
        assert all(np.array_equal(x, y) for x, y in zip(got, want))
    assert rest == list(expected[1:])


# ---- the grid captioners (attention, transformer) ----------------------------------------------
GRID_HW = (2, 2)
GRID_OPTIONS = {
    "attention": dict(embed_dim=8, units=8, dropout=0.0, annotation_dim=8, attention_dim=8),
    "transformer": dict(d_model=8, heads=2, ff_dim=16, encoder_layers=1, decoder_layers=1, dropout=0.0),
}


def grid_config(variant, vocab_size=16, max_length=8, feature_dim=6):
    return {"variant": variant, "mode": "sequence", "grid": list(GRID_HW), "feature_dim": feature_dim,
            "vocab_size": vocab_size, "max_length": max_length, **GRID_OPTIONS[variant]}


@pytest.mark.parametrize("variant", registry.GRID_VARIANTS)
def test_grid_caption_log_probs_equal_the_step_log_probs(variant):
    """Each image's grid once and image_index per caption, as in training: the forward pass's
    log p of a caption is the sum of the step function's log p of its tokens."""
    import keras
    keras.utils.set_random_seed(0)
    config = grid_config(variant)
    model = registry.build_from_config(config)
    kernel, bias = model.get_layer("logits").get_weights()
    bias[2] = 2.0            # make endseq (id 2) likely, so the captions' lengths differ
    model.get_layer("logits").set_weights([kernel, bias])
    grids = np.random.default_rng(1).normal(size=(4, 4, 6)).astype(np.float32)
    init_fn, step_fn = decoding.make_step_fn(model, config)
    repeat = np.repeat(np.arange(4), 3)                # 3 captions per image
    sampled = scst.sample_decode(step_fn, decoding.take_states(init_fn(grids), repeat), 1, 2, 8,
                                 np.random.default_rng(0), [0, 1])
    expected = []
    for row, ids in zip(repeat, sampled):
        states, last, total = init_fn(grids[row:row + 1]), np.array([1]), 0.0
        for token in ids:
            log_probs, states = step_fn(states, last)
            total += log_probs[0, token]
            last = np.array([token])
        expected.append(total)
    inputs, targets = scst.teacher_arrays(sampled, 1)
    got = scst.caption_log_probs(model, grids, inputs, targets, repeat.astype(np.int32)).numpy()
    assert len({len(s) for s in sampled}) > 1          # padding is exercised
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def grid_runs(tmp_path_factory):
    """learnable_data's dataset, its grids (the kind's code in one cell of 2x2, noise elsewhere)
    in a spatial file, and a random tiny attention, transformer and merge model saved as train.py
    would."""
    import keras
    from learnable_data import FEATURE_DIM, make_learnable
    root = tmp_path_factory.mktemp("scst_grid")
    features, data_dir, _ = make_learnable(root)
    rng = np.random.default_rng(1)
    writer = SpatialWriter(root / "grids.h5", "test", "lite0", "head_relu")
    grids = {}
    for k, (image_id, vector) in enumerate(sorted(load_features(features).items())):
        grid = rng.normal(0, 0.3, (*GRID_HW, FEATURE_DIM)).astype(np.float32)
        grid.reshape(-1, FEATURE_DIM)[k % 4] += vector
        grids[image_id] = grid
    writer.append(grids)
    writer.finish()
    meta = text.load_meta(data_dir)
    common = {"vocab_size": meta["vocab_size"], "max_length": meta["max_length"],
              "start_token": meta["start_token"], "end_token": meta["end_token"], "pad_id": 0,
              "tokenizer_sha256": sha256_file(data_dir / "tokenizer.json"), "data_dir": str(data_dir)}
    for variant in (*registry.GRID_VARIANTS, "merge"):    # merge: for the wrong-kind errors
        keras.utils.set_random_seed(2)
        if variant == "merge":
            config = {"variant": "merge", "mode": "sequence", "feature_dim": FEATURE_DIM,
                      "embed_dim": 8, "units": 8, "dropout": 0.5, **common}
            model = random_captioner("merge", "sequence", FEATURE_DIM, meta["vocab_size"], meta["max_length"])
        else:
            config = {**grid_config(variant, feature_dim=FEATURE_DIM), **common}
            model = registry.build_from_config(config)
        (root / variant).mkdir()
        model.save(root / variant / registry.MODEL_FILE)
        write_json(root / variant / registry.CONFIG_FILE, config)
    return root, data_dir, features, root / "grids.h5"


def run_grid(grid_runs, variant, out_dir, *extra, features=None):
    root, data_dir, _, grids = grid_runs
    return run_cli(train_scst.main, ["--init", str(root / variant), "--features", str(features or grids),
                                     "--data-dir", str(data_dir), "--output-dir", str(out_dir),
                                     "--samples", "3", "--batch-images", "8", "--learning-rate", "0.01",
                                     "--epochs", "1", *extra])


def last_weights(run_dir):
    return registry.load_keras(run_dir / "current" / "last.keras", compile=False).get_weights()


@pytest.mark.slow
@pytest.mark.parametrize("variant", registry.GRID_VARIANTS)
def test_grid_model_trains_one_epoch_repeats_bit_for_bit_and_resumes(grid_runs, variant, tmp_path, capsys):
    root = grid_runs[0]
    assert run_grid(grid_runs, variant, tmp_path / "a") == 0
    run_dir = tmp_path / "a" / f"{variant}-scst"
    state = json.loads((run_dir / "current" / "state.json").read_text())
    assert state["epoch"] == 1 and [r["epoch"] for r in state["history"]] == [0, 1]
    assert state["history"][1]["sample_reward"] > 0      # rewards, so the update is not zero
    config = json.loads((run_dir / "model.json").read_text())
    assert config["variant"] == variant and config["scst"]["epochs_trained"] == 1
    _, loaded, _ = registry.load_captioner(run_dir, grid_runs[1])
    assert loaded["grid"] == list(GRID_HW)
    init = registry.load_keras(root / variant / registry.MODEL_FILE, compile=False).get_weights()
    trained = last_weights(run_dir)
    assert not all(np.array_equal(x, y) for x, y in zip(init, trained))
    # the same seed again, in another folder: the same weights, bit for bit
    assert run_grid(grid_runs, variant, tmp_path / "b") == 0
    again = last_weights(tmp_path / "b" / f"{variant}-scst")
    assert all(np.array_equal(x, y) for x, y in zip(trained, again))
    # a higher --epochs resumes from last.keras (the grid model's layers and its Adam state)
    capsys.readouterr()
    assert run_grid(grid_runs, variant, tmp_path / "a", "--epochs", "2") == 0
    assert f"resuming {run_dir} after SCST epoch 1" in capsys.readouterr().out
    assert json.loads((run_dir / "current" / "state.json").read_text())["epoch"] == 2
    assert not all(np.array_equal(x, y) for x, y in zip(trained, last_weights(run_dir)))


@pytest.mark.slow
def test_select_decoding_beam_adds_its_column_and_selects_by_it(grid_runs, tmp_path, capsys):
    assert run_grid(grid_runs, "attention", tmp_path, "--select-decoding", "beam") == 0
    run_dir = tmp_path / "attention-scst"
    rows = (run_dir / "history.csv").read_text().splitlines()
    assert rows[0].split(",")[-1] == "dev_beam_cider_d" and len(rows) == 3
    state = json.loads((run_dir / "current" / "state.json").read_text())
    best = max(r["dev_beam_cider_d"] for r in state["history"])
    assert state["best_dev_beam_cider_d"] == best and "best_dev_cider_d" not in state
    scst_block = json.loads((run_dir / "model.json").read_text())["scst"]
    assert scst_block["select_decoding"] == "beam" and scst_block["best_dev_beam_cider_d"] == best
    # continuing it with greedy selection would mix the two measures: refused
    capsys.readouterr()
    assert run_grid(grid_runs, "attention", tmp_path, "--epochs", "2") == 1
    assert capsys.readouterr().err.strip() == (
        f"error: run folder holds an SCST run with another select_decoding ('beam' there, 'greedy' "
        f"now); use another --name or remove it ({run_dir})")


def test_wrong_kind_of_features_is_one_line_naming_both(grid_runs, tmp_path, capsys):
    """A pickle for a grid model, grids of another shape, a grid file for merge: one line with
    the file's shape and the model's, nothing written."""
    root, data_dir, features, grids = grid_runs
    writer = SpatialWriter(tmp_path / "wide.h5", "test", "lite0", "head_relu")
    writer.append({i: np.zeros((2, 2, 5), np.float32) for i in load_features(features)})
    writer.finish()
    cases = [("attention", features, ["pooled features (36, 8)", "(N, 2, 2, 8)"]),
             ("transformer", tmp_path / "wide.h5", ["spatial grids (36, 2, 2, 5)", "(N, 2, 2, 8)"]),
             ("merge", grids, ["spatial grids (36, 2, 2, 8)", "(N, 8)"])]
    for variant, path, messages in cases:
        capsys.readouterr()
        assert run_grid(grid_runs, variant, tmp_path / "out", features=path) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(path) in err and str(root / variant) in err, err
        assert all(m in err for m in messages), err
        assert not (tmp_path / "out").exists()

"""Tests for captioning/inference/ensemble.py: the mean of log-probabilities as one step
function (hand-written tables whose captions follow by hand, then real networks), the members'
checks, checkpoint averaging, and the ensemble on evaluate_bleu.py's and generate_caption.py's
command lines."""
import json
import math
import shutil

import numpy as np
import pytest

from captioning.inference import decoding, ensemble
from captioning.models import registry
from captioning.utils import PipelineError
from helpers import BANNED, END, START, WORDS, caption, make_tiny_run, random_captioner, table_step

# Two members that disagree. Ensemble next-word probabilities (normalised geometric means):
#   first word: a, the sqrt(.5 * .05) = .1581 each, one sqrt(.45 * .45) = .45 -> / .7662:
#               a .2064, the .2064, one .5873
#   after "one cat": sleeps sqrt(.9 * .2) = .4243, endseq sqrt(.1 * .8) = .2828 -> .6 / .4
#   the other rows are the same in both tables, so the ensemble keeps them
# Greedy: one .587 -> cat .6 -> sleeps .6 -> endseq 1             = .2114 "one cat sleeps"
# Beam 3: "one dog" .587 * .4 = .2349 beats it ("a dog", "the dog" .2064 each)
# Alone: A says "a dog" (greedy and beam 3: .5 beats .45 * .6 * .9 = .243), B says "the dog".
SHARED = {("a",): {"dog": 1.0}, ("a", "dog"): {"endseq": 1.0}, ("the",): {"dog": 1.0},
          ("the", "dog"): {"endseq": 1.0}, ("one",): {"cat": .6, "dog": .4},
          ("one", "dog"): {"endseq": 1.0}, ("one", "cat", "sleeps"): {"endseq": 1.0}}
TABLE_A = {**SHARED, (): {"a": .5, "the": .05, "one": .45}, ("one", "cat"): {"sleeps": .9, "endseq": .1}}
TABLE_B = {**SHARED, (): {"the": .5, "a": .05, "one": .45}, ("one", "cat"): {"sleeps": .2, "endseq": .8}}


def table_member(table, wrap=tuple):
    """(init_fn, step_fn) over a table; wrap: how the member packs its state (a tuple holding
    the token array, or a dict), so nested states of both kinds are reordered by the search."""
    if wrap is dict:
        pack, unpack = (lambda tokens: {"tokens": tokens}), (lambda state: state["tokens"])
    else:
        pack, unpack = (lambda tokens: (tokens,)), (lambda state: state[0])

    def init_fn(features):
        return pack(np.zeros((len(features), 1), dtype=np.int64))   # one pad "seed" column

    def step_fn(state, last_ids):
        log_probs, tokens = table_step(unpack(state), last_ids, table)
        return log_probs, pack(tokens)

    return init_fn, step_fn


def decode_with(members, beam, n=1):
    init_fn, step_fn = ensemble.ensemble_steps(members)
    states = init_fn([np.zeros((n, 3))] * len(members))
    return [caption(ids) for ids in decoding.decode(step_fn, states, START, END, 10, beam, 0.0, BANNED)]


def test_table_ensemble_greedy_and_beam_differ_from_each_member():
    a, b = table_member(TABLE_A), table_member(TABLE_B, wrap=dict)
    assert decode_with([a], 1) == decode_with([a], 3) == ["a dog"]
    assert decode_with([b], 1) == decode_with([b], 3) == ["the dog"]
    assert decode_with([a, b], 1, n=2) == ["one cat sleeps"] * 2
    assert decode_with([a, b], 3, n=2) == ["one dog"] * 2


def test_ensemble_scores_are_the_renormalised_geometric_mean():
    init_fn, step_fn = ensemble.ensemble_steps([table_member(TABLE_A), table_member(TABLE_B)])
    log_probs, states = step_fn(init_fn([np.zeros((1, 3))] * 2), np.array([START]))
    probs = np.exp(log_probs[0])
    assert math.isclose(probs.sum(), 1.0, rel_tol=1e-12)
    g = {"a": math.sqrt(.5 * .05), "the": math.sqrt(.05 * .5), "one": .45}
    z = sum(g.values()) + (len(WORDS) - 3) * 1e-9      # unlisted words: 1e-9 in both tables
    for word, value in g.items():
        assert math.isclose(probs[WORDS.index(word)], value / z, rel_tol=1e-6), word
    assert isinstance(states, tuple) and len(states) == 2
    with pytest.raises(PipelineError, match="needs 2 feature arrays, got 1"):
        init_fn([np.zeros((1, 3))])


def test_mean_of_one_member_is_its_own_log_probs():
    log_probs = np.log(np.array([[.2, .5, .3]]))
    assert np.array_equal(ensemble.mean_log_probs([log_probs]), log_probs)
    both = ensemble.mean_log_probs([log_probs, np.log(np.array([[.5, .2, .3]]))])
    expected = np.array([math.sqrt(.1), math.sqrt(.1), .3])
    np.testing.assert_allclose(np.exp(both[0]), expected / expected.sum(), rtol=1e-12)


def test_take_states_reorders_nested_states():
    states = ((np.arange(3), np.arange(3) * 10), {"t": np.arange(3)[:, None]})
    taken = decoding.take_states(states, np.array([2, 2, 0]))
    assert list(taken[0][1]) == [20, 20, 0] and taken[1]["t"].tolist() == [[2], [2], [0]]


@pytest.fixture(scope="module")
def network():
    model = random_captioner("merge", "sequence", seed=3)
    feats = np.random.default_rng(2).normal(size=(5, 16)).astype(np.float32)
    return model, feats


@pytest.mark.parametrize("copies", [1, 2])
def test_ensemble_of_one_model_or_copies_of_it_is_the_model(network, copies):
    model, feats = network
    config = {"variant": "merge"}
    start, end, banned = 1, 2, [0, 1, 3]
    init_fn, step_fn = decoding.make_step_fn(model, config)
    e_init, e_step = ensemble.ensemble_steps([decoding.make_step_fn(model, config)
                                              for _ in range(copies)])
    for beam in (1, 3):
        alone = decoding.decode(step_fn, init_fn(feats), start, end, 9, beam, 0.7, banned)
        together = decoding.decode(e_step, e_init([feats] * copies), start, end, 9, beam, 0.7, banned)
        assert together == alone, beam


@pytest.mark.slow
def test_members_of_other_families_read_their_own_features(network):
    """merge (pooled vectors) + transformer (grids, a key/value cache per block in its state) +
    attention: beam search reorders every member's states; an ensemble of the transformer alone
    is the transformer; each image's caption does not depend on the others in the batch."""
    merge, feats = network
    grid_options = {"attention": dict(embed_dim=8, units=8, dropout=0.0, annotation_dim=8, attention_dim=8),
                    "transformer": dict(d_model=8, heads=2, ff_dim=8, encoder_layers=1,
                                        decoder_layers=2, dropout=0.0)}
    grids = np.random.default_rng(4).normal(size=(len(feats), 6, 5)).astype(np.float32)
    members, inputs = [decoding.make_step_fn(merge, {"variant": "merge"})], [feats]
    for variant, options in grid_options.items():
        config = {"variant": variant, "grid": [2, 3], "feature_dim": 5, "vocab_size": 40,
                  "max_length": 10, **options}
        members.append(decoding.make_step_fn(registry.build_from_config(config), config))
        inputs.append(grids)
    start, end, banned = 1, 2, [0, 1, 3]
    t_init, t_step = members[1]
    alone = decoding.decode(t_step, t_init(grids), start, end, 9, 3, 0.7, banned)
    e_init, e_step = ensemble.ensemble_steps(members[1:2])
    assert decoding.decode(e_step, e_init([grids]), start, end, 9, 3, 0.7, banned) == alone
    e_init, e_step = ensemble.ensemble_steps(members)
    together = decoding.decode(e_step, e_init(inputs), start, end, 9, 3, 0.7, banned)
    one_by_one = [decoding.decode(e_step, e_init([x[i:i + 1] for x in inputs]), start, end, 9, 3,
                                  0.7, banned)[0] for i in range(len(feats))]
    assert together == one_by_one
    assert all(0 < len(ids) <= 9 and not set(ids) & set(banned) for ids in together)


# ---- the members' checks ----------------------------------------------------------------------
def fake_run(folder, **changes):
    """A run folder with model.json only (and an empty model.keras: the checks come first)."""
    folder.mkdir()
    (folder / "model.keras").write_bytes(b"")
    config = {"variant": "merge", "vocab_size": 2532, "tokenizer_sha256": "7e81" + "0" * 60,
              "max_length": 38, "start_token": "startseq", "end_token": "endseq", "pad_id": 0,
              **changes}
    (folder / "model.json").write_text(json.dumps(config))
    return folder


def test_members_with_another_vocabulary_are_refused_naming_both(tmp_path):
    a = fake_run(tmp_path / "a")
    b = fake_run(tmp_path / "b", vocab_size=2410, tokenizer_sha256="1a2b" + "0" * 60)
    with pytest.raises(PipelineError) as refused:
        ensemble.Ensemble([a, b])
    assert str(refused.value) == (f"ensemble members disagree on the vocabulary: {a} (tokenizer "
                                  f"7e81…, 2532 ids) vs {b} (tokenizer 1a2b…, 2410 ids)")
    c = fake_run(tmp_path / "c", max_length=20)
    with pytest.raises(PipelineError, match=r"^ensemble members disagree on max_length: .*a \(38\) vs .*c \(20\)$"):
        ensemble.Ensemble([a, c])
    d = fake_run(tmp_path / "d", end_token="stop")
    with pytest.raises(PipelineError, match="disagree on end_token"):
        ensemble.check_members(["a", "d"], [json.loads((p / "model.json").read_text()) for p in (a, d)])


def test_each_member_reads_the_features_that_fit_it():
    pooled, grid = np.zeros((4, 16)), np.zeros((4, 9, 8))
    configs = [{"variant": "merge", "feature_dim": 16},
               {"variant": "attention", "feature_dim": 8, "grid": [3, 3]}]
    chosen = ensemble.member_inputs(configs, [grid, pooled], ["g.h5", "f.pkl"], ["m", "att"])
    assert chosen[0] is pooled and chosen[1] is grid
    with pytest.raises(PipelineError, match=r"^no features file fits the attention model att: given f.pkl \(4, 16\), "):
        ensemble.member_inputs(configs, [pooled, np.zeros((4, 32))], ["f.pkl", "w.pkl"], ["m", "att"])
    with pytest.raises(PipelineError, match="spatial grids .* given to the merge model"):
        ensemble.member_inputs(configs[:1], [grid], ["g.h5"], ["m"])   # one file: the usual error


def test_members_read_the_pooled_file_of_their_own_backbone(tmp_path):
    """Lite0 and Lite2 vectors are both 1280 wide: the backbone each file records decides which
    member reads it; a model or file that records none takes the first that fits."""
    from captioning.data.features import load_features, save_features
    files = []
    for backbone, value in (("lite0", 0.0), ("lite2", 1.0)):
        files.append(tmp_path / f"{backbone}.pkl")
        save_features(files[-1], {"a": np.full(4, value, np.float32)})
        (tmp_path / f"{backbone}.settings.json").write_text(json.dumps({"backbone": backbone}))
    unrecorded = tmp_path / "reference.pkl"          # no settings.json: made by who knows
    save_features(unrecorded, {"a": np.full(4, 2.0, np.float32)})

    class Member:
        def __init__(self, backbone):
            self.config = {"variant": "merge", "feature_dim": 4, "backbone": backbone}
            self.run_dir = f"models/{backbone}"

        def readable(self, paths):
            return list(paths)

    def read(member, path):
        return load_features(path)["a"][None]
    chosen, used = ensemble.member_features([Member("lite2"), Member("lite0"), Member(None)],
                                            files, ["m2", "m0", "old"], read)
    assert [float(c[0, 0]) for c in chosen] == [1.0, 0.0, 0.0] and used == [files[1], files[0]]
    # a file recorded as made by the member's backbone comes before an unrecorded one
    chosen, _ = ensemble.member_features([Member("lite2"), Member("lite0"), Member(None)],
                                         [unrecorded, *files], ["m2", "m0", "old"], read)
    assert [float(c[0, 0]) for c in chosen] == [1.0, 0.0, 2.0]
    with pytest.raises(PipelineError, match=r"lite0\.pkl holds lite0 features but model m2 was "
                                            r"trained on lite2 features$"):
        ensemble.member_features([Member("lite2")], files[:1], ["m2"], read)


# ---- checkpoint averaging ---------------------------------------------------------------------
def saved_captioner(folder, seed, units=8):
    folder.mkdir()
    model = random_captioner("merge", "sequence", units=units, seed=seed)
    model.save(folder / registry.MODEL_FILE)
    (folder / registry.CONFIG_FILE).write_text(json.dumps(
        {"variant": "merge", "feature_dim": 16, "vocab_size": 40, "max_length": 10, "units": units}))
    return model.get_weights()


def test_averaging_gives_the_exact_mean_and_refuses_other_architectures(tmp_path):
    first = saved_captioner(tmp_path / "a", seed=0)
    second = saved_captioner(tmp_path / "b", seed=1)
    out = ensemble.save_average([tmp_path / "a", tmp_path / "b" / "model.keras"], tmp_path / "avg")
    averaged = registry.load_keras(out / "model.keras", compile=False).get_weights()
    assert len(averaged) == len(first)
    for mean, x, y in zip(averaged, first, second):
        assert mean.dtype == x.dtype
        assert np.array_equal(mean, ((x.astype(np.float64) + y) / 2).astype(x.dtype))
    assert json.loads((out / "model.json").read_text())["averaged_from"] == [
        str(tmp_path / "a" / "model.keras"), str(tmp_path / "b" / "model.keras")]
    saved_captioner(tmp_path / "wide", seed=0, units=12)
    with pytest.raises(PipelineError, match=r"^cannot average models of different architectures: .*a/model.keras "
                                            r"\(caption_merge\) vs .*wide/model.keras \(caption_merge\): "):
        ensemble.average_weights([tmp_path / "a", tmp_path / "wide"])
    with pytest.raises(PipelineError, match="at least two models"):
        ensemble.average_weights([tmp_path / "a"])


# ---- the command lines ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """make_tiny_run's run, and a second merge model of the same vocabulary (other weights)."""
    root = tmp_path_factory.mktemp("ensemble")
    data_dir, model_dir, features, ids = make_tiny_run(root)
    other = root / "other"
    other.mkdir()
    config = json.loads((model_dir / "model.json").read_text())
    random_captioner("merge", "sequence", 16, config["vocab_size"], config["max_length"],
                     seed=5).save(other / "model.keras")
    shutil.copyfile(model_dir / "model.json", other / "model.json")
    return data_dir, model_dir, other, features, ids


@pytest.mark.slow
def test_evaluate_bleu_scores_an_ensemble_and_an_average(two_runs, tmp_path):
    import evaluate_bleu as eb
    data_dir, model_dir, other, features, _ = two_runs
    common = ["--features", str(features), "--data-dir", str(data_dir), "--java", "no", "--limit", "5"]
    rc = eb.main([*common, "--model", str(model_dir), "--model", str(other), "--output", str(tmp_path / "e")])
    assert rc == 0
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert results["members"] == [str(model_dir), str(other)] and results["n_images"] == 5
    assert results["model"] == f"{model_dir} + {other}"
    rc = eb.main([*common, "--model", str(model_dir), str(other), "--average-into", str(tmp_path / "avg"),
                  "--output", str(tmp_path / "m")])
    assert rc == 0 and (tmp_path / "avg" / "model.keras").is_file()
    results = json.loads((tmp_path / "m" / "results.json").read_text())
    assert results["model"] == str(tmp_path / "avg") and "members" not in results


def test_evaluate_bleu_average_needs_two_models():
    import evaluate_bleu as eb
    with pytest.raises(SystemExit):
        eb.parse_args(["--model", "a", "--average-into", "out"])
    args = eb.parse_args(["--model", "a"])
    assert args.model == ["a"] and args.features == [eb.FEATURES]


def test_generate_caption_ensemble_on_cached_features(two_runs, capsys):
    import generate_caption as gc
    data_dir, model_dir, other, features, ids = two_runs
    common = ["--data-dir", str(data_dir), "--features", str(features), "--ids", *ids[:3]]
    assert gc.main([*common, "--model", str(model_dir), "--model", str(other), "--beam", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ids[:3] and all(line.split("\t")[1] for line in lines)
    with pytest.raises(SystemExit):
        gc.parse_args([*common, "--model", "a", "b", "--attention-map", "x.png"])
    assert "--attention-map shows one model's attention" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_caption_ensemble_of_a_model_and_itself_says_what_it_says(two_runs, capsys):
    import generate_caption as gc
    data_dir, model_dir, _, features, ids = two_runs
    common = ["--data-dir", str(data_dir), "--features", str(features), "--ids", *ids[:4], "--beam", "3"]
    assert gc.main([*common, "--model", str(model_dir)]) == 0
    alone = capsys.readouterr().out
    assert gc.main([*common, "--model", str(model_dir), str(model_dir)]) == 0
    assert capsys.readouterr().out == alone

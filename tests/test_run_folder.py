"""Tests for captioning/training/run_folder.py, the run folder all three trainers keep.

The trainer here is a stand-in a few lines long (a 4 -> 3 Dense layer, one Adam step per epoch
on data drawn from the epoch number, a scripted dev measure), so that the folder's logic - the
atomic checkpoint, resume, best epoch, patience, history, "nothing to do" - is tested on its own,
and a kill after every single write can be replayed in seconds. The trainers' own resume tests
are in test_train.py, test_retrieval.py and test_scst.py.
"""
import argparse
import json
import os
import shutil

import numpy as np
import pytest

from captioning.training.run_folder import LAST_FILE, RunFolder, Selection
from captioning.utils import PipelineError
from helpers import run_folder_listing

# the scripted dev measure (lower is better): epoch 2 is the best; epochs 3 and 4 do not beat it,
# so patience 2 stops the run after epoch 4, before epoch 5 would have improved
DEV = [3.0, 1.0, 2.0, 2.5, 0.5, 0.4]
FIELDS = ["epoch", "loss", "dev"]
SETTINGS = {"seed": 1, "units": 3}


def stand_in_run(run_dir, epochs=6, patience=2, settings=SETTINGS, keep=1):
    """A trainer in miniature on a RunFolder: resume or start, then per epoch one Adam step, a
    history row, the selection by DEV and one checkpoint (the newest `keep` stay). Returns
    (folder, state)."""
    import keras
    folder = RunFolder(run_dir, Selection("best_dev", higher=False, patience=patience), FIELDS,
                       keep=keep)
    state = folder.resume(settings)
    if state is None:
        keras.utils.set_random_seed(settings["seed"])
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(settings["units"])])
        model.compile(keras.optimizers.Adam(0.1), "mse", run_eagerly=True)
        state = folder.new_state()
    elif folder.finished(state, epochs):
        return folder, state
    else:
        model = keras.models.load_model(folder.checkpoint / LAST_FILE)    # weights + Adam state
    folder.write_settings(argparse.Namespace(seed=settings["seed"]), units=settings["units"])
    for epoch in range(state["epoch"] + 1, epochs + 1):
        rng = np.random.default_rng(epoch)
        x, y = rng.normal(size=(8, 4)).astype("float32"), rng.normal(size=(8, 3)).astype("float32")
        loss = float(model.train_on_batch(x, y))
        improved = folder.record(state, {"epoch": epoch, "loss": round(loss, 6), "dev": DEV[epoch - 1]},
                                 DEV[epoch - 1])
        folder.save(model, state, {"best_epoch": state["best_epoch"]}, improved)
        if state["stopped_early"]:
            break
    return folder, state


def weights(path):
    import keras
    return keras.models.load_model(path, compile=False).get_weights()


def same_weights(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def states_after_every_write(monkeypatch, folder, store):
    """Patch the calls that make writes durable or visible (os.fsync, replace, rename, link,
    symlink) so that each one is followed by a copy of `folder`: the states that a kill right
    after that write would leave on disk (temporary files included). Consecutive identical
    states (e.g. a folder's fsync) are kept once. Returns the list the copies are appended to."""
    real = {name: getattr(os, name) for name in ("fsync", "replace", "rename", "link", "symlink")}
    states, seen, busy = [], [None], [False]

    def wrapped(name):
        def call(*args, **kwargs):
            result = real[name](*args, **kwargs)
            if not busy[0] and folder.is_dir():
                busy[0] = True                   # copytree itself makes links
                try:
                    listing = run_folder_listing(folder)
                    if listing != seen[0]:
                        seen[0] = listing
                        copy = store / f"{len(states):03d}" / folder.name
                        shutil.copytree(folder, copy, symlinks=True)
                        states.append(copy)
                finally:
                    busy[0] = False
            return result
        return call

    for name in real:
        monkeypatch.setattr(os, name, wrapped(name))
    return states


def test_selection_directions():
    lower, higher = Selection("best_val_loss", False, 3), Selection("best_dev_rsum", True, 3)
    assert lower.improves(2.0, None) and lower.improves(1.0, 2.0) and not lower.improves(2.0, 2.0)
    assert higher.improves(0.0, None) and higher.improves(3.0, 2.0) and not higher.improves(2.0, 2.0)


def test_best_epoch_patience_history_layout_and_nothing_to_do(tmp_path):
    folder, state = stand_in_run(tmp_path / "run")
    run = tmp_path / "run"
    # epoch 2 is kept; 3 and 4 are two epochs without improvement: patience 2 stops the run
    assert (state["epoch"], state["best_epoch"], state["best_dev"], state["wait"]) == (4, 2, 1.0, 2)
    assert state["stopped_early"] is True
    assert [(row["epoch"], row["dev"]) for row in state["history"]] == [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5)]
    assert json.loads((run / "current" / "state.json").read_text()) == state
    lines = (run / "history.csv").read_text().splitlines()
    assert lines[0] == "epoch,loss,dev"
    assert [line.split(",")[::2] for line in lines[1:]] == [["1", "3.0"], ["2", "1.0"], ["3", "2.0"], ["4", "2.5"]]
    assert json.loads((run / "model.json").read_text()) == {"best_epoch": 2}
    assert json.loads((run / "settings.json").read_text()) == {"seed": 1, "units": 3}
    # one checkpoint; `current` and the published names lead into it
    names = [name for name, _ in run_folder_listing(run)]
    assert names == ["checkpoint-0004", *(f"checkpoint-0004/{n}" for n in (
        "history.csv", "last.keras", "model.json", "model.keras", "state.json")),
        "current", "history.csv", "model.json", "model.keras", "settings.json"]
    assert os.readlink(run / "current") == "checkpoint-0004"
    assert {name: os.readlink(run / name) for name in ("model.keras", "model.json", "history.csv")} == {
        name: f"current/{name}" for name in ("model.keras", "model.json", "history.csv")}
    # model.keras is epoch 2's model: the weights of a run stopped there (same seed, same steps)
    _, short = stand_in_run(tmp_path / "two", epochs=2)
    assert short["epoch"] == 2 and not short["stopped_early"]
    epoch_two = weights(tmp_path / "two" / "current" / LAST_FILE)
    assert same_weights(weights(run / "model.keras"), epoch_two)
    assert not same_weights(weights(run / "current" / LAST_FILE), epoch_two)
    # the stopped run has nothing to do, with a higher --epochs too: nothing is written
    before = run_folder_listing(run)
    for epochs in (6, 9):
        again, state_again = stand_in_run(run, epochs=epochs)
        assert state_again == state and again.finished(state_again, epochs)
        assert run_folder_listing(run) == before
    # the two-epoch run continues to six, then stops at the limit, not early
    _, longer = stand_in_run(tmp_path / "two", epochs=6, patience=5)
    assert (longer["epoch"], longer["best_epoch"], longer["stopped_early"]) == (6, 6, False)
    # clear() empties the folder; the same run then starts again from epoch 1
    folder.clear()
    assert sorted(p.name for p in run.iterdir()) == []
    _, fresh = stand_in_run(run, epochs=2)
    assert fresh["epoch"] == 2 and same_weights(weights(run / "current" / LAST_FILE), epoch_two)


@pytest.mark.slow
def test_a_kill_after_any_write_resumes_to_the_same_state(tmp_path, monkeypatch):
    """A kill right after each durable write in turn (the folder copied at that moment: what
    SIGKILL would leave, no cleanup); the same run resumed from each copy must end exactly where
    an uninterrupted run ends: weights of last.keras and model.keras, state.json, model.json,
    history.csv, and the same names and links (no leftovers)."""
    stand_in_run(tmp_path / "clean" / "run")

    def outcome(folder):
        return ([weights(folder / "current" / name) for name in (LAST_FILE, "model.keras")],
                [(folder / name).read_text() for name in ("current/state.json", "model.json", "history.csv")],
                [(name, size if isinstance(size, str) else None) for name, size in run_folder_listing(folder)])

    expected = outcome(tmp_path / "clean" / "run")
    with monkeypatch.context() as patch:
        states = states_after_every_write(patch, tmp_path / "killed" / "run", tmp_path / "states")
        stand_in_run(tmp_path / "killed" / "run")
    # settings.json, then per epoch (4): last.keras, model.keras, model.json, history.csv,
    # state.json, the rename, and `current` swapped in two steps (a new link, then the rename)
    assert len(states) >= 2 + 4 * 7, len(states)
    listings = [[name for name, _ in run_folder_listing(s)] for s in states]
    assert any(".checkpoint-0003.tmp/state.json" in names for names in listings)     # half built
    assert any("checkpoint-0002" in names and "checkpoint-0003" in names for names in listings)
    assert any(os.readlink(s / "current") == "checkpoint-0002" and (s / "checkpoint-0003").is_dir()
               for s in states if (s / "current").is_symlink())                    # renamed, not linked
    for state in states:
        _, resumed = stand_in_run(state)
        assert (resumed["epoch"], resumed["best_epoch"]) == (4, 2), state
        got = outcome(state)
        assert all(same_weights(a, b) for a, b in zip(got[0], expected[0])), state
        assert got[1:] == expected[1:], state


def test_other_settings_are_refused_in_one_line_naming_both_values(tmp_path):
    stand_in_run(tmp_path / "run", epochs=1)
    with pytest.raises(PipelineError) as refused:
        stand_in_run(tmp_path / "run", epochs=2, settings={"seed": 2, "units": 3})
    assert str(refused.value) == (f"run folder holds a run with another seed (1 there, 2 now); "
                                  f"use another --name or remove it ({tmp_path / 'run'})")
    folder = RunFolder(tmp_path / "run", Selection("best_dev", False, 2), FIELDS, what="an SCST run",
                       remedy="choose another --name")
    with pytest.raises(PipelineError, match=r"^run folder holds an SCST run with another units \(3 there, "
                                            r"4 now\); choose another --name \("):
        folder.resume({"seed": 1, "units": 4})
    # the refused reruns changed nothing: the run continues
    _, state = stand_in_run(tmp_path / "run", epochs=2)
    assert state["epoch"] == 2 and [row["epoch"] for row in state["history"]] == [1, 2]


def test_without_symbolic_links_the_published_files_are_copies(tmp_path, monkeypatch):
    def no_symlinks(*args, **kwargs):
        raise OSError("symbolic links not supported")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    _, state = stand_in_run(tmp_path / "run", epochs=3)
    run = tmp_path / "run"
    assert not (run / "current").exists() and state["best_epoch"] == 2
    for name in ("model.keras", "model.json", "history.csv"):
        assert not (run / name).is_symlink()
        assert (run / name).read_bytes() == (run / "checkpoint-0003" / name).read_bytes(), name
    assert same_weights(weights(run / "model.keras"), weights(run / "checkpoint-0003" / "model.keras"))


def test_keep_the_last_epochs_for_averaging(tmp_path):
    """keep=3: the three newest checkpoints stay, each with its epoch's last.keras; resuming
    and continuing keep three; the default layout (one checkpoint) is unchanged elsewhere."""
    from captioning.inference.ensemble import average_weights
    run = tmp_path / "run"
    folder, state = stand_in_run(run, epochs=5, patience=9, keep=3)
    assert [epochs for epochs, _ in folder.checkpoints()] == [3, 4, 5]
    assert os.readlink(run / "current") == "checkpoint-0005"
    assert folder.epoch_models() == [(e, run / f"checkpoint-{e:04d}" / LAST_FILE) for e in (3, 4, 5)]
    # each checkpoint holds its own epoch's model; their uniform mean is one model
    runs = [weights(path) for _, path in folder.epoch_models()]
    assert not same_weights(runs[0], runs[1]) and not same_weights(runs[1], runs[2])
    model, _, _ = average_weights([path for _, path in folder.epoch_models()])
    for mean, *each in zip(model.get_weights(), *runs):
        np.testing.assert_array_equal(mean, (np.sum(np.stack(each).astype(np.float64), axis=0) / 3)
                                      .astype(mean.dtype))
    folder, state = stand_in_run(run, epochs=6, patience=9, keep=3)
    assert state["epoch"] == 6 and [epochs for epochs, _ in folder.checkpoints()] == [4, 5, 6]
    # a resume with the default keep trims to the newest one
    folder, state = stand_in_run(run, epochs=6, patience=9)
    assert [epochs for epochs, _ in folder.checkpoints()] == [6]
    with pytest.raises(PipelineError, match="at least 1 checkpoint"):
        RunFolder(run, Selection("best_dev", False, 2), FIELDS, keep=0)

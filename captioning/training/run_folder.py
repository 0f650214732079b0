"""The run folder: one training run on disk, one atomic checkpoint per epoch, resumable bit for bit.

All three trainers keep their runs here (train.py, train_retrieval.py, train_scst.py), in the
folder <output-dir>/<name>:

    checkpoint-NNNN/    the whole state after NNNN epochs (SCST: 0 = the model it started from)
        last.keras      the model after epoch NNNN with its optimizer state (for resuming)
        model.keras     the kept model, the best epoch so far: a hard link to last.keras when
                        this epoch improved, else to the previous checkpoint's model.keras
        model.json      the trainer's config: all a decoder needs (registry.load_run reads it)
        state.json      {epoch (finished epochs), best_epoch, <selection.key> (the best value),
                        wait (epochs since the best), stopped_early, history [one dict per
                        epoch], and what the trainer adds (train.py: settings, rng, ...)}
        history.csv     the history, one row per epoch, the trainer's columns
        loss.png ...    the trainer's plots of the history, if any
    current             a symbolic link to the newest checkpoint (swapped atomically)
    model.keras, model.json, history.csv, loss.png ...
                        links through `current` (copies where the OS has no symbolic links),
                        so model.keras and model.json always come from the same epoch
    settings.json       every argument of the run plus derived values, written at each start
Only the newest checkpoint is kept, unless the trainer asks for the newest K (RunFolder keep=K):
then the K-1 before it stay too, each with its epoch's last.keras, the inputs of checkpoint
averaging (epoch_models; captioning/inference/ensemble.py averages them). Resuming always starts
from the newest; the older ones are only read.
While a checkpoint or a link is built it has a temporary name (.checkpoint-NNNN.tmp,
.current.tmp, .model.keras.tmp, ...); whatever of these a kill leaves is deleted on the rerun.

Why one folder per epoch: Keras' BackupAndRestore / ModelCheckpoint / CSVLogger / EarlyStopping
each write their own piece (weights, metadata, a CSV row, an in-memory counter) at different
moments, so a kill between them mixes epochs. Here every file of an epoch is written and fsync'd
under the temporary name, the folder then gets its final name in one rename, so a complete
checkpoint is one whose name is final, and a kill at any moment leaves the previous epoch or the
new one. The best-epoch and patience counters live in the same state.json for the same reason.

Use (each trainer's epoch loop or Keras callback):
    folder = RunFolder(run_dir, Selection("best_val_loss", higher=False, patience=3), FIELDS)
    state = folder.resume(settings)        # None: a fresh run; else the newest checkpoint's state
    if state is None:                      # build and compile the model
        state = folder.new_state()
    elif folder.finished(state, epochs):   # stopped early, or all epochs done: nothing to do
        return state
    else:                                  # weights and optimizer state
        model = load_model(folder.checkpoint / LAST_FILE)
    folder.write_settings(args, ...)
    for each epoch:
        improved = folder.record(state, history_row, dev_value)
        folder.save(model, state, config, improved)
        if state["stopped_early"]: stop
"""
import csv
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from captioning.models.registry import CONFIG_FILE, MODEL_FILE
from captioning.utils import PipelineError, atomic_write, read_json, save_settings

CHECKPOINT_PREFIX, CURRENT = "checkpoint-", "current"
LAST_FILE, STATE_FILE = "last.keras", "state.json"
HISTORY_FILE, SETTINGS_FILE = "history.csv", "settings.json"


@dataclass(frozen=True)
class Selection:
    """Which epoch a run keeps as model.keras, and when it stops.

    key       state.json's field holding the best value so far ("best_val_loss", "best_dev_rsum")
    higher    True where a larger value is better (BLEU-4, rsum, CIDEr-D), False for a loss
    patience  epochs without improvement after which the run stops early
    """
    key: str
    higher: bool
    patience: int

    def improves(self, value, best):
        return best is None or (value > best if self.higher else value < best)


class RunFolder:
    """One run folder (layout above). `checkpoint` is the newest complete checkpoint: the one
    resumed from, then each one written; None before the first."""

    def __init__(self, path, selection, history_fields, plots=None, what="a run",
                 remedy="use another --name or remove it", keep=1):
        """selection: a Selection; history_fields: history.csv's columns; plots: {file name:
        function(history) -> bytes}, written and published beside history.csv; what, remedy:
        the words of the error for a folder holding a run with other settings; keep: how many
        of the newest checkpoints stay on disk (1: only the newest; each costs one last.keras,
        plus model.keras where it is not a link)."""
        if keep < 1:
            raise PipelineError(f"a run folder keeps at least 1 checkpoint (got {keep})")
        self.keep = int(keep)
        self.path = Path(path)
        self.selection, self.history_fields, self.plots = selection, list(history_fields), plots or {}
        self.published = (MODEL_FILE, CONFIG_FILE, HISTORY_FILE, *self.plots)
        self.what, self.remedy = what, remedy
        self.checkpoint = None

    # ---- reading the folder ----------------------------------------------------------------
    def checkpoints(self):
        """[(epochs, folder)] of the complete checkpoints, oldest first (a final name means
        complete: a checkpoint is renamed to it once every file in it is on disk)."""
        found = []
        for path in self.path.glob(CHECKPOINT_PREFIX + "*"):
            suffix = path.name[len(CHECKPOINT_PREFIX):]
            if path.is_dir() and not path.is_symlink() and suffix.isdigit():
                found.append((int(suffix), path))
        return sorted(found)

    def latest(self):
        """The newest complete checkpoint folder, or None."""
        found = self.checkpoints()
        return found[-1][1] if found else None

    def epoch_models(self):
        """[(epochs, its last.keras)] of the kept checkpoints, oldest first: the models after
        each of the last `keep` epochs (the inputs of checkpoint averaging)."""
        return [(epochs, path / LAST_FILE) for epochs, path in self.checkpoints()]

    # ---- starting: resume or fresh ---------------------------------------------------------
    def resume(self, settings):
        """The state of the newest checkpoint (self.checkpoint then names it), or None for a
        fresh run. Creates the folder; deletes what a kill left half done.

        settings: {name: value} that must equal the folder's run (state.json's "settings" where
        the trainer keeps them there, else settings.json's); a difference is a one-line
        PipelineError naming the setting, both values and the folder.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        latest = self.latest()
        if latest is None:
            self._tidy()
            return None
        state = read_json(latest / STATE_FILE)
        old = state.get("settings") or read_json(self.path / SETTINGS_FILE)
        for key, value in settings.items():
            if old.get(key) != value:
                raise PipelineError(f"run folder holds {self.what} with another {key} ({old.get(key)!r} "
                                    f"there, {value!r} now); {self.remedy} ({self.path})")
        self.checkpoint = latest
        self._point_current()                  # a kill may have come between rename and link
        self._tidy()
        return state

    def new_state(self, **extra):
        """A fresh run's state.json dict (extra: the trainer's own fields)."""
        return {"epoch": 0, "best_epoch": None, self.selection.key: None, "wait": 0,
                "stopped_early": False, "history": [], **extra}

    @staticmethod
    def finished(state, epochs):
        """True when the run stopped early or has trained `epochs` epochs: nothing to do."""
        return state["stopped_early"] or state["epoch"] >= epochs

    def write_settings(self, args, **extra):
        """settings.json: the argparse namespace plus derived values."""
        save_settings(self.path / SETTINGS_FILE, args, **extra)

    def clear(self):
        """Delete the run (train.py --overwrite): checkpoints, links, settings.json."""
        for _, path in self.checkpoints():
            _remove(path)
        for name in (CURRENT, SETTINGS_FILE, *self.published):
            _remove(self.path / name)
        self.checkpoint = None
        self._tidy()

    # ---- after each epoch ------------------------------------------------------------------
    def record(self, state, row, value, best=None, can_stop=True):
        """Add one epoch to `state`: its history row (row["epoch"] = epochs finished), the
        selection by `value`, the patience counter. Returns True when the epoch improved.

        best: more fields set when it improved (e.g. the other measure at that epoch);
        can_stop False: this epoch may not stop the run (train_retrieval.py's warm-up).
        """
        state["history"].append(row)
        state["epoch"] = row["epoch"]
        improved = self.selection.improves(value, state.get(self.selection.key))
        if improved:
            state.update({self.selection.key: value, "best_epoch": row["epoch"], "wait": 0}, **(best or {}))
        else:
            state["wait"] += 1
        if state["wait"] >= self.selection.patience and can_stop:
            state["stopped_early"] = True
        return improved

    def save(self, model, state, config, improved):
        """Write the state after state["epoch"] epochs as ONE new checkpoint folder; return it.

        Every file is written under a temporary folder name and fsync'd, the folder is renamed
        to checkpoint-NNNN (atomic), `current` is pointed at it (an atomic link swap), then the
        checkpoints older than the newest `keep` are deleted. model.keras is `model` when it
        improved (or in the first checkpoint), else the previous checkpoint's model.keras.
        """
        name = f"{CHECKPOINT_PREFIX}{state['epoch']:04d}"
        tmp, final = self.path / f".{name}.tmp", self.path / name
        _remove(tmp)                                    # a killed earlier attempt's leftovers
        tmp.mkdir(parents=True)
        model.save(tmp / LAST_FILE)
        fsync_path(tmp / LAST_FILE)
        if improved or self.checkpoint is None:
            os.link(tmp / LAST_FILE, tmp / MODEL_FILE)  # the same bytes: one file, two names
        else:
            _link_or_copy(self.checkpoint / MODEL_FILE, tmp / MODEL_FILE)
        _write_synced(tmp / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
        _write_synced(tmp / HISTORY_FILE, history_csv(state["history"], self.history_fields))
        for file_name, plot in self.plots.items():
            _write_synced(tmp / file_name, plot(state["history"]))
        _write_synced(tmp / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")
        fsync_path(tmp, directory=True)
        _remove(final)           # only a checkpoint of the same epoch from an abandoned branch
        os.rename(tmp, final)
        fsync_path(self.path, directory=True)
        self.checkpoint = final
        self._point_current()
        self._tidy()
        return final

    # ---- links and leftovers ---------------------------------------------------------------
    def _point_current(self):
        """Make `current` name self.checkpoint (one atomic link swap); the published names are
        links through it. Where the OS has no symbolic links they are copied, one by one."""
        try:
            _set_link(self.path / CURRENT, self.checkpoint.name)
        except (OSError, NotImplementedError):
            for name in self.published:
                with atomic_write(self.path / name, "wb") as handle:
                    handle.write((self.checkpoint / name).read_bytes())
            return
        for name in self.published:
            _set_link(self.path / name, f"{CURRENT}/{name}")
        fsync_path(self.path, directory=True)

    def _tidy(self):
        """Delete temporary checkpoints and links a kill left, and every checkpoint but
        self.checkpoint and the keep - 1 before it."""
        for path in [*self.path.glob(f".{CHECKPOINT_PREFIX}*.tmp"),
                     *(self.path / f".{name}.tmp" for name in (CURRENT, *self.published))]:
            _remove(path)
        found = self.checkpoints()                    # oldest first
        newest = [epochs for epochs, path in found if path == self.checkpoint]
        kept = [path for epochs, path in found if newest and epochs <= newest[0]][-self.keep:]
        for _, path in found:
            if path not in kept:
                _remove(path)


def history_csv(history, fields):
    """history.csv's text: one row per epoch dict, the given columns."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k) for k in fields})
    return buffer.getvalue()


# ---- durable file operations --------------------------------------------------------------------
def fsync_path(path, directory=False):
    """Flush a file (or a folder's entries) to disk; folders are skipped where the OS cannot."""
    flags = os.O_RDONLY
    if directory:
        if not hasattr(os, "O_DIRECTORY"):
            return                       # e.g. Windows: no directory fsync
        flags |= os.O_DIRECTORY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path, data):
    """Write bytes or text to a new file inside a checkpoint being built, then fsync it."""
    with open(path, "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())


def _link_or_copy(source, target):
    """Hard-link an unchanging file into the new checkpoint (no copy); copy where links fail."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
        fsync_path(target)


def _set_link(path, target):
    """Make `path` a symbolic link to `target` in one atomic step (new name, or a swap)."""
    if path.is_symlink() and os.readlink(path) == target:
        return
    if not path.exists() and not path.is_symlink():
        os.symlink(target, path)                       # creating a name is atomic by itself
        return
    tmp = path.with_name(f".{path.name}.tmp")
    _remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, path)


def _remove(path):
    """Delete a file, link or folder tree if it is there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)

"""Ensembles of captioners (several models, one caption) and checkpoint averaging (several saved
models of one architecture, one model).

Owns
  ensemble_steps   [(init_fn, step_fn)] of k members -> ONE (init_fn, step_fn) of decoding.py's
                   step interface, so greedy and beam search run unchanged. The next-word score
                   is the mean of the members' log-probabilities, renormalised (minus its
                   logsumexp): a normalised geometric mean of the k distributions. Its init_fn
                   takes one feature array per member (pooled (N, D) or grids (N, G, C), each
                   what its member reads); its states are the tuple of the members' states.
  check_members    the members must share the vocabulary (model.json's tokenizer_sha256 and
                   vocab_size), the special tokens and max_length: else one-line PipelineError
                   naming both models. Checkpoint averaging also refuses a fine-tuned encoder top.
  Ensemble         Captioner's decoding interface over k run folders (one tokenizer).
  load_captioner   a Captioner for one model path, an Ensemble for several.
  member_inputs    which of the given feature arrays each member reads (the first that fits).
  member_features  each member's features from the given files: a frozen member the first file
                   of its kind that fits it, a member with a fine-tuned encoder top its own top
                   over the trunk file's maps.
  average_weights, save_average
                   the uniform mean of every weight array of models of the same architecture
                   (e.g. the last.keras of a run's last epochs: run_folder.py keep=K keeps them),
                   one model; written as a run folder (model.keras + model.json).
Reads run folders (model.keras, model.json) and tokenizer.json; save_average writes a run
folder. Imports captioning.utils, data.features, inference.captioner/decoding,
models.finetune/registry.

Why a mean of log-probabilities and not of probabilities: every member's confidence counts
multiplicatively, so a word one member finds absurd is held back; the renormalisation matters
for beam search, which compares summed scores of different prefixes.
"""
import shutil
from pathlib import Path

import numpy as np

from captioning.data.features import check_backbone, check_features
from captioning.data.grid_inputs import is_trunk_file
from captioning.inference import decoding
from captioning.inference.captioner import Captioner
from captioning.models import finetune, registry
from captioning.utils import PipelineError, progress as progress_bar, read_json, write_json

# model.json fields every member must share, beyond the vocabulary itself: the ids decoding
# starts from, stops at and never emits, and the caption length limit
SPECIAL_FIELDS = ("start_token", "end_token", "oov_token", "pad_id", "start_id", "end_id")


# ---- the combined step function ---------------------------------------------------------------
def mean_log_probs(log_probs):
    """[k arrays (N, V)] -> the renormalised mean (N, V) float64. One member is returned as it
    is, so an ensemble of one decodes exactly as the model alone."""
    if len(log_probs) == 1:
        return np.asarray(log_probs[0], np.float64)
    mean = np.mean([np.asarray(lp, np.float64) for lp in log_probs], axis=0)
    top = np.max(mean, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)          # a row that is -inf everywhere stays so
    with np.errstate(divide="ignore"):
        norm = top + np.log(np.sum(np.exp(mean - top), axis=1, keepdims=True))
    return mean - norm


def ensemble_steps(members):
    """[(init_fn, step_fn)] of k members -> (init_fn, step_fn) of the step interface.

    init_fn(features): a sequence of k arrays, the i-th member's input (N rows each) -> the
    tuple of the members' states (decoding.take_states reorders nested states). step_fn feeds
    every member the same last ids and returns mean_log_probs of their log-probabilities.
    """
    members = list(members)
    if not members:
        raise PipelineError("an ensemble needs at least one member")

    def init_fn(features):
        if len(features) != len(members):
            raise PipelineError(f"an ensemble of {len(members)} members needs {len(members)} "
                                f"feature arrays, got {len(features)}")
        rows = {len(f) for f in features}
        if len(rows) > 1:
            raise PipelineError(f"the members' feature arrays hold different numbers of images "
                                f"({sorted(rows)})")
        return tuple(init(f) for (init, _), f in zip(members, features))

    def step_fn(states, last_ids):
        outputs = [step(state, last_ids) for (_, step), state in zip(members, states)]
        return mean_log_probs([lp for lp, _ in outputs]), tuple(new for _, new in outputs)

    return init_fn, step_fn


# ---- members ----------------------------------------------------------------------------------
def _short(sha):
    return f"{sha[:4]}…" if isinstance(sha, str) else repr(sha)


def check_members(paths, configs, averaging=False):
    """One-line PipelineError naming both models unless every member shares the first one's
    vocabulary (tokenizer_sha256, vocab_size), special tokens (SPECIAL_FIELDS) and max_length.
    averaging: also refuse a model trained with a fine-tuned encoder top (model.json
    "encoder_top"): the average would be a captioner without the top its grids came from. (An
    ensemble takes such a member: it reads its own top's grids, member_features.)"""
    first, first_path = configs[0], paths[0]
    for path, config in zip(paths, configs):
        if averaging and config.get(finetune.KEY):
            raise PipelineError(f"{path} has a fine-tuned encoder top: such models are not "
                                f"averaged (the average would lose the top its grids came from)")
    for path, config in zip(paths[1:], configs[1:]):
        if (config.get("tokenizer_sha256"), config.get("vocab_size")) != (
                first.get("tokenizer_sha256"), first.get("vocab_size")):
            raise PipelineError(
                f"ensemble members disagree on the vocabulary: {first_path} (tokenizer "
                f"{_short(first.get('tokenizer_sha256'))}, {first.get('vocab_size')} ids) vs {path} "
                f"(tokenizer {_short(config.get('tokenizer_sha256'))}, {config.get('vocab_size')} ids)")
        for field in (*SPECIAL_FIELDS, "max_length"):
            if config.get(field) != first.get(field):
                raise PipelineError(f"ensemble members disagree on {field}: {first_path} "
                                    f"({first.get(field)!r}) vs {path} ({config.get(field)!r})")


def member_inputs(configs, matrices, files, names):
    """For each member (model.json `configs`, run folders `names`), the first of `matrices`
    (read from `files`) that fits it (data.features.check_features). A single file is checked
    as a single model's features are (the same error); with several, a member none fits is a
    one-line PipelineError naming the member and every file's shape."""
    chosen = []
    for config, name in zip(configs, names):
        if len(matrices) == 1:
            check_features(matrices[0].shape, config, files[0])
            chosen.append(matrices[0])
            continue
        for matrix in matrices:
            try:
                check_features(matrix.shape, config, name)
            except PipelineError:
                continue
            chosen.append(matrix)
            break
        else:
            given = ", ".join(f"{f} {tuple(m.shape)}" for f, m in zip(files, matrices))
            raise PipelineError(f"no features file fits the {config.get('variant', 'merge')} "
                                f"model {name}: given {given}")
    return chosen


def member_features(members, files, names, read):
    """([one feature array per member], [the files used]) from the features `files`.

    members: Captioners; names: how errors name them; read(member, path) -> the member's
    float32 matrix of `path` (its read_features for the wanted ids). Each member looks only at
    the files of its kind (Captioner.readable: trunk files for a member with a fine-tuned top,
    the others for a frozen one), never one recorded as made by another backbone (Lite0 and
    Lite2 vectors have the same width), files recorded as made by its own backbone before
    unrecorded ones, and takes the first that fits it (member_inputs, with its errors). A
    frozen file is read once for all members; a trunk file once per fine-tuned member, since
    each runs its own top over the maps.
    """
    cache, chosen, used = {}, [], []
    for member, name in zip(members, names):
        candidates = member.readable(files)
        tuned = bool(member.config.get(finetune.KEY))
        if not tuned:     # a trunk file's backbone is checked by its own spec
            same, unrecorded, mismatched = [], [], []
            for path in candidates:
                if is_trunk_file(path):    # the wrong kind here: read_features says so
                    unrecorded.append(path)
                    continue
                try:
                    recorded = member.config.get("backbone") and check_backbone(member.config, path, name)
                except PipelineError as exc:
                    mismatched.append(exc)
                    continue
                (same if recorded else unrecorded).append(path)
            if not same and not unrecorded:
                raise mismatched[0]
            candidates = same + unrecorded     # a file made by its own backbone first
        matrices = []
        for path in candidates:
            key = (str(path), str(member.run_dir) if tuned else None)
            if key not in cache:
                cache[key] = read(member, path)
            matrices.append(cache[key])
        chosen.extend(member_inputs([member.config], matrices, candidates, [name]))
        used.extend(p for p in candidates if p not in used)
    return chosen, used


class Ensemble:
    """k trained captioners decoding together (ensemble_steps), with one vocabulary.

    Offers what the scoring and the scripts use of Captioner: caption_ids, words, end_id,
    run_dir (the members', joined), config (the shared fields, no grid: no attention maps),
    members (the Captioners), encode_images.
    """

    def __init__(self, model_paths, data_dir=None):
        """model_paths: 2 or more run folders (or their model.keras); data_dir: as Captioner's
        (default: the first member's). The members are compared (check_members) before any
        model is loaded."""
        run_dirs = [registry.run_folder(p) for p in model_paths]
        configs = [read_json(d / registry.CONFIG_FILE) for d in run_dirs]
        check_members([str(p) for p in model_paths], configs)
        if data_dir is None:
            first = run_dirs[0]
            data_dir = first if (first / "tokenizer.json").is_file() else configs[0].get("data_dir")
        self.members = [Captioner(d, data_dir) for d in run_dirs]
        head = self.members[0]
        self.tokenizer = head.tokenizer
        self.id_to_word, self.start_id, self.end_id, self.banned = (
            head.id_to_word, head.start_id, head.end_id, head.banned)
        self.paths = [str(p) for p in model_paths]
        self.run_dir = " + ".join(str(d) for d in run_dirs)
        self.config = {"variant": "ensemble", "max_length": head.config["max_length"],
                       "vocab_size": head.config.get("vocab_size"), "members": self.paths}
        self._step_fns = None

    @property
    def configs(self):
        return [m.config for m in self.members]

    def caption_ids(self, features, beam=decoding.BEAM, alpha=decoding.ALPHA, progress=False,
                    batch_images=decoding.BATCH_IMAGES, candidates=False):
        """features: one array per member (member_inputs) -> N lists of generated ids; with
        candidates (beam >= 2), N n-best lists [(ids, score)] (decoding.beam_search)."""
        for member, matrix in zip(self.members, features):
            check_features(np.shape(matrix), member.config, f"the features of {member.run_dir}")
        if self._step_fns is None:      # built once: every build traces new tf.functions
            self._step_fns = ensemble_steps([decoding.make_step_fn(m.model, m.config)
                                             for m in self.members])
        init_fn, step_fn = self._step_fns
        features = [np.asarray(f, np.float32) for f in features]
        starts = range(0, len(features[0]), batch_images)
        if progress:
            starts = progress_bar(starts, unit="batch",
                                  desc=f"decoding (ensemble of {len(self.members)}, beam {beam})")
        out = []
        for lo in starts:
            states = init_fn([f[lo:lo + batch_images] for f in features])
            out.extend(decoding.decode(step_fn, states, self.start_id, self.end_id,
                                       self.config["max_length"], beam, alpha, self.banned, candidates))
        return out

    def words(self, ids):
        return decoding.ids_to_words(self.id_to_word, ids, self.end_id)

    def encoders(self, weights):
        """One encoder per distinct (backbone, pooled|spatial) the members read; every member
        must name the same backbone (else one-line PipelineError naming both). Returns
        {kind: encoder}, kind = the member's default encoder key (member_kind)."""
        backbones = [(m.backbone, m.run_dir) for m in self.members]
        for backbone, run_dir in backbones[1:]:
            if backbone != backbones[0][0]:
                raise PipelineError(f"ensemble members read features of different backbones: "
                                    f"{backbones[0][1]} ({backbones[0][0] or 'unknown'}) vs "
                                    f"{run_dir} ({backbone or 'unknown'})")
        out = {}
        for member in self.members:
            kind = member_kind(member)
            if kind not in out:
                member.encode = member.default_encoder(weights)
                out[kind] = member.encode
            member.encode = out[kind]
            member.check_encoder()
        return out

    def encode_images(self, images):
        """PIL RGB images -> one feature array per member (each kind encoded once)."""
        by_kind = {}
        for member in self.members:
            kind = member_kind(member)
            if kind not in by_kind:
                by_kind[kind] = member.encode_images(images)
        return [by_kind[member_kind(m)] for m in self.members]


def member_kind(captioner):
    """What a member's images become: ("pooled" | "spatial" grid [H, W] | "tuned" run folder:
    the grid of the member's own fine-tuned top, encoded for it alone)."""
    if captioner.config.get(finetune.KEY):
        return ("tuned", str(captioner.run_dir))
    grid = captioner.config.get("grid")
    return ("spatial", tuple(grid)) if grid else ("pooled",)


def load_captioner(model_paths, data_dir=None):
    """A Captioner for one model path (exactly as Captioner(path, data_dir)), an Ensemble for
    several."""
    paths = [model_paths] if isinstance(model_paths, (str, Path)) else list(model_paths)
    if len(paths) == 1:
        return Captioner(paths[0], data_dir)
    return Ensemble(paths, data_dir)


# ---- checkpoint averaging ---------------------------------------------------------------------
def model_file(path):
    """The .keras file of `path`: the file itself (e.g. a checkpoint's last.keras), or a run
    folder's model.keras. model.json is read from the same folder."""
    path = Path(path)
    if path.suffix == ".keras" and path.is_file():
        return path
    if (path / registry.MODEL_FILE).is_file():
        return path / registry.MODEL_FILE
    raise PipelineError(f"missing file {path / registry.MODEL_FILE if path.is_dir() else path}")


def _layout(model):
    """[(weight path, shape, dtype)] of every weight: two models can be averaged when equal."""
    return [(getattr(w, "path", w.name), tuple(w.shape), str(w.dtype)) for w in model.weights]


def average_weights(paths):
    """Uniform mean of every weight array of the models at `paths` (.keras files or run
    folders, 2 or more, one architecture) -> (keras model holding the mean, model.json of the
    first, [model files]). Float arrays are averaged in float64 and stored in their own dtype;
    others (counters, seeds) are the first model's. Another architecture or vocabulary is a
    one-line PipelineError naming both models."""
    if len(paths) < 2:
        raise PipelineError(f"averaging needs at least two models (got {len(paths)})")
    files = [model_file(p) for p in paths]
    configs = [read_json(f.parent / registry.CONFIG_FILE) for f in files]
    check_members([str(f) for f in files], configs, averaging=True)
    models = [registry.load_keras(f, compile=False) for f in files]
    head = _layout(models[0])
    for f, model in zip(files[1:], models[1:]):
        layout = _layout(model)
        if layout != head or model.name != models[0].name:
            diff = next((f"{a[0]} {a[1]} vs {b[0]} {b[1]}" for a, b in zip(head, layout) if a != b),
                        f"{len(head)} vs {len(layout)} weight arrays")
            raise PipelineError(f"cannot average models of different architectures: {files[0]} "
                                f"({models[0].name}) vs {f} ({model.name}): {diff}")
    stacks = zip(*(m.get_weights() for m in models))
    mean = [np.mean(np.stack(ws).astype(np.float64), axis=0).astype(ws[0].dtype)
            if np.issubdtype(ws[0].dtype, np.floating) else ws[0] for ws in stacks]
    models[0].set_weights(mean)
    return models[0], configs[0], files


def save_average(paths, output):
    """average_weights of `paths`, written as a run folder `output`: model.keras (atomic),
    model.json (the first model's, plus "averaged_from": the model files) and the first
    folder's tokenizer.json/meta.json when it carries them. Returns the folder."""
    model, config, files = average_weights(paths)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "meta.json"):
        if (files[0].parent / name).is_file():
            shutil.copyfile(files[0].parent / name, output / name)
    registry.save_keras(model, output / registry.MODEL_FILE)
    write_json(output / registry.CONFIG_FILE, {**config, "averaged_from": [str(f) for f in files]})
    return output

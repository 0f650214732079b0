"""What the benchmarks need from a clean clone: a prepared text folder and a features file.

Each benchmark runs with its defaults from a fresh checkout: where no prepared --data-dir is
given, prepare_text.py runs on the real Flickr8k captions (../shared/flickr8k/Flickr8k_text) into
a temporary folder, or on the bundled data/sample when the real files are absent; the features
default to the shared EfficientNet-Lite0 file, or random vectors for the sample's images (timing
only: they carry no meaning). Every benchmark prints the `data:` line describe() returns.
"""
from pathlib import Path

import numpy as np

from captioning.apps.pipeline import run_script
from captioning.data import text
from captioning.data.features import save_features
from captioning.encoders.runtime import finished, submitter
from captioning.utils import PipelineError

REPO = Path(__file__).resolve().parents[1]

SHARED = REPO.parent / "shared" / "flickr8k"
SHARED_TEXT = SHARED / "Flickr8k_text"
SHARED_FEATURES = SHARED / "features_efficientnet_lite0.pkl"
SAMPLE_TEXT = REPO / "data" / "sample" / "Flickr8k_text"
RANDOM_WIDTH = 1280     # random stand-in features get Lite0's width, so the model has its size


def prepare(data_dir, features, workdir):
    """(data_dir, features, description): the given ones, or ones made in `workdir`."""
    made = []
    if data_dir is None or not (Path(data_dir) / "meta.json").is_file():
        if data_dir is not None:
            raise PipelineError(f"no prepare_text.py output in {data_dir} (meta.json missing); "
                                f"leave --data-dir out to prepare one in a temporary folder")
        source = SHARED_TEXT if SHARED_TEXT.is_dir() else SAMPLE_TEXT
        data_dir = Path(workdir) / "data"
        text.write_outputs(data_dir, text.prepare(source)[0])     # what prepare_text.py does
        made.append(f"prepare_text.py on {source} (default cleaning) in a temporary folder")
    else:
        made.append(f"prepared text in {data_dir}")
    if features is None:
        if SHARED_FEATURES.is_file():
            features = SHARED_FEATURES
        else:
            splits = text.load_splits(data_dir)
            rng = np.random.default_rng(0)
            features = Path(workdir) / "random_features.pkl"
            save_features(features, {i: rng.normal(size=RANDOM_WIDTH).astype(np.float32)
                                     for part in splits.values() for i in part})
            made.append(f"RANDOM {RANDOM_WIDTH}-d features (no Flickr8k features found: timing only)")
    made.append(f"features {Path(features).name}")
    return Path(data_dir), Path(features), "; ".join(made)


def train(args, what):
    """train.py ARGS in a process of its own, exactly as a user runs it; PipelineError naming
    `what` if it fails (its own error is on stderr above)."""
    if run_script(REPO / "train.py", args) != 0:
        raise PipelineError(f"training {what} failed (train.py {' '.join(map(str, args))})")


def ceiling(predict, tensors, batch_size, overlapped=True):
    """(c) forward passes only, on tensors decoded beforehand, in full batches of batch_size,
    one batch submitted while the previous one runs, as extract_features.extract does;
    overlapped=False waits for each before the next (the latency of one photo at a time)."""
    submit = submitter(predict) if overlapped else lambda batch: finished(predict(batch))
    in_flight = None
    for start in range(0, len(tensors), batch_size):
        batch = tensors[start:start + batch_size]
        if len(batch) < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - len(batch), *batch.shape[1:]),
                                                    batch.dtype)])
        future = submit(batch)
        if in_flight is not None:
            in_flight.result()
        in_flight = future
    if in_flight is not None:
        in_flight.result()

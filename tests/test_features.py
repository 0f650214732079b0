"""captioning.data.features: the restricted loader never runs code, and keeps reading real files."""
import os
import pickle

import numpy as np
import pytest

from captioning.encoders import extract
from captioning.data.features import load_features, load_pickle
from captioning.utils import PipelineError, run_cli


class RunsACommand:
    """Unpickling an instance of this calls os.system: what a hostile features.pkl would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_a_command_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "features.pkl"
    path.write_bytes(pickle.dumps({"img": RunsACommand(marker)}))
    with pytest.raises(PipelineError, match=r"refused to load posix\.system|refused to load os\.system"):
        load_features(path)
    assert not marker.exists()
    # the checkpoint reader of extract_features uses the same loader
    (tmp_path / "f.pkl.partial").write_bytes(pickle.dumps(RunsACommand(marker)))
    with pytest.raises(PipelineError, match="not a safe checkpoint"):
        extract.load_partial(tmp_path / "f.pkl.partial", "x")
    assert not marker.exists()


def test_the_cli_reports_an_unsafe_features_file_in_one_line(tmp_path, capsys):
    import generate_caption
    marker = tmp_path / "pwned"
    path = tmp_path / "features.pkl"
    path.write_bytes(pickle.dumps({"img": RunsACommand(marker)}))
    code = run_cli(generate_caption.main, ["--features", str(path), "--ids", "img",
                                           "--model", str(tmp_path / "nomodel")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and not marker.exists()
    assert len(err.splitlines()) == 1 and err.startswith("error:")


def test_numpy_arrays_in_every_layout_load(tmp_path):
    path = tmp_path / "f.pkl"
    data = {"a": np.arange(4, dtype=np.float16), "b": np.ones((1, 4), np.float64)}
    for protocol in (2, 4, 5):
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        loaded = load_features(path)
        assert loaded["a"].tolist() == [0, 1, 2, 3] and loaded["b"].shape == (4,)
        assert loaded["a"].dtype == np.float32
    path.write_bytes(pickle.dumps([1, "x", 2.5]))
    assert load_pickle(path) == [1, "x", 2.5]


def test_the_shared_reference_features_load(flickr8k_dir):
    features = load_features(flickr8k_dir / "features_efficientnet_lite0.pkl")
    assert len(features) == 8091
    assert features["1000268201_693b08cb0e"].shape == (1280,)

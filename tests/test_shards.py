"""Tests of captioning/encoders/shards.py: extraction in parts, the merge, and Dask.

The fast tests swap the backbone for a tiny seeded Keras model (pooled 6 wide, grids 7x7x4) and
run in this process. The two Dask tests (slow: worker processes import TensorFlow) run the real
EfficientNet-Lite0 with random seeded weights (--weights none) on a few shared Flickr8k images,
skipped without them.
"""
import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning.data.features import load_features, memmap_features, read_rows
from captioning.data.spatial import SpatialFeatures
from captioning.encoders import extract as ef
from captioning.encoders import shards
from captioning.utils import PipelineError, read_json, run_cli, write_json
from helpers import FIXTURE

TINY = shards.Settings(backbone="lite0", weights="none", grids=True, batch_size=3,
                       checkpoint_every=1, runtime="tf")


def tiny_model(weights, seed=0, backbone="lite0", output="pooled"):
    """(224, 224, 3) -> pooled (6,), and with output="both" also a (7, 7, 4) grid; seeded."""
    import keras
    inputs = keras.Input((224, 224, 3))
    grid = keras.layers.AveragePooling2D(32)(inputs)
    grid = keras.layers.Conv2D(4, 1, kernel_initializer=keras.initializers.GlorotUniform(seed=1))(grid)
    pooled = keras.layers.Dense(6, kernel_initializer=keras.initializers.GlorotUniform(seed=2))(
        keras.layers.GlobalAveragePooling2D()(grid))
    return keras.Model(inputs, [pooled, grid] if output == "both" else pooled)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(ef, "build_model", tiny_model)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for k in range(10):
        pixels = rng.integers(0, 256, (60 + k, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{k:02d}.{'png' if k % 3 else 'jpg'}")
    (folder / "img99.jpg").write_bytes(b"not an image")
    return folder


def run_all(folder, parts, settings=TINY, shards_n=3):
    paths = ef.list_images(folder)
    return [shards.extract_shard(i, shards_n, paths, parts, settings, log=lambda line: None)
            for i in range(shards_n)]


def test_shards_are_contiguous_blocks_of_the_sorted_ids(tmp_path):
    paths = [Path(f"/x/{name}") for name in ["c.jpg", "a.png", "e.jpg", "b.jpg", "d.jpg"]]
    blocks = [[p.stem for p in shards.shard_paths(paths, i, 3)] for i in range(3)]
    assert blocks == [["a"], ["b", "c"], ["d", "e"]]
    assert [p for i in range(7) for p in shards.shard_paths(paths, i, 7)] == \
        shards.sorted_images(paths)                      # more shards than images: some empty
    assert shards.parse_shard("3/16") == (3, 16) and shards.part_name(3, 16) == "part-0003-of-0016"
    for bad in ["16/16", "-1/4", "3", "a/b", "0/0"]:
        with pytest.raises(PipelineError, match="--shard takes I/N"):
            shards.parse_shard(bad)
    with pytest.raises(PipelineError, match="duplicate image id a: /x/a.png and /y/a.jpg"):
        shards.sorted_images([*paths, Path("/y/a.jpg")])


def test_parts_merge_into_a_memory_map_ids_grids_and_pickle(tiny, folder, tmp_path, monkeypatch):
    summaries = run_all(folder, tmp_path / "parts")
    assert [s["images"] for s in summaries] == [3, 4, 4 - 1]     # img99 is unreadable
    assert summaries[2]["skipped"][0][0] == "img99.jpg"
    assert [s["model_built"] for s in summaries] in ([True, False, False], [False] * 3)
    out = tmp_path / "merged"
    result = shards.merge_parts(tmp_path / "parts", out / "features.npy", spatial=out / "grids.h5",
                                pickle_path=out / "features.pkl", log=lambda line: None)
    assert result["images"] == 10 and result["grid"] == [7, 7, 4]
    matrix = np.load(out / "features.npy", mmap_mode="r")
    assert isinstance(matrix, np.memmap) and matrix.shape == (10, 6) and matrix.dtype == np.float32
    ids = (out / "features.ids.txt").read_text(encoding="utf-8").splitlines()
    assert ids == [f"img{k:02d}" for k in range(10)]          # sorted, img99 left out
    # the plain extractor gives the same features (other batch boundaries: float tolerance)
    plain, _ = ef.extract(tiny_model("none"), ef.list_images(folder)[:10], batch_size=4,
                          backbone="lite0")
    assert all(np.allclose(plain[i], matrix[k], atol=1e-6) for k, i in enumerate(ids))
    pickled = load_features(out / "features.pkl")
    assert list(pickled) == ids and all(np.array_equal(pickled[i], matrix[k]) for k, i in enumerate(ids))
    settings = read_json(out / "features.settings.json")
    assert settings["backbone"] == "lite0" and settings["shards"] == 3 and settings["images"] == 10
    assert settings["skipped"][0][0] == "img99.jpg" and settings["layout"] == "npy"
    # the grids: a virtual dataset over the parts, read through the usual reader from elsewhere
    assert (out / "grids.h5").stat().st_size < 20_000
    monkeypatch.chdir(tmp_path.parent)
    with SpatialFeatures(out / "grids.h5") as grids:
        assert grids.grid == (7, 7) and grids.width == 4 and sorted(grids.ids) == ids
        rows = grids.rows(ids[::-1])
        assert rows.shape == (10, 7, 7, 4) and np.isfinite(rows).all()
        first = np.asarray(tiny_model("none", output="both")(
            ef.load_image(folder / "img00.jpg", backbone="lite0")[None])[1][0])
        assert np.allclose(grids["img00"], first, atol=2e-3)            # float16 storage
    # a rerun computes nothing
    assert [s["computed"] for s in run_all(folder, tmp_path / "parts")] == [0, 0, 0]


def test_a_stopped_part_resumes_from_its_checkpoint(tiny, folder, tmp_path, monkeypatch):
    real = ef.extract

    def stopped_after_two(model, paths, **kwargs):
        real(model, paths[:2], **{**kwargs, "batch_size": 1})
        raise KeyboardInterrupt
    monkeypatch.setattr(ef, "extract", stopped_after_two)
    paths = ef.list_images(folder)
    with pytest.raises(KeyboardInterrupt):
        shards.extract_shard(2, 3, paths, tmp_path / "parts", TINY, log=lambda line: None)
    names = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert names == ["part-0002-of-0003.h5.partial", "part-0002-of-0003.partial"]
    monkeypatch.setattr(ef, "extract", real)
    summary = shards.extract_shard(2, 3, paths, tmp_path / "parts", TINY, log=lambda line: None)
    assert (summary["resumed"], summary["computed"], summary["images"]) == (2, 1, 3)
    run_all(folder, tmp_path / "again")
    for suffix in (".npy", ".json"):
        name = f"part-0002-of-0003{suffix}"
        if suffix == ".npy":
            assert np.allclose(np.load(tmp_path / "parts" / name),    # other batches: tolerance
                               np.load(tmp_path / "again" / name), atol=1e-6)
        else:
            assert read_json(tmp_path / "parts" / name)["ids"] == read_json(tmp_path / "again" / name)["ids"]


def test_foreign_parts_are_refused_in_one_line(tiny, folder, tmp_path):
    parts = tmp_path / "parts"
    run_all(folder, parts)
    paths = ef.list_images(folder)
    other_seed = shards.Settings(**{**TINY.__dict__, "seed": 1})
    cases = [(lambda: shards.extract_shard(0, 4, paths, parts, TINY),
              "part-0000-of-0003.json is one of 3 parts, this run makes 4"),
             (lambda: shards.extract_shard(1, 3, paths, parts, other_seed),
              "part-0000-of-0003.json was made with another model \\(lite0 random seed=0; .*\\), "
              "this run uses lite0 random seed=1"),
             (lambda: shards.extract_shard(1, 3, paths[:-1], parts, TINY),
              "part-0001-of-0003.json was made from another image list"),
             (lambda: shards.extract_shard(0, 20, paths, tmp_path / "many", TINY),
              "part-0000-of-0020 has no images: there are fewer images than parts")]
    for run, message in cases:
        with pytest.raises(PipelineError, match=message) as info:
            run()
        assert "\n" not in str(info.value)
    record = parts / "part-0001-of-0003.json"
    part = read_json(record)
    write_json(record, {**part, "image_size": [256, 256]})
    with pytest.raises(PipelineError, match="made at image size \\[256, 256\\], this run at \\[224, 224\\]"):
        shards.extract_shard(2, 3, paths, parts, TINY)
    with pytest.raises(PipelineError, match="part-0001-of-0003.json and part-0000-of-0003.json "
                                            "differ in image size"):
        shards.merge_parts(parts, tmp_path / "f.npy")
    write_json(record, {**part, "fingerprint": "another"})
    with pytest.raises(PipelineError, match="differ in model: another and lite0 random seed=0"):
        shards.merge_parts(parts, tmp_path / "f.npy")
    record.unlink()
    with pytest.raises(PipelineError, match="1 of 3 parts not finished .* first part-0001-of-0003 "
                                            "\\(run --shard 1/3\\)"):
        shards.merge_parts(parts, tmp_path / "f.npy")
    # --overwrite redoes a part made with other settings
    summary = shards.extract_shard(0, 3, paths, parts, other_seed, overwrite=True, log=lambda line: None)
    assert summary["computed"] == 3
    assert read_json(parts / "part-0000-of-0003.json")["fingerprint"].startswith("lite0 random seed=1")
    assert not list(tmp_path.glob("f.*"))            # nothing half-written by the failed merges
    with pytest.raises(PipelineError, match="no finished part files"):
        shards.merge_parts(tmp_path / "empty", tmp_path / "f.npy")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_scheduler_that_does_not_answer_is_an_error_within_the_timeout():
    pytest.importorskip("distributed")
    import time
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(PipelineError, match=f"no Dask scheduler answered at {address} within 2 s"):
        with shards.dask_client(address, connect_timeout=2):
            pass
    assert time.monotonic() - start < 10
    for bad in ["localhost:8786", "local:0", "local:two"]:
        with pytest.raises(PipelineError, match="--dask"):
            with shards.dask_client(bad):
                pass


def test_scheduler_without_workers_is_an_error_within_the_timeout():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=None,
                                  processes=False, protocol="tcp") as cluster:
        with pytest.raises(PipelineError, match="has no worker after 1 s"):
            with shards.dask_client(cluster.scheduler_address, worker_timeout=1):
                pass


def test_extract_features_cli_parts_merge_and_karpathy_image_paths(tiny, tmp_path, capsys,
                                                                   monkeypatch):
    """prepare_text.py --karpathy-json, then extract_features.py --shard 0/2, 1/2 and
    --merge-parts over COCO's two folders; and the options' one-line errors."""
    import extract_features
    import prepare_text
    root = tmp_path / "coco"
    for image in json.loads(FIXTURE.read_text())["images"]:     # one colour each is enough here
        path = root / image["filepath"] / image["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (90, 120, 150)).save(path)
    assert run_cli(prepare_text.main, ["--karpathy-json", str(FIXTURE), "--output-dir",
                                       str(tmp_path / "data"), "--min-count", "1"],
                   tensorflow=False) == 0
    common = ["--images", str(root), "--image-paths", str(tmp_path / "data" / "image_paths.json"),
              "--backbone", "lite0", "--weights", "none", "--runtime", "tf", "--spatial", "yes",
              "--parts-dir", str(tmp_path / "parts"), "--output", str(tmp_path / "f.npy")]
    for i in range(2):
        assert run_cli(extract_features.main, [*common, "--shard", f"{i}/2"]) == 0
    out = capsys.readouterr().out
    assert "summary: part-0001-of-0002: 3 images" in out
    assert f"--merge-parts {tmp_path / 'parts'} --output {tmp_path / 'f.npy'}" in out
    assert run_cli(extract_features.main, ["--merge-parts", str(tmp_path / "parts"), "--output",
                                           str(tmp_path / "f.pkl"), "--spatial",
                                           str(tmp_path / "g.h5")]) == 0
    assert "summary: 6 lite0 features (6 wide) from 2 parts" in capsys.readouterr().out
    ids = (tmp_path / "f.ids.txt").read_text().split()
    assert ids == sorted(read_json(tmp_path / "data" / "image_paths.json"))
    assert ids[0].startswith("COCO_train2014") and ids[-1].startswith("COCO_val2014")
    assert list(load_features(tmp_path / "f.pkl")) == ids and np.load(tmp_path / "f.npy").shape == (6, 6)
    with SpatialFeatures(tmp_path / "g.h5") as grids:
        assert grids.ids == ids
    # one line each; nothing merged
    monkeypatch.setattr(shards, "CONNECT_TIMEOUT", 2)
    address = f"tcp://127.0.0.1:{free_port()}"
    for argv, message in [([*common, "--shard", "0/3"], "part-0000-of-0002.json is one of 2 parts"),
                          ([*common, "--shard", "2/2"], "--shard takes I/N"),
                          (["--merge-parts", str(tmp_path / "none"), "--output", str(tmp_path / "h.npy")],
                           "no finished part files"),
                          ([*common[:-2], "--output", str(tmp_path / "h.npy"), "--dask", address],
                           "image file missing: .*COCO_val2014_000000000073.jpg"),
                          ([*common[2:-2], "--output", str(tmp_path / "h.npy"), "--dask", address],
                           "--images is required"),
                          (["--images", str(root / "train2014"), "--output", str(tmp_path / "h.npy"),
                            "--dask", address], f"no Dask scheduler answered at {address} within 2 s")]:
        if "--dask" in argv and "--image-paths" in argv:
            (root / "val2014" / "COCO_val2014_000000000073.jpg").unlink(missing_ok=True)
        assert run_cli(extract_features.main, argv) == 1
        err = capsys.readouterr().err.strip().splitlines()     # a note may come first
        assert err[-1].startswith("error: ") and re.search(message, err[-1]), (argv, err)
        assert not any(line.startswith("error") for line in err[:-1])
    assert not (tmp_path / "h.npy").exists()
    with pytest.raises(SystemExit):
        extract_features.main([*common, "--shard", "0/2", "--dask", "local:2"])
    assert "not allowed with argument" in capsys.readouterr().err


KILLER = '''
import os, threading, time
from pathlib import Path
MARKER, CHECKPOINT = Path(r"{marker}"), Path(r"{checkpoint}")

def dask_setup(worker):
    """Kill this worker process once, while it runs part 0 and after its first checkpoint."""
    def watch():
        while not MARKER.exists():
            if CHECKPOINT.exists() and any(str(task.key).startswith("extract-part-0000")
                                           for task in worker.state.executing):
                MARKER.write_text(str(os.getpid()))
                os._exit(1)
            time.sleep(0.005)
    threading.Thread(target=watch, daemon=True).start()
'''


@pytest.mark.slow
def test_dask_local_cluster_with_a_killed_worker_writes_what_the_plain_command_writes(
        flickr8k_dir, tmp_path, capsys):
    """extract_features.py --dask local:2 on 9 shared images in 3 parts (Lite0, random seeded
    weights). One worker process is killed in the middle of part 0 (a worker preload, Dask's
    way to run code in every worker); the scheduler reschedules the part, which resumes from its
    checkpoint. The output equals the same command's --shard parts run one after the other here
    (exactly) and the plain command's features.pkl (float tolerance: other batch boundaries)."""
    dask = pytest.importorskip("dask")
    import extract_features
    marker, preload = tmp_path / "killed", tmp_path / "killer.py"
    preload.write_text(KILLER.format(marker=marker, checkpoint=tmp_path / "dask.parts" /
                                     "part-0000-of-0003.partial"))
    common = ["--images", str(flickr8k_dir / "Flicker8k_Dataset"), "--limit", "9", "--backbone", "lite0", "--weights",
              "none", "--seed", "3", "--batch-size", "1", "--checkpoint-every", "1",
              "--runtime", "tf"]
    with dask.config.set({"distributed.worker.preload": [str(preload)]}):
        assert run_cli(extract_features.main, [*common, "--dask", "local:2", "--shards", "3",
                                               "--output", str(tmp_path / "dask.pkl")]) == 0
    err = capsys.readouterr().err
    done = dict(re.findall(r"(part-000\d-of-0003): 3 images, .* worker (\S+)", err))
    assert marker.exists() and sorted(done) == ["part-0000-of-0003", "part-0001-of-0003",
                                                 "part-0002-of-0003"]
    assert re.search(r"part-0000-of-0003: 3 images, [12] computed, [12] resumed", err)  # redone
    assert marker.read_text() not in {p.split(":")[1] for p in done.values()}
    for process in set(done.values()):                 # one model per worker process
        assert len(re.findall(re.escape(process) + r" \(built its model\)", err)) == 1
    for i in range(3):
        assert run_cli(extract_features.main, [*common, "--shard", f"{i}/3", "--output",
                                               str(tmp_path / "here.pkl")]) == 0
    assert run_cli(extract_features.main, ["--merge-parts", str(tmp_path / "here.parts"),
                                           "--output", str(tmp_path / "here.pkl")]) == 0
    assert np.array_equal(np.load(tmp_path / "dask.npy"), np.load(tmp_path / "here.npy"))
    assert (tmp_path / "dask.ids.txt").read_text() == (tmp_path / "here.ids.txt").read_text()
    assert run_cli(extract_features.main, [*common[:10], "--runtime", "tf", "--output",
                                           str(tmp_path / "plain.pkl")]) == 0
    plain, dask_run = load_features(tmp_path / "plain.pkl"), load_features(tmp_path / "dask.pkl")
    assert list(plain) == list(dask_run) and len(plain) == 9
    assert all(np.allclose(plain[i], dask_run[i], rtol=1e-4, atol=1e-5) for i in plain)
    assert read_json(tmp_path / "dask.settings.json")["backbone"] == "lite0"


def test_grid_rows_read_per_batch_in_the_asked_order(tiny, folder, tmp_path):
    from captioning.data import grid_inputs, inputs
    run_all(folder, tmp_path / "parts")
    shards.merge_parts(tmp_path / "parts", tmp_path / "f.npy", spatial=tmp_path / "g.h5",
                       log=lambda line: None)
    rows = grid_inputs.GridRows(tmp_path / "g.h5")
    assert rows.shape == (10, 49, 4) and rows.dtype == np.float16 and len(rows) == 10
    with SpatialFeatures(tmp_path / "g.h5") as grids:
        whole = grids.rows(grids.ids, dtype=np.float16).reshape(10, 49, 4)
    for asked in ([7, 2, 2, 9], [0], list(range(10))[::-1]):
        assert np.array_equal(rows[asked], whole[asked])
    assert np.array_equal(rows[2:5], whole[2:5]) and rows[[]].shape == (0, 49, 4)
    rows.close()
    matrix, row_of_id, missing = inputs.mapped_matrix(tmp_path / "f.npy", ["img03", "nope", "img00"],
                                                      0.5, "here")
    assert isinstance(matrix, np.memmap) and row_of_id == {"img03": 3, "img00": 0}
    assert missing == ["nope"]
    found, rows, grid = read_rows(tmp_path / "f.npy", ["img03", "nope", "img00"])   # evaluation's reader
    assert found == ["img03", "img00"] and grid is None
    assert np.array_equal(rows, np.asarray(matrix)[[3, 0]])
    (tmp_path / "f.ids.txt").write_text("img00\n")
    with pytest.raises(PipelineError, match="lists 1 ids for 10 rows"):
        memmap_features(tmp_path / "f.npy")
    (tmp_path / "f.ids.txt").unlink()
    with pytest.raises(PipelineError, match="missing the id list of f.npy"):
        memmap_features(tmp_path / "f.npy")


@pytest.mark.slow
def test_training_reads_the_merged_files_per_batch(tiny, tmp_path, capsys):
    """train.py on merged parts: merge on features.npy (a memory map) trains exactly as on the
    pickle of the same parts, and attention trains on the virtual-dataset grids."""
    import extract_features
    import prepare_text
    import train
    root = tmp_path / "coco"
    rng = np.random.default_rng(1)
    for image in json.loads(FIXTURE.read_text())["images"]:   # a different image each
        path = root / image["filepath"] / image["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    data = tmp_path / "data"
    assert run_cli(prepare_text.main, ["--karpathy-json", str(FIXTURE), "--output-dir", str(data),
                                       "--min-count", "1"], tensorflow=False) == 0
    assert run_cli(extract_features.main, [
        "--images", str(root), "--image-paths", str(data / "image_paths.json"), "--backbone",
        "lite0", "--weights", "none", "--runtime", "tf", "--output", str(tmp_path / "f.pkl"),
        "--spatial", str(tmp_path / "g.h5")]) == 0
    small = ["--data-dir", str(data), "--output-dir", str(tmp_path / "models"), "--epochs", "2",
             "--embed-dim", "8", "--units", "8", "--batch-size", "4", "--verbose", "0",
             "--recipe", "tutorial"]
    for name, features in (("npy", "f.npy"), ("pkl", "f.pkl")):
        assert train.main(["--features", str(tmp_path / features), "--name", name, *small]) == 0
    history = [(tmp_path / "models" / name / "history.csv").read_text().splitlines()
               for name in ("npy", "pkl")]
    losses = [[line.split(",")[1:3] for line in h[1:]] for h in history]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    assert train.main(["--variant", "attention", "--features", str(tmp_path / "g.h5"), "--name",
                       "att", "--annotation-dim", "8", "--attention-dim", "4", *small]) == 0
    config = read_json(tmp_path / "models" / "att" / "model.json")
    assert config["grid"] == [7, 7] and config["feature_dim"] == 4


def test_every_trainer_reads_features_npy_as_a_memory_map(tmp_path):
    """inputs.pooled_rows: features.npy (+ ids.txt) gives a read-only memory map whose rows are
    the pickle's; the retrieval trainer's inputs come through it (SCST and train.py likewise)."""
    import argparse
    from captioning.data import inputs
    from captioning.data.features import load_features
    from captioning.retrieval import training as retrieval_training
    from helpers import make_tiny_run
    data_dir, _, pickle_path, ids = make_tiny_run(tmp_path)
    features = load_features(pickle_path)
    order = sorted(features, reverse=True)            # file order other than the split's
    npy = tmp_path / "features.npy"
    np.save(npy, np.stack([features[i] for i in order]).astype(np.float32))
    npy.with_suffix(".ids.txt").write_text("\n".join(order) + "\n")
    mapped, row_of_id, missing = inputs.pooled_rows(npy, ids, 0.0)
    assert isinstance(mapped, np.memmap) and not missing
    for image_id in ids[:5]:
        assert np.array_equal(mapped[row_of_id[image_id]], features[image_id])
    args = argparse.Namespace(features=npy, data_dir=data_dir, max_missing=0.0, backbone="lite0",
                              embed_dim=8, word_dim=8, margin=0.2)
    matrix, train, dev, _ = retrieval_training.prepare_inputs(args)
    assert isinstance(matrix, np.memmap) and train and dev
    row, _ = train[0]
    assert any(np.array_equal(matrix[row], features[i]) for i in ids)

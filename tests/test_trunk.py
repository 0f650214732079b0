"""Tests of captioning/data/trunk.py: the trunk file's layout, resume, refusals and row reads.

Synthetic maps only (the extraction that fills a trunk file with real Lite0 maps is tested in
tests/test_extract_features.py).
"""
import h5py
import numpy as np
import pytest

from captioning.data.rowfile import partial_path
from captioning.data.trunk import TrunkFile, TrunkSpec, TrunkWriter
from captioning.utils import PipelineError

SPEC = TrunkSpec("lite0", 224, 15, "lite0 random seed=0; resize=bilinear")
SHAPE = (3, 3, 4)


def maps(ids, flips=False):
    """{id: deterministic (3, 3, 4) map, or (2, 3, 3, 4) [plain, mirrored] with flips}."""
    out = {}
    for image_id in ids:
        plain = np.arange(36, dtype=np.float32).reshape(SHAPE) / 8 + 10 * int(image_id[-1])
        out[image_id] = np.stack([plain, plain[:, ::-1]]) if flips else plain
    return out


def test_round_trip_with_flips_and_row_reads(tmp_path):
    path = tmp_path / "trunk.h5"
    writer = TrunkWriter(path, SPEC, flips=True)
    written = maps(["img0", "img1", "img2"], flips=True)
    writer.append(written)
    assert not path.exists() and partial_path(path).exists()
    assert writer.finish() == 3
    assert path.is_file() and not partial_path(path).exists()
    with h5py.File(path) as handle:
        assert handle["trunk"].dtype == np.float16 and handle["trunk"].chunks == (1, *SHAPE)
        assert handle["trunk_flipped"].shape == (3, *SHAPE)
        assert dict(handle.attrs) | {"shape": list(handle.attrs["shape"])} == {
            "format_version": 1, "backbone": "lite0", "image_size": 224, "block": 15,
            "fingerprint": SPEC.fingerprint, "flips": True, "count": 3, "shape": [3, 3, 4]}
    with TrunkFile(path, expect=SPEC) as trunk:
        assert trunk.ids == ["img0", "img1", "img2"] and trunk.flips and trunk.shape == SHAPE
        assert trunk.spec == SPEC and len(trunk) == 3
        np.testing.assert_array_equal(trunk["img1"], written["img1"][0])   # exact in float16
        # any order, repeats, one view per id
        rows = trunk.rows(["img2", "img0", "img2", "img1"], flipped=[False, True, True, False],
                          dtype=np.float16)
        assert rows.dtype == np.float16 and rows.shape == (4, *SHAPE)
        for row, (image_id, view) in zip(rows, [("img2", 0), ("img0", 1), ("img2", 1), ("img1", 0)]):
            np.testing.assert_array_equal(row, written[image_id][view])
        np.testing.assert_array_equal(trunk.rows(["img0"], flipped=True)[0, :, ::-1],
                                      written["img0"][0])
        with pytest.raises(PipelineError, match=r"image nope not in .*trunk\.h5"):
            trunk.rows(["img0", "nope"])


def test_uncommitted_rows_are_redone_after_a_kill(tmp_path):
    path = tmp_path / "trunk.h5"
    writer = TrunkWriter(path, SPEC)
    writer.append(maps(["a1", "b2"]))
    writer.commit()
    writer.append(maps(["c3"]))          # computed, never committed: a kill lands here
    writer.close()
    resumed = TrunkWriter(path, SPEC)
    assert resumed.done == {"a1", "b2"} and resumed.rows == 2
    resumed.append(maps(["a1", "c3", "d4"]))   # a1 is done: skipped, not written twice
    assert resumed.finish() == 4
    with TrunkFile(path) as trunk:
        assert trunk.ids == ["a1", "b2", "c3", "d4"]
        np.testing.assert_array_equal(trunk["c3"], maps(["c3"])["c3"])
        with pytest.raises(PipelineError, match="has no flipped view .*--flips"):
            trunk.rows(["a1"], flipped=True)


def test_extending_a_finished_file_keeps_it_valid_until_the_rename(tmp_path):
    path = tmp_path / "trunk.h5"
    writer = TrunkWriter(path, SPEC)
    writer.append(maps(["a1"]))
    writer.finish()
    more = TrunkWriter(path, SPEC)
    assert more.done == {"a1"}
    more.append(maps(["b2"]))
    more.commit()
    with TrunkFile(path) as trunk:      # the finished file is untouched meanwhile
        assert trunk.ids == ["a1"]
    more.finish()
    with TrunkFile(path) as trunk:
        assert trunk.ids == ["a1", "b2"]


def test_a_model_of_other_settings_is_refused_in_one_line(tmp_path):
    path = tmp_path / "t.h5"
    writer = TrunkWriter(path, SPEC)
    writer.append(maps(["a1"]))
    writer.finish()
    with pytest.raises(PipelineError) as info:
        TrunkFile(path, expect=TrunkSpec("lite2", 260, 15, SPEC.fingerprint))
    assert str(info.value) == (f"trunk file {path} was made by lite0 at 224 px, block 15; "
                               "the model expects lite2 at 260 px, block 15")
    with pytest.raises(PipelineError, match=r"made by lite0 at 224 px, block 15; the model "
                                            r"expects lite0 at 224 px, block 11$"):
        TrunkFile(path, expect=("lite0", 224, 11, SPEC.fingerprint))
    with pytest.raises(PipelineError, match=r"other weights or preprocessing \(lite0 random "
                                            r"seed=0; resize=bilinear\); the model expects imagenet"):
        TrunkFile(path, expect=SPEC._replace(fingerprint="imagenet"))
    # a rerun with other settings never mixes into the file
    for spec, flips in [(SPEC._replace(block=11), False), (SPEC, True)]:
        with pytest.raises(PipelineError, match="other settings .*--overwrite"):
            TrunkWriter(path, spec, flips=flips)
    fresh = TrunkWriter(path, SPEC._replace(block=11), overwrite=True)
    assert fresh.done == set()
    with pytest.raises(PipelineError, match="do not match flips=False"):
        fresh.append(maps(["a1"], flips=True))


def test_unreadable_files_are_one_line_errors(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(PipelineError, match=r"unreadable trunk file \(.*junk\.h5"):
        TrunkFile(junk)
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle["features"] = np.zeros((1, 2))
    with pytest.raises(PipelineError, match=r"not a trunk file \(.*other\.h5: attribute"):
        TrunkFile(tmp_path / "other.h5")
    with pytest.raises(PipelineError, match="trunk file not found"):
        TrunkFile(tmp_path / "absent.h5")
    writer = TrunkWriter(tmp_path / "big.h5", SPEC)
    with pytest.raises(PipelineError, match="beyond float16's range"):
        writer.append({"a1": np.full(SHAPE, 1e6, np.float32)})

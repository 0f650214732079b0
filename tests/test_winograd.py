"""Tests of captioning/encoders/winograd.py: the transforms compute a 3x3 correlation exactly (in float64),
the OpenVINO graph equals a direct convolution up to float32 rounding for any image size and
batch, and rewrite() replaces exactly the convolutions it may and nothing else.

Tolerance for the OpenVINO graph against a float64 direct convolution: max |diff| <= 2e-5 *
max |direct| (F(4x4) measures ~1e-6 on these small cases, 1-2e-5 on VGG16-sized layers).
"""
import numpy as np
import pytest

from captioning.encoders import runtime

from captioning.encoders import winograd

needs_openvino = pytest.mark.skipif(not runtime.openvino_installed(),
                                    reason="openvino is not installed (pip install openvino)")


def direct(x, weights):
    """float64 "same" 3x3 correlation, x [N, C, H, W], weights [K, C, 3, 3] (what a CNN's
    convolution computes)."""
    n, _, h, w = x.shape
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, weights.shape[0], h, w))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,kc->nkhw", xp[:, :, i:i + h, j:j + w], weights[:, :, i, j])
    return out


def relative(actual, expected):
    return np.abs(actual - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize("tile", [2, 4])
def test_one_dimensional_transform_is_a_correlation(tile):
    bt, g, at = winograd.transforms(tile)
    d = np.array([3.0, -1.0, 4.0, 1.0, -5.0, 9.0])[:tile + 2]
    kernel = np.array([2.0, -7.0, 1.0])
    y = at @ ((g @ kernel) * (bt @ d))
    expected = np.correlate(d, kernel, mode="valid")     # tile outputs
    assert expected.shape == (tile,)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-12)


def test_weight_transform_shape_and_values():
    weights = np.zeros((2, 3, 3, 3))
    weights[1, 2, 1, 1] = 1.0                  # output 1 copies input 2: the identity kernel
    u = winograd.transform_weights(weights, tile=4)
    assert u.shape == (36, 3, 2) and u.dtype == np.float32
    g = winograd.transforms(4)[1]
    np.testing.assert_allclose(u[:, 2, 1], np.outer(g[:, 1], g[:, 1]).ravel(), rtol=1e-7)
    assert not u[:, :2].any() and not u[:, :, 0].any()


def test_only_tiles_two_and_four():
    with pytest.raises(ValueError, match="2 or 4"):
        winograd.transforms(3)


def compile_graph(build, shape):
    ov = runtime.import_openvino()
    import openvino.opset13 as opset
    parameter = opset.parameter(shape, np.float32)
    model = ov.Model([build(opset, parameter)], [parameter])
    return runtime.openvino_core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


@needs_openvino
@pytest.mark.parametrize("tile", [2, 4])
def test_graph_of_ones_counts_the_pixels_under_the_kernel(tile):
    # all-ones 5x6 image, all-ones kernel: each output = how many pixels the 3x3 window covers
    compiled = compile_graph(
        lambda opset, x: winograd.conv3x3(opset, x, np.ones((1, 1, 3, 3)), 5, 6, tile),
        [-1, 1, 5, 6])
    out = compiled(np.ones((1, 1, 5, 6), np.float32))[0]
    expected = np.array([[4, 6, 6, 6, 6, 4]] + [[6, 9, 9, 9, 9, 6]] * 3 + [[4, 6, 6, 6, 6, 4]])
    np.testing.assert_allclose(out[0, 0], expected, atol=1e-5)


@needs_openvino
@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("height, width", [(7, 9), (8, 8), (14, 13)])
def test_openvino_graph_equals_direct_convolution(tile, height, width):
    rng = np.random.default_rng(height * width)
    weights = rng.normal(size=(5, 3, 3, 3))
    compiled = compile_graph(
        lambda opset, x: winograd.conv3x3(opset, x, weights, height, width, tile),
        [-1, 3, height, width])
    for batch in (1, 3):                        # one compiled model, any batch size
        x = rng.normal(size=(batch, 3, height, width)).astype(np.float32)
        out = compiled(x)[0]
        assert out.shape == (batch, 5, height, width)
        assert relative(out, direct(x, weights)) <= 2e-5


def conv(opset, x, weights, stride=1, pad=1):
    return opset.convolution(x, opset.constant(weights.astype(np.float32)), [stride, stride],
                             [pad, pad], [pad, pad], [1, 1])


@needs_openvino
def test_rewrite_replaces_only_eligible_convolutions_and_keeps_the_output():
    ov = runtime.import_openvino()
    import openvino.opset13 as opset
    rng = np.random.default_rng(0)
    eligible = rng.normal(0, 0.05, (128, 64, 3, 3))    # 3x3, stride 1, same, 64 -> 128
    strided = rng.normal(0, 0.05, (128, 128, 3, 3))    # stride 2: stays direct
    narrow = rng.normal(0, 0.05, (64, 128, 3, 3))      # 64 outputs: stays direct
    x = opset.parameter([-1, 64, 12, 12], np.float32)
    y = opset.relu(conv(opset, x, eligible))
    y = conv(opset, conv(opset, y, strided, stride=2), narrow)
    model = ov.Model([y], [x])
    batch = rng.normal(size=(2, 64, 12, 12)).astype(np.float32)
    core = runtime.openvino_core()
    before = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(batch)[0]
    assert winograd.rewrite(model, opset) == 1
    convolutions = [op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    assert sorted(op.input_value(1).get_partial_shape().to_shape()[0] for op in convolutions) \
        == [64, 128]                                   # the strided and the narrow one remain
    after = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(batch)[0]
    assert after.shape == before.shape == (2, 64, 6, 6)
    assert relative(after, before) <= 2e-5
    assert winograd.rewrite(model, opset) == 0         # nothing eligible is left


@needs_openvino
def test_rewrite_takes_in_bias_and_relu_and_consecutive_convolutions_stay_channels_last():
    ov = runtime.import_openvino()
    import openvino.opset13 as opset
    rng = np.random.default_rng(1)
    first = rng.normal(0, 0.05, (128, 64, 3, 3))
    second = rng.normal(0, 0.05, (128, 128, 3, 3))
    bias = rng.normal(0, 0.5, (1, 128, 1, 1)).astype(np.float32)   # moves ~half under 0
    x = opset.parameter([-1, 64, 8, 8], np.float32)
    y = opset.relu(opset.add(conv(opset, x, first), opset.constant(bias)))
    y = conv(opset, y, second)                    # no bias or ReLU after this one
    model = ov.Model([y], [x])
    batch = rng.normal(size=(2, 64, 8, 8)).astype(np.float32)
    core = runtime.openvino_core()
    before = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(batch)[0]
    assert winograd.rewrite(model, opset) == 2
    types = [op.get_type_name() for op in model.get_ordered_ops()]
    assert "Convolution" not in types
    # the bias and ReLU now act on the products' channels-last output, [tiles, 128]
    adds = [op for op in model.get_ordered_ops() if op.get_type_name() == "Add"]
    assert [list(op.get_output_partial_shape(0))[-1].get_length() for op in adds] == [128]
    assert types.count("Relu") == 1
    # one transpose into channels-last at the start and one back at the end; none between
    perms = [list(op.input_value(1).get_node().get_data()) for op in model.get_ordered_ops()
             if op.get_type_name() == "Transpose"
             and op.get_output_partial_shape(0).rank.get_length() == 4]   # not the 6-d ones
    assert perms == [[0, 2, 3, 1], [0, 3, 1, 2]]
    after = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(batch)[0]
    assert after.shape == before.shape == (2, 128, 8, 8)
    assert relative(after, before) <= 2e-5

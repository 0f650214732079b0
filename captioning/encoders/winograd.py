"""Winograd convolution for OpenVINO: a 3x3 stride-1 convolution rewritten as matrix products
that do 4x fewer multiplications (Lavin & Gray, "Fast Algorithms for Convolutional
Neural Networks", 2016).

Why our own: OpenVINO's CPU plugin (oneDNN 3) runs every f32 convolution directly and no
longer has Winograd kernels; on a CPU where that direct convolution is already at the cores'
peak (AVX-512), doing fewer multiplications is the only exact way to be faster. The rewrite is
made of plain OpenVINO ops (StridedSlice, Concat, MatMul, Transpose, Reshape), so OpenVINO's
own matrix kernels do the work.

F(m x m, 3 x 3), one output tile of m x m pixels from an input tile of a = m + 2:
    Y = A^T [ (G g G^T) (.) (B^T d B) ] A
  d: input tile (a x a) per channel; g: 3x3 kernel; (.) elementwise in the transformed
  domain, where the sum over input channels becomes a^2 independent matrix products
  [tiles, C] x [C, K]. Multiplications per output pixel and channel pair: a^2 / m^2 instead
  of 9 (F(4x4): 36/16 = 2.25, 4x fewer; F(2x2): 16/4 = 4, 2.25x fewer).

Numbers: the transforms are exact in real arithmetic; in float32 they add rounding, F(4x4) more
than F(2x2) (tests/test_winograd.py bounds it: 2e-5 of the direct convolution's largest value).
The weight transform G g G^T is computed in float64 and rounded once.

rewrite(model, opset) replaces, in a converted model (NCHW, as ov.convert_model writes it),
each Convolution that is 3x3, stride 1, dilation 1, padded 1 on every side ("same"), with
constant weights and at least MIN_IN_CHANNELS inputs and MIN_OUT_CHANNELS outputs; other
convolutions (Lite0's are all depthwise, strided or 1x1) are left as they are. The bias Add
and ReLU right after a rewritten convolution are taken into its graph (they act on the last
product's output), and between two rewritten convolutions the activations stay channels-last
(the transposes out of and back into NCHW cancel), so no pass of its own copies them.

Which layers gain: those with many channels on small images; on VGG16's 224x224 first block the
transformed tiles do not stay in cache and the rewrite is slower, hence MIN_OUT_CHANNELS
(benchmarks/bench_runtime.py measures the whole network).
"""
import numpy as np

# -- settings ---------------------------------------------------------------------------------
VERSION = 2              # of the graph rewrite() builds; part of runtime's cache key
TILE = 4                 # m: output tile side; 4 -> F(4x4, 3x3), 2 -> F(2x2, 3x3)
MIN_IN_CHANNELS = 64     # VGG16's first layer (3 inputs): little to save
MIN_OUT_CHANNELS = 128   # VGG16's block1 (64 outputs at 224x224) is slower rewritten, see above


def transforms(tile=TILE):
    """(B^T, G, A^T) in float64 for F(tile x tile, 3x3): interpolation points 0, +-1 (tile 2)
    or 0, +-1, +-2 (tile 4), and infinity (Lavin & Gray 2016, section 4)."""
    if tile == 2:
        bt = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
        g = [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]
        at = [[1, 1, 1, 0], [0, 1, -1, -1]]
    elif tile == 4:
        bt = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
              [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
        g = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
             [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
        at = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
    else:
        raise ValueError(f"Winograd tile must be 2 or 4, not {tile}")
    return np.array(bt, np.float64), np.array(g, np.float64), np.array(at, np.float64)


def transform_weights(weights, tile=TILE):
    """OpenVINO convolution weights [K, C, 3, 3] -> U [a*a, C, K] float32, U = G g G^T per
    (output, input) channel pair, computed in float64 and rounded once."""
    _, g, _ = transforms(tile)
    k, c = weights.shape[:2]
    u = np.einsum("xi,kcij,yj->xyck", g, np.asarray(weights, np.float64), g)
    return np.ascontiguousarray(u.reshape(-1, c, k), dtype=np.float32)


def constant(opset, value, dtype=np.float32):
    return opset.constant(np.asarray(value, dtype))


def sliced(opset, node, axis, start, stop, rank):
    """node[..., start:stop, ...] on one axis; every other axis whole (any batch size)."""
    begin, end, strides = [0] * rank, [0] * rank, [1] * rank
    begin[axis], end[axis] = start, stop
    mask = [0 if i == axis else 1 for i in range(rank)]
    return opset.strided_slice(node, constant(opset, begin, np.int64),
                               constant(opset, end, np.int64),
                               constant(opset, strides, np.int64), mask, mask)


def tiles(opset, node, axis, count, tile, rank):
    """The a = tile + 2 overlapping windows along `axis`, stacked on a new axis after it:
    [..., L, ...] -> [..., count, a, ...], window t = [t * tile, t * tile + a), L >= (count + 1)
    * tile. Made of two contiguous slices and reshapes, not one stepped slice per position
    (why: OpenVINO runs slices by its reference code, and fewer of them copy less):
    positions 0..tile-1 of every window from
    [0, count * tile), positions tile, tile+1 from [tile, count * tile + tile)."""
    def windows(start, keep):
        part = sliced(opset, node, axis, start, start + count * tile, rank)
        shape = [-1] + [dim.get_length() for dim in list(part.get_output_partial_shape(0))[1:]]
        shape[axis:axis + 1] = [count, tile]   # axis 0 (the batch) may be dynamic, no other
        part = opset.reshape(part, constant(opset, shape, np.int64), False)
        return part if keep == tile else sliced(opset, part, axis + 1, 0, keep, rank + 1)
    return opset.concat([windows(0, tile), windows(tile, 2)], axis + 1)


def channels_last(opset, x):
    """x [N, C, H, W] as [N, H, W, C]: the input of the NCHW transpose that made x when there
    is one (the previous rewritten convolution's output), so the two transposes cancel."""
    node = x.get_node()
    if node.get_type_name() == "Transpose":
        perm = node.input_value(1).get_node()
        if perm.get_type_name() == "Constant" and list(perm.get_data()) == [0, 3, 1, 2]:
            return node.input_value(0)
    return opset.transpose(x, constant(opset, [0, 2, 3, 1], np.int64))


def conv3x3(opset, x, weights, height, width, tile=TILE, bias=None, relu=False):
    """Graph for conv(x, weights), "same" padding, stride 1, x [N, C, H, W] (N may be dynamic),
    weights [K, C, 3, 3] numpy -> [N, K, H, W]. Steps (P = N * Th * Tw tiles): channels last
    (why: the windows are then cut along outer axes and each transform is one matrix product
    over whole rows, much faster than cutting NCHW's innermost axis) -> pad to whole
    tiles -> windows along H, B^T on them -> windows along W, B^T on them -> [a*a, P, C]
    -> times U [a*a, C, K] -> A^T along H, then along W -> + bias [K], ReLU (when given: they
    run on the last product's output, not as passes of their own) -> back to [N, K, H, W]."""
    x = x.output(0) if hasattr(x, "outputs") else x                 # a node's one output
    bt, _, at = transforms(tile)
    a = tile + 2
    k, c = weights.shape[:2]
    th, tw = -(-height // tile), -(-width // tile)
    hp, wp = (th + 1) * tile, (tw + 1) * tile   # whole tiles plus one, for tiles()' 2nd slice
    i64 = np.int64
    d = channels_last(opset, x)                                     # N H W C
    d = opset.pad(d, constant(opset, [0, 1, 1, 0], i64),
                  constant(opset, [0, hp - height - 1, wp - width - 1, 0], i64), "constant")
    d = tiles(opset, d, 1, th, tile, 4)                              # N Th a Wp C
    d = opset.reshape(d, constant(opset, [-1, a, wp * c], i64), False)
    d = opset.matmul(constant(opset, bt), d, False, False)          # B^T d along H
    d = opset.reshape(d, constant(opset, [-1, wp, c], i64), False)    # N*Th*a Wp C
    d = tiles(opset, d, 1, tw, tile, 3)                              # N*Th*a Tw a C
    d = opset.matmul(constant(opset, bt), d, False, False)          # B^T along W: B^T d B
    d = opset.reshape(d, constant(opset, [-1, th, a, tw, a, c], i64), False)
    d = opset.transpose(d, constant(opset, [2, 4, 0, 1, 3, 5], i64))  # a a N Th Tw C
    d = opset.reshape(d, constant(opset, [a * a, -1, c], i64), False)
    m = opset.matmul(d, constant(opset, transform_weights(weights, tile)), False, False)
    y = opset.reshape(m, constant(opset, [a, -1], i64), False)       # a(h) | a(w) P K
    y = opset.matmul(constant(opset, at), y, False, False)          # m(h) | a(w) P K
    y = opset.reshape(y, constant(opset, [tile, a, -1], i64), False)
    y = opset.matmul(constant(opset, at), y, False, False)          # m(h) m(w) P K, batched
    if bias is not None:
        y = opset.add(opset.reshape(y, constant(opset, [-1, k], i64), False),
                      constant(opset, np.reshape(bias, k)))
    if relu:
        y = opset.relu(y)
    y = opset.reshape(y, constant(opset, [tile, tile, -1, th, tw, k], i64), False)
    y = opset.transpose(y, constant(opset, [2, 3, 0, 4, 1, 5], i64))  # N Th m Tw m K
    y = opset.reshape(y, constant(opset, [-1, th * tile, tw * tile, k], i64), False)
    if th * tile != height:
        y = sliced(opset, y, 1, 0, height, 4)
    if tw * tile != width:
        y = sliced(opset, y, 2, 0, width, 4)
    return opset.transpose(y, constant(opset, [0, 3, 1, 2], i64))    # N K H W


def eligible(node):
    """True for a Convolution this module can replace (see the module docstring)."""
    if node.get_type_name() != "Convolution":
        return False
    attrs = node.get_attributes()
    weights = node.input_value(1).get_node()
    shape = node.input_value(0).get_partial_shape()
    if weights.get_type_name() != "Constant" or shape.rank.is_dynamic or len(shape) != 4:
        return False
    k, c, kh, kw = weights.get_output_shape(0)
    return (list(attrs["strides"]) == [1, 1] and list(attrs["dilations"]) == [1, 1]
            and list(attrs["pads_begin"]) == [1, 1] and list(attrs["pads_end"]) == [1, 1]
            and (kh, kw) == (3, 3) and shape[2].is_static and shape[3].is_static
            and c >= MIN_IN_CHANNELS and k >= MIN_OUT_CHANNELS
            and node.get_output_element_type(0).get_type_name() == "f32")


def only_user(node):
    """The one node reading `node`'s only output, else None."""
    targets = list(node.output(0).get_target_inputs()) if len(node.outputs()) == 1 else []
    return targets[0].get_node() if len(targets) == 1 else None


def bias_of(node, channels):
    """The [K] values when `node` is Add(x, constant of K channels in NCHW), else None."""
    if node is None or node.get_type_name() != "Add":
        return None
    other = node.input_value(1).get_node()
    if other.get_type_name() != "Constant":
        return None
    value = other.get_data()
    return value.reshape(channels) if list(value.shape) in ([1, channels, 1, 1],
                                                            [channels, 1, 1]) else None


def rewrite(model, opset, tile=TILE):
    """Replace every eligible convolution of `model` (an ov.Model, changed in place) with its
    Winograd graph, taking in the bias Add and ReLU that follow it; returns how many
    convolutions were replaced."""
    replaced = 0
    for node in model.get_ordered_ops():
        if not eligible(node):
            continue
        shape = node.input_value(0).get_partial_shape()
        weights = node.input_value(1).get_node().get_data()
        last = node                   # the last node the Winograd graph stands for
        bias = bias_of(only_user(node), weights.shape[0])
        if bias is not None:
            last = only_user(node)
        follower = only_user(last)
        relu = follower is not None and follower.get_type_name() == "Relu"
        if relu:
            last = follower
        new = conv3x3(opset, node.input_value(0), weights, shape[2].get_length(),
                      shape[3].get_length(), tile, bias, relu)
        for target in list(last.output(0).get_target_inputs()):
            target.replace_source_output(new.output(0))
        replaced += 1
    if replaced:
        model.validate_nodes_and_infer_types()
    return replaced

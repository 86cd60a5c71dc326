"""Gradient rules for convolution, pooling and batch normalisation (N-d, NCHW layout).

Conv:     dX = ConvTranspose(dY, W) with output_padding restoring the input size;
          dW = channels-first im2col (one Slice per kernel tap) and one Gemm for small ungrouped kernels, else a Conv
          that treats input channels as the batch and the batch as channels (groups fold into the
          channel axis), so it needs only standard ops and handles groups > 1.
MaxPool:  windows that tile the input (stride == kernel, no padding) find each window's first
          maximum with Reshape/Transpose/ArgMax and scatter back with MaxUnpool, first-max
          tie-breaking like PyTorch; other windows use the forward MaxPool's Indices output and
          ScatterElements (with reduction="add", opset >= 16, when windows overlap).
AveragePool: dX = ConvTranspose of dY with a constant 1/count kernel per channel.
BatchNormalization: inference form with frozen running statistics (training mode: batchnorm_training).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from aggregator.compiler.batchnorm_training import training_batchnorm_grad
from aggregator.compiler.grad_context import GradContext, node_attrs, rule, spatial_attrs


def _out_padding(in_size, out_size, kernel, stride, dilation, pad_begin, pad_end):
    covered = (out_size - 1) * stride + (kernel - 1) * dilation + 1 - pad_begin - pad_end
    return in_size - covered


def _conv_transpose(ctx, node, g, w, x_shape, y_shape, geo, group):
    rank = len(x_shape) - 2
    out_pad = [
        _out_padding(x_shape[2 + i], y_shape[2 + i], geo["kernel"][i], geo["strides"][i], geo["dilations"][i],
                     geo["pads"][i], geo["pads"][rank + i])
        for i in range(rank)
    ]
    attrs = dict(strides=geo["strides"], pads=geo["pads"], dilations=geo["dilations"], group=group)
    if any(out_pad):
        attrs["output_padding"] = out_pad
    return ctx.em.node("ConvTranspose", [g, w], hint="d_conv_in", **attrs)


def _swap01(ctx, name: str, shape: tuple) -> str:
    """Swap the first two axes; a Reshape when one of them has size 1 (no data movement)."""
    rank = len(shape)
    if shape[1] == 1:
        return ctx.em.reshape(name, [1, -1] + list(shape[2:]))
    if shape[0] == 1 and all(d is not None for d in shape[1:]):
        return ctx.em.reshape(name, [shape[1], 1] + list(shape[2:]))
    return ctx.em.node("Transpose", [name], perm=[1, 0] + list(range(2, rank)))


# Small kernels (<= 4x4 taps) get the weight gradient from an explicit im2col and one Gemm, which
# onnxruntime runs ~2x faster than a Conv whose "kernel" is the whole output gradient.
IM2COL_MAX_KERNEL = 16


def _conv_weight_grad_im2col(ctx, x, g, x_shape, y_shape, w_shape, geo):
    """dW[m, (c, k)] = sum over (n, o) of dY[m, (n, o)] * cols[(c, k), (n, o)]: one Gemm over the batch.

    cols is built channels-first: x is transposed once to [C, N, *S] (K times smaller than cols), each
    kernel tap is a strided Slice of it, and the taps are concatenated to [C, K, N, *O] = [C*K, N*O].
    dY is transposed to [M, N*O]. The product is dW itself in its [M, C*K] layout. A per-image batched
    MatMul would instead materialise an [N, C*K, M] tensor to sum over the batch: 300 MB for each
    512-channel 3x3 layer of resnet18 at 1x1 resolution, the bulk of that step's memory and time.
    """
    em = ctx.em
    rank = len(x_shape) - 2
    channels, m_out = x_shape[1], w_shape[0]
    kernel, pooled = list(w_shape[2:]), list(y_shape[2:])
    taps = int(np.prod(kernel))
    pads = geo["pads"]
    source = _swap01(ctx, x, x_shape)  # [C, N, *S]
    if any(pads):
        source = em.node("Pad", [source, em.ints([0, 0] + pads[:rank] + [0, 0] + pads[rank:])], mode="constant")
    patches = []
    for offset in np.ndindex(*kernel):
        starts = [o * d for o, d in zip(offset, geo["dilations"], strict=True)]
        ends = [s0 + (p - 1) * st + 1 for s0, p, st in zip(starts, pooled, geo["strides"], strict=True)]
        if starts == [0] * rank and ends == list(x_shape[2:]) and all(st == 1 for st in geo["strides"]) \
                and not any(pads):
            patches.append(em.unsqueeze(source, [1]))  # a 1x1 kernel over the whole input: no Slice
            continue
        inputs = [source, em.ints(starts), em.ints(ends), em.ints(range(2, 2 + rank))]
        if any(st != 1 for st in geo["strides"]):
            inputs.append(em.ints(geo["strides"]))
        patches.append(em.unsqueeze(em.node("Slice", inputs), [1]))
    cols = em.node("Concat", patches, axis=1) if len(patches) > 1 else patches[0]  # [C, K, N, *O]
    cols = em.reshape(cols, [channels * taps, -1])
    g_t = em.reshape(_swap01(ctx, g, y_shape), [m_out, -1])  # [M, N*O]
    d_w = em.node("Gemm", [g_t, cols], transB=1, hint="d_conv_w")
    em.gemm_shapes[d_w] = (m_out, channels * taps)
    return em.reshape(d_w, list(w_shape))


def _conv_weight_grad_transposed(ctx, x, g, x_shape, y_shape, w_shape, geo, group):
    """dW as a Conv that treats input channels as the batch and the batch as channels; groups fold into
    the channel axis, so this handles any group count and kernel size."""
    em = ctx.em
    rank = len(x_shape) - 2
    c_in, m_out = x_shape[1], w_shape[0]
    cg = c_in // group
    if group == 1:
        xt = _swap01(ctx, x, x_shape)  # [C, N, *S]
    else:  # [N, g*Cg, S] -> [Cg, g*N, S], channel blocks ordered by group
        xg = em.reshape(x, [0, group, cg] + list(x_shape[2:]))
        xg = em.node("Transpose", [xg], perm=[2, 1, 0] + list(range(3, 3 + rank)))
        xt = em.reshape(xg, [cg, -1] + list(x_shape[2:]))
    gt = _swap01(ctx, g, y_shape)  # [M, N, *So]
    # out[c, m, k] = sum_n sum_o X[n, c, o*stride + k*dilation - pad] * dY[n, m, o]
    r = em.node("Conv", [xt, gt], hint="d_conv_w", strides=geo["dilations"], dilations=geo["strides"],
                pads=geo["pads"], group=group)  # [Cg, M, K']
    full = [None] * rank
    for i in range(rank):
        size = x_shape[2 + i] + geo["pads"][i] + geo["pads"][rank + i]
        full[i] = (size - ((y_shape[2 + i] - 1) * geo["strides"][i] + 1)) // geo["dilations"][i] + 1
    gw = _swap01(ctx, r, (cg, m_out, *full))
    if any(f != k for f, k in zip(full, w_shape[2:], strict=True)):
        gw = em.node("Slice", [gw, em.ints([0] * rank), em.ints(list(w_shape[2:])), em.ints(range(2, 2 + rank))])
    return gw


@rule("Conv")
def conv_grad(ctx: GradContext, node, grads):
    x, w = node.input[0], node.input[1]
    b = node.input[2] if len(node.input) > 2 else ""
    y, g = node.output[0], grads[0]
    em = ctx.em
    x_shape = ctx.static_shape(node, x)
    y_shape = ctx.static_shape(node, y)
    w_shape = ctx.static_shape(node, w, skip_batch=False)
    rank = len(x_shape) - 2
    geo = spatial_attrs(ctx, node, rank, w_shape[2:])
    group = int(geo["attrs"].get("group", 1))
    gx = gw = gb = None
    if ctx.needs(x):
        gx = _conv_transpose(ctx, node, g, w, x_shape, y_shape, geo, group)
    if ctx.needs(w):
        if group == 1 and int(np.prod(w_shape[2:])) <= IM2COL_MAX_KERNEL:
            gw = _conv_weight_grad_im2col(ctx, x, g, x_shape, y_shape, w_shape, geo)
        else:
            gw = _conv_weight_grad_transposed(ctx, x, g, x_shape, y_shape, w_shape, geo, group)
    if b and ctx.needs(b):
        gb = em.reduce("ReduceSum", g, [0] + list(range(2, 2 + rank)), keepdims=False)
    return [gx, gw, gb][: len(node.input)]


def _window_argmax_indices(ctx: GradContext, x: str, x_shape: tuple, y_shape: tuple, kernel: list) -> str:
    """Flat indices into ``x`` of each window's first maximum, for windows that tile x (stride == kernel).

    Reshape x to [N, C, O1, k1, O2, k2, ...], move the window axes last, ArgMax (first maximum, as
    PyTorch and onnxruntime's MaxPool pick), then turn (n, c, o, window position) into a flat index.
    onnxruntime's own MaxPool Indices output costs ~15x a plain MaxPool, this about 4x.
    """
    em = ctx.em
    rank = len(kernel)
    spatial, pooled = list(x_shape[2:]), list(y_shape[2:])
    channels = x_shape[1]
    covered = [o * k for o, k in zip(pooled, kernel, strict=True)]
    if covered != spatial:  # floor mode drops the ragged edge
        x = em.node("Slice", [x, em.ints([0] * rank), em.ints(covered), em.ints(range(2, 2 + rank))])
    split = [0, channels]
    for o, k in zip(pooled, kernel, strict=True):
        split += [o, k]
    windows = em.reshape(x, split)
    perm = [0, 1] + [2 + 2 * i for i in range(rank)] + [3 + 2 * i for i in range(rank)]
    windows = em.node("Transpose", [windows], perm=perm)
    windows = em.reshape(windows, [0, channels] + pooled + [int(np.prod(kernel))])
    position = em.node("ArgMax", [windows], axis=-1, keepdims=0, select_last_index=0)
    # flat index = n*C*prod(S) + c*prod(S) + sum_i (o_i*k_i + a_i) * stride_i, strides of x's layout.
    # The window position p = sum_i a_i * P_i (P_i = prod(k[i+1:])) maps to its offset in x as
    # p + sum_{i<rank-1} (p // P_i) * (stride_i - k_{i+1} * stride_{i+1}): integer arithmetic, because
    # onnxruntime's Gather from a small table is ~10x slower than Div/Mul/Add.
    strides = [int(np.prod(spatial[i + 1:])) for i in range(rank)]
    index = position
    for i in range(rank - 1):
        block = int(np.prod(kernel[i + 1:]))
        jump = strides[i] - kernel[i + 1] * strides[i + 1]
        row = em.node("Div", [position, em.const(np.asarray(block, dtype=np.int64))])
        index = em.add(index, em.mul(row, em.const(np.asarray(jump, dtype=np.int64))))
    base = np.zeros([channels] + pooled, dtype=np.int64)
    base += (np.arange(channels) * int(np.prod(spatial))).reshape([channels] + [1] * rank)
    for i in range(rank):
        shape = [1] * (rank + 1)
        shape[1 + i] = pooled[i]
        base += (np.arange(pooled[i]) * kernel[i] * strides[i]).reshape(shape)
    index = em.add(index, em.const(base, hint="window_base"))
    batch = em.node("Gather", [em.node("Shape", [index]), em.const(np.asarray(0, dtype=np.int64))], axis=0)
    one = em.const(np.asarray(1, dtype=np.int64))
    image = em.node("Range", [em.const(np.asarray(0, dtype=np.int64)), batch, one])
    image = em.mul(image, em.const(np.asarray(channels * int(np.prod(spatial)), dtype=np.int64)))
    return em.add(index, em.reshape(image, [-1] + [1] * (rank + 1)))


@rule("MaxPool")
def max_pool_grad(ctx: GradContext, node, grads):
    x, y = node.input[0], node.output[0]
    em = ctx.em
    x_shape = ctx.static_shape(node, x)
    y_shape = ctx.static_shape(node, y)
    rank = len(x_shape) - 2
    attrs = node_attrs(node)
    geo = spatial_attrs(ctx, node, rank, attrs["kernel_shape"])
    if int(attrs.get("storage_order", 0)) != 0:
        raise ctx.unsupported(node, "storage_order=1")
    g = grads[0]
    plain = not any(geo["pads"]) and all(d == 1 for d in geo["dilations"]) and not int(attrs.get("ceil_mode", 0))
    if plain and geo["strides"] == geo["kernel"] and len(node.output) < 2:
        indices = _window_argmax_indices(ctx, x, x_shape, y_shape, geo["kernel"])
        return [em.node("MaxUnpool", [g, indices, em.node("Shape", [x])], hint="d_maxpool",
                        kernel_shape=geo["kernel"], strides=geo["strides"])]
    if len(node.output) > 1 and node.output[1]:
        indices = node.output[1]
    else:  # ask the forward MaxPool for its argmax indices
        indices = em.fresh(f"{y}_indices")
        rewritten = onnx.NodeProto()
        rewritten.CopyFrom(node)
        del rewritten.output[:]
        rewritten.output.extend([y, indices])
        em.forward_rewrites[y] = rewritten
    extent = [(k - 1) * d + 1 for k, d in zip(geo["kernel"], geo["dilations"], strict=True)]
    overlapping = any(e > s for e, s in zip(extent, geo["strides"], strict=True))
    if overlapping and ctx.opset < 16:
        raise ctx.unsupported(
            node, "overlapping windows below opset 16 (ScatterElements reduction='add' needs opset 16)"
        )
    # Scatter into a flat zero tensor: indices are unique when windows do not overlap, else summed.
    zeros = em.node("ConstantOfShape", [em.reshape(em.node("Size", [x]), [1])],
                    value=helper.make_tensor("zero", em.onnx_dtype, [1], [0.0]))
    scatter_attrs = {"axis": 0, "reduction": "add"} if overlapping else {"axis": 0}
    flat = em.node("ScatterElements", [zeros, em.reshape(indices, [-1]), em.reshape(g, [-1])], **scatter_attrs)
    return [em.reshape(flat, [-1] + list(x_shape[1:]))]


@rule("AveragePool")
def average_pool_grad(ctx: GradContext, node, grads):
    x, y = node.input[0], node.output[0]
    em = ctx.em
    x_shape = ctx.static_shape(node, x)
    y_shape = ctx.static_shape(node, y)
    rank = len(x_shape) - 2
    attrs = node_attrs(node)
    geo = spatial_attrs(ctx, node, rank, attrs["kernel_shape"])
    if int(attrs.get("ceil_mode", 0)):
        raise ctx.unsupported(node, "ceil_mode=1")
    if any(d != 1 for d in geo["dilations"]):
        raise ctx.unsupported(node, "dilations other than 1")
    channels = x_shape[1]
    g = grads[0]
    window = float(np.prod(geo["kernel"]))
    if int(attrs.get("count_include_pad", 0)) or not any(geo["pads"]):
        kernel = np.full((channels, 1, *geo["kernel"]), 1.0 / window, dtype=em.dtype)
    else:  # border windows average over fewer elements: divide by each window's own count
        counts = np.ones((1,), dtype=np.float64)
        for i in range(rank):
            size, k, s = x_shape[2 + i], geo["kernel"][i], geo["strides"][i]
            start = np.arange(y_shape[2 + i]) * s - geo["pads"][i]
            axis_count = np.minimum(start + k, size) - np.maximum(start, 0)
            counts = np.multiply.outer(counts, axis_count)
        counts = counts.reshape((1, 1, *y_shape[2:]))
        g = em.mul(g, em.const((1.0 / counts).astype(em.dtype), hint="inv_count"))
        kernel = np.ones((channels, 1, *geo["kernel"]), dtype=em.dtype)
    w = em.const(kernel, hint="avgpool_kernel")
    return [_conv_transpose(ctx, node, g, w, x_shape, y_shape, geo, channels)]


@rule("GlobalAveragePool")
def global_average_pool_grad(ctx: GradContext, node, grads):
    x = node.input[0]
    x_shape = ctx.static_shape(node, x)
    em = ctx.em
    scaled = em.mul(grads[0], em.scalar(1.0 / float(np.prod(x_shape[2:]))))
    return [em.node("Expand", [scaled, em.node("Shape", [x])])]


@rule("BatchNormalization")
def batch_norm_grad(ctx: GradContext, node, grads):
    """Inference-mode BN: y = (x - mean) / sqrt(var + eps) * scale + bias, running stats frozen."""
    attrs = node_attrs(node)
    if int(attrs.get("training_mode", 0)):
        return training_batchnorm_grad(ctx, node, grads)
    if len(node.output) > 1 and any(node.output[1:]):
        raise ctx.unsupported(node, "running-statistics outputs")
    x, scale, bias, mean, var = node.input[:5]
    em = ctx.em
    x_shape = ctx.shape(node, x)
    rank = len(x_shape)
    eps = float(attrs.get("epsilon", 1e-5))
    bshape = (-1,) + (1,) * (rank - 2)
    inv_std = 1.0 / np.sqrt(ctx.constant(node, var).astype(np.float64) + eps)
    g = grads[0]
    axes = [0] + list(range(2, rank))
    out = [None] * len(node.input)
    if ctx.needs(x):
        if scale in ctx.constants:
            factor = em.const((ctx.constants[scale] * inv_std).reshape(bshape).astype(em.dtype), hint="bn_factor")
        else:
            factor = em.mul(em.reshape(scale, list(bshape)), em.const(inv_std.reshape(bshape).astype(em.dtype)))
        out[0] = em.mul(g, factor)
    if ctx.needs(scale):
        centred = em.sub(x, em.const(ctx.constant(node, mean).reshape(bshape).astype(em.dtype), hint="bn_mean"))
        x_hat = em.mul(centred, em.const(inv_std.reshape(bshape).astype(em.dtype), hint="bn_inv_std"))
        out[1] = em.reduce("ReduceSum", em.mul(g, x_hat), axes, keepdims=False)
    if ctx.needs(bias):
        out[2] = em.reduce("ReduceSum", g, axes, keepdims=False)
    return out

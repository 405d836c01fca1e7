"""Convolutions for XLA's CPU backend: 3-D ones as 2-D ones, gradients in canonical form.

Five things make flax's default ``lax.conv_general_dilated`` slow on XLA CPU (jaxlib 0.10.2):

- **3-D convolutions.** XLA runs three spatial dimensions 3-4x slower than two: a U-Net
  layer (3x3x3, 8 -> 16 channels, batch 2, forward + both gradients) took 181 ms at 32^3
  where torch's ``conv3d`` took 39 ms. A 3-D convolution is a 2-D one over ``(H, W)``
  whose input channels are the ``kd`` depth-shifted copies of the input side by side,
  with the kernel's depth taps moved into its input channels; depth then becomes part of
  the batch. Written that way the same layer took 52 ms (``benchmarks/results/kernels-conv.md``).
  The price is memory: the stacked input is ``kd`` times the input (and is kept for the
  backward pass).
- **Gradients inside loops.** Autodiff writes a convolution's input and kernel gradients
  as convolutions with permuted dimension numbers. XLA CPU rewrites them into its fast
  form (explicit transposes, then a channels-last convolution) in the top-level program
  but not inside a ``while`` loop's body, where they run as naive loops: a 2-D layer's
  training update took 1.7 s per iteration in a ``fori_loop`` against 81 ms outside.
  ``jaxreg.nn.training.train`` runs its steps in a ``lax.scan``, so every network
  trained there paid that. :func:`conv2d` has a ``custom_vjp`` whose gradients are
  channels-last convolutions of explicitly transposed operands: 67 ms in the loop.
  (The cost: no forward-mode differentiation through these convolutions.)
- **Kernel gradients under vmap.** The networks see one pair each and training vmaps them
  over the batch; lax batches the kernel gradient (both of its operands mapped) as a
  grouped convolution, 4-5x slower on XLA CPU than one convolution per pair in a
  ``lax.map``, which :func:`conv2d`'s gradient runs instead.

- **Few channels, and kernel gradients at full resolution.** Where a stride-1 window reads
  at most 32 values per pixel (a 3x3 window over 3 channels: a network's input layer, or
  the input gradient of its 3-channel output layer), the convolution runs as the window's
  shifted copies side by side and one matrix product (:func:`_by_columns`). Where the
  output gradient's shifted copies are at most 1.5 times the input (decoder layers that
  narrow the channels), the kernel gradient is the input against those copies in one
  matrix product (:func:`_kernel_gradient_by_shifts`) instead of a convolution whose window
  is the whole image. Together they took the 3-D GradICON step below from 0.31 to 0.26 s in
  ``train``'s scan (1.18x; 1.24x for the step alone, 14 rounds in turn); a 2-D one tied.

- **Large batches.** XLA CPU's convolutions slow down on large batches (a 3-D layer's
  depth slices are its batch): the kernel gradient contracts over the batch and ran 3-5x
  faster in chunks of 8-16 items (a ``lax.map``, the chunks' gradients summed), and a
  forward pass or input gradient over more than 32 MiB ran 1.5x faster in chunks of at most
  8 MiB. With both, a 64^3 layer (8 -> 16 channels, 2 pairs, forward and both gradients)
  took 136-176 ms where torch's ``conv3d`` took 240-325 ms (``benchmarks/results/kernels-conv.md``).
  That is torch on its default NCDHW layout; on ``channels_last_3d`` tensors torch picks
  other oneDNN kernels and took 49 ms against jaxreg's 148 (``benchmarks/results/kernels.md``,
  2026-11-22 17:33): the gap this module has not closed. Tried against it, and lost
  (64^3 layer, forward, 2 cores): XLA's library flags (``--xla_cpu_use_onednn`` with
  ``--xla_cpu_experimental_onednn_custom_call``, ``--xla_cpu_use_xnnpack``,
  ``--xla_cpu_experimental_{onednn,xnn,ynn}_fusion_type=individual_convolution``) left
  both lax's and this module's convolutions within noise (61-67 ms for this module's);
  an explicit im2col (the 27 shifted copies side by side, one matrix product per chunk
  of 4-64 depth slices) took 146-414 ms against 62 ms, its concatenation of 8-channel
  slices being the cost (the product alone runs at 130-220 GFLOP/s). Stacking the
  kernel's depth taps in the OUTPUT channels instead (one 2-D convolution of the
  depth-padded input to ``kd * O`` channels, then the taps' shifted outputs summed: no
  copy of the input) lost on every U-Net layer shape, forward and both gradients: 0.36x
  (32^3, 8 -> 16) to 0.89x (16^3, 16 -> 16 and 48 -> 16). XLA CPU runs each of these
  convolutions in a YNNPACK fusion on one thread (the same time with 1 core or 2), and
  two independent ones from a split batch ran one after the other; with YNNPACK kept to
  matrix products (``xla_cpu_experimental_ynn_fusion_type``, which a compile can set),
  Eigen's convolutions use both cores but the 3-D GradICON step was slower (200 against
  175 ms).

Together: the 3-D GradICON training step of ``examples/gradicon_3d.py`` (two-step U-Net,
2 pairs of 32^3) ran 0.7 s per step in ``train``'s scan, against 3.5 s with lax's
convolutions (same process, in turn), with the first three; the matrix-product forms
brought it to 0.26 s on a faster host (``benchmarks/results/amortized-3d.md``: 4.56
steps/s against icon_registration's 4.31).

:func:`conv_general_dilated` is a drop-in for ``lax.conv_general_dilated`` (flax's
``nnx.Conv`` takes it as ``conv_general_dilated=``) that does all of this where it can and
the backend is a CPU; on other backends it is lax's, unchanged.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv2d", "conv_general_dilated", "depth_folded_conv"]

_NHWC = ("NHWC", "HWIO", "NHWC")
# Channels-last convolutions as lax names their axes: (batch, feature, *spatial) for the
# images and (out, in, *spatial) for the kernel.
_CHANNELS_LAST = {
    2: lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)),
    3: lax.ConvDimensionNumbers(lhs_spec=(0, 4, 1, 2, 3), rhs_spec=(4, 3, 0, 1, 2), out_spec=(0, 4, 1, 2, 3)),
}


def _ones(value) -> bool:
    return value is None or all(int(v) == 1 for v in value)


def _pads(padding, in_shape, window, strides) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        return tuple(tuple(int(p) for p in pair) for pair in lax.padtype_to_pads(in_shape, window, strides, padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _channels_last_rank(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, batch_group_count, extra) -> int | None:
    """2 or 3 where the call is a plain channels-last convolution this module handles."""
    rank = jnp.ndim(lhs) - 2
    if rank not in _CHANNELS_LAST or jnp.ndim(rhs) != rank + 2:
        return None
    if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != _CHANNELS_LAST[rank]:
        return None
    if not (_ones(lhs_dilation) and _ones(rhs_dilation)) or feature_group_count != 1 or batch_group_count != 1:
        return None
    # flax passes out_sharding=None; a real sharding or a preferred output type is lax's business.
    return rank if all(value is None for value in extra.values()) else None


def _plain(x, k, strides, pads, precision, lhs_dilation=(1, 1), rhs_dilation=(1, 1)):
    return lax.conv_general_dilated(
        x, k, strides, pads, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=_NHWC, precision=precision
    )


def conv2d(x, kernel, strides, padding, *, precision=None):
    """``lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC",
    "HWIO", "NHWC"))``, whose gradients stay fast inside loops on XLA CPU (module docstring).

    Args:
      x: ``(N, H, W, C)`` input.
      kernel: ``(kh, kw, C, O)``.
      strides: two strides.
      padding: 'SAME', 'VALID' or two ``(low, high)`` pairs (negative crops), as lax takes them.

    Differentiable in reverse mode, to any order; not in forward mode (``jax.jvp``).
    """
    if jnp.ndim(x) != 4 or jnp.ndim(kernel) != 4:
        raise ValueError(f"conv2d needs a (N, H, W, C) input and a (kh, kw, C, O) kernel; got shapes {jnp.shape(x)} and {jnp.shape(kernel)}")
    if x.shape[-1] != kernel.shape[2]:
        raise ValueError(f"input has {x.shape[-1]} channels but the kernel expects {kernel.shape[2]}")
    strides = tuple(int(s) for s in strides)
    return _conv2d(x, kernel, strides, _pads(padding, x.shape[1:3], kernel.shape[:2], strides), precision)


# A stride-1 convolution whose window reads at most this many values per pixel (kh * kw * C)
# runs as shifted copies and one matrix product (:func:`_by_columns`): XLA CPU ran a 3x3
# convolution from 3 channels to 24 (2 pairs at 32^3, depth folded) in 11.6 ms, the same as
# columns in 2.5 ms; from 6 channels to 8 they tied (2.2 and 2.5 ms), and from 9 channels
# up the convolution won (9 -> 24: 5.8 against 18 ms).
_COLUMNS_MAX_WINDOW_VALUES = 32


def _by_columns(x, kernel, pads, precision):
    """A stride-1 ``_plain(x, kernel, (1, 1), pads)`` as one matrix product of the
    ``kh * kw`` shifted copies of ``x`` (side by side in the channels) and the kernel."""
    kh, kw, channels, out_channels = kernel.shape
    out = tuple(n + lo + hi - k + 1 for n, (lo, hi), k in zip(x.shape[1:3], pads, (kh, kw)))
    columns = jnp.concatenate([_shifted(x, (a - pads[0][0], b - pads[1][0]), out) for a in range(kh) for b in range(kw)], axis=-1)
    product = jnp.matmul(columns.reshape(-1, kh * kw * channels), kernel.reshape(-1, out_channels), precision=precision)
    return product.reshape((x.shape[0],) + out + (out_channels,))


def _shifted(x, offsets, size):
    """``y[:, i, j] = x[:, i + offsets[0], j + offsets[1]]`` on a ``size`` grid, zero where
    that falls outside ``x``."""
    pads = [(-offset, m - n + offset, 0) for offset, n, m in zip(offsets, x.shape[1:3], size)]
    return lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *pads, (0, 0, 0)])


def _reads_columns(kernel_shape, strides) -> bool:
    kh, kw, channels, _ = kernel_shape
    return all(s == 1 for s in strides) and kh * kw * channels <= _COLUMNS_MAX_WINDOW_VALUES


def _convolve(x, kernel, strides, pads, precision, lhs_dilation=(1, 1)):
    """``_plain``, or :func:`_by_columns` where that was measured faster (stride and input
    dilation 1, a window of few values)."""
    if all(d == 1 for d in lhs_dilation) and _reads_columns(kernel.shape, strides):
        return _by_columns(x, kernel, pads, precision)
    return _plain(x, kernel, strides, pads, precision, lhs_dilation=lhs_dilation)


def _forward(x, kernel, strides, pads, precision):
    def in_one(x):
        return _convolve(x, kernel, strides, pads, precision)

    out_pixels = math.prod((n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip(x.shape[1:3], pads, kernel.shape[:2], strides))
    return _in_large_batch_chunks(in_one, x, out_pixels * kernel.shape[3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv2d(x, kernel, strides, pads, precision):
    return _forward(x, kernel, strides, pads, precision)


def _conv2d_forward(x, kernel, strides, pads, precision):
    return _forward(x, kernel, strides, pads, precision), (x, kernel)


def _input_gradient(g, kernel, size, strides, pads, precision):
    """The input gradient of ``_plain(x, kernel, strides, pads)`` for an ``x`` of spatial
    ``size``: ``g`` dilated by the strides, read by the flipped kernel with its in and out
    channels swapped."""
    window, out = kernel.shape[:2], g.shape[1:3]
    # The barrier keeps XLA from folding the transpose back into the convolution's
    # dimension numbers, the form that runs slowly inside loops.
    flipped = lax.optimization_barrier(jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
    pads_x = tuple((k - 1 - lo, n - 1 + lo - (m - 1) * s) for k, (lo, _), n, m, s in zip(window, pads, size, out, strides))

    def in_one(g):
        return _convolve(g, flipped, (1, 1), pads_x, precision, lhs_dilation=strides)

    return _in_large_batch_chunks(in_one, g, math.prod(size) * kernel.shape[2])


def _conv2d_backward(strides, pads, precision, residuals, g):
    x, kernel = residuals
    dx = _input_gradient(g, kernel, x.shape[1:3], strides, pads, precision)
    dk = _kernel_gradient(x, g, kernel.shape[:2], strides, pads, precision)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_conv2d.defvjp(_conv2d_forward, _conv2d_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _kernel_gradient(x, g, window, strides, pads, precision):
    """The kernel gradient of ``_plain(x, kernel, strides, pads)`` for an output gradient ``g``."""

    if _by_shifted_gradients(x.shape[-1], g.shape[-1], window, strides):
        by_shifts = functools.partial(_kernel_gradient_by_shifts, window=window, pads=pads, precision=precision)
        return _summed_over_chunks(by_shifts, x, g, _SHIFTED_GRADIENT_CHUNK)

    def in_one(x, g):
        size, out = x.shape[1:3], g.shape[1:3]
        # Batch and channels swapped, the output gradient as the kernel, dilated by the strides.
        x_t = lax.optimization_barrier(jnp.transpose(x, (3, 1, 2, 0)))  # (C, H, W, N)
        g_t = lax.optimization_barrier(jnp.transpose(g, (1, 2, 0, 3)))  # (H', W', N, O)
        pads_k = tuple((lo, k + (m - 1) * s - n - lo) for k, (lo, _), n, m, s in zip(window, pads, size, out, strides))
        dk = _plain(x_t, g_t, (1, 1), pads_k, precision, rhs_dilation=strides)  # (C, kh, kw, O)
        return jnp.transpose(dk, (1, 2, 0, 3))

    @jax.custom_batching.custom_vmap
    def kernel_gradient(x, g):
        return _summed_over_chunks(in_one, x, g, _KERNEL_GRADIENT_CHUNK)

    @kernel_gradient.def_vmap
    def one_at_a_time(axis_size, in_batched, x, g):
        # Under vmap both operands carry the mapped axis, and lax batches that as a grouped
        # convolution: 4-5x slower on XLA CPU than the same convolutions run one mapped
        # element at a time (vmap of a U-Net layer over 2 pairs at 32^3: 297 against 57 ms).
        x, g = (a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape) for a, batched in zip((x, g), in_batched))
        return lax.map(lambda pair: kernel_gradient(*pair), (x, g)), True

    return kernel_gradient(x, g)


# The convolution form of the kernel gradient contracts over the batch as its input
# features, and XLA CPU ran it fastest with 8 to 16 of them: batches cut into chunks of at
# most 16 (a lax.map, the chunks' gradients summed) took 42 ms against 235 for 128 slices
# of 64x64, 24 -> 16 channels (a 64^3 layer, 2 pairs, depth folded), 5 against 7 ms at
# 32^3, 2.2 against 4.8 ms for 128 MNIST-sized 16 -> 32 layers; chunks of 4 lost again.
_KERNEL_GRADIENT_CHUNK = 16
# The same for the shifted-copies form (its copies then stay in cache): 8 items a chunk
# took 42 against 139 ms for 128 slices of 64x64, 72 -> 8 channels, 4.0 against 14.6 ms
# for 64 slices of 32x32 (the gradicon_3d decoder layer), 9.4 against 48 ms for 24 -> 3.
_SHIFTED_GRADIENT_CHUNK = 8
# A convolution (or its input gradient) whose batch holds more than this many bytes of
# input or output runs in chunks of at most _CONVOLUTION_CHUNK_BYTES: 64^3, 24 -> 16
# channels, 2 pairs (48 MiB of input) 65 -> 43 ms forward, 85 -> 58 ms input gradient, in
# chunks of 6 MiB; from 18 MiB down, chunks tied or lost.
_CONVOLUTION_CHUNK_ABOVE_BYTES = 32 * 2**20
_CONVOLUTION_CHUNK_BYTES = 8 * 2**20


def _chunk_size(n: int, most: int) -> int | None:
    """The largest divisor of ``n`` that is at most ``most``, or None where the batch
    should run whole: ``n <= most``, or no divisor of 8 or more (chunks of fewer lost)."""
    if n <= most:
        return None
    chunk = max(c for c in range(1, most + 1) if n % c == 0)
    return chunk if chunk >= min(8, most) else None


def _map_chunks(fn, arrays, chunk):
    """``fn`` on consecutive chunks of ``chunk`` items of the arrays' shared leading axis,
    one after the other (a lax.map); results stacked on a new leading axis."""
    split = tuple(a.reshape((a.shape[0] // chunk, chunk) + a.shape[1:]) for a in arrays)
    return lax.map(lambda parts: fn(*parts), split)


def _summed_over_chunks(fn, x, g, most: int):
    """``fn(x, g)`` (a kernel gradient), summed over chunks of at most ``most`` items of
    the batch where :func:`_chunk_size` finds them."""
    chunk = _chunk_size(x.shape[0], most)
    if chunk is None:
        return fn(x, g)
    return jnp.sum(_map_chunks(fn, (x, g), chunk), axis=0)


def _large_batch_chunk(batch: int, item_bytes: int) -> int | None:
    if batch * item_bytes <= _CONVOLUTION_CHUNK_ABOVE_BYTES:
        return None
    return _chunk_size(batch, max(1, _CONVOLUTION_CHUNK_BYTES // item_bytes))


def _in_large_batch_chunks(fn, x, out_item_size: int):
    """``fn(x)`` (a convolution or its input gradient, ``out_item_size`` values out per
    batch item), run in chunks of the batch where it is large (:func:`_large_batch_chunk`)."""
    item_bytes = max(math.prod(x.shape[1:]), out_item_size) * x.dtype.itemsize
    chunk = _large_batch_chunk(x.shape[0], item_bytes)
    if chunk is None:
        return fn(x)
    out = _map_chunks(fn, (x,), chunk)
    return out.reshape((x.shape[0],) + out.shape[2:])


def _by_shifted_gradients(channels, out_channels, window, strides) -> bool:
    """Whether :func:`_kernel_gradient_by_shifts` computes the kernel gradient: stride 1
    and an output gradient whose ``kh * kw`` shifted copies are at most 1.5 times the input.

    Measured on XLA CPU, 2 cores, 2 pairs (depth-folded U-Net layers, ``C`` counting the
    depth taps): 72 -> 8 channels at 32^3 took 26 ms as a convolution and 6-10 ms as shifts
    and one matrix product, 96 -> 16 at 16^3 3.3 against 1.8 ms, 24 -> 3 at 32^3 6.9 against
    1.4 ms; where the copies outgrow the input the convolution wins (24 -> 16 at 32^3: 7 against
    32 ms; 6 -> 8: 1.9 against 2.6 ms).
    """
    return all(s == 1 for s in strides) and 2 * math.prod(window) * out_channels <= 3 * channels


def _kernel_gradient_by_shifts(x, g, window, pads, precision):
    """The kernel gradient of a stride-1 ``_plain(x, kernel, (1, 1), pads)`` as one matrix
    product: ``x`` against the ``kh * kw`` copies of ``g`` shifted onto the input's grid.

    Tap ``(a, b)`` of the kernel pairs input ``(i, j)`` with output ``(i - a + lo_h, j - b + lo_w)``,
    so its column of the product is ``x`` against ``g`` shifted by that much (zeros where the
    output has no row): no transposed copy of ``x``, and a product with the input's channels
    as rows and ``kh * kw * O`` columns, which XLA CPU runs at full speed where the convolution
    form (``x`` transposed, read by a window as large as the image) does not.
    """
    (kh, kw), (lo_h, lo_w) = window, (lo for lo, _ in pads)
    shifted = [_shifted(g, (lo_h - a, lo_w - b), x.shape[1:3]) for a in range(kh) for b in range(kw)]
    columns = jnp.concatenate(shifted, axis=-1).reshape(-1, kh * kw * g.shape[-1])
    dk = jnp.matmul(x.reshape(-1, x.shape[-1]).T, columns, precision=precision)  # (C, kh * kw * O)
    return jnp.transpose(dk.reshape(x.shape[-1], kh, kw, g.shape[-1]), (1, 2, 0, 3))


def _kernel_gradient_forward(x, g, window, strides, pads, precision):
    return _kernel_gradient(x, g, window, strides, pads, precision), (x, g)


def _kernel_gradient_backward(window, strides, pads, precision, residuals, c):
    # The kernel gradient is bilinear in (x, g): for a cotangent c (a kernel), its x-part
    # is the input gradient of a convolution by c, its g-part the convolution of x by c.
    x, g = residuals
    dx = _input_gradient(g, c.astype(g.dtype), x.shape[1:3], strides, pads, precision)
    dg = _conv2d(x, c.astype(x.dtype), strides, pads, precision)
    return dx.astype(x.dtype), dg.astype(g.dtype)


_kernel_gradient.defvjp(_kernel_gradient_forward, _kernel_gradient_backward)


def depth_folded_conv(lhs, rhs, window_strides, padding, *, precision=None):
    """A channels-last 3-D convolution computed as a 2-D one (:func:`conv2d`) over
    depth-stacked channels.

    Args:
      lhs: ``(N, D, H, W, C)`` input.
      rhs: ``(kd, kh, kw, C, O)`` kernel.
      window_strides: three strides.
      padding: 'SAME', 'VALID' or three ``(low, high)`` pairs (negative crops), as lax takes them.

    Returns:
      ``(N, D', H', W', O)``, equal to ``lax.conv_general_dilated(lhs, rhs, window_strides,
      padding, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))`` up to float rounding.

    >>> x = jnp.arange(2 * 4 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 4, 1)
    >>> w = jnp.ones((3, 3, 3, 1, 2))
    >>> want = lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    >>> bool(jnp.allclose(depth_folded_conv(x, w, (1, 1, 1), "SAME"), want))
    True
    """
    if jnp.ndim(lhs) != 5 or jnp.ndim(rhs) != 5:
        raise ValueError(f"depth_folded_conv needs a (N, D, H, W, C) input and a (kd, kh, kw, C, O) kernel; got shapes {jnp.shape(lhs)} and {jnp.shape(rhs)}")
    if lhs.shape[-1] != rhs.shape[3]:
        raise ValueError(f"input has {lhs.shape[-1]} channels but the kernel expects {rhs.shape[3]}")
    strides = tuple(int(s) for s in window_strides)
    pads = _pads(padding, lhs.shape[1:4], rhs.shape[:3], strides)
    n, depth, height, width, channels = lhs.shape
    kd, kh, kw, _, out_channels = rhs.shape
    (low, high), stride_d = pads[0], strides[0]
    out_depth = (depth + low + high - kd) // stride_d + 1
    if out_depth < 1:
        raise ValueError(f"kernel depth {kd} does not fit the padded input depth {depth + low + high}")
    # lax.pad, not jnp.pad: explicit padding may be negative (a crop), as lax allows.
    padded = lax.pad(lhs, jnp.zeros((), lhs.dtype), [(0, 0, 0), (low, high, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0)])
    last = stride_d * (out_depth - 1) + 1
    # Channel k*C + c of the stack is channel c of the input read at depth tap k.
    taps = [lax.slice_in_dim(padded, k, k + last, stride=stride_d, axis=1) for k in range(kd)]
    stacked = taps[0] if kd == 1 else jnp.concatenate(taps, axis=-1)
    kernel = jnp.transpose(rhs, (1, 2, 0, 3, 4)).reshape(kh, kw, kd * channels, out_channels)
    out = conv2d(stacked.reshape(n * out_depth, height, width, kd * channels), kernel, strides[1:], pads[1:], precision=precision)
    return out.reshape((n, out_depth) + out.shape[1:])


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
    **kwargs,
):
    """``lax.conv_general_dilated``; when JAX's default backend is a CPU, channels-last
    2-D convolutions go through :func:`conv2d` and 3-D ones through
    :func:`depth_folded_conv`.

    Only plain convolutions are rerouted (no dilation, groups, sharding or preferred
    output type); anything else, and every call on another backend, is lax's, unchanged.
    """
    extra = dict(kwargs)
    if preferred_element_type is not None:
        extra["preferred_element_type"] = preferred_element_type
    rank = None
    if jax.default_backend() == "cpu":
        rank = _channels_last_rank(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, batch_group_count, extra)
    if rank == 2:
        return conv2d(lhs, rhs, window_strides, padding, precision=precision)
    if rank == 3:
        return depth_folded_conv(lhs, rhs, window_strides, padding, precision=precision)
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        **extra,
    )

"""jaxreg.nn.conv: lax's convolutions, computed in forms that XLA CPU runs fast: values,
gradients (first and second order, under vmap) against lax and finite differences, and the
form of the gradients' convolutions inside a loop."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from jaxreg.nn import conv
from jaxreg.nn.modules import UNet

from helpers import assert_grad_matches_fd, assert_jit_matches, assert_vmap_matches_loop

NUMBERS = ("NDHWC", "DHWIO", "NDHWC")
NUMBERS_2D = ("NHWC", "HWIO", "NHWC")
CASES_2D = [
    ((3, 9, 8, 5), (3, 3, 5, 4), (1, 1), "SAME"),
    ((2, 9, 7, 3), (3, 3, 3, 4), (2, 2), "SAME"),
    ((2, 8, 9, 3), (3, 1, 3, 2), (2, 3), "VALID"),  # strides that leave input rows unread
    ((1, 7, 7, 2), (3, 3, 2, 3), (1, 1), [(2, 0), (0, 2)]),
    ((1, 7, 7, 2), (3, 3, 2, 3), (2, 1), [(-1, 1), (1, 1)]),  # a negative pad crops
]


def reference_2d(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NUMBERS_2D, precision=lax.Precision.HIGHEST)


def relative_error(got, want):
    return float(jnp.abs(got - want).max() / jnp.abs(want).max())


def reference(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NUMBERS, precision=lax.Precision.HIGHEST)


def random_pair(shape, kernel, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(kernel) * 0.2, jnp.float32)
    return x, w


@pytest.mark.parametrize("shape, kernel, strides, padding", CASES_2D)
def test_conv2d_values_and_gradients_equal_lax(shape, kernel, strides, padding):
    x, w = random_pair(shape, kernel)
    ours = lambda x, w: conv.conv2d(x, w, strides, padding, precision=lax.Precision.HIGHEST)  # noqa: E731
    theirs = lambda x, w: reference_2d(x, w, strides, padding)  # noqa: E731
    np.testing.assert_allclose(ours(x, w), theirs(x, w), rtol=1e-5, atol=1e-5)

    def energy(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w)))

    for got, want in zip(jax.grad(energy(ours), (0, 1))(x, w), jax.grad(energy(theirs), (0, 1))(x, w)):
        assert relative_error(got, want) < 1e-5

    if strides != (2, 2):
        return  # second order once, on the strided case (the vmap test checks it too)

    # Second order: the gradient of a function of the gradient.
    def second(f):
        return lambda x, w: jnp.sum(jnp.stack([jnp.sum(g**2) for g in jax.grad(energy(f), (0, 1))(x, w)]))

    for got, want in zip(jax.grad(second(ours), (0, 1))(x, w), jax.grad(second(theirs), (0, 1))(x, w)):
        assert relative_error(got, want) < 1e-4


def test_conv2d_under_vmap_jit_and_finite_differences():
    x, w = random_pair((4, 2, 7, 6, 3), (3, 3, 3, 2), seed=4)
    ours = lambda x, w: conv.conv2d(x, w, (2, 1), "SAME")  # noqa: E731
    assert_jit_matches(ours, x[0], w, atol=1e-5)
    assert_vmap_matches_loop(ours, x, jnp.stack([w, -w, 0.5 * w, w]), atol=1e-5)

    # Gradients of a vmap over pairs (the kernel's gradient runs one pair at a time there)
    # equal lax's, first and second order.
    def energy(f):
        return lambda w, x: jnp.sum(jnp.sin(jax.vmap(lambda xi: f(xi, w, (2, 1), "SAME"))(x)))

    first = [jax.grad(energy(f), (0, 1))(w, x) for f in (conv.conv2d, reference_2d)]
    for got, want in zip(*first):
        assert relative_error(got, want) < 1e-5
    squared = [jax.grad(lambda w, x, f=f: jnp.sum(jax.grad(energy(f))(w, x) ** 2), (0, 1))(w, x) for f in (conv.conv2d, reference_2d)]
    for got, want in zip(*squared):
        assert relative_error(got, want) < 1e-4
    assert_grad_matches_fd(lambda wx: energy(conv.conv2d)(*wx), (w, x))


# Stride-1 cases that take the matrix-product forms (the assertions name which), with the
# pads of 'SAME', 'VALID', one-sided, asymmetric and negative (a crop).
PRODUCT_CASES = [
    ((2, 9, 8, 2), (3, 3, 2, 3), "SAME"),  # columns forward, columns input gradient
    ((1, 7, 6, 3), (3, 3, 3, 2), [(2, 0), (0, 2)]),
    ((1, 8, 7, 3), (3, 1, 3, 2), "VALID"),
    ((2, 6, 7, 24), (3, 3, 24, 3), "SAME"),  # kernel gradient by shifts, columns input gradient
    ((1, 8, 6, 30), (3, 3, 30, 4), [(-1, 1), (2, 0)]),
    ((1, 7, 6, 40), (1, 3, 40, 8), [(0, 2), (1, 0)]),
]


@pytest.mark.parametrize("shape, kernel, padding", PRODUCT_CASES)
def test_matrix_product_forms_equal_lax_to_second_order_and_under_vmap(shape, kernel, padding):
    kh, kw, channels, out_channels = kernel
    columns, reversed_columns = conv._reads_columns(kernel, (1, 1)), conv._reads_columns((kh, kw, out_channels, channels), (1, 1))
    shifts = conv._by_shifted_gradients(channels, out_channels, (kh, kw), (1, 1))
    assert columns or reversed_columns or shifts  # the case exercises at least one of them
    x, w = random_pair(shape, kernel, seed=8)
    ours = lambda x, w: conv.conv2d(x, w, (1, 1), padding, precision=lax.Precision.HIGHEST)  # noqa: E731
    theirs = lambda x, w: reference_2d(x, w, (1, 1), padding)  # noqa: E731
    np.testing.assert_allclose(ours(x, w), theirs(x, w), rtol=1e-5, atol=1e-5)

    def energy(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w)))

    def second(f):
        return lambda x, w: sum(jnp.sum(g**2) for g in jax.grad(energy(f), (0, 1))(x, w))

    for order in (energy, second):
        got, want = (jax.jit(jax.grad(order(f), (0, 1)))(x, w) for f in (ours, theirs))
        for g, r in zip(got, want):
            assert relative_error(g, r) < 1e-4, order.__name__

    # A vmap over pairs with a shared kernel, as training runs it: per-pair kernel gradients.
    per_pair = [jax.jit(jax.vmap(jax.grad(energy(f), 1), (0, None)))(x[:, None], w) for f in (ours, theirs)]
    assert relative_error(*per_pair) < 1e-5
    assert_grad_matches_fd(lambda xw: energy(ours)(*xw), (x, w))


def test_matrix_product_forms_run_where_measured_faster():
    """The forms' thresholds, on the layers of examples/gradicon_3d.py (features 8, 16, 16, 32,
    depth folded so that C counts 3 depth taps), where they were measured."""
    assert conv._reads_columns((3, 3, 3, 24), (1, 1))  # output layer's input gradient: 3 -> 24
    assert not conv._reads_columns((3, 3, 6, 8), (1, 1))  # stem, 2 channels folded: a tie, left to XLA
    assert not conv._reads_columns((3, 3, 3, 24), (2, 2))  # strided: never
    assert conv._by_shifted_gradients(72, 8, (3, 3), (1, 1))  # last decoder layer, 24 -> 8 at 32^3
    assert conv._by_shifted_gradients(24, 3, (3, 3), (1, 1))  # output layer, 8 -> 3
    assert not conv._by_shifted_gradients(24, 16, (3, 3), (1, 1))  # 8 -> 16: the copies outgrow the input
    assert not conv._by_shifted_gradients(72, 8, (3, 3), (2, 2))


def test_chunk_sizes_divide_the_batch_and_keep_at_least_8_items():
    assert conv._chunk_size(64, 16) == 16
    assert conv._chunk_size(40, 16) == 10
    assert conv._chunk_size(16, 16) is None  # small enough to run whole
    assert conv._chunk_size(34, 16) is None  # 34 = 2 * 17: chunks of 2 would lose
    assert conv._chunk_size(128, 1) == 1  # items too large for more than one a chunk
    assert conv._large_batch_chunk(128, 64 * 64 * 24 * 4) == 16  # the 64^3 layer: 48 MiB in 6 MiB chunks
    assert conv._large_batch_chunk(64, 32 * 32 * 72 * 4) is None  # 18 MiB: whole


@pytest.mark.parametrize("strides, padding", [((1, 1), "SAME"), ((2, 1), [(1, 0), (0, 2)])])
def test_batches_run_in_chunks_equal_lax_to_second_order_and_under_vmap(monkeypatch, strides, padding):
    """Chunks forced on a small batch (8 items in chunks of 4, both gradient forms): values
    and gradients as lax's, and the kernel gradient summed over the chunks."""
    monkeypatch.setattr(conv, "_KERNEL_GRADIENT_CHUNK", 4)
    monkeypatch.setattr(conv, "_CONVOLUTION_CHUNK_ABOVE_BYTES", 1)
    monkeypatch.setattr(conv, "_CONVOLUTION_CHUNK_BYTES", 4 * 9 * 8 * 6 * 4)
    x, w = random_pair((8, 9, 8, 5), (3, 3, 5, 6), seed=9)
    assert conv._large_batch_chunk(8, 9 * 8 * 6 * 4) == 4 and conv._chunk_size(8, 4) == 4
    ours = lambda x, w: conv.conv2d(x, w, strides, padding, precision=lax.Precision.HIGHEST)  # noqa: E731
    theirs = lambda x, w: reference_2d(x, w, strides, padding)  # noqa: E731
    np.testing.assert_allclose(jax.jit(ours)(x, w), theirs(x, w), rtol=1e-5, atol=1e-5)

    def energy(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w)))

    def second(f):
        return lambda x, w: sum(jnp.sum(g**2) for g in jax.grad(energy(f), (0, 1))(x, w))

    # The forward pass and both gradients each loop over the chunks.
    assert jax.jit(jax.grad(energy(ours), (0, 1))).lower(x, w).as_text().count("stablehlo.while") == 3
    for order in (energy, second):
        got, want = (jax.jit(jax.grad(order(f), (0, 1)))(x, w) for f in (ours, theirs))
        for g, r in zip(got, want):
            assert relative_error(g, r) < 1e-4, order.__name__
    per_pair = [jax.jit(jax.vmap(jax.grad(energy(f), 1), (0, None)))(jnp.stack([x, -x]), w) for f in (ours, theirs)]
    assert relative_error(*per_pair) < 1e-5
    assert_grad_matches_fd(lambda xw: energy(ours)(*xw), (x, w))


def test_gradients_inside_a_loop_are_channels_last_convolutions():
    """The reason for conv2d: XLA CPU leaves autodiff's permuted convolutions in a loop body
    as they are, and runs them as naive loops; conv2d's gradients are channels-last there."""
    if jax.default_backend() != "cpu":
        pytest.skip("layouts are XLA CPU's concern: a GPU's layout assignment picks its own")
    x, w = random_pair((2, 1, 12, 12, 4), (3, 3, 4, 6), seed=5)

    def labels(f, strides):
        grad = jax.grad(lambda w, x: jnp.sum(jax.vmap(lambda xi: f(xi, w, strides, "SAME"))(x) ** 2), (0, 1))
        update = lambda wx: jax.tree_util.tree_map(lambda a, b: a - 1e-3 * b, wx, grad(*wx))  # noqa: E731
        text = jax.jit(lambda wx: lax.fori_loop(0, 2, lambda i, wx: update(wx), wx)).lower((w, x)).compile().as_text()
        return re.findall(r"convolution\(.*?dim_labels=([\w>-]+)", text)

    for strides in [(1, 1), (2, 2)]:
        found = labels(conv.conv2d, strides)
        assert len(found) == 3 and set(found) == {"b01f_01io->b01f"}, found
    if jax.default_backend() == "cpu":
        # What this guards against (if XLA learns to canonicalize there, this may go).
        assert set(labels(reference_2d, (1, 1))) != {"b01f_01io->b01f"}


@pytest.mark.parametrize(
    "shape, kernel, strides, padding",
    [
        ((2, 8, 6, 5, 3), (3, 3, 3, 3, 4), (1, 1, 1), "SAME"),
        ((1, 9, 7, 6, 2), (3, 3, 3, 2, 5), (2, 2, 2), "SAME"),  # the U-Net's downsampling, odd sizes
        ((1, 7, 6, 8, 2), (3, 3, 3, 2, 2), (1, 2, 1), "VALID"),
        ((2, 6, 6, 6, 1), (5, 3, 1, 1, 3), (2, 1, 1), "SAME"),  # unequal kernel sides
        ((1, 6, 5, 4, 2), (1, 1, 1, 2, 3), (1, 1, 1), "SAME"),  # a pointwise layer: no depth taps to stack
        ((1, 8, 5, 5, 2), (3, 3, 3, 2, 2), (1, 1, 1), [(2, 0), (1, 1), (0, 2)]),
        ((1, 8, 5, 5, 2), (3, 3, 3, 2, 2), (1, 1, 1), [(-1, 1), (1, 1), (1, 1)]),  # a negative pad crops
    ],
)
def test_depth_folded_conv_equals_lax_conv3d(shape, kernel, strides, padding):
    x, w = random_pair(shape, kernel)
    want = reference(x, w, strides, padding)
    got = conv.depth_folded_conv(x, w, strides, padding, precision=lax.Precision.HIGHEST)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_depth_folded_conv_gradients_equal_lax_and_finite_differences():
    x, w = random_pair((1, 6, 5, 4, 2), (3, 3, 3, 2, 3), seed=1)

    def energy(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w, (2, 1, 1), "SAME")))

    folded = energy(lambda *a: conv.depth_folded_conv(*a, precision=lax.Precision.HIGHEST))
    got = jax.grad(folded, argnums=(0, 1))(x, w)
    want = jax.grad(energy(reference), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    assert_grad_matches_fd(lambda xw: folded(*xw), (x, w))


def test_depth_folded_conv_under_jit_and_vmap():
    x, w = random_pair((3, 1, 5, 4, 4, 2), (3, 3, 3, 2, 2), seed=2)
    f = lambda x, w: conv.depth_folded_conv(x, w, (1, 1, 1), "SAME")  # noqa: E731
    assert_jit_matches(f, x[0], w, atol=1e-5)
    # Batched over images and kernels at once, as a vmap over pairs and ensembles would.
    weights = jnp.stack([w, 2.0 * w, -w])
    assert_vmap_matches_loop(f, x, weights, atol=1e-5)


def test_conv_general_dilated_routes_plain_convolutions_on_cpu_and_the_rest_to_lax(monkeypatch):
    calls = []
    for name in ("conv2d", "depth_folded_conv"):
        real = getattr(conv, name)
        monkeypatch.setattr(conv, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    x, w = random_pair((1, 6, 6, 6, 2), (3, 3, 3, 2, 2), seed=3)
    numbers = lax.conv_dimension_numbers(x.shape, w.shape, NUMBERS)
    # A dilated kernel is lax's job; the result is still lax's convolution.
    dilated = conv.conv_general_dilated(x, w, (1, 1, 1), "SAME", rhs_dilation=(2, 2, 2), dimension_numbers=numbers)
    want = lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", rhs_dilation=(2, 2, 2), dimension_numbers=numbers)
    np.testing.assert_allclose(dilated, want, rtol=1e-6, atol=1e-6)
    # So are channels-first convolutions, grouped ones and a preferred output type.
    conv.conv_general_dilated(jnp.moveaxis(x, -1, 1), jnp.transpose(w, (4, 3, 0, 1, 2)), (1, 1, 1), "SAME")
    conv.conv_general_dilated(x, w[..., :1, :], (1, 1, 1), "SAME", dimension_numbers=NUMBERS, feature_group_count=2)
    conv.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=NUMBERS, preferred_element_type=jnp.float32)
    assert calls == []
    flat = conv.conv_general_dilated(x[:, 0], w[0], (1, 2), "SAME", dimension_numbers=NUMBERS_2D)
    folded = conv.conv_general_dilated(x, w, (2, 2, 2), "SAME", dimension_numbers=numbers, out_sharding=None)
    assert calls == (["conv2d", "depth_folded_conv", "conv2d"] if jax.default_backend() == "cpu" else [])
    np.testing.assert_allclose(flat, reference_2d(x[:, 0], w[0], (1, 2), "SAME"), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(folded, reference(x, w, (2, 2, 2), "SAME"), rtol=1e-4, atol=1e-4)


def test_conv_general_dilated_falls_back_to_lax_under_jit_vmap_and_finite_differences():
    """The calls handed to lax unchanged (a dilated kernel, grouped channels) stay lax's
    convolution under jit, vmap over pairs, and in their gradients."""
    x, w = random_pair((1, 5, 6, 5, 2), (3, 3, 3, 2, 2), seed=4)
    numbers = lax.conv_dimension_numbers(x.shape, w.shape, NUMBERS)

    def dilated(x, w):
        return conv.conv_general_dilated(x, w, (1, 1, 1), "SAME", rhs_dilation=(2, 1, 2), dimension_numbers=numbers)

    def grouped(x, w):
        return conv.conv_general_dilated(x, w[..., :1, :], (1, 2, 1), "SAME", dimension_numbers=NUMBERS, feature_group_count=2)

    want_dilated = lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", rhs_dilation=(2, 1, 2), dimension_numbers=numbers,
                                            precision=lax.Precision.HIGHEST)
    want_grouped = lax.conv_general_dilated(x, w[..., :1, :], (1, 2, 1), "SAME", dimension_numbers=NUMBERS,
                                            feature_group_count=2, precision=lax.Precision.HIGHEST)
    np.testing.assert_allclose(jax.jit(dilated)(x, w), want_dilated, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jax.jit(grouped)(x, w), want_grouped, rtol=1e-4, atol=1e-4)
    images = jnp.stack([x, -0.5 * x, x**2])
    weights = jnp.stack([w, 2.0 * w, -w])
    for f in (dilated, grouped):
        assert_vmap_matches_loop(f, images, weights, rtol=1e-4, atol=1e-4)
        assert_grad_matches_fd(lambda p, f=f: jnp.sum(jnp.tanh(f(p[0], p[1]))), (x, w))


def test_unet_3d_equals_the_same_weights_under_lax_convolutions():
    net = UNet(3, in_channels=2, features=(4, 6), rngs=nnx.Rngs(0))
    # Nonzero output weights, so that the output depends on every layer.
    net.out.kernel[...] = 0.1 * jax.random.normal(jax.random.key(1), net.out.kernel.shape)
    pair = jax.random.normal(jax.random.key(2), (7, 6, 5, 2))
    run = nnx.jit(lambda net, pair: net(pair))
    got = run(net, pair)
    for layer in [net.stem, net.out, *net.down, *net.up]:
        layer.conv_general_dilated = lax.conv_general_dilated
    want = run(net, pair)
    assert got.shape == (7, 6, 5, 3)
    assert float(jnp.abs(want).max()) > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bad_shapes_are_named():
    x, w = random_pair((1, 4, 4, 4, 2), (3, 3, 3, 3, 2))
    with pytest.raises(ValueError, match="channels"):
        conv.depth_folded_conv(x, w, (1, 1, 1), "SAME")
    with pytest.raises(ValueError, match=r"\(N, D, H, W, C\)"):
        conv.depth_folded_conv(x[0], w, (1, 1, 1), "SAME")
    with pytest.raises(ValueError, match="does not fit"):
        conv.depth_folded_conv(x[:, :2], w[..., :2, :], (1, 1, 1), "VALID")
    with pytest.raises(ValueError, match="channels"):
        conv.conv2d(x[:, 0], w[0], (1, 1), "SAME")
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        conv.conv2d(x, w[0], (1, 1), "SAME")

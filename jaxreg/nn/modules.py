"""Registration networks (flax nnx): every one is called as ``net(moving, fixed) -> Transform``.

A network sees ONE pair of images of the same shape, ``(*spatial)`` or ``(*spatial, C)``
(channels last), given as plain arrays in index space; batches come from ``jax.vmap`` over a
pure function (see :mod:`jaxreg.nn.training`). The transform it returns is one of the
classical side's (:class:`~jaxreg.transforms.Displacement`, :class:`~jaxreg.transforms.Velocity`,
:class:`~jaxreg.transforms.Affine` or a composition), so ``warp``, the metrics and the CLI
work on it unchanged. Coordinates are voxel indices of the fixed image (identity grid);
:func:`jaxreg.nn.inference.register_images` lifts them to world space.

Every network starts as the exact identity map: the layer that produces the field (or the
affine parameters) has zero weights and bias. A multistep network that started from a
random displacement applied eight times would not train at all.

Building blocks:

- backbones map the stacked pair ``(*spatial, 2C)`` to a field ``(*spatial, d)``:
  :class:`MLP` (flattens the images; for small fixed-size inputs such as MNIST) and
  :class:`UNet` (any rank, any size);
- heads turn that field into a transform: :class:`DisplacementField`,
  :class:`VelocityField` (diffeomorphic through scaling and squaring) and
  :class:`AffineHead` (its own small encoder);
- wrappers combine networks: :class:`TwoStep` (warp with the first, look again with the
  second, compose), :class:`Multistep` (one network applied ``n`` times with shared
  weights, a learned iterative optimizer) and :class:`Downsampled` (run a network at a
  coarser resolution; its field is interpolated back, so ``TwoStep(Downsampled(a), b)`` is
  a coarse-to-fine pair).

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> net = Multistep(DisplacementField(MLP((8, 8), hidden=(16,), rngs=nnx.Rngs(0))), steps=3)
>>> image = jnp.zeros((8, 8)).at[2:5, 3:6].set(1.0)
>>> t = net(image, image)
>>> float(jnp.abs(t(jnp.array([[1.0, 2.0]])) - jnp.array([[1.0, 2.0]])).max())  # identity at init
0.0
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxreg.grid import Grid, precise_matmul
from jaxreg.nn.conv import conv_general_dilated
from jaxreg.transforms import Affine, Displacement, Transform, Velocity, compose, warp

__all__ = [
    "MLP",
    "UNet",
    "DisplacementField",
    "VelocityField",
    "AffineHead",
    "TwoStep",
    "Multistep",
    "Downsampled",
    "stack_pair",
]

_zeros = nnx.initializers.zeros_init()


def _with_channels(image, ndim: int, *, name: str):
    image = jnp.asarray(image)
    if image.ndim == ndim:
        return image[..., None]
    if image.ndim == ndim + 1:
        return image
    raise ValueError(f"{name} must be (*spatial) or (*spatial, C) with {ndim} spatial axes; got shape {image.shape}")


def _checked_pair(moving, fixed, ndim: int):
    """``moving`` and ``fixed`` as float32 ``(*spatial, C)`` images of one shape."""
    m = _with_channels(moving, ndim, name="moving")
    f = _with_channels(fixed, ndim, name="fixed")
    if m.shape != f.shape:
        raise ValueError(f"moving and fixed must have the same shape for a network; got {m.shape} and {f.shape}")
    return m.astype(jnp.float32), f.astype(jnp.float32)


def stack_pair(moving, fixed, ndim: int):
    """The network input: ``moving`` and ``fixed`` stacked along a channel axis, ``(*spatial, 2C)``."""
    return jnp.concatenate(_checked_pair(moving, fixed, ndim), axis=-1)


# ---------------------------------------------------------------------------- backbones


class MLP(nnx.Module):
    """Fully connected backbone: the flattened pair -> hidden layers (ReLU) -> a field.

    ``shape`` is the spatial shape it is built for (the input size is fixed);
    ``channels`` the channels per image. The output is ``(*shape, d)``; the last layer
    starts at zero.
    """

    def __init__(self, shape: Sequence[int], *, hidden: Sequence[int] = (50, 50), channels: int = 1, rngs: nnx.Rngs):
        self.shape = tuple(int(n) for n in shape)
        self.ndim = len(self.shape)
        sizes = [2 * channels * math.prod(self.shape), *(int(h) for h in hidden)]
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = nnx.Linear(sizes[-1], math.prod(self.shape) * self.ndim, kernel_init=_zeros, bias_init=_zeros, rngs=rngs)

    def __call__(self, pair):
        self._check_shape(pair)
        return self._after_first_layer(self._first_layer(pair.reshape(-1)))

    @property
    def _first_layer(self):
        return self.hidden[0] if self.hidden else self.out

    def _after_first_layer(self, x):
        """The field from the first layer's output (before its activation)."""
        if not self.hidden:
            return x.reshape(self.shape + (self.ndim,))
        x = nnx.relu(x)
        for layer in list(self.hidden)[1:]:
            x = nnx.relu(layer(x))
        return self.out(x).reshape(self.shape + (self.ndim,))

    def given_fixed(self, fixed):
        """``moving -> self(stack_pair(moving, fixed))`` with the fixed image's share of the
        first layer computed once, here.

        For a network that looks at the same fixed image many times (:class:`Multistep`):
        each later look multiplies only the moving half of the first layer, and the
        gradient of the fixed half's weights is one product with the summed gradients.
        Equal to the plain call up to float rounding (the first layer sums in two parts).
        """
        self._check_shape(fixed)
        first = self._first_layer
        channels = fixed.shape[-1]
        if 2 * channels * math.prod(self.shape) != first.kernel.shape[0]:
            raise ValueError(f"this MLP was built for {first.kernel.shape[0] // (2 * math.prod(self.shape))} channel(s) per image; the fixed image has {channels}")
        kernel = first.kernel[...].reshape(math.prod(self.shape), 2 * channels, -1)
        moving_rows = kernel[:, :channels].reshape(-1, kernel.shape[-1])
        fixed_share = fixed.reshape(-1) @ kernel[:, channels:].reshape(-1, kernel.shape[-1]) + first.bias[...]

        def look(moving):
            self._check_shape(moving)
            return self._after_first_layer(moving.reshape(-1) @ moving_rows + fixed_share)

        return look

    def _check_shape(self, image):
        if tuple(image.shape[: self.ndim]) != self.shape:
            raise ValueError(f"this MLP was built for images of shape {self.shape}; got {tuple(image.shape[: self.ndim])}")


def _conv(*args, **kwargs) -> nnx.Conv:
    # On CPU, jaxreg.nn.conv runs 3-D convolutions as 2-D ones and keeps the gradients fast
    # inside train()'s scan and under vmap: the 3-D training step ran 4-5x faster.
    return nnx.Conv(*args, conv_general_dilated=conv_general_dilated, **kwargs)


class UNet(nnx.Module):
    """Convolutional encoder-decoder with skip connections, for any spatial rank.

    ``features`` lists the channels at each resolution, finest first; each level halves
    the size with a stride-2 convolution and the decoder doubles it back (nearest
    upsampling, then a convolution over the upsampled and skipped features). Inputs of any
    size work: they are edge-padded to a multiple of ``2**(len(features) - 1)`` and the
    output is cropped back. The output has ``out_channels`` (default ``ndim``) channels and
    starts at zero.
    """

    def __init__(self, ndim: int, *, in_channels: int = 2, features: Sequence[int] = (16, 32, 32, 64), out_channels: int | None = None, rngs: nnx.Rngs):
        if not features:
            raise ValueError("UNet needs at least one level in features")
        self.ndim = int(ndim)
        self.depth = len(features) - 1
        k = (3,) * self.ndim
        features = [int(f) for f in features]
        self.stem = _conv(in_channels, features[0], k, rngs=rngs)
        self.down = nnx.List([_conv(a, b, k, strides=2, rngs=rngs) for a, b in zip(features[:-1], features[1:])])
        self.up = nnx.List([_conv(b + a, a, k, rngs=rngs) for a, b in zip(features[:-1], features[1:])])
        self.out = _conv(features[0], out_channels or self.ndim, k, kernel_init=_zeros, bias_init=_zeros, rngs=rngs)

    def __call__(self, pair):
        spatial = pair.shape[: self.ndim]
        multiple = 2**self.depth
        pad = [(0, -n % multiple) for n in spatial] + [(0, 0)]
        x = jnp.pad(pair, pad, mode="edge")[None]
        x = nnx.leaky_relu(self.stem(x), 0.2)
        skips = []
        for conv in self.down:
            skips.append(x)
            x = nnx.leaky_relu(conv(x), 0.2)
        for conv, skip in zip(reversed(self.up), reversed(skips)):
            for axis in range(1, self.ndim + 1):
                x = jnp.repeat(x, 2, axis=axis)
            x = nnx.leaky_relu(conv(jnp.concatenate([x, skip], axis=-1)), 0.2)
        x = self.out(x)[0]
        return x[tuple(slice(0, n) for n in spatial)]


# -------------------------------------------------------------------------------- heads


class DisplacementField(nnx.Module):
    """``x -> x + u(x)`` with ``u = backbone(moving, fixed)`` in voxels of the fixed image."""

    def __init__(self, backbone: nnx.Module):
        self.backbone = backbone
        self.ndim = backbone.ndim

    def __call__(self, moving, fixed) -> Transform:
        return Displacement(self.backbone(stack_pair(moving, fixed, self.ndim)))

    def given_fixed(self, fixed):
        """``moving -> self(moving, fixed)``, with what depends on ``fixed`` alone computed
        once where the backbone can (:meth:`MLP.given_fixed`)."""
        if not hasattr(self.backbone, "given_fixed"):
            return lambda moving: self(moving, fixed)
        fixed_channels = _with_channels(fixed, self.ndim, name="fixed").astype(jnp.float32)
        look = self.backbone.given_fixed(fixed_channels)

        def call(moving):
            return Displacement(look(_checked_pair(moving, fixed_channels, self.ndim)[0]))

        return call


class VelocityField(nnx.Module):
    """``exp(v)`` with ``v = backbone(moving, fixed)``: diffeomorphic for a smooth ``v``."""

    def __init__(self, backbone: nnx.Module, *, steps: int = 7):
        self.backbone = backbone
        self.ndim = backbone.ndim
        self.steps = int(steps)

    def __call__(self, moving, fixed) -> Transform:
        return Velocity(self.backbone(stack_pair(moving, fixed, self.ndim)), steps=self.steps)


class AffineHead(nnx.Module):
    """An affine map about the image centre from a small strided-convolution encoder.

    ``features`` are the encoder's channels (each convolution halves the size); the mean
    of the last feature map goes through a linear layer, initialised at zero, to the
    ``d*d + d`` parameters of :meth:`Affine.from_params` (``kind="affine"``).
    """

    def __init__(self, ndim: int, *, in_channels: int = 2, features: Sequence[int] = (16, 32, 64), rngs: nnx.Rngs):
        self.ndim = int(ndim)
        k = (3,) * self.ndim
        sizes = [in_channels, *(int(f) for f in features)]
        self.encoder = nnx.List([_conv(a, b, k, strides=2, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = nnx.Linear(sizes[-1], self.ndim * self.ndim + self.ndim, kernel_init=_zeros, bias_init=_zeros, rngs=rngs)

    def __call__(self, moving, fixed) -> Transform:
        pair = stack_pair(moving, fixed, self.ndim)
        x = pair[None]
        for conv in self.encoder:
            x = nnx.leaky_relu(conv(x), 0.2)
        params = self.out(jnp.mean(x[0], axis=tuple(range(self.ndim))))
        center = (jnp.asarray(pair.shape[: self.ndim], jnp.float32) - 1.0) / 2.0
        return Affine.from_params(params, kind="affine", ndim=self.ndim, center=center)


# ----------------------------------------------------------------------------- wrappers


def _warped(moving, transform: Transform):
    """``moving`` resampled through ``transform`` on its own grid (channels kept)."""
    return warp(moving, transform, order=1, mode="constant")


class TwoStep(nnx.Module):
    """Register with ``first``, warp the moving image, register again with ``second``.

    Returns ``compose(phi, psi)``: ``phi = first(moving, fixed)`` and
    ``psi = second(moving∘phi, fixed)``, so the moving image is read at ``phi(psi(x))``.
    The composition is kept exact (no resampling of ``phi`` onto a grid).
    """

    def __init__(self, first: nnx.Module, second: nnx.Module):
        self.first = first
        self.second = second

    def __call__(self, moving, fixed) -> Transform:
        phi = self.first(moving, fixed)
        psi = self.second(_warped(moving, phi), fixed)
        return compose(phi, psi)


class Multistep(nnx.Module):
    """One network applied ``steps`` times with the same weights, a learned iterative optimizer.

    Step ``k`` warps the ORIGINAL moving image with the map so far, looks at the warped
    image and the fixed one, and composes its correction on the right, as the left chain
    ``TwoStep(TwoStep(TwoStep(net, net), net), ...)`` does (ICON's nested
    ``TwoStepRegistration(net, net)``); moving images are never resampled twice. The map
    is kept as a displacement on the fixed grid, ``u_k(x) = c_k(x) + u_{k-1}(x + c_k(x))``: exact at the voxel centres, linearly
    interpolated between them. The steps run in a ``lax.scan``, so the program (and its
    compile time) does not grow with ``steps``, and XLA cannot fuse one step's
    interpolation into the next one's and recompute it per tap (see :mod:`jaxreg.sampling`),
    which made eight unrolled steps cost hundreds of times one.

    ``remat=True`` recomputes each step in the backward pass instead of keeping its
    intermediate values: memory of one step instead of ``steps``, for large networks or
    3-D images. The default keeps them, which is faster where they are small: 42 against
    53 ms per gradient of 128 MNIST pairs x 8 steps (2 cores). Neither a partial
    recomputation nor unrolling beat it (MNIST diffusion step, 64 pairs, Intel Xeon, 2
    cores, in turn): 26.1 ms keeping everything, 26.5 with ``checkpoint_policies.dots_saveable``,
    26.9 with ``dots_with_no_batch_dims_saveable``, 29.5 recomputing everything; the scan
    with ``unroll=2`` took 29.5 ms. Writing the kept values is 17 % of the step's time.
    :meth:`trajectory` returns the displacement after every step (for figures).

    Every step looks at the same fixed image, so where ``net`` has ``given_fixed``
    (:meth:`DisplacementField.given_fixed` over an :class:`MLP`) what depends on the fixed
    image alone is computed once before the steps: half of the first layer's products
    and of its weight gradient. Measured on the MNIST training step (same process,
    alternating): 5-7 % faster (diffusion, 1 device; ICON, 2 devices).
    """

    def __init__(self, net: nnx.Module, *, steps: int, remat: bool = False):
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1; got {steps}")
        self.net = net
        self.steps = int(steps)
        self.remat = bool(remat)

    def trajectory(self, moving, fixed):
        """Displacements ``(steps, *spatial, d)`` of the map after each step, in voxels."""
        first, rest = self._run(moving, fixed, keep_steps=True)
        return jnp.concatenate([first[None], rest], axis=0)

    def __call__(self, moving, fixed) -> Transform:
        return Displacement(self._run(moving, fixed, keep_steps=False))

    def _run(self, moving, fixed, *, keep_steps: bool):
        """The last displacement, or the first and the stack of the others with ``keep_steps``."""
        grid = Grid(jnp.shape(fixed)[: _spatial_rank(self.net, fixed)])
        look = self.net.given_fixed(fixed) if hasattr(self.net, "given_fixed") else (lambda m: self.net(m, fixed))
        first = Displacement.from_transform(look(moving), grid).field

        def step(u, _):
            correction = look(_warped(moving, Displacement(u)))
            u = Displacement.from_transform(compose(Displacement(u), correction), grid).field
            # Stacking every step's map costs a copy per step; a plain call needs the last.
            return u, (u if keep_steps else None)

        last, rest = jax.lax.scan(jax.checkpoint(step) if self.remat else step, first, None, length=self.steps - 1)
        return (first, rest) if keep_steps else last


def _spatial_rank(net, image) -> int:
    ndim = getattr(net, "ndim", None)
    return jnp.ndim(image) if ndim is None else ndim


def _block_mean(image, factor: int, ndim: int):
    """Average over non-overlapping ``factor``-wide blocks (edge-padded to a multiple)."""
    image = _with_channels(image, ndim, name="image")
    spatial = image.shape[:ndim]
    pad = [(0, -n % factor) for n in spatial] + [(0, 0)]
    image = jnp.pad(image, pad, mode="edge")
    blocks = []
    for n in image.shape[:ndim]:
        blocks += [n // factor, factor]
    reshaped = image.reshape(tuple(blocks) + image.shape[ndim:])
    return reshaped.mean(axis=tuple(range(1, 2 * ndim, 2)))


class Downsampled(nnx.Module):
    """Run ``net`` on the pair averaged over ``factor``-wide blocks.

    The transform it returns lives on the coarse grid; it is mapped back to voxels of the
    full-size fixed image (``T(x) = S(t(S^-1 x))`` with ``S`` the coarse grid's
    voxel-to-full-voxel matrix), so its field is interpolated linearly at full size.
    """

    def __init__(self, net: nnx.Module, *, factor: int = 2, ndim: int):
        if int(factor) < 1:
            raise ValueError(f"factor must be >= 1; got {factor}")
        self.net = net
        self.factor = int(factor)
        self.ndim = int(ndim)

    def __call__(self, moving, fixed) -> Transform:
        coarse_moving = _block_mean(moving, self.factor, self.ndim)
        coarse_fixed = _block_mean(fixed, self.factor, self.ndim)
        coarse = self.net(coarse_moving, coarse_fixed)
        return _lift(coarse, _coarse_to_full(self.factor, self.ndim))


def _coarse_to_full(factor: int, ndim: int) -> Affine:
    """Coarse voxel -> full voxel: block ``i`` is centred at ``i * factor + (factor - 1) / 2``."""
    return Affine.from_linear(factor * jnp.eye(ndim), jnp.full((ndim,), (factor - 1) / 2.0))


def _lift(transform: Transform, coarse_to_full: Affine) -> Transform:
    """``S ∘ t ∘ S^-1``; a displacement or velocity field is re-expressed on its grid instead."""
    if isinstance(transform, (Displacement, Velocity)):
        linear = coarse_to_full.linear
        # A field in coarse voxels: its grid becomes S·grid and its vectors scale by S.
        field = precise_matmul(transform.field, linear.T)
        affine = precise_matmul(coarse_to_full.matrix, jnp.asarray(transform.affine))
        if isinstance(transform, Velocity):
            return Velocity(field, affine, steps=transform.steps)
        return Displacement(field, affine)
    return compose(coarse_to_full, transform, coarse_to_full.inverse())

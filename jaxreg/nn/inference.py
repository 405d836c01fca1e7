"""Running a trained network on images in physical space.

A network works in voxel indices of the image it sees. :func:`register_images` resamples the
moving image onto the fixed image's grid (through world coordinates, so scans of different
shape, spacing or orientation are fine), optionally onto a grid of the network's input
shape over the same extent, normalises intensities, runs the network, and lifts its
transform back to world coordinates: ``T = A ∘ t ∘ A⁻¹`` with ``A`` the voxel-to-world
matrix of the grid the network saw. ``warp(moving, T, fixed.grid)`` is then the registered
image, and ``T`` is written by :mod:`jaxreg.itk` like any classical result.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxreg.grid import Grid, Image, as_image
from jaxreg.registration import normalize_intensity
from jaxreg.transforms import Affine, Transform, compose, warp

__all__ = ["Prediction", "network_grid", "register_images"]


class Prediction(NamedTuple):
    transform: Transform  # world -> world, the moving image is read at transform(x)
    warped: Image  # moving resampled onto the fixed grid
    grid: Grid  # the grid the network saw


def network_grid(grid: Grid, shape: Sequence[int] | None) -> Grid:
    """A grid of ``shape`` over the extent of ``grid`` (``grid`` itself when ``shape`` is None or equal)."""
    if shape is None or tuple(shape) == grid.shape:
        return grid
    shape = tuple(int(n) for n in shape)
    if len(shape) != grid.ndim:
        raise ValueError(f"the network takes {len(shape)}-D inputs of shape {shape}; the fixed image is {grid.ndim}-D {grid.shape}")
    # Voxels n/m times larger over the same extent: Grid.scaled's block-centre geometry,
    # and its rounded shape round(n / (n/m)) is m.
    return grid.scaled([n / m for n, m in zip(grid.shape, shape)])


def register_images(network, fixed, moving, *, input_shape: Sequence[int] | None = None, normalize: bool = True) -> Prediction:
    """Register ``moving`` to ``fixed`` (:class:`~jaxreg.grid.Image` or plain arrays) with ``network``."""
    fixed, moving, grid, fixed_input, moving_input = _network_inputs(fixed, moving, input_shape, normalize)
    index_transform = jax.jit(lambda m, f: network(m, f))(moving_input, fixed_input)
    return _lift(index_transform, grid, fixed, moving)


def _network_inputs(fixed, moving, input_shape, normalize: bool):
    """``(fixed, moving, grid, fixed_input, moving_input)``: both images as
    :class:`~jaxreg.grid.Image`, the grid the network sees, and the arrays it is given (both
    images resampled onto that grid, intensities normalised if asked). Shared with
    networks that cannot be traced by JAX (``benchmarks/peers/icon_3d.py``)."""
    fixed, moving = as_image(fixed), as_image(moving, ndim=as_image(fixed).ndim)
    if fixed.ndim != moving.ndim:
        raise ValueError(f"fixed is {fixed.ndim}-D and moving is {moving.ndim}-D")
    grid = network_grid(fixed.grid, input_shape)
    identity = Affine.identity(grid.ndim)
    fixed_input = Image(warp(fixed, identity, grid).data, grid.affine)
    moving_input = Image(warp(moving, identity, grid).data, grid.affine)
    if normalize:
        fixed_input, moving_input = normalize_intensity(fixed_input), normalize_intensity(moving_input)
    return fixed, moving, grid, fixed_input.data, moving_input.data


def _lift(index_transform: Transform, grid: Grid, fixed: Image, moving: Image) -> Prediction:
    """The network's transform in voxels of ``grid`` lifted to world space, and ``moving``
    resampled through it onto the fixed grid."""
    to_world = Affine(jnp.asarray(grid.affine, jnp.float32))
    transform = compose(to_world, index_transform, to_world.inverse())
    warped = jax.jit(lambda image, t: warp(image, t, fixed.grid))(moving, transform)
    return Prediction(transform, warped, grid)

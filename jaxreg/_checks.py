"""Trace-time input validation shared by every module.

Every check looks only at static information (shape, dtype, rank) so it works on
tracers inside ``jit`` and ``vmap``. Value checks (NaN, constant images) cannot
raise under ``jit``; those live in :func:`check_finite` and :func:`check_image_values`
for eager callers and do nothing on tracers.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def spatial_rank_of(image_ndim: int, ndim: int | None, *, name: str) -> tuple[int, bool]:
    """Resolve the spatial rank of an image and whether it carries channels.

    A scalar image has ``ndim`` axes; a multi-channel one has ``ndim + 1`` with the
    channel last. Returns ``(ndim, has_channels)``.
    """
    if ndim is None:
        return image_ndim, False
    if image_ndim == ndim:
        return ndim, False
    if image_ndim == ndim + 1:
        return ndim, True
    raise ValueError(
        f"{name} has {image_ndim} axes but the coordinates are {ndim}-D: expected a scalar "
        f"image of {ndim} axes or a channels-last image of {ndim + 1} axes"
    )


def check_points(points, ndim: int | None = None, *, name: str = "points"):
    """Check a ``(..., d)`` array of points; return ``d``."""
    shape = jnp.shape(points)
    if len(shape) == 0:
        raise ValueError(f"{name} must have a last axis of length d (the spatial rank); got a scalar")
    d = shape[-1]
    if d < 1:
        raise ValueError(f"{name} has an empty last axis; expected the spatial rank d >= 1")
    if ndim is not None and d != ndim:
        raise ValueError(f"{name} has last axis {d}, expected the spatial rank {ndim}; shape {shape}")
    if not jnp.issubdtype(jnp.result_type(points), jnp.floating):
        raise TypeError(f"{name} must be floating point; got dtype {jnp.result_type(points)}")
    return d


def check_field(field, ndim: int | None = None, *, name: str = "field"):
    """Check a vector field of shape ``(*spatial, d)`` with ``len(spatial) == d``."""
    shape = jnp.shape(field)
    if len(shape) < 2 or shape[-1] != len(shape) - 1:
        raise ValueError(
            f"{name} must have shape (*spatial, d) with d = number of spatial axes; got {shape}"
        )
    if ndim is not None and shape[-1] != ndim:
        raise ValueError(f"{name} is {shape[-1]}-D, expected {ndim}-D; shape {shape}")
    if any(n == 0 for n in shape):
        raise ValueError(f"{name} is empty; shape {shape}")
    return shape[-1]


def check_same_shape(a, b, *, names: tuple[str, str] = ("a", "b")):
    sa, sb = jnp.shape(a), jnp.shape(b)
    if sa != sb:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape; got {sa} and {sb}")


def check_not_empty(x, *, name: str):
    shape = jnp.shape(x)
    if any(n == 0 for n in shape):
        raise ValueError(f"{name} is empty; shape {shape}")


def _concrete(value):
    """The value as a float array, or None for a tracer (unknown until run time)."""
    try:
        return np.atleast_1d(np.asarray(value, dtype=float))
    except Exception:
        return None


def check_positive(value, *, name: str):
    values = _concrete(value)
    if values is None:
        return
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"{name} must be positive and finite; got {value}")


def check_nonnegative(value, *, name: str):
    values = _concrete(value)
    if values is None:
        return
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"{name} must be non-negative and finite; got {value}")


def per_axis(value, ndim: int, *, name: str) -> tuple[float, ...]:
    """Broadcast a scalar or a length-``ndim`` sequence to a tuple of ``ndim`` floats."""
    if np.ndim(value) == 0:
        return (float(value),) * ndim
    values = tuple(float(v) for v in value)
    if len(values) != ndim:
        raise ValueError(f"{name} needs one value per spatial axis ({ndim}); got {len(values)}")
    return values


def check_finite(x, *, name: str):
    """Eager check for NaN/Inf; skipped silently on tracers (use inside jit is a no-op)."""
    try:
        values = np.asarray(x)
    except Exception:  # a tracer: values are unknown at trace time
        return
    if values.size and not np.all(np.isfinite(values)):
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        raise ValueError(f"{name} contains {bad} NaN or Inf values")


def check_real(x, *, name: str):
    """Refuse complex and non-numeric dtypes (trace time: only the dtype is looked at)."""
    dtype = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
    if dtype != np.bool_ and not np.issubdtype(dtype, np.integer) and not np.issubdtype(dtype, np.floating):
        raise TypeError(f"{name} must hold real numbers; got dtype {dtype}, shape {jnp.shape(x)}")


def check_image_values(x, *, name: str, constant: bool = True):
    """Eager: refuse NaN or Inf voxels and, with ``constant``, an image that is one value
    everywhere (no similarity can see anything in it). Does nothing on tracers."""
    if isinstance(x, jax.core.Tracer):
        return
    values = np.asarray(x)
    if values.size == 0:
        return
    if np.issubdtype(values.dtype, np.inexact):
        finite = np.isfinite(values)
        if not finite.all():
            bad = int(values.size - np.count_nonzero(finite))
            raise ValueError(f"{name} has {bad} NaN or Inf voxels out of {values.size}")
    if constant:
        first = values.flat[0]
        if np.all(values == first):
            raise ValueError(f"{name} is constant (every voxel is {first}); there is nothing to register")


def normalize_axes(axes: Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if axes is None:
        return tuple(range(ndim))
    return tuple(a % ndim for a in axes)

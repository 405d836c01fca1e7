"""Training losses for registration networks, as factories of pure functions.

Every factory returns

    ``loss(net, pair) -> (scalar, metrics)``

for ONE pair: ``net`` is any callable ``(moving, fixed) -> Transform`` and ``pair`` a dict
with ``"moving"`` and ``"fixed"`` images of the same shape (index space), and optionally
``"moving_labels"`` / ``"fixed_labels"`` (integer label maps, for a Dice term) and
``"target"`` (a precomputed displacement field ``(*spatial, d)`` in voxels, for
distillation). ``metrics`` is a dict of scalars (the terms of the loss). Batches are
``jax.vmap`` over pairs; :mod:`jaxreg.nn.training` averages them.

Conventions (all in voxel units of the fixed image):

- ``regularized``: ``sim(moving∘φ, fixed) + λ·reg(u)`` with ``u = φ(x) - x`` sampled on the
  fixed grid, e.g. ``reg = diffusion()``: the sum over components and axes of the mean
  squared forward difference.
- ``icon``: both directions, ``sim(A∘φ_AB, B) + sim(B∘φ_BA, A) + λ·mean |φ_AB(φ_BA(x)) - x|²``
  over the grid points (ICON, Greer et al. 2021).
- ``gradicon``: the same with ``λ·mean ||D(φ_AB∘φ_BA)(x) - I||_F²``, the Jacobian by
  central differences (GradICON, Tian et al. 2023).
- ``supervised``: ``mean |u(x) - target(x)|²`` (summed over components), Quicksilver-style
  distillation of a classical registration.

A Dice term (``dice_weight``, ``labels``) adds ``dice_weight·(1 - soft Dice)`` of the
linearly warped one-hot moving labels against the fixed ones.

>>> import jax.numpy as jnp
>>> from jaxreg.transforms import Displacement
>>> shift = lambda moving, fixed: Displacement(jnp.zeros((6, 6, 2)).at[..., 1].set(1.0))
>>> ramp = jnp.tile(jnp.arange(6.0), (6, 1))
>>> loss, metrics = regularized(lmbda=0.05)(shift, {"moving": ramp, "fixed": ramp + 1.0})
>>> float(metrics["similarity"]), float(metrics["regularity"])  # only the last column reads off the image
(6.0, 0.0)
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax.numpy as jnp

from jaxreg import differential, metrics as _metrics
from jaxreg.grid import Grid
from jaxreg.losses import regularizers, similarity as _similarity
from jaxreg.transforms import Transform, compose, warp

__all__ = ["regularized", "icon", "gradicon", "supervised", "displacement_on_grid"]

Loss = Callable[[Callable, dict], tuple]


def _grid_of(image, ndim: int) -> Grid:
    return Grid(jnp.shape(image)[:ndim])


def displacement_on_grid(transform: Transform, grid: Grid):
    """``φ(x) - x`` at the voxel centres of ``grid``, ``(*shape, d)``."""
    return transform.mapped_points(grid) - grid.points()


def _check_pair(pair, *keys):
    if not isinstance(pair, dict):
        raise TypeError(f"a training pair is a dict with 'moving' and 'fixed'; got {type(pair).__name__}")
    missing = [k for k in ("moving", "fixed", *keys) if k not in pair]
    if missing:
        raise KeyError(f"training pair lacks {missing}; it has {sorted(pair)}")


def _labels_tuple(labels) -> tuple[int, ...]:
    labels = tuple(int(v) for v in labels)
    if not labels:
        raise ValueError("a Dice term needs the label values to score, e.g. labels=(1, 2, 3)")
    return labels


def _dice_term(transform: Transform, moving_labels, fixed_labels, labels: tuple[int, ...]):
    """``1 - soft Dice`` of the linearly warped one-hot moving labels against the fixed ones."""
    values = jnp.asarray(labels)
    one_hot_moving = (moving_labels[..., None] == values).astype(jnp.float32)
    one_hot_fixed = (fixed_labels[..., None] == values).astype(jnp.float32)
    warped = warp(one_hot_moving, transform, order=1, mode="constant")
    return 1.0 - jnp.mean(_metrics.soft_dice(warped, one_hot_fixed))


def _similarity_and_labels(similarity, dice_weight, labels):
    sim = similarity if similarity is not None else _similarity.mse()
    label_values = _labels_tuple(labels) if dice_weight else ()

    def data_term(transform, moving, fixed, moving_labels=None, fixed_labels=None):
        value = sim(warp(moving, transform, order=1, mode="constant"), fixed)
        terms = {"similarity": value}
        if dice_weight:
            dice_loss = _dice_term(transform, moving_labels, fixed_labels, label_values)
            terms["dice_loss"] = dice_loss
            value = value + dice_weight * dice_loss
        return value, terms

    return data_term, label_values


def regularized(similarity=None, regularizer=None, *, lmbda: float = 0.05, dice_weight: float = 0.0, labels: Sequence[int] = ()) -> Loss:
    """``sim(moving∘φ, fixed) + lmbda·reg(φ - id)`` (defaults: ``mse`` and ``diffusion``)."""
    reg = regularizer if regularizer is not None else regularizers.diffusion()
    data_term, _ = _similarity_and_labels(similarity, dice_weight, labels)

    def loss(net, pair):
        _check_pair(pair, *(("moving_labels", "fixed_labels") if dice_weight else ()))
        transform = net(pair["moving"], pair["fixed"])
        grid = _grid_of(pair["fixed"], transform.ndim)
        data, terms = data_term(transform, pair["moving"], pair["fixed"], pair.get("moving_labels"), pair.get("fixed_labels"))
        regularity = reg(displacement_on_grid(transform, grid))
        return data + lmbda * regularity, {**terms, "regularity": regularity}

    return loss


def _both_directions(net, pair, data_term):
    a, b = pair["moving"], pair["fixed"]
    phi_ab = net(a, b)
    phi_ba = net(b, a)
    data_ab, terms_ab = data_term(phi_ab, a, b, pair.get("moving_labels"), pair.get("fixed_labels"))
    data_ba, terms_ba = data_term(phi_ba, b, a, pair.get("fixed_labels"), pair.get("moving_labels"))
    terms = {k: terms_ab[k] + terms_ba[k] for k in terms_ab}
    grid = _grid_of(b, phi_ab.ndim)
    round_trip = compose(phi_ab, phi_ba).mapped_points(grid)
    return data_ab + data_ba, terms, round_trip, grid


def icon(similarity=None, *, lmbda: float = 1.0, dice_weight: float = 0.0, labels: Sequence[int] = ()) -> Loss:
    """ICON: symmetric similarity + ``lmbda·mean |φ_AB(φ_BA(x)) - x|²`` (voxels²)."""
    data_term, _ = _similarity_and_labels(similarity, dice_weight, labels)

    def loss(net, pair):
        _check_pair(pair, *(("moving_labels", "fixed_labels") if dice_weight else ()))
        data, terms, round_trip, grid = _both_directions(net, pair, data_term)
        inverse_consistency = jnp.mean(jnp.sum((round_trip - grid.points()) ** 2, axis=-1))
        return data + lmbda * inverse_consistency, {**terms, "inverse_consistency": inverse_consistency}

    return loss


def gradicon(similarity=None, *, lmbda: float = 1.0, dice_weight: float = 0.0, labels: Sequence[int] = ()) -> Loss:
    """GradICON: symmetric similarity + ``lmbda·mean ||D(φ_AB∘φ_BA) - I||_F²``."""
    data_term, _ = _similarity_and_labels(similarity, dice_weight, labels)

    def loss(net, pair):
        _check_pair(pair, *(("moving_labels", "fixed_labels") if dice_weight else ()))
        data, terms, round_trip, grid = _both_directions(net, pair, data_term)
        jacobian = differential.jacobian_of_map(round_trip, grid)
        deviation = jacobian - jnp.eye(grid.ndim, dtype=jacobian.dtype)
        gradient_consistency = jnp.mean(jnp.sum(deviation**2, axis=(-2, -1)))
        return data + lmbda * gradient_consistency, {**terms, "gradient_inverse_consistency": gradient_consistency}

    return loss


def supervised() -> Loss:
    """Distillation: ``mean |u(x) - target(x)|²`` against ``pair["target"]`` (voxels)."""

    def loss(net, pair):
        _check_pair(pair, "target")
        transform = net(pair["moving"], pair["fixed"])
        grid = _grid_of(pair["fixed"], transform.ndim)
        target = jnp.asarray(pair["target"])
        if target.shape != grid.shape + (grid.ndim,):
            raise ValueError(f"target displacement must have shape {grid.shape + (grid.ndim,)}; got {target.shape}")
        error = jnp.mean(jnp.sum((displacement_on_grid(transform, grid) - target) ** 2, axis=-1))
        return error, {"displacement_error": error}

    return loss

"""Small helpers shared by the AIRLab-style examples (not part of the library).

Kept apart so that each example shows only the registration itself: where the OASIS
data live, the synthetic pair with a known warp and its scores (:func:`warped_blobs`,
:func:`scores`), timing a jitted call (compile and run apart), writing ``metrics.json``
atomically and printing the metrics.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

#: The labels of ``jaxreg.synthetic.blobs(..., labels=4)``.
LABELS = (1, 2, 3, 4)

ROOT = Path(__file__).resolve().parents[1]
#: ``../shared/data`` next to the repository (override with JAXREG_SHARED_DATA, as the tests do).
SHARED_DATA = Path(os.environ.get("JAXREG_SHARED_DATA", ROOT / ".." / "shared" / "data"))
OASIS = SHARED_DATA / "oasis"


def oasis_path(subject: int, name: str) -> Path:
    """``../shared/data/oasis/OASIS_OAS1_000{subject}_MR1/{name}`` (may not exist)."""
    return OASIS / f"OASIS_OAS1_{subject:04d}_MR1" / name


def synthetic_pair(seed: int, shape, amplitude) -> dict:
    """:func:`warped_blobs` as the dict the scoring helpers take (``scores(..., **pair)``)."""
    fixed, fixed_labels, moving, moving_labels, truth = warped_blobs(jax.random.PRNGKey(seed), tuple(shape), amplitude)
    return dict(fixed=fixed, fixed_labels=fixed_labels, moving=moving, moving_labels=moving_labels, truth=truth)


def level_steps(steps: int, levels: int) -> tuple[int, ...]:
    """``steps`` at the coarsest pyramid level and 0.6x that at each finer one (at least 1)."""
    return tuple(max(1, round(steps * 0.6**level)) for level in range(levels))


@functools.partial(jax.jit, static_argnames="shape")  # one program, not op-by-op dispatch
def warped_blobs(key, shape, amplitude):
    """A synthetic pair with a known warp: ``(fixed, fixed_labels, moving, moving_labels, truth)``.

    ``fixed`` and its labels are ``synthetic.blobs``; ``truth`` is a random stationary
    velocity field (largest velocity ``amplitude`` fields of view, smooth over a quarter
    of one) and ``moving = fixed o exp(truth)``, so a registration that maps fixed points
    to moving ones should find ``exp(-truth)``.
    """
    from jaxreg import synthetic
    from jaxreg.grid import Grid
    from jaxreg.transforms import warp

    key_image, key_warp = jax.random.split(key)
    fixed, fixed_labels = synthetic.blobs(key_image, shape, labels=len(LABELS))
    n = min(shape)
    truth = synthetic.random_velocity(key_warp, Grid(shape), amplitude=amplitude * n, smoothness=0.25 * n)
    return fixed, fixed_labels, warp(fixed, truth), warp(fixed_labels, truth, order=0), truth


@jax.jit
def _scores(transform, fixed, fixed_labels, moving, moving_labels, truth):
    from jaxreg import metrics
    from jaxreg.grid import Grid
    from jaxreg.losses import similarity
    from jaxreg.transforms import jacobian_determinant, warp

    grid = Grid(fixed.shape)
    inside = (fixed_labels > 0).astype(jnp.float32)
    # moving = fixed o exp(truth), so the ideal transform is exp(-truth).
    error = jnp.linalg.norm(transform.mapped_points(grid) - truth.inverse().mapped_points(grid), axis=-1)
    determinant = jacobian_determinant(transform, grid)
    return {
        "mse": similarity.mse()(warp(moving, transform), fixed),
        "dice": metrics.mean_dice(warp(moving_labels, transform, order=0), fixed_labels, labels=LABELS),
        "field_error_mm": jnp.sum(error * inside) / jnp.sum(inside),
        "min_det_jacobian": jnp.min(determinant),
        "folds_percent": 100 * metrics.negative_jacobian_fraction(determinant),
    }


def scores(transform, prefix: str, *, fixed, fixed_labels, moving, moving_labels, truth) -> dict:
    """How well ``transform`` registers a :func:`warped_blobs` pair, as ``{prefix}_*`` floats:
    MSE and mean Dice of the warped moving image and labels, the mean distance to the true
    transform inside the labels (mm), the smallest Jacobian determinant and the
    percentage of folded pixels (``det <= 0``)."""
    values = _scores(transform, fixed, fixed_labels, moving, moving_labels, truth)
    return {f"{prefix}_{k}": rounded(v, 7 if k == "mse" else 4) for k, v in values.items()}


def timed(fn, *args):
    """``jax.jit(fn)(*args)`` compiled ahead of time; returns ``(out, compile_s, run_s)``."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compiled_at = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return out, compiled_at - start, time.perf_counter() - compiled_at


def write_metrics(out: Path, result: dict) -> Path:
    """Write ``result`` to ``out/metrics.json`` atomically; returns the path."""
    from jaxreg.io import write_atomically

    out.mkdir(parents=True, exist_ok=True)
    # write_atomically gives the file ordinary permissions (a NamedTemporaryFile is 0600).
    return write_atomically(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)), overwrite=True)


def print_metrics(result: dict, written=()):
    width = max(len(k) for k in result) + 2
    for key, value in result.items():
        print(f"{key:>{width}}: {value}")
    if written:
        print(f"{'written':>{width}}: " + ", ".join(str(p) for p in written))


def rounded(x, digits: int = 4) -> float:
    """A plain float for JSON (``float(jax_scalar)``, rounded)."""
    return round(float(np.asarray(x)), digits)


def plt_figure(*args, **kwargs):
    """A matplotlib ``Figure`` without pyplot (no global state, no GUI backend)."""
    from matplotlib.figure import Figure

    return Figure(*args, **kwargs)


def benchmark_turn():
    """When ``benchmarks/amortized.py`` runs an example side by side with its peer, the
    turn they share the machine by (see ``benchmarks/_turns.py``); None on its own."""
    if not os.environ.get("JAXREG_BENCH_TURN_FDS"):
        return None
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks._turns import Turn

    return Turn.from_environment()


def block_steps_per_second(history) -> list[float]:
    """Steps per second of each chunk of ``jaxreg.nn.train``'s history (the first holds
    compilation): the blocks a benchmark compares turn by turn with its peer's."""
    return [(b["step"] - a["step"]) / b["seconds"] for a, b in zip([{"step": 0}] + list(history), history)]


def training_devices(count: int):
    """The first ``count`` devices (None for one). Without an accelerator JAX is asked for
    ``count`` CPU devices, which must happen before it first runs anything."""
    if count < 1:
        raise SystemExit(f"--devices must be >= 1; got {count}")
    if count == 1:
        return None
    jax.config.update("jax_num_cpu_devices", count)
    devices = jax.devices()
    if len(devices) < count:
        raise SystemExit(f"--devices {count}: only {len(devices)} device(s) available")
    return devices[:count]

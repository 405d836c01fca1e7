"""Draw the figures of the documentation (docs/images/*.png) with jaxreg.viz.

A synthetic 2-D pair (jaxreg.synthetic: ellipsoids, moved by a small rotation and a random
stationary velocity field, as ``jaxreg demo --2d`` makes), registered by ``jaxreg.register``.
Deterministic: the same seed gives the same pair; the pictures change only when the
library's results do. Run from the repository root:

    python docs/make_figures.py            # writes docs/images/*.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

import jaxreg
from jaxreg import metrics, synthetic, viz

SEED = 0
SIZE = 96
DPI = 80


def make_pair(size: int, seed: int):
    """Fixed image and labels, and the same moved by a known affine + SVF (1 mm voxels,
    world origin at the image centre)."""
    affine = np.eye(3, dtype=np.float32)
    affine[:2, 2] = -(size - 1) / 2.0
    grid = jaxreg.Grid((size, size), affine)
    key_image, key_warp = jax.random.split(jax.random.PRNGKey(seed))
    image, labels = synthetic.blobs(key_image, grid.shape, labels=4)
    velocity = synthetic.random_velocity(key_warp, grid, amplitude=0.06 * size, smoothness=0.25 * size)
    rotation = jaxreg.transforms.rotation_matrix(jnp.array([np.deg2rad(6.0)]), 2)
    truth = jaxreg.compose(jaxreg.Affine.from_linear(1.03 * rotation, jnp.full(2, 0.03 * size)), velocity)
    fixed = jaxreg.Image(image, affine)
    moving = jaxreg.warp(fixed, truth)
    moving_labels = jaxreg.warp(jaxreg.Image(labels, affine), truth, order=0)
    return fixed, jaxreg.Image(labels, affine), moving, moving_labels


def panel(draw, path: Path, size=(3.0, 3.0)):
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    draw(ax)
    viz.save_figure(fig, path, overwrite=True, dpi=DPI)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "images"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    fixed, fixed_labels, moving, moving_labels = make_pair(SIZE, SEED)
    result = jaxreg.register(fixed, moving, preset="fast")
    warped_labels = jaxreg.warp(moving_labels, result.transform, fixed.grid, order=0)
    labels = (1, 2, 3, 4)
    before = float(metrics.mean_dice(moving_labels.data, fixed_labels.data, labels=labels))
    after = float(metrics.mean_dice(warped_labels.data, fixed_labels.data, labels=labels))
    print(f"stages {result.stages}; mean Dice {before:.3f} -> {after:.3f}")

    written = [
        panel(lambda ax: viz.overlay(fixed, moving, ax=ax, title=f"before (Dice {before:.2f})"), out / "overlay_before.png"),
        panel(lambda ax: viz.overlay(fixed, result.warped, ax=ax, title=f"after (Dice {after:.2f})"), out / "overlay_after.png"),
        panel(
            lambda ax: viz.checkerboard(viz.normalize(fixed), viz.normalize(result.warped), tiles=6, ax=ax, title="checkerboard fixed / warped"),
            out / "checkerboard.png",
        ),
        panel(
            lambda ax: viz.deformed_grid(result.transform, fixed.grid, ax, background=result.warped, title="deformed grid"),
            out / "deformed_grid.png",
        ),
        panel(lambda ax: viz.jacobian_map(result.transform, fixed.grid, ax=ax), out / "jacobian.png", size=(3.5, 3.0)),
    ]
    report = viz.report(fixed, moving, result.warped, result.transform, dpi=60)
    written.append(viz.save_figure(report, out / "report.png", overwrite=True, dpi=60))
    for path in written:
        print(f"{path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()

"""Pictures of a registration: overlays, checkerboards, deformed grids, Jacobian maps, a report.

matplotlib is optional (the ``viz`` extra) and imported only inside the functions that
draw. Figures are built as ``matplotlib.figure.Figure`` objects without pyplot: no global
state, no GUI backend, nothing to close; :func:`save_figure` writes one atomically.

**Slices.** A 2-D image is shown whole. A 3-D image is shown by one slice (the middle one
unless ``index=`` says otherwise) in a ``view``: ``"axial"``, ``"coronal"`` or
``"sagittal"`` fixes the index axis most aligned with the world S, A or R axis (the three
views always fix three different axes), an int fixes that index axis. The first remaining
index axis is drawn horizontally, the second vertically, and each display axis is turned
so that its world coordinate (R, A or S) grows to the right and upwards; the data are
never flipped, only the axes, so images and grid lines drawn in index coordinates agree.

**Colours.** Overlays put the fixed image in magenta (red + blue) and the moving one in
green (or red/green with ``colors="red-green"``): where they agree the picture is grey.
Intensities are normalised by :func:`normalize` (robust percentiles, whole volume).

Every drawing function takes ``ax=`` to draw into an existing axes and returns the
``Figure``; the pure parts (:func:`normalize`, :func:`overlay_rgb`, :func:`checkerboard`,
:func:`deformed_grid_lines`) return arrays and need no matplotlib.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxreg import _programs
from jaxreg.grid import Grid, Image

__all__ = [
    "VIEWS",
    "normalize",
    "view_axis",
    "overlay_rgb",
    "overlay",
    "checkerboard",
    "deformed_grid_lines",
    "deformed_grid",
    "jacobian_map",
    "report",
    "save_figure",
]

VIEWS = ("axial", "coronal", "sagittal")
_VIEW_WORLD_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # RAS: R, A, S
_COLORS = ("magenta-green", "red-green")
_FOLD_RGBA = (1.0, 0.85, 0.0, 1.0)  # folds in yellow, away from the diverging map's colours


# ------------------------------------------------------------------------------ helpers


def _mapped(transform, points):
    return transform(points)


def _data(x) -> np.ndarray:
    return np.asarray(x.data if isinstance(x, Image) else x)


def _grid(x) -> Grid:
    if isinstance(x, Image):
        return Grid(x.shape[: x.ndim], np.asarray(x.affine))
    if isinstance(x, Grid):
        return Grid(x.shape, np.asarray(x.affine))
    return Grid(np.shape(x))


def _check_scalar(x, *, name: str):
    if isinstance(x, Image) and x.has_channels:
        raise ValueError(f"{name} has channels {x.shape}; pass one channel at a time")


def normalize(x, percentiles: Sequence[float] = (0.5, 99.5)) -> np.ndarray:
    """Intensities mapped to ``[0, 1]``: the ``percentiles`` of the finite values go to 0 and 1,
    values beyond are clipped, NaN becomes 0. A constant image gives zeros. float64."""
    data = np.asarray(_data(x), dtype=np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(data.shape)
    lo, hi = np.percentile(data[finite], percentiles)
    if not hi > lo:
        return np.zeros(data.shape)
    out = np.clip((data - lo) / (hi - lo), 0.0, 1.0)
    return np.where(finite, out, 0.0)


def view_axis(grid: Grid, view="axial") -> int | None:
    """The index axis a 3-D ``view`` fixes (None for a 2-D grid, which is shown whole).

    ``view`` is ``"axial"``, ``"coronal"``, ``"sagittal"`` or an index axis. The named views
    are assigned to the three index axes by the permutation that best aligns them with the
    world S, A and R axes, so oblique and permuted volumes still get three distinct views.
    """
    if grid.ndim == 2:
        return None
    if grid.ndim != 3:
        raise ValueError(f"only 2-D and 3-D images can be shown; got {grid.ndim}-D")
    if isinstance(view, (int, np.integer)) and not isinstance(view, bool):
        if not 0 <= int(view) < 3:
            raise ValueError(f"view axis must be 0, 1 or 2; got {view}")
        return int(view)
    if view not in _VIEW_WORLD_AXIS:
        raise ValueError(f"view must be one of {VIEWS} or an index axis; got {view!r}")
    linear = np.asarray(grid.affine, dtype=np.float64)[:3, :3]
    directions = np.abs(linear) / np.linalg.norm(linear, axis=0)
    # perm[w] is the index axis assigned to world axis w.
    perm = max(itertools.permutations(range(3)), key=lambda p: sum(directions[w, p[w]] for w in range(3)))
    return perm[_VIEW_WORLD_AXIS[view]]


class _Slice:
    """Where a 2-D picture of a grid comes from: fixed axis, its position, the plane's axes."""

    def __init__(self, grid: Grid, view="axial", index: int | None = None):
        self.grid = grid
        self.axis = view_axis(grid, view)
        if self.axis is None:
            self.position = None
            self.plane = (0, 1)
        else:
            n = grid.shape[self.axis]
            self.position = n // 2 if index is None else int(index)
            if not 0 <= self.position < n:
                raise ValueError(f"slice index {index} is outside 0..{n - 1} along axis {self.axis}")
            self.plane = tuple(k for k in range(3) if k != self.axis)

    def take(self, data: np.ndarray) -> np.ndarray:
        data = np.asarray(data)
        return data if self.axis is None else np.take(data, self.position, axis=self.axis)

    def label(self) -> str:
        if self.axis is None:
            return ""
        names = {v: k for k, v in ((name, view_axis(self.grid, name)) for name in VIEWS)}
        return f"{names.get(self.axis, 'axis')} {self.axis}={self.position}"

    def show(self, ax, picture: np.ndarray, **kwargs):
        """``imshow`` a plane array (h-axis first, RGB last if any) in index coordinates."""
        picture = np.swapaxes(np.asarray(picture), 0, 1)  # rows are the vertical axis
        spacing = np.asarray(self.grid.spacing, dtype=np.float64)
        aspect = float(spacing[self.plane[1]] / spacing[self.plane[0]])
        kwargs.setdefault("interpolation", "nearest")
        shown = ax.imshow(picture, origin="lower", aspect=aspect, **kwargs)
        self.orient(ax)
        return shown

    def orient(self, ax):
        """Axis limits over the plane, each display axis turned so its world coordinate grows."""
        linear = np.asarray(self.grid.affine, dtype=np.float64)[: self.grid.ndim, : self.grid.ndim]
        limits = []
        for k in self.plane:
            column = linear[:, k]
            lo, hi = -0.5, self.grid.shape[k] - 0.5
            limits.append((hi, lo) if column[np.argmax(np.abs(column))] < 0 else (lo, hi))
        ax.set_xlim(*limits[0])
        ax.set_ylim(*limits[1])
        ax.set_xticks([])
        ax.set_yticks([])


def _new_axes(ax, figsize=(4.0, 4.0)):
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _on_grid(image, grid: Grid, *, name: str) -> np.ndarray:
    """``image`` as an array on ``grid``: as it is when it lives there, else resampled
    through the identity in world space (what a viewer showing both would display)."""
    data = _data(image)
    if isinstance(image, Image):
        if image.shape[: image.ndim] == grid.shape and np.allclose(np.asarray(image.affine), np.asarray(grid.affine), atol=1e-5):
            return data
        if image.ndim != grid.ndim:
            raise ValueError(f"{name} is {image.ndim}-D, the reference grid is {grid.ndim}-D")
        from jaxreg.transforms import Affine, warp

        return np.asarray(warp(image, Affine.identity(grid.ndim), grid).data)
    if data.shape != grid.shape:
        raise ValueError(f"{name} has shape {data.shape}, expected {grid.shape} (pass Images to compare different grids)")
    return data


# ------------------------------------------------------------------------------ overlay


def overlay_rgb(fixed, moving, *, colors: str = "magenta-green", percentiles=(0.5, 99.5)) -> np.ndarray:
    """RGB composite ``(*shape, 3)`` in ``[0, 1]`` of two same-shape images (any rank).

    ``"magenta-green"``: red = blue = normalised fixed, green = normalised moving;
    ``"red-green"``: red = fixed, green = moving, blue = 0.
    """
    if colors not in _COLORS:
        raise ValueError(f"colors must be one of {_COLORS}; got {colors!r}")
    f, m = _data(fixed), _data(moving)
    if f.shape != m.shape:
        raise ValueError(f"fixed has shape {f.shape} and moving {m.shape}; overlay needs the same shape")
    f, m = normalize(f, percentiles), normalize(m, percentiles)
    blue = f if colors == "magenta-green" else np.zeros_like(f)
    return np.stack([f, m, blue], axis=-1)


def overlay(fixed, moving, *, view="axial", index=None, colors="magenta-green", ax=None, title=None):
    """Figure of the colour overlay of ``fixed`` and ``moving`` (see :func:`overlay_rgb`).

    ``moving`` given as an Image on another grid is first resampled onto the fixed grid
    through the identity in world space (the "before registration" picture).
    """
    _check_scalar(fixed, name="fixed")
    _check_scalar(moving, name="moving")
    grid = _grid(fixed)
    rgb = overlay_rgb(_data(fixed), _on_grid(moving, grid, name="moving"), colors=colors)
    fig, ax = _new_axes(ax)
    where = _Slice(grid, view, index)
    where.show(ax, where.take(rgb))
    ax.set_title(title if title is not None else f"overlay {where.label()}".strip(), fontsize=9)
    return fig


# ------------------------------------------------------------------------- checkerboard


def checkerboard(a, b, tiles=8, *, ax=None, view="axial", index=None, title=None) -> np.ndarray:
    """Checkerboard composite of two same-shape arrays: ``a`` where the tile parity is even.

    ``tiles`` (an int or one per axis) is the number of tiles along each axis; voxel ``i``
    of an axis of length ``n`` lies in tile ``i * tiles // n``, and the parity is the sum of
    the tile numbers over all spatial axes (a 3-D board, so every slice is a checkerboard).
    Returns the composite over the whole array (dtype of ``a`` and ``b`` combined); with
    ``ax`` it is also drawn there (grey scale, one slice for 3-D).
    """
    da, db = _data(a), _data(b)
    if da.shape != db.shape:
        raise ValueError(f"checkerboard needs two arrays of the same shape; got {da.shape} and {db.shape}")
    counts = np.broadcast_to(np.asarray(tiles, dtype=np.int64), (da.ndim,))
    if np.any(counts < 1):
        raise ValueError(f"tiles must be positive; got {tiles}")
    parity = np.zeros(da.shape, dtype=np.int64)
    for axis, (n, t) in enumerate(zip(da.shape, counts)):
        shape = [1] * da.ndim
        shape[axis] = n
        parity = parity + ((np.arange(n) * t) // n).reshape(shape)
    board = np.where(parity % 2 == 0, da, db)
    if ax is not None:
        where = _Slice(_grid(a) if isinstance(a, Image) else Grid(da.shape), view, index)
        where.show(ax, where.take(board), cmap="gray")
        ax.set_title(title if title is not None else f"checkerboard {where.label()}".strip(), fontsize=9)
    return board


# ------------------------------------------------------------------------- deformed grid


def _line_spacing(spacing, plane_shape) -> tuple[int, int]:
    if spacing is None:
        step = max(1, int(round(min(plane_shape) / 16)))
        return step, step
    steps = tuple(int(s) for s in np.broadcast_to(np.asarray(spacing), (2,)))
    if any(s < 1 for s in steps):
        raise ValueError(f"grid line spacing must be >= 1 voxel; got {spacing}")
    return steps


def deformed_grid_lines(
    transform, grid: Grid, *, spacing=None, view="axial", index=None, samples_per_voxel: int = 2, space: str = "index"
) -> list[np.ndarray]:
    """Lines of the fixed grid in one plane, mapped through ``transform``, as ``(n, 2)`` arrays.

    Lines run along both in-plane index axes every ``spacing`` voxels (an int or one per
    plane axis; default about 16 lines across), each sampled ``samples_per_voxel`` times
    per voxel. Their voxel positions go to world space, through ``transform`` (fixed world
    -> moving world), and are returned in the plane's coordinates:

    - ``space="index"`` (default): fixed-grid index coordinates of the two plane axes, the
      coordinates the image panels use (out-of-plane motion is dropped);
    - ``space="world"``: the world coordinates most aligned with the two plane axes.

    The first lines returned run along the first plane axis (one per position on the
    second), the rest along the second.
    """
    if space not in ("index", "world"):
        raise ValueError(f"space must be 'index' or 'world'; got {space!r}")
    if samples_per_voxel < 1:
        raise ValueError(f"samples_per_voxel must be >= 1; got {samples_per_voxel}")
    grid = _grid(grid)
    if transform.ndim != grid.ndim:
        raise ValueError(f"transform is {transform.ndim}-D, grid is {grid.ndim}-D")
    where = _Slice(grid, view, index)
    p, q = where.plane
    steps = _line_spacing(spacing, (grid.shape[p], grid.shape[q]))
    world_axes = [int(np.argmax(np.abs(np.asarray(grid.affine, dtype=np.float64)[: grid.ndim, k]))) for k in (p, q)]
    affine = np.asarray(grid.affine, dtype=np.float64)
    pieces = []  # index points of each line, (n_line, d)
    for along, across, step in ((p, q, steps[1]), (q, p, steps[0])):
        n = grid.shape[along]
        t = np.linspace(0.0, n - 1, (n - 1) * samples_per_voxel + 1)
        for position in np.arange(0, grid.shape[across], step, dtype=np.float64):
            points = np.zeros((len(t), grid.ndim))
            points[:, along] = t
            points[:, across] = position
            if where.axis is not None:
                points[:, where.axis] = where.position
            pieces.append(points)
    index_points = np.concatenate(pieces)
    world = index_points @ affine[:-1, :-1].T + affine[:-1, -1]
    # One compiled call for all the points (op-by-op dispatch would compile every step).
    mapped = np.asarray(_programs.run(_mapped, (transform, world.astype(np.float32)), voxels=len(world)), dtype=np.float64)
    if space == "index":
        inverse = np.linalg.inv(affine)
        coords = (mapped @ inverse[:-1, :-1].T + inverse[:-1, -1])[:, [p, q]]
    else:
        coords = mapped[:, world_axes]
    lines = np.split(coords, np.cumsum([len(piece) for piece in pieces])[:-1])
    return lines


def deformed_grid(
    transform, grid, ax=None, *, spacing=None, view="axial", index=None, background=None, color="tab:orange", linewidth=0.7, title=None
):
    """Figure of the fixed grid's lines deformed by ``transform`` (see :func:`deformed_grid_lines`),
    drawn in index coordinates over ``background`` (an array or Image on ``grid``, optional).

    The lines are one ``LineCollection`` (``ax.collections[-1].get_segments()``).
    """
    from matplotlib.collections import LineCollection

    grid = _grid(grid)
    fig, ax = _new_axes(ax)
    where = _Slice(grid, view, index)
    if background is not None:
        where.show(ax, where.take(normalize(_on_grid(background, grid, name="background"))), cmap="gray", alpha=0.5, vmin=0, vmax=1)
    lines = deformed_grid_lines(transform, grid, spacing=spacing, view=view, index=index)
    ax.add_collection(LineCollection(lines, colors=color, linewidths=linewidth))
    where.orient(ax)
    spacing_mm = np.asarray(grid.spacing, dtype=np.float64)
    ax.set_aspect(float(spacing_mm[where.plane[1]] / spacing_mm[where.plane[0]]))
    ax.set_title(title if title is not None else f"deformed grid {where.label()}".strip(), fontsize=9)
    return fig


# ------------------------------------------------------------------------- Jacobian map


def _determinant(transform, grid: Grid) -> np.ndarray:
    from jaxreg.transforms import jacobian_determinant

    return np.asarray(_programs.run(jacobian_determinant, (transform, grid), voxels=grid.size))


def jacobian_map(transform, grid, *, log: bool = False, view="axial", index=None, ax=None, colorbar=True, title=None, _determinant_values=None):
    """Figure of ``det(d transform / d x)`` on ``grid`` (one slice for 3-D).

    A diverging colour map centred at 1 (``log=True``: ``log(det)`` centred at 0), its range
    symmetric about the centre; folded voxels (``det <= 0``) are painted yellow on top and
    counted in the title. The first image of the axes holds the plotted values, the
    second (present only where there are folds) the fold mask.
    """
    from matplotlib.colors import Normalize

    grid = _grid(grid)
    det = _determinant(transform, grid) if _determinant_values is None else np.asarray(_determinant_values)
    if det.shape != grid.shape:
        raise ValueError(f"determinant has shape {det.shape}, grid {grid.shape}")
    fig, ax = _new_axes(ax)
    where = _Slice(grid, view, index)
    plane = where.take(det).astype(np.float64)
    folds = ~(plane > 0)  # NaN counts as folded too
    if log:
        values = np.log(np.where(folds, 1.0, plane))
        values = np.ma.masked_array(values, folds)
        centre = 0.0
    else:
        values, centre = plane, 1.0
    finite = np.asarray(values[~folds]) if np.any(~folds) else np.zeros(1)
    spread = float(np.max(np.abs(finite - centre))) if finite.size else 0.0
    spread = max(spread, 0.05)
    shown = where.show(ax, values, cmap="RdBu_r", norm=Normalize(vmin=centre - spread, vmax=centre + spread))
    if folds.any():
        rgba = np.zeros(folds.shape + (4,))
        rgba[folds] = _FOLD_RGBA
        where.show(ax, rgba)
    if colorbar:
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    folded = float(np.mean(~(det > 0)))
    if title is None:
        title = f"{'log ' if log else ''}det J {where.label()}".strip() + f"  folds {100 * folded:.3g}%"
    ax.set_title(title, fontsize=9)
    return fig


# ------------------------------------------------------------------------------- report


def report(fixed, moving, warped, transform, path=None, *, overwrite: bool = False, views=None, title=None, dpi: int = 100):
    """One figure summarising a registration; saved to ``path`` (atomically) when given.

    Columns: overlay before (moving on the fixed grid through the identity in world space),
    overlay after (``warped``), checkerboard of fixed and warped, the fixed grid deformed by
    ``transform`` over the warped image, and the Jacobian determinant map. A 2-D pair gives
    one row; a 3-D pair one row per view (default axial, coronal, sagittal, middle slices).
    The transform is evaluated once on the fixed grid and shared by the last two columns.
    """
    from matplotlib.figure import Figure

    from jaxreg import differential
    from jaxreg.transforms import Displacement

    for image, name in ((fixed, "fixed"), (moving, "moving"), (warped, "warped")):
        _check_scalar(image, name=name)
    grid = _grid(fixed)
    f = _data(fixed)
    m = _on_grid(moving, grid, name="moving")
    w = _on_grid(warped, grid, name="warped")
    if views is None:
        views = VIEWS if grid.ndim == 3 else ("axial",)
    views = tuple(views)

    def evaluate(t):
        mapped = t.mapped_points(grid)
        return mapped - grid.points(), differential.jacobian_determinant_of_map(mapped, grid)

    # One program (not op-by-op dispatch), kept: a second picture of the same shapes, or
    # with the cache on a second process, neither traces nor compiles it again.
    displacement, det = _programs.run(evaluate, (transform,), voxels=grid.size)
    det = np.asarray(det)
    # The sampled map as a transform: exact at voxel centres, linear between them.
    sampled = Displacement(np.asarray(displacement), np.asarray(grid.affine))
    board = checkerboard(normalize(f), normalize(w), tiles=8)

    columns = 5
    fig = Figure(figsize=(3.2 * columns, 3.2 * len(views) + (0.4 if title else 0.0)), dpi=dpi, layout="constrained")
    axes = np.asarray(fig.subplots(len(views), columns, squeeze=False))
    for row, view in zip(axes, views):
        where = _Slice(grid, view)
        label = where.label()
        # Images, not arrays: the overlay picks its slice and orientation from the grid,
        # as the other columns do.
        overlay(Image(f, grid.affine), Image(m, grid.affine), view=view, ax=row[0], title=f"before {label}".strip())
        overlay(Image(f, grid.affine), Image(w, grid.affine), view=view, ax=row[1], title=f"after {label}".strip())
        where.show(row[2], where.take(board), cmap="gray", vmin=0, vmax=1)
        row[2].set_title(f"checkerboard fixed/warped {label}".strip(), fontsize=9)
        deformed_grid(sampled, grid, row[3], view=view, background=w, title=f"deformed grid {label}".strip())
        jacobian_map(None, grid, view=view, ax=row[4], _determinant_values=det)
    if title:
        fig.suptitle(title)
    if path is not None:
        save_figure(fig, path, overwrite=overwrite, dpi=dpi)
    return fig


# --------------------------------------------------------------------------------- save


def save_figure(fig, path, overwrite: bool = False, *, dpi=None) -> Path:
    """Write ``fig`` to ``path`` atomically (format from the extension); return the path.

    The figure is rendered to a temporary file in the same folder and then published under
    its name, so the file appears complete or not at all. An existing ``path`` raises
    FileExistsError unless ``overwrite=True``.
    """
    from jaxreg.io import write_atomically

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if not fmt:
        raise ValueError(f"cannot save a figure to {path}: no extension to choose a format (e.g. .png)")
    return write_atomically(
        path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi if dpi is not None else "figure"), overwrite=overwrite
    )

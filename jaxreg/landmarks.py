"""Reading landmark (point) files into world coordinates (RAS, mm).

:func:`read_points` reads three kinds of text file and returns an ``(N, d)`` float64 array
of world points in jaxreg's RAS convention:

- ``"text"``: one point per line, world RAS coordinates separated by whitespace or commas.
  Blank lines and lines starting with ``#`` are skipped, as is one header line of names
  (e.g. ``x,y,z``) at the top.
- ``"elastix"``: elastix/transformix point sets: a first line ``point`` or ``index``, a
  second line with the number of points, then one point per line. ``point`` files hold
  ITK physical coordinates, which are LPS, and are turned into RAS; ``index`` files hold
  0-based voxel indices of ``reference``.
- ``"dirlab"``: DIR-Lab style voxel lists: integer voxel indices, 1-based, one point per
  line (e.g. ``case1_300_T00_xyz.txt``); they need the ``reference`` image whose voxel grid
  they index (index axis ``k`` is array axis ``k`` of the image as jaxreg loads it).

``format="auto"`` picks ``elastix`` when the first line is ``point`` or ``index``,
``dirlab`` when the file name ends in ``_xyz.txt`` (DIR-Lab's naming), and ``text``
otherwise; voxel lists with other names need ``format="dirlab"``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from jaxreg.grid import Grid, Image
from jaxreg.io import _check_file

__all__ = ["FORMATS", "LandmarkError", "read_points"]

FORMATS = ("auto", "text", "elastix", "dirlab")
_MAX_BYTES = 64 << 20  # a landmark file is small; refuse to slurp anything huge
_SPLIT = re.compile(r"[,\s;]+")


class LandmarkError(ValueError):
    """A landmark file that cannot be read (bad syntax, wrong counts, missing reference)."""

    def __init__(self, path, reason: str, line: int | None = None):
        self.path = os.fspath(path)
        self.reason = reason
        self.line = line
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"cannot read landmarks {where}: {reason}")


def _lines(path: Path) -> list[tuple[int, str]]:
    _check_file(path, "landmark")
    if path.stat().st_size > _MAX_BYTES:
        raise LandmarkError(path, f"file is larger than {_MAX_BYTES >> 20} MiB")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise LandmarkError(path, f"not a text file ({err.reason})") from None
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            out.append((number, stripped))
    return out


def _numbers(path, number: int, line: str) -> list[float]:
    fields = [f for f in _SPLIT.split(line) if f]
    try:
        values = [float(f) for f in fields]
    except ValueError:
        raise LandmarkError(path, f"expected numbers, got {line[:80]!r}", number) from None
    if not all(np.isfinite(values)):
        raise LandmarkError(path, f"non-finite coordinate in {line[:80]!r}", number)
    return values


def _table(path, rows: list[tuple[int, str]]) -> np.ndarray:
    points = [_numbers(path, number, line) for number, line in rows]
    if not points:
        raise LandmarkError(path, "no points")
    width = len(points[0])
    for (number, _), values in zip(rows, points):
        if len(values) != width:
            raise LandmarkError(path, f"{len(values)} coordinates where the first point has {width}", number)
    if width not in (2, 3):
        raise LandmarkError(path, f"points have {width} coordinates; expected 2 or 3", rows[0][0])
    return np.asarray(points, dtype=np.float64)


def _is_header(line: str) -> bool:
    fields = [f for f in _SPLIT.split(line) if f]
    try:
        [float(f) for f in fields]
    except ValueError:
        return True
    return False


def _reference_affine(path, reference, width: int) -> np.ndarray:
    if reference is None:
        raise LandmarkError(path, "voxel indices need a reference image (its voxel-to-world matrix)")
    if isinstance(reference, (Image, Grid)):
        affine = np.asarray(reference.affine, dtype=np.float64)
    else:
        affine = np.asarray(reference, dtype=np.float64)
    if affine.shape != (width + 1, width + 1):
        raise LandmarkError(path, f"points have {width} coordinates but the reference is {affine.shape[0] - 1}-D")
    return affine


def _index_to_world(affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    d = affine.shape[0] - 1
    return index @ affine[:d, :d].T + affine[:d, d]


def _detect(path: Path, rows) -> str:
    if rows and rows[0][1].lower() in ("point", "index"):
        return "elastix"
    if path.name.lower().endswith("_xyz.txt"):
        return "dirlab"
    return "text"


def read_points(path, *, format: str = "auto", reference=None) -> np.ndarray:
    """Points of a landmark file as an ``(N, d)`` float64 array of world RAS coordinates.

    ``format`` is ``"auto"``, ``"text"``, ``"elastix"`` or ``"dirlab"`` (see the module
    docstring). ``reference`` (an :class:`~jaxreg.grid.Image`, a :class:`~jaxreg.grid.Grid`
    or a ``(d+1, d+1)`` voxel-to-world matrix) is needed for voxel indices (``dirlab``,
    elastix ``index``). Raises FileNotFoundError for a missing file and
    :class:`LandmarkError` (a ValueError) for anything unreadable.

    >>> import os, tempfile
    >>> with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
    ...     _ = f.write("point\\n1\\n10 20 30\\n")
    >>> read_points(f.name).tolist()  # elastix points are LPS
    [[-10.0, -20.0, 30.0]]
    >>> os.unlink(f.name)
    """
    if format not in FORMATS:
        raise ValueError(f"landmark format must be one of {FORMATS}; got {format!r}")
    path = Path(path)
    rows = _lines(path)
    if not rows:
        raise LandmarkError(path, "no points")
    kind = _detect(path, rows) if format == "auto" else format

    if kind == "elastix":
        header = rows[0][1].lower()
        if header not in ("point", "index"):
            raise LandmarkError(path, f"elastix point sets start with 'point' or 'index', not {rows[0][1][:40]!r}", rows[0][0])
        if len(rows) < 2:
            raise LandmarkError(path, "the number of points is missing after the header")
        number, count_text = rows[1]
        try:
            count = int(count_text)
        except ValueError:
            raise LandmarkError(path, f"expected the number of points, got {count_text[:40]!r}", number) from None
        body = rows[2:]
        if count != len(body):
            raise LandmarkError(path, f"header says {count} points, file has {len(body)}", number)
        points = _table(path, body)
        if header == "point":
            points = points.copy()
            points[:, :2] *= -1.0  # ITK physical space is LPS
            return points + 0.0
        return _index_to_world(_reference_affine(path, reference, points.shape[1]), points)

    if kind == "dirlab":
        points = _table(path, rows)
        if not np.all(points == np.round(points)):
            raise LandmarkError(path, "DIR-Lab voxel lists hold integer indices; found fractions (use format='text' for world coordinates)")
        if np.any(points < 1):
            raise LandmarkError(path, "DIR-Lab voxel indices are 1-based; found an index below 1")
        return _index_to_world(_reference_affine(path, reference, points.shape[1]), points - 1.0)

    # plain text, world RAS
    if _is_header(rows[0][1]):
        rows = rows[1:]
    return _table(path, rows)

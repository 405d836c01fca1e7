"""Transform files that ITK and ANTs read and write.

Affine transforms go to ITK's text format (``.txt``, ``.tfm``) or to the MATLAB v4 file
ANTs writes (``.mat``, e.g. ``0GenericAffine.mat``); dense transforms go to displacement
field images (``.nii.gz``, ``.nii``, ``.mha``), vectors in mm, the field's grid in the
image header. Both ITK and ANTs work in LPS world coordinates; the conversion is done by
the helpers in :mod:`jaxreg.io` and nowhere else. Like jaxreg's transforms, ITK's map
fixed world points to moving world points, so nothing has to be inverted on the way.

ITK stores an affine as a matrix ``M``, a translation ``t`` and a centre ``c`` (its
``FixedParameters``), the map being ``y = M (x - c) + c + t``; the centre is folded into
the translation on reading, and written as zero unless asked for.

ANTs lists the pieces of a transform (``transformlist`` of ``ants.apply_transforms``,
``-t`` of ``antsApplyTransforms``, ``fwdtransforms`` of ``ants.registration``) so that the
*first* file listed is applied *first* to the fixed point: ``[warp, affine]`` is
``x -> affine(warp(x))``, jaxreg's ``compose(affine, warp)`` -- the argument order of
``compose`` reversed. ``tests/test_itk.py`` checks this against ANTsPy with factors that
do not commute.
"""

from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jaxreg import _programs, io
from jaxreg.grid import Grid, Image
from jaxreg.transforms import Affine, Compose, Displacement, Transform, compose
from jaxreg.transforms import invert as _invert

__all__ = [
    "TransformFiles",
    "TransformReadError",
    "read_affine",
    "read_displacement_field",
    "read_transforms",
    "write_affine",
    "write_displacement_field",
    "write_transforms",
]

PathLike = str | os.PathLike

_TEXT = (".txt", ".tfm")
_MAT = (".mat",)
_AFFINE_EXTENSIONS = _TEXT + _MAT
_FIELD_WRITE = (".nii.gz", ".nii", ".mha")
_FIELD_READ = (".nii.gz", ".nii", ".mha", ".mhd")
# A transform file is a few hundred bytes; refusing big files keeps garbage from being
# parsed at length.
_MAX_TRANSFORM_FILE = 1 << 20


class TransformReadError(io.FileReadError):
    """A file exists but cannot be read as a transform (corrupt, unsupported type)."""

    what = "transform"


class TransformFiles(list):
    """The files :func:`write_transforms` wrote, in ANTs' order (ants.registration's
    ``fwdtransforms``); ``inverse`` and ``whichtoinvert`` are ANTs' ``invtransforms`` and
    the flags that go with them (both empty unless an inverse was asked for)."""

    def __init__(self, forward=(), inverse=(), whichtoinvert=()):
        super().__init__(forward)
        self.inverse = list(inverse)
        self.whichtoinvert = list(whichtoinvert)

    def __repr__(self) -> str:
        return f"TransformFiles({list(self)!r}, inverse={self.inverse!r}, whichtoinvert={self.whichtoinvert!r})"


# -- affine -----------------------------------------------------------------------------


def write_affine(affine: Affine, path: PathLike, *, overwrite: bool = False, center=None) -> Path:
    """Write an :class:`Affine` as an ITK transform file; return the path.

    ``.txt``/``.tfm`` give ITK's text format, ``.mat`` the MATLAB v4 file ANTs writes;
    both hold ``AffineTransform_double_d_d`` in LPS. ``center`` (RAS world, default the
    origin) is ITK's centre of the linear part; it changes the numbers, not the map.
    The write is atomic; an existing ``path`` raises FileExistsError unless
    ``overwrite=True``.
    """
    path = Path(path)
    ext = io._matching_extension(path, _AFFINE_EXTENSIONS, action="write an affine to")
    if not isinstance(affine, Affine):
        raise TypeError(f"write_affine takes an Affine; got {type(affine).__name__}")
    matrix = np.asarray(affine.matrix, dtype=np.float64)
    ndim = matrix.shape[0] - 1
    if ndim not in (2, 3):
        raise ValueError(f"ITK transform files hold 2-D or 3-D affines; got {ndim}-D")
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"cannot write {path}: the affine is not finite:\n{matrix}")
    lps = io.ras_to_lps_transform(matrix)
    linear = lps[:ndim, :ndim]
    if center is None:
        centre = np.zeros(ndim)
    else:
        centre = io.ras_to_lps_vectors(np.asarray(center, dtype=np.float64).reshape(ndim))
    # y = M (x - c) + c + t  =  M x + offset   =>   t = offset - c + M c
    translation = lps[:ndim, ndim] - centre + linear @ centre
    parameters = np.concatenate([linear.ravel(), translation]) + 0.0
    fixed = centre + 0.0
    name = f"AffineTransform_double_{ndim}_{ndim}"
    if ext in _MAT:
        payload = _mat_variable(name, parameters) + _mat_variable("fixed", fixed)
    else:
        payload = _itk_text(name, parameters, fixed).encode("ascii")
    return io.write_bytes(path, payload, overwrite=overwrite)


def read_affine(path: PathLike) -> Affine:
    """Read an ITK/ANTs linear transform file (``.txt``, ``.tfm``, ``.mat``) as an :class:`Affine`.

    Reads what ITK, ANTs, SimpleITK and :func:`write_affine` write: affine and matrix-offset
    transforms, Euler/rigid/similarity/versor/quaternion variants, translation, scale and
    identity, in float or double, and composites of these (multiplied into one matrix).
    Raises FileNotFoundError for a missing file and :class:`TransformReadError` for one
    that cannot be read or holds a transform that is not linear.
    """
    path = Path(path)
    ext = io._matching_extension(path, _AFFINE_EXTENSIONS, action="read an affine from")
    raw = _read_small(path)
    if ext in _MAT:
        entries = _parse_mat_transforms(path, raw)
    else:
        entries = _parse_text_transforms(path, raw)
    matrices = [_linear_transform(path, name, params, fixed) for name, params, fixed in entries]
    lps = matrices[0]
    for m in matrices[1:]:
        if m.shape != lps.shape:
            raise TransformReadError(path, "its composite mixes transforms of different dimensions")
        lps = lps @ m  # ITK applies a composite's last transform first, as compose() does
    return Affine(io.lps_to_ras_transform(lps))


# -- displacement fields ----------------------------------------------------------------


def write_displacement_field(transform: Transform, grid: Grid, path: PathLike, *, overwrite: bool = False) -> Path:
    """Sample ``transform`` on ``grid`` and write it as an ITK displacement field; return the path.

    The file holds ``transform(x) - x`` (mm, LPS components) at the voxel centres of
    ``grid``, float32, laid out as ITK vector images are: ``(X, Y, Z, 1, 3)`` in 3-D,
    ``(X, Y, 1, 1, 2)`` in 2-D, with NIfTI intent VECTOR and ``grid``'s matrix in qform
    and sform (a sheared grid has no exact qform, and ITK reads the qform: use grids with
    orthogonal axes for files meant for ITK). ``.nii.gz``, ``.nii`` or ``.mha``. Atomic;
    an existing ``path`` raises FileExistsError unless ``overwrite=True``.
    """
    path = Path(path)
    io._matching_extension(path, _FIELD_WRITE, action="write a displacement field to")
    grid = grid.grid if isinstance(grid, Image) else grid
    if grid.ndim not in (2, 3) or transform.ndim != grid.ndim:
        raise ValueError(f"need a 2-D or 3-D transform and grid of the same rank; got {transform.ndim}-D and {grid.ndim}-D")
    if _programs.traced((transform, grid)):
        raise ValueError("write_displacement_field writes a file: call it on concrete arrays, not inside jit or vmap")
    # One program, kept (with its trace) like a registration's: run eagerly, the sampling
    # and point arithmetic were a dozen one-operation programs, 0.36 s of a jaxreg command.
    field = np.asarray(_programs.run(_displacement_on, (transform, grid), voxels=math.prod(grid.shape)), dtype=np.float32)
    if not np.all(np.isfinite(field)):
        raise ValueError(f"cannot write {path}: the displacement field has NaN or Inf values")
    return io.save(Image(io.ras_to_lps_vectors(field), np.asarray(grid.affine, np.float32)), path, overwrite=overwrite)


def _displacement_on(transform: Transform, grid: Grid):
    return Displacement.from_transform(transform, grid).field


def read_displacement_field(path: PathLike) -> Displacement:
    """Read an ITK/ANTs displacement field image (e.g. ANTs' ``1Warp.nii.gz``) as a :class:`Displacement`.

    The field keeps the file's grid; beyond it jaxreg holds the edge value where ITK
    would use zero, which matters only for points outside the field's grid.
    """
    path = Path(path)
    io._matching_extension(path, _FIELD_READ, action="read a displacement field from")
    image = io.load(path)
    if image.has_channels and image.data.shape[-1] == 2 and image.ndim == 3:
        if image.data.shape[2] != 1:
            raise TransformReadError(path, f"2-component vectors on a 3-D grid {image.data.shape[:3]}")
        image = _squeeze_last_axis(image)
    if not image.has_channels or image.data.shape[-1] != image.ndim:
        raise TransformReadError(
            path, f"not a displacement field: data of shape {image.data.shape} are not {image.ndim}-vectors on a {image.ndim}-D grid"
        )
    field = io.lps_to_ras_vectors(np.asarray(image.data, dtype=np.float32))
    return Displacement(jnp.asarray(field), np.asarray(image.affine, np.float32))


def _squeeze_last_axis(image: Image) -> Image:
    # io.squeeze drops every singleton axis; here only the third may go (an (X, 1, 1) field
    # is still 2-D), so drop it and the world row most aligned with it, as io.squeeze does.
    affine = np.asarray(image.affine, dtype=np.float32)
    rows = [0, 1, 2]
    rows.remove(max(rows, key=lambda r: abs(float(affine[r, 2]))))
    new = np.eye(3, dtype=np.float32)
    new[:2, :2] = affine[np.ix_(rows, [0, 1])]
    new[:2, 2] = affine[rows, 3]
    return Image(image.data[:, :, 0], new)


# -- ANTs transform lists ---------------------------------------------------------------


def write_transforms(
    transform: Transform,
    grid: Grid,
    directory: PathLike,
    *,
    prefix: str = "",
    overwrite: bool = False,
    inverse: Transform | bool | None = None,
) -> TransformFiles:
    """Write ``transform`` as the files ANTs applies; return them in ANTs' order.

    An :class:`Affine` becomes ``[<prefix>affine.mat]``. A composition whose first
    (outermost) factor is an affine, as ``compose(affine, velocity)`` from a registration,
    becomes ``[<prefix>warp.nii.gz, <prefix>affine.mat]``: the rest of it, sampled on
    ``grid`` (the fixed image's), is the displacement field. Anything else becomes one
    field ``[<prefix>warp.nii.gz]``. The list goes as is to ``ants.apply_transforms(...,
    transformlist=files)`` or ``antsApplyTransforms -t``, and back through
    :func:`read_transforms`.

    ``inverse`` also writes what warps the other way, as ANTs' ``invtransforms``:
    ``files.inverse == [<prefix>affine.mat, <prefix>inverse_warp.nii.gz]`` with
    ``files.whichtoinvert == [True, False]``. The affine is one file both ways (readers
    invert it); the inverse field lies on ``grid`` too, like ANTs' ``1InverseWarp``; an
    affine alone needs no inverse file. ``inverse=True`` computes the field with
    :func:`jaxreg.transforms.invert` (exact for velocity fields, fixed-point iterations
    otherwise); a :class:`Transform` is taken as the inverse of the whole of
    ``transform`` (moving world -> fixed world), e.g. from a symmetric registration.

    ``directory`` is created if needed. Nothing is written if any file exists and
    ``overwrite`` is False (FileExistsError); each file is written atomically.
    """
    grid = grid.grid if isinstance(grid, Image) else grid
    directory = Path(directory)
    affine, dense = _split(transform)
    affine_path = directory / f"{prefix}affine.mat"
    warp_path = directory / f"{prefix}warp.nii.gz"
    inverse_path = directory / f"{prefix}inverse_warp.nii.gz"

    jobs = []  # (path, writer) in the order they are written
    forward, backward, flags = [], [], []
    if dense is not None:
        jobs.append((warp_path, lambda p: write_displacement_field(dense, grid, p, overwrite=overwrite)))
        forward.append(warp_path)
    if affine is not None:
        jobs.append((affine_path, lambda p: write_affine(affine, p, overwrite=overwrite)))
        forward.append(affine_path)
    if inverse is not None and inverse is not False:
        if affine is not None:
            backward.append(affine_path)
            flags.append(True)
        if dense is not None:
            if inverse is True:
                dense_inverse = _invert(dense, grid=grid)
            elif isinstance(inverse, Transform):
                # (A o D)^-1 = D^-1 o A^-1, so D^-1 = inverse o A.
                dense_inverse = inverse if affine is None else compose(inverse, affine)
            else:
                raise TypeError(f"inverse must be True or a Transform; got {type(inverse).__name__}")
            jobs.append((inverse_path, lambda p: write_displacement_field(dense_inverse, grid, p, overwrite=overwrite)))
            backward.append(inverse_path)
            flags.append(False)

    if not overwrite:
        for path, _ in jobs:
            if os.path.lexists(path):
                raise FileExistsError(17, "file exists (pass overwrite=True to replace it)", os.fspath(path))
    directory.mkdir(parents=True, exist_ok=True)
    for path, write in jobs:
        write(path)
    return TransformFiles([os.fspath(p) for p in forward], [os.fspath(p) for p in backward], flags)


def read_transforms(paths: PathLike | Sequence[PathLike], *, invert: Sequence[bool] | None = None) -> Transform:
    """Read an ANTs transform list (``fwdtransforms``, ``invtransforms``, ``-t`` files) as one transform.

    ``paths`` in ANTs' order: ``[warp, affine]`` is ``compose(affine, warp)``, i.e.
    ``x -> affine(warp(x))``. ``invert`` is ANTs' ``whichtoinvert``, one flag per file:
    an affine is inverted exactly; a displacement field (which ANTs refuses to invert) is
    inverted numerically on its own grid by :func:`jaxreg.transforms.invert`.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("read_transforms needs at least one file")
    flags = [False] * len(paths) if invert is None else [bool(f) for f in invert]
    if len(flags) != len(paths):
        raise ValueError(f"invert has {len(flags)} flags for {len(paths)} files")
    pieces = []
    for path, flag in zip(paths, flags):
        if _is_affine_file(path):
            piece = read_affine(path)
            pieces.append(piece.inverse() if flag else piece)
        else:
            piece = read_displacement_field(path)
            pieces.append(_invert(piece) if flag else piece)
    return compose(*reversed(pieces))


def _split(transform: Transform):
    """``(affine, dense)``: the leading affine factor (or None) and the rest (or None)."""
    if isinstance(transform, Affine):
        return transform, None
    if isinstance(transform, Compose) and isinstance(transform.transforms[0], Affine):
        rest = transform.transforms[1:]
        return transform.transforms[0], rest[0] if len(rest) == 1 else Compose(rest)
    return None, transform


def _is_affine_file(path: Path) -> bool:
    return path.name.lower().endswith(_AFFINE_EXTENSIONS)


def _read_small(path: Path) -> bytes:
    io._check_file(path, "transform")
    if path.stat().st_size > _MAX_TRANSFORM_FILE:
        raise TransformReadError(path, f"{path.stat().st_size} bytes is too large for a linear transform file")
    return path.read_bytes()


# -- ITK text ---------------------------------------------------------------------------


def _numbers(values) -> str:
    # repr is the shortest text that reads back as the same float64.
    return " ".join(repr(float(v)) for v in np.ravel(values))


def _itk_text(name: str, parameters, fixed) -> str:
    return (
        "#Insight Transform File V1.0\n"
        "#Transform 0\n"
        f"Transform: {name}\n"
        f"Parameters: {_numbers(parameters)}\n"
        f"FixedParameters: {_numbers(fixed)}\n"
    )


def _parse_text_transforms(path: Path, raw: bytes):
    """``[(type name, parameters, fixed parameters)]`` of an ITK text transform file."""
    if b"\0" in raw:
        raise TransformReadError(path, "binary data, not an ITK text transform file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TransformReadError(path, "not an ITK text transform file (not text)") from None
    entries: list[list] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if not sep:
            raise TransformReadError(path, f"line {number} {line[:60]!r} is not 'Key: value'")
        if key == "transform":
            entries.append([value.strip(), None, None])
            continue
        if key not in ("parameters", "fixedparameters"):
            raise TransformReadError(path, f"line {number}: unknown key {key!r}")
        if not entries:
            raise TransformReadError(path, f"line {number}: {key} before any 'Transform:' line")
        try:
            values = np.array([float(v) for v in value.split()], dtype=np.float64)
        except ValueError:
            raise TransformReadError(path, f"line {number}: {key} are not numbers: {value.strip()[:60]!r}") from None
        entries[-1][1 if key == "parameters" else 2] = values
    if not entries:
        raise TransformReadError(path, "no 'Transform:' line; not an ITK transform file")
    entries = [(name, np.zeros(0) if p is None else p, np.zeros(0) if f is None else f) for name, p, f in entries]
    if entries[0][0].startswith("CompositeTransform"):
        entries = entries[1:]
        if not entries:
            raise TransformReadError(path, "an empty CompositeTransform")
    elif len(entries) > 1:
        raise TransformReadError(path, f"holds {len(entries)} transforms but no CompositeTransform to say how they combine")
    return entries


# -- MATLAB v4 (ITK's MatlabTransformIO, ANTs' .mat) -----------------------------------

_MAT_TYPES = {0: "f8", 1: "f4", 2: "i4", 3: "i2", 4: "u2", 5: "u1"}


def _mat_variable(name: str, values) -> bytes:
    values = np.asarray(values, dtype="<f8").ravel()
    # type 0: little-endian IEEE, double, full numeric matrix; rows x 1, real.
    header = struct.pack("<5i", 0, values.size, 1, 0, len(name) + 1)
    return header + name.encode("ascii") + b"\0" + values.tobytes()


def _read_mat_v4(path: Path, raw: bytes) -> list[tuple[str, np.ndarray]]:
    variables = []
    pos = 0
    if raw[:6] == b"MATLAB":
        raise TransformReadError(path, "a MATLAB v5+ file; ITK and ANTs write (and read) MATLAB v4 .mat files")
    while pos < len(raw):
        if len(raw) - pos < 20:
            raise TransformReadError(path, f"truncated MATLAB v4 header at byte {pos}")
        for order, machine in (("<", 0), (">", 1)):
            kind, rows, cols, imagf, namelen = struct.unpack_from(order + "5i", raw, pos)
            if 0 <= kind < 10000 and kind // 1000 == machine and 0 <= rows < 1 << 20 and 0 <= cols < 1 << 20 and 0 < namelen < 1024:
                break
        else:
            raise TransformReadError(path, "not a MATLAB v4 file as ITK and ANTs write them")
        precision, storage = (kind // 10) % 10, kind % 10
        if (kind // 100) % 10 != 0 or storage != 0 or precision not in _MAT_TYPES or imagf != 0:
            raise TransformReadError(path, f"MATLAB v4 variable of type {kind} (imaginary {imagf}) is not a real numeric matrix")
        dtype = np.dtype(_MAT_TYPES[precision]).newbyteorder(order)
        start = pos + 20 + namelen
        end = start + rows * cols * dtype.itemsize
        if end > len(raw):
            raise TransformReadError(path, f"truncated: a {rows}x{cols} variable needs {end} bytes, the file has {len(raw)}")
        name = raw[pos + 20 : start].split(b"\0", 1)[0].decode("ascii", errors="replace")
        # MATLAB stores column after column.
        data = np.frombuffer(raw, dtype=dtype, count=rows * cols, offset=start).reshape(cols, rows).T
        variables.append((name, data.astype(np.float64).ravel(order="F")))
        pos = end
    if not variables:
        raise TransformReadError(path, "an empty file")
    return variables


def _parse_mat_transforms(path: Path, raw: bytes):
    variables = _read_mat_v4(path, raw)
    entries = []
    for name, values in variables:
        if name == "fixed":
            if not entries or entries[-1][2] is not None:
                raise TransformReadError(path, "a 'fixed' variable without a transform before it")
            entries[-1][2] = values
        else:
            entries.append([name, values, None])
    if not entries:
        raise TransformReadError(path, "no transform variable, only 'fixed'")
    if len(entries) > 1:
        raise TransformReadError(path, f"holds {len(entries)} transforms ({', '.join(e[0] for e in entries)}); expected one")
    return [(name, p, np.zeros(0) if f is None else f) for name, p, f in entries]


# -- ITK linear transform types ---------------------------------------------------------

_TYPE_NAME = re.compile(r"^(?P<kind>[A-Za-z0-9]+?)_(?P<precision>float|double)_(?P<d_in>\d)_(?P<d_out>\d)$")


def _rotation_2d(angle):
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def _euler_3d(angles, zyx: bool):
    ax, ay, az = angles
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    # ITK's Euler3DTransform: rotate about y, then x, then z (z, y, x with ComputeZYX).
    return rz @ ry @ rx if zyx else rz @ rx @ ry


def _quaternion_matrix(x, y, z, w):
    # vnl_quaternion's homogeneous form, as ITK uses it: a unit quaternion gives a
    # rotation, an unnormalized one a rotation scaled by its squared norm.
    return np.array(
        [
            [w * w + x * x - y * y - z * z, 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), w * w - x * x + y * y - z * z, 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), w * w - x * x - y * y + z * z],
        ]
    )


def _versor_matrix(v):
    v = np.asarray(v, dtype=np.float64)
    norm = float(np.sqrt(v @ v))
    if norm >= 1.0 - 1e-10:  # ITK rescales a versor part of norm ~1 or more, as here
        v = v / (norm + 1e-10 * norm)
    w = math.sqrt(max(0.0, 1.0 - float(v @ v)))
    return _quaternion_matrix(*v, w)


def _linear_transform(path: Path, name: str, params, fixed) -> np.ndarray:
    """The homogeneous LPS matrix of one ITK transform."""
    match = _TYPE_NAME.match(name)
    if not match:
        raise TransformReadError(path, f"unrecognized transform type {name!r}")
    kind = match["kind"]
    d = int(match["d_in"])
    if d != int(match["d_out"]) or d not in (2, 3):
        raise TransformReadError(path, f"{name}: only 2-D and 3-D transforms to the same dimension are supported")
    p = np.asarray(params, dtype=np.float64)
    f = np.asarray(fixed, dtype=np.float64)

    def need(count):
        if p.size != count:
            raise TransformReadError(path, f"{name} has {p.size} parameters, expected {count}")

    def centre():
        # A missing centre is the origin, as in ITK; extra fixed parameters are flags.
        if f.size == 0:
            return np.zeros(d)
        if f.size < d:
            raise TransformReadError(path, f"{name} has {f.size} fixed parameters, expected at least {d}")
        return f[:d]

    c = None
    if kind in ("AffineTransform", "MatrixOffsetTransformBase") or (d == 3 and kind == "Rigid3DTransform"):
        need(d * d + d)
        m, t = p[: d * d].reshape(d, d), p[d * d :]
    elif kind == "CenteredAffineTransform":
        need(d * d + 2 * d)
        m, c, t = p[: d * d].reshape(d, d), p[d * d : d * d + d], p[d * d + d :]
    elif kind == "TranslationTransform":
        need(d)
        m, t, c = np.eye(d), p, np.zeros(d)
    elif kind == "IdentityTransform":
        m, t, c = np.eye(d), np.zeros(d), np.zeros(d)
    elif kind in ("ScaleTransform", "ScaleLogarithmicTransform"):
        need(d)
        m, t = np.diag(np.exp(p) if kind == "ScaleLogarithmicTransform" else p), np.zeros(d)
    elif d == 2 and kind in ("Euler2DTransform", "Rigid2DTransform"):
        need(3)
        m, t = _rotation_2d(p[0]), p[1:]
    elif d == 2 and kind in ("CenteredRigid2DTransform", "CenteredEuler2DTransform"):
        need(5)
        m, c, t = _rotation_2d(p[0]), p[1:3], p[3:]
    elif d == 2 and kind == "Similarity2DTransform":
        need(4)
        m, t = p[0] * _rotation_2d(p[1]), p[2:]
    elif d == 2 and kind == "CenteredSimilarity2DTransform":
        need(6)
        m, c, t = p[0] * _rotation_2d(p[1]), p[2:4], p[4:]
    elif d == 3 and kind == "Euler3DTransform":
        need(6)
        m, t = _euler_3d(p[:3], zyx=f.size > 3 and f[3] != 0), p[3:]
    elif d == 3 and kind == "CenteredEuler3DTransform":
        need(9)
        m, c, t = _euler_3d(p[:3], zyx=f.size > 3 and f[3] != 0), p[3:6], p[6:]
    elif d == 3 and kind == "VersorTransform":
        need(3)
        m, t = _versor_matrix(p), np.zeros(3)
    elif d == 3 and kind == "VersorRigid3DTransform":
        need(6)
        m, t = _versor_matrix(p[:3]), p[3:]
    elif d == 3 and kind == "Similarity3DTransform":
        need(7)
        m, t = p[6] * _versor_matrix(p[:3]), p[3:6]
    elif d == 3 and kind == "QuaternionRigidTransform":
        need(7)
        m, t = _quaternion_matrix(*p[:4]), p[4:]
    elif kind in ("DisplacementFieldTransform", "BSplineTransform", "GaussianExponentialDiffeomorphicTransform"):
        raise TransformReadError(path, f"{name} is not a linear transform; read displacement fields with read_displacement_field")
    else:
        raise TransformReadError(path, f"unsupported transform type {name!r}")
    if c is None:
        c = centre()
    matrix = np.eye(d + 1)
    matrix[:d, :d] = m
    matrix[:d, d] = t + c - m @ c
    if not np.all(np.isfinite(matrix)):
        raise TransformReadError(path, f"{name} has non-finite parameters")
    return matrix

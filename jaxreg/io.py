"""Reading and writing images with their place in world space.

``load`` returns an :class:`~jaxreg.grid.Image` whose ``data`` is a numpy array with the
spatial axes first and channels last, and whose ``affine`` is the RAS voxel-to-world matrix
nibabel reports as ``img.affine`` (stored as float32). ``save`` writes what ``load`` reads.

Formats, chosen by extension:

- NIfTI (``.nii``, ``.nii.gz``) and MGH (``.mgz``, ``.mgh``) through nibabel. A 4-D
  ``(x, y, z, C)`` file is a channels-last image; a 5-D ``(x, y, z, 1, C)`` file (ITK's
  vector images, e.g. displacement fields) becomes ``(x, y, z, C)``.
- MetaImage (``.mha``, and ``.mhd`` with its data file; ``.mha`` only for ``save``) with a
  small reader and writer of our own. MetaImage world coordinates are LPS; they are turned
  into RAS by :func:`lps_to_ras_affine` and back by :func:`ras_to_lps_affine`, the one
  place in the library where that conversion lives.

Stored types: floating data is written as float32; integer and boolean data as the
narrowest of uint8, int16 and int32 that holds its values (the integer types NIfTI, MGH and
MetaImage all share), so label maps stay small and stay integers. ``load`` returns float32
unless ``dtype`` asks for something else; ask for an integer type to get label maps back
as integers (values that are not whole numbers then raise rather than being truncated).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import secrets
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np

from jaxreg import _checks
from jaxreg.grid import Image

__all__ = [
    "ImageReadError",
    "check_image",
    "load",
    "lps_to_ras_affine",
    "lps_to_ras_transform",
    "lps_to_ras_vectors",
    "ras_to_lps_affine",
    "ras_to_lps_transform",
    "ras_to_lps_vectors",
    "save",
    "squeeze",
    "write_atomically",
    "write_bytes",
]

PathLike = str | os.PathLike

_NIFTI = "nifti"
_MGH = "mgh"
_META = "metaimage"
# Longest first, so ".nii.gz" wins over ".gz"-less matches.
_EXTENSIONS = {
    ".nii.gz": _NIFTI,
    ".nii": _NIFTI,
    ".mgz": _MGH,
    ".mgh": _MGH,
    ".mha": _META,
    ".mhd": _META,
}
_SAVE_EXTENSIONS = (".nii", ".nii.gz", ".mgz", ".mgh", ".mha")

# Deflate never compresses by more than about 1032:1, so a compressed file that claims
# more data than this is corrupt; checking first avoids allocating absurd arrays.
_MAX_DEFLATE_RATIO = 1032
_SLACK = 1 << 16


class FileReadError(ValueError):
    """A file exists but cannot be read as ``what`` it should be; names the file."""

    what = "file"

    def __init__(self, path: PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot read {self.what} {self.path}: {reason}")


class ImageReadError(FileReadError):
    """A file exists but cannot be read as an image (truncated, corrupt, unsupported)."""

    what = "image"


# -- LPS <-> RAS ------------------------------------------------------------------------


def _negate_x_and_y(values, length: int, *, axis: int):
    """``values`` with entries 0 and 1 along ``axis`` (of ``length``) negated: the one
    difference between LPS and RAS. Numpy in, numpy out (jax arrays stay jax)."""
    flip = np.ones(length, dtype=np.float32)
    flip[:2] = -1.0
    out = values * (flip[:, None] if axis == 0 else flip)
    if isinstance(values, np.ndarray):
        # + 0.0 turns the -0.0 that negated zeros become back into 0.0, for tidy printing.
        return (out + 0.0).astype(values.dtype)
    return out


def lps_to_ras_affine(affine):
    """Voxel-to-world matrix in LPS (ITK, ANTs, MetaImage) -> the same one in RAS (nibabel).

    Negates the first two world axes (rows), in 2-D as in 3-D. The map is its own inverse.
    Works on numpy and jax arrays. A world->world matrix ``T`` converts as ``F @ T @ F``
    with ``F = lps_to_ras_affine(eye)``.
    """
    shape = np.shape(affine)
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 3:
        raise ValueError(f"expected a (d+1, d+1) matrix with d >= 2; got shape {shape}")
    return _negate_x_and_y(affine, shape[0], axis=0)


def ras_to_lps_affine(affine):
    """Voxel-to-world matrix in RAS -> LPS; the inverse (and the same map) as :func:`lps_to_ras_affine`."""
    return lps_to_ras_affine(affine)


def lps_to_ras_transform(matrix):
    """World-to-world matrix ``(d+1, d+1)`` in LPS (an ITK/ANTs affine) -> the same map in RAS.

    ``F @ T @ F`` with ``F`` the flip of the first two world axes: a point is flipped into
    LPS, mapped, and flipped back. Its own inverse; works on numpy and jax arrays.
    """
    # Flipping rows and then columns is F @ T @ F without building F.
    return lps_to_ras_affine(lps_to_ras_affine(matrix).T).T


def ras_to_lps_transform(matrix):
    """World-to-world matrix in RAS -> LPS; the same map as :func:`lps_to_ras_transform`."""
    return lps_to_ras_transform(matrix)


def lps_to_ras_vectors(vectors):
    """World vectors ``(..., d)`` (e.g. an ITK displacement field) from LPS to RAS.

    Negates components 0 and 1, in 2-D as in 3-D; its own inverse.
    """
    shape = np.shape(vectors)
    if len(shape) < 1 or shape[-1] < 2:
        raise ValueError(f"expected vectors (..., d) with d >= 2; got shape {shape}")
    return _negate_x_and_y(vectors, shape[-1], axis=-1)


def ras_to_lps_vectors(vectors):
    """World vectors from RAS to LPS; the same map as :func:`lps_to_ras_vectors`."""
    return lps_to_ras_vectors(vectors)


# -- public API -------------------------------------------------------------------------


def load(path: PathLike, *, dtype=None, squeeze: bool = False) -> Image:
    """Read an image file into an :class:`Image` (numpy data, RAS affine).

    ``dtype`` defaults to float32; pass an integer type to read label maps as integers.
    ``squeeze=True`` drops singleton spatial axes (see :func:`squeeze`), so a
    ``160x192x1`` slice comes back as a 2-D image with a ``(3, 3)`` affine.

    Raises FileNotFoundError for a missing file, ValueError for an unknown extension or
    data that do not fit ``dtype``, and :class:`ImageReadError` for a file that cannot be
    read.
    """
    path = Path(path)
    fmt = _format_of(path, _EXTENSIONS, action="read")
    _check_file(path, "image")
    if fmt == _META:
        data, affine = _read_metaimage(path)
    else:
        data, affine = _read_nibabel(path)
    image = Image(_convert(data, dtype, path), affine)
    return _squeeze(image) if squeeze else image


def save(
    image,
    path: PathLike,
    *,
    overwrite: bool = False,
    protect: Iterable[PathLike] = (),
) -> Path:
    """Write an :class:`Image` (or a plain array, identity affine) to ``path``; return the path.

    The format follows the extension: ``.nii``, ``.nii.gz``, ``.mgz``, ``.mgh`` or ``.mha``.
    Floating data are stored as float32, integers as the narrowest of uint8/int16/int32.
    A 2-D image goes to NIfTI/MGH as ``(x, y, 1)`` with its matrix extended by a unit third
    axis, so ``load(path, squeeze=True)`` gives it back exactly. Channels go to NIfTI as
    ITK vectors ``(x, y, z, 1, C)``, to MGH as frames, to MetaImage as components; MGH and
    MetaImage cannot mark a single channel, which therefore reads back as a scalar image.

    The write is atomic: the file appears complete under its name or not at all. An
    existing ``path`` raises FileExistsError unless ``overwrite=True``; a ``path`` that is
    the same file as one in ``protect`` raises ValueError whatever ``overwrite`` says.
    """
    path = Path(path)
    fmt = _format_of(path, _SAVE_EXTENSIONS, action="write")
    for other in protect:
        if _same_file(path, other):
            raise ValueError(f"refusing to write {path}: it is the input file {os.fspath(other)}")
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(17, "file exists (pass overwrite=True to replace it)", os.fspath(path))

    image = image if isinstance(image, Image) else Image(np.asarray(image))
    data = np.asarray(image.data)
    affine = np.asarray(image.affine, dtype=np.float32)
    ndim = affine.shape[0] - 1
    data = data.astype(_storage_dtype(data), copy=False)
    if not np.all(np.isfinite(affine)) or np.linalg.det(affine.astype(np.float64)) == 0:
        raise ValueError(f"cannot write {path}: the affine must be finite and invertible; got\n{affine}")
    if fmt == _META and ndim not in (2, 3):
        raise ValueError(f"cannot write {path}: MetaImage is written for 2-D or 3-D images, got {ndim}-D")
    if not 1 <= ndim <= 3:
        raise ValueError(f"cannot write {path}: {ndim}-D images do not fit NIfTI/MGH (at most 3-D)")

    def write(tmp):
        if fmt == _NIFTI:
            _write_nifti(data, affine, tmp)
        elif fmt == _MGH:
            _write_mgh(data, affine, tmp)
        else:
            _write_metaimage(data, affine, tmp)

    # The temporary file carries the real extension: nibabel picks compression from it.
    ext = next(e for e in sorted(_SAVE_EXTENSIONS, key=len, reverse=True) if path.name.lower().endswith(e))
    return write_atomically(path, write, overwrite=overwrite, suffix=ext)


def write_atomically(path: PathLike, write, *, overwrite: bool = False, suffix: str = "") -> Path:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then put it in place.

    Readers never see a partial file: an interrupted or failed ``write`` leaves nothing
    under ``path`` and removes the temporary file. An existing ``path`` raises
    FileExistsError unless ``overwrite=True``. ``suffix`` ends the temporary name (writers
    such as nibabel choose compression from the extension).
    """
    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(17, "file exists (pass overwrite=True to replace it)", os.fspath(path))
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp{suffix}")
    # 0o666 under the umask gives the permissions an ordinary open() would have given.
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as err:  # name the file asked for, not the temporary one
        raise type(err)(err.errno, f"cannot write here: {err.strerror}", os.fspath(path)) from None
    try:
        write(tmp)
        _publish(tmp, path, overwrite=overwrite)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_bytes(path: PathLike, payload: bytes, *, overwrite: bool = False) -> Path:
    """Write ``payload`` to ``path`` atomically, with :func:`save`'s overwrite rule."""
    return write_atomically(path, lambda tmp: Path(tmp).write_bytes(payload), overwrite=overwrite)


def squeeze(image: Image) -> Image:
    """Drop the singleton spatial axes of an image and lower the rank of its affine.

    For each dropped index axis its matrix column goes, together with the world row it is
    most aligned with; the kept rows of the remaining columns and of the translation form
    the ``(d+1, d+1)`` matrix of the remaining rank. This is exact for axis-aligned slices
    (the dropped world coordinate is constant over the slice); for an oblique slice it is
    the projection onto the kept world axes. An image whose spatial axes are all
    singletons is returned unchanged.
    """
    ndim = image.ndim
    spatial = image.shape[:ndim]
    drop = [k for k, n in enumerate(spatial) if n == 1]
    if not drop or len(drop) == ndim:
        return image
    affine = np.asarray(image.affine, dtype=np.float32)
    rows = list(range(ndim))
    for k in drop:
        # max() keeps the first of equally aligned rows, so ties resolve deterministically.
        rows.remove(max(rows, key=lambda r: abs(float(affine[r, k]))))
    keep = [k for k in range(ndim) if k not in drop]
    new = np.eye(len(keep) + 1, dtype=np.float32)
    new[:-1, :-1] = affine[np.ix_(rows, keep)]
    new[:-1, -1] = affine[rows, ndim]
    data = image.data.reshape(tuple(spatial[k] for k in keep) + tuple(image.shape[ndim:]))
    return Image(data, new)


_squeeze = squeeze  # load() has a keyword of the same name


def check_image(image, *, name: str = "image"):
    """Raise ValueError unless ``image`` is usable for registration; return it otherwise.

    Refuses empty data, NaN or Inf voxels, data that are the same value everywhere (no
    similarity measure can see anything in them), and a non-finite or singular affine.
    """
    data = np.asarray(image.data if isinstance(image, Image) else image)
    if data.size == 0:
        raise ValueError(f"{name} is empty; shape {data.shape}")
    if not np.issubdtype(data.dtype, np.number) and data.dtype != np.bool_:
        raise ValueError(f"{name} has non-numeric dtype {data.dtype}")
    _checks.check_image_values(data, name=name)
    if isinstance(image, Image):
        affine = np.asarray(image.affine, dtype=np.float64)
        if not np.all(np.isfinite(affine)) or np.linalg.det(affine) == 0:
            raise ValueError(f"{name} has a non-finite or singular voxel-to-world matrix:\n{affine}")
    return image


# -- helpers ----------------------------------------------------------------------------


def _matching_extension(path: Path, extensions, *, action: str, kind: str = "") -> str:
    """The one of ``extensions`` that ``path`` ends with (longest first: ``.nii.gz``
    before ``.gz``), or a ValueError naming the action and the choices."""
    name = Path(path).name.lower()
    for ext in sorted(extensions, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    known = ", ".join(sorted(extensions))
    raise ValueError(f"cannot {action} {path}: unknown {kind}extension (expected one of {known})")


def _format_of(path: Path, extensions, *, action: str) -> str:
    return _EXTENSIONS[_matching_extension(path, extensions, action=action, kind="image ")]


def _check_file(path: Path, what: str):
    """FileNotFoundError / IsADirectoryError / PermissionError naming ``path`` before any
    reader sees it."""
    if not path.exists():
        raise FileNotFoundError(2, f"no such {what} file", os.fspath(path))
    if path.is_dir():
        raise IsADirectoryError(21, f"expected {_article(what)} {what} file, got a directory", os.fspath(path))
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise PermissionError(13, f"permission denied: cannot read this {what} file", os.fspath(path)) from None


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _same_file(a: PathLike, b: PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet: compare where they would live
        return os.path.realpath(a) == os.path.realpath(b)


def _publish(tmp: Path, path: Path, *, overwrite: bool):
    if overwrite:
        os.replace(tmp, path)
        return
    # A hard link fails if the name was taken meanwhile, where a rename would clobber it.
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(17, "file exists (pass overwrite=True to replace it)", os.fspath(path)) from None
    except OSError:  # file systems without hard links
        if os.path.lexists(path):
            raise FileExistsError(17, "file exists (pass overwrite=True to replace it)", os.fspath(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _storage_dtype(data: np.ndarray) -> np.dtype:
    if data.dtype == np.bool_:
        return np.dtype(np.uint8)
    if np.issubdtype(data.dtype, np.integer):
        if data.size == 0:
            return np.dtype(np.int32)
        lo, hi = int(data.min()), int(data.max())
        for candidate in (np.uint8, np.int16, np.int32):
            info = np.iinfo(candidate)
            if info.min <= lo and hi <= info.max:
                return np.dtype(candidate)
        raise ValueError(f"integer data in [{lo}, {hi}] do not fit int32, the widest type written")
    if np.issubdtype(data.dtype, np.floating):
        return np.dtype(np.float32)
    raise ValueError(f"cannot write data of dtype {data.dtype}; expected real numbers or booleans")


def _convert(data: np.ndarray, dtype, path: Path) -> np.ndarray:
    target = np.dtype(np.float32 if dtype is None else dtype)
    if target == np.bool_:
        return np.asarray(data != 0)
    if np.issubdtype(target, np.integer):
        if data.dtype.kind in "iub":
            if data.size:
                info = np.iinfo(target)
                lo, hi = int(data.min()), int(data.max())
                if lo < info.min or hi > info.max:
                    raise ValueError(f"{path}: values in [{lo}, {hi}] do not fit {target}")
        else:
            with np.errstate(invalid="ignore"):
                whole = np.isfinite(data) & (np.round(data) == data)
            if not whole.all():
                raise ValueError(f"{path}: data are not whole numbers; load with a float dtype, not {target}")
            if data.size:
                info = np.iinfo(target)
                if data.min() < info.min or data.max() > info.max:
                    raise ValueError(f"{path}: values in [{data.min()}, {data.max()}] do not fit {target}")
        return np.asarray(data, dtype=target)
    if not np.issubdtype(target, np.floating):
        raise ValueError(f"{path}: dtype must be a float, integer or bool type; got {target}")
    return np.asarray(data, dtype=target)


def _spatial_layout(data: np.ndarray, path: Path) -> np.ndarray:
    """nibabel's axes -> (x, y, z) or (x, y, z, C)."""
    shape = data.shape
    if data.dtype.names:  # RGB(A) NIfTI: a record per voxel, one field per channel
        if len(shape) > 3:
            raise ImageReadError(path, f"colour data with {len(shape)} axes are not supported")
        data = np.stack([data[field] for field in data.dtype.names], axis=-1)
        return data.reshape(shape + (1,) * (3 - len(shape)) + (data.shape[-1],))
    if len(shape) <= 3:
        return data.reshape(shape + (1,) * (3 - len(shape)))
    if len(shape) == 4:
        return data
    if len(shape) == 5 and shape[3] == 1:
        return data.reshape(shape[:3] + shape[4:])
    raise ImageReadError(path, f"data of shape {shape} are neither (x,y,z), (x,y,z,C) nor (x,y,z,1,C)")


def _check_size(path: Path, n_bytes: int, offset: int, *, compressed: bool):
    size = path.stat().st_size
    if compressed:
        if n_bytes > _MAX_DEFLATE_RATIO * size + _SLACK:
            raise ImageReadError(path, f"header claims {n_bytes} bytes of data, more than a {size}-byte compressed file can hold")
    elif offset + n_bytes > size:
        raise ImageReadError(path, f"truncated: header needs {offset + n_bytes} bytes, file has {size}")


def _read_nibabel(path: Path):
    import nibabel as nib

    try:
        img = nib.load(os.fspath(path), mmap=False)
        proxy = img.dataobj
        shape = tuple(int(n) for n in proxy.shape)
        if any(n < 0 for n in shape):
            raise ImageReadError(path, f"negative size in header shape {shape}")
        if any(n == 0 for n in shape):
            raise ImageReadError(path, f"empty image: header shape {shape} has an axis of length 0")
        n_bytes = int(np.prod(shape, dtype=object)) * np.dtype(proxy.dtype).itemsize
        compressed = path.name.lower().endswith((".gz", ".mgz"))
        _check_size(path, n_bytes, int(proxy.offset), compressed=compressed)
        data = np.asarray(proxy)
        affine = np.asarray(img.affine, dtype=np.float64)
    except ImageReadError:
        raise
    except (PermissionError, IsADirectoryError):
        raise
    except Exception as err:  # nibabel, gzip and numpy signal corruption in many ways
        raise ImageReadError(path, _nibabel_failure(path, err)) from err
    if np.iscomplexobj(data):
        raise ImageReadError(path, f"complex data ({data.dtype}) are not supported")
    return _spatial_layout(data, path), affine


def _nibabel_failure(path: Path, err: Exception) -> str:
    """Why nibabel could not read ``path``, in words: truncation and unrecognised files
    said plainly, anything else as the exception itself."""
    compressed = path.name.lower().endswith((".gz", ".mgz"))
    if isinstance(err, EOFError):
        return f"truncated: the compressed data end early ({err})"
    if compressed and isinstance(err, (gzip.BadGzipFile, zlib.error)) or "not a gzip file" in str(err):
        return f"not valid gzip-compressed data ({type(err).__name__}: {err})"
    from nibabel.spatialimages import HeaderDataError

    if isinstance(err, HeaderDataError):
        return f"corrupt or unsupported header: {err}"
    if "Cannot work out file type" in str(err):
        if compressed:
            try:  # the header is the first 348 bytes; a stream ending before them is truncated
                with gzip.open(path, "rb") as f:
                    f.read(1024)
            except EOFError:
                return "truncated: the compressed data end before the end of the image header"
            except (OSError, zlib.error) as gz_err:
                return f"not valid gzip-compressed data ({type(gz_err).__name__}: {gz_err})"
        return "no NIfTI or MGH header found: not an image, or a truncated or corrupt one"
    return f"{type(err).__name__}: {err}"


def _embed_3d(data: np.ndarray, affine: np.ndarray):
    """Pad a d<3 image to 3 spatial axes; the new axes map to unit steps along new world axes."""
    ndim = affine.shape[0] - 1
    spatial = data.shape[:ndim]
    channels = data.shape[ndim:]
    full = np.eye(4, dtype=np.float32)
    full[:ndim, :ndim] = affine[:ndim, :ndim]
    full[:ndim, 3] = affine[:ndim, ndim]
    return data.reshape(spatial + (1,) * (3 - ndim) + channels), full


def _write_nifti(data: np.ndarray, affine: np.ndarray, path: Path):
    import nibabel as nib

    data, affine = _embed_3d(data, affine)
    vector = data.ndim == 4
    if vector:  # ITK's layout for multi-component voxels: time axis of length 1
        data = data.reshape(data.shape[:3] + (1,) + data.shape[3:])
    img = nib.Nifti1Image(data, affine, dtype=data.dtype)
    # sform carries the float32 matrix exactly; qform is its closest rigid+zoom version for
    # readers (ITK) that look there.
    img.set_sform(affine, code="scanner")
    img.set_qform(affine, code="scanner")
    img.header.set_xyzt_units("mm", "sec")
    if vector:
        img.header.set_intent("vector")
    nib.save(img, os.fspath(path))


def _write_mgh(data: np.ndarray, affine: np.ndarray, path: Path):
    import nibabel as nib

    data, affine = _embed_3d(data, affine)
    if data.ndim == 4 and data.shape[3] == 1:
        # MGH cannot tell one frame from none; it comes back as a scalar image.
        data = data[..., 0]
    nib.save(nib.MGHImage(data, affine), os.fspath(path))


# -- MetaImage --------------------------------------------------------------------------

_MET_TYPES = {
    "MET_CHAR": "i1",
    "MET_UCHAR": "u1",
    "MET_SHORT": "i2",
    "MET_USHORT": "u2",
    "MET_INT": "i4",
    "MET_UINT": "u4",
    # MetaIO's LONG is 4 bytes; 8-byte integers are LONG_LONG.
    "MET_LONG": "i4",
    "MET_ULONG": "u4",
    "MET_LONG_LONG": "i8",
    "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}
_MET_NAMES = {np.dtype("u1"): "MET_UCHAR", np.dtype("i2"): "MET_SHORT", np.dtype("i4"): "MET_INT", np.dtype("f4"): "MET_FLOAT"}
_MAX_HEADER_LINES = 256
_MAX_LINE = 1 << 16


def _read_metaimage_header(path: Path, f):
    header = {}
    for _ in range(_MAX_HEADER_LINES):
        line = f.readline(_MAX_LINE)
        if not line:
            break
        text = line.decode("latin-1").strip()
        if not text:
            continue
        key, sep, value = text.partition("=")
        if not sep:
            raise ImageReadError(path, f"not a MetaImage header: line {text[:60]!r} is not 'key = value'")
        key = key.strip().lower()
        header[key] = value.strip()
        if key == "elementdatafile":  # always the last header line; data may follow
            return header, f.tell()
    raise ImageReadError(path, "MetaImage header has no ElementDataFile line")


def _met_numbers(path, header, keys, count, default=None, *, kind=float):
    for key in keys:
        if key in header:
            try:
                values = [kind(v) for v in header[key].split()]
            except ValueError:
                raise ImageReadError(path, f"{key} = {header[key]!r} is not {count} numbers") from None
            if len(values) != count:
                raise ImageReadError(path, f"{key} has {len(values)} values, expected {count}")
            return values
    if default is None:
        raise ImageReadError(path, f"MetaImage header lacks {' / '.join(keys)}")
    return default


def _met_bool(path, header, keys, default=False):
    for key in keys:
        if key in header:
            value = header[key].lower()
            if value in ("true", "1"):
                return True
            if value in ("false", "0"):
                return False
            raise ImageReadError(path, f"{key} = {header[key]!r} is not True or False")
    return default


def _read_metaimage(path: Path):
    try:
        with open(path, "rb") as f:
            header, data_start = _read_metaimage_header(path, f)
            return _decode_metaimage(path, header, data_start, f)
    except (ImageReadError, PermissionError):
        raise
    except (OSError, ValueError, OverflowError, zlib.error) as err:
        raise ImageReadError(path, f"{type(err).__name__}: {err}") from err


def _decode_metaimage(path: Path, header: dict, data_start: int, f):
    if header.get("objecttype", "Image").lower() != "image":
        raise ImageReadError(path, f"ObjectType {header['objecttype']!r} is not Image")
    if not _met_bool(path, header, ("binarydata",), default=True):
        raise ImageReadError(path, "ASCII MetaImage data (BinaryData = False) are not supported")
    (ndim,) = _met_numbers(path, header, ("ndims",), 1, kind=int)
    if ndim not in (2, 3):
        raise ImageReadError(path, f"NDims = {ndim}; only 2-D and 3-D MetaImages are supported")
    dims = _met_numbers(path, header, ("dimsize",), ndim, kind=int)
    if any(n < 1 for n in dims):
        raise ImageReadError(path, f"DimSize {dims} must be positive")
    (channels,) = _met_numbers(path, header, ("elementnumberofchannels",), 1, [1], kind=int)
    if channels < 1:
        raise ImageReadError(path, f"ElementNumberOfChannels = {channels} must be positive")
    element_type = header.get("elementtype", "").upper()
    if element_type not in _MET_TYPES:
        raise ImageReadError(path, f"unsupported ElementType {header.get('elementtype')!r}")
    big_endian = _met_bool(path, header, ("binarydatabyteordermsb", "elementbyteordermsb"))
    dtype = np.dtype(_MET_TYPES[element_type]).newbyteorder(">" if big_endian else "<")
    spacing = _met_numbers(path, header, ("elementspacing", "elementsize"), ndim, [1.0] * ndim)
    origin = _met_numbers(path, header, ("offset", "origin", "position"), ndim, [0.0] * ndim)
    eye = np.eye(ndim).ravel().tolist()
    matrix = _met_numbers(path, header, ("transformmatrix", "rotation", "orientation"), ndim * ndim, eye)
    compressed = _met_bool(path, header, ("compresseddata",))

    n_bytes = int(np.prod(dims, dtype=object)) * channels * dtype.itemsize
    source = header["elementdatafile"]
    if source.upper() == "LOCAL":
        data_path, offset = path, data_start
    else:
        if source.upper() == "LIST" or "%" in source or not source:
            raise ImageReadError(path, f"ElementDataFile = {source!r}: only LOCAL or one file name is supported")
        data_path = path.parent / source
        if not data_path.is_file():
            raise ImageReadError(path, f"its data file {data_path} does not exist")
        (offset,) = _met_numbers(path, header, ("headersize",), 1, [0], kind=int)
        if offset == -1 and not compressed:  # MetaIO: the data are the last bytes of the file
            offset = data_path.stat().st_size - n_bytes
        if offset < 0:
            raise ImageReadError(path, f"HeaderSize {offset} is negative")
    _check_size(data_path, n_bytes, offset, compressed=compressed)

    with open(data_path, "rb") if data_path != path else contextlib.nullcontext(f) as g:
        g.seek(offset)
        if compressed:
            limit = _met_numbers(path, header, ("compresseddatasize",), 1, [-1], kind=int)[0]
            raw = g.read(limit) if limit >= 0 else g.read()
            # max_length bounds the output, so a zip bomb cannot exhaust memory.
            inflater = zlib.decompressobj()
            buffer = inflater.decompress(raw, n_bytes + 1)
            if len(buffer) < n_bytes:
                buffer += inflater.flush()
            if len(buffer) != n_bytes:
                raise ImageReadError(path, f"compressed data inflate to {len(buffer)} bytes, expected {n_bytes}")
        else:
            buffer = g.read(n_bytes)
            if len(buffer) != n_bytes:
                raise ImageReadError(path, f"truncated: expected {n_bytes} bytes of data, got {len(buffer)}")

    # File order is x fastest: a C-order read gives (z, y, x, C); reversing puts x first.
    flat = np.frombuffer(buffer, dtype=dtype)
    data = flat.reshape(tuple(reversed(dims)) + (channels,))
    data = np.transpose(data, tuple(reversed(range(ndim))) + (ndim,))
    data = data[..., 0] if channels == 1 else data
    data = np.ascontiguousarray(data, dtype=dtype.newbyteorder("="))

    # TransformMatrix lists, axis after axis, the LPS direction of each index axis (ITK's
    # MetaImageIO reads it the same way): group k is column k of the direction matrix.
    direction = np.asarray(matrix, dtype=np.float64).reshape(ndim, ndim).T
    lps = np.eye(ndim + 1)
    lps[:ndim, :ndim] = direction * np.asarray(spacing, dtype=np.float64)
    lps[:ndim, ndim] = origin
    return data, lps_to_ras_affine(lps)


def _write_metaimage(data: np.ndarray, affine: np.ndarray, path: Path):
    ndim = affine.shape[0] - 1
    lps = ras_to_lps_affine(affine.astype(np.float64))
    linear = lps[:ndim, :ndim]
    spacing = np.sqrt(np.sum(linear**2, axis=0))
    direction = linear / spacing
    channels = data.shape[ndim] if data.ndim == ndim + 1 else 1

    def numbers(values):
        # repr is the shortest text that reads back as the same float64.
        return " ".join(repr(float(v)) for v in np.ravel(values))

    lines = [
        "ObjectType = Image",
        f"NDims = {ndim}",
        "BinaryData = True",
        "BinaryDataByteOrderMSB = False",
        "CompressedData = False",
        f"TransformMatrix = {numbers(direction.T)}",
        f"Offset = {numbers(lps[:ndim, ndim])}",
        f"CenterOfRotation = {' '.join(['0'] * ndim)}",
        f"ElementSpacing = {numbers(spacing)}",
        f"DimSize = {' '.join(str(n) for n in data.shape[:ndim])}",
    ]
    if channels > 1:  # a single channel reads back as a scalar image, as in ITK
        lines.append(f"ElementNumberOfChannels = {channels}")
    lines += [f"ElementType = {_MET_NAMES[data.dtype]}", "ElementDataFile = LOCAL"]
    order = tuple(reversed(range(ndim))) + tuple(range(ndim, data.ndim))
    payload = np.ascontiguousarray(np.transpose(data, order), dtype=data.dtype.newbyteorder("<"))
    with open(path, "wb") as f:
        f.write(("\n".join(lines) + "\n").encode("ascii"))
        f.write(payload.tobytes())

"""The ``jaxreg`` command: register, apply, evaluate, demo.

::

    jaxreg register FIXED MOVING --out DIR [--preset NAME] [--transform affine+svf]
                    [--similarity lncc] [--regularization 1.0] [--shrink 4,2,1] [--steps 100,60,30]
                    [--fixed-mask MASK] [--fixed-landmarks P --moving-landmarks Q]
                    [--overwrite] [--no-report] [--quiet] [--debug] [--no-cache]
    jaxreg apply DIR IMAGE --out OUT [--interp linear|nearest|cubic] [--reference FIXED] [--inverse]
    jaxreg apply TRANSFORM... IMAGE --out OUT --reference FIXED
    jaxreg evaluate --fixed-labels F --warped-labels W [--labels 1,2] [--transform-dir DIR]
                    [--fixed-landmarks P --moving-landmarks Q] [--out metrics.json]
    jaxreg demo --out DIR [--2d] [--size N]

``register`` writes into DIR: ``warped.<ext>`` (the moving image on the fixed grid, in the
fixed image's format and header geometry), the transform as ANTs/ITK files
(``warp.nii.gz``, ``affine.mat``, ``inverse_warp.nii.gz``; see :mod:`jaxreg.itk`),
``transforms.json`` (which files, in ANTs order, and the grids), ``metrics.json`` (timings,
losses, similarity, folding, options, versions) and ``report.png`` (:func:`jaxreg.viz.report`).
Everything is written to a temporary folder inside DIR first and moved into place at the
end, so a failed run leaves no partial output; a DIR that exists and is not empty needs
``--overwrite``, and no output ever replaces an input file.

Images are read with :func:`jaxreg.io.load` (NIfTI, MGH, MetaImage); singleton spatial
axes are dropped, so a ``(x, y, 1)`` NIfTI slice is registered as a 2-D image, and outputs
are written back with the reference file's own shape and matrix.

Errors: a problem with the command line or the output location (bad option values,
an existing output without ``--overwrite``, an output that is an input, a folder without
write permission) prints ``jaxreg: error: <message>`` and exits with 2, before any work; a
problem found while running (unreadable or missing files, NaN images, rank mismatch, a
failed registration) prints the same kind of line and exits with 1, and running out of
memory (host ``MemoryError`` or XLA's ``RESOURCE_EXHAUSTED``) says so with what to try.
``--debug`` shows the traceback instead.

JAX's persistent compilation cache is on (``$JAXREG_CACHE_DIR``, default
``~/.cache/jaxreg/jax``), so a second run on same-shaped images skips most of the
compilation; ``--no-cache`` turns it off.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

__all__ = ["main", "UsageError", "CommandError"]

PROG = "jaxreg"
TRANSFORMS_JSON = "transforms.json"
METRICS_JSON = "metrics.json"
REPORT_PNG = "report.png"
# Names jaxreg.itk.write_transforms uses (checked against the inputs before running).
_TRANSFORM_NAMES = ("affine.mat", "warp.nii.gz", "inverse_warp.nii.gz")
_AFFINE_KINDS = ("translation", "rigid", "similarity", "affine")
_DEFORMABLE_KINDS = ("svf", "greedy", "syn", "bspline")
_INTERP = {"nearest": 0, "linear": 1, "cubic": 3}
_IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mgz", ".mgh", ".mha", ".mhd")


class UsageError(Exception):
    """A wrong command line or output location: exit status 2."""


class CommandError(Exception):
    """A problem found while running: exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump; main() prints it
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------- utilities


def _info(args, text: str):
    if not getattr(args, "quiet", False):
        print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def _warn(text: str):
    print(f"{PROG}: warning: {text}", file=sys.stderr, flush=True)


class _Progress:
    """One status line on stderr, rewritten per pyramid level on a terminal, one line per
    level otherwise (logs); silent when disabled."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.width = 0
        self.count = 0

    def __call__(self, stage: str, done: int, total: int):
        self.count += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        text = f"{PROG}: {stage:<14} level {done}/{total}  {elapsed:7.1f} s"
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0


def _int_list(text: str, *, name: str, minimum: int) -> tuple[int, ...]:
    parts = [p for p in text.replace("x", ",").split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"{name} must be comma-separated integers like 4,2,1; got {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise UsageError(f"{name} values must be integers >= {minimum}; got {text!r}")
    return values


def _label_list(text: str) -> tuple[int, ...]:
    return _int_list(text, name="--labels", minimum=-(2**31))


def _extension(path) -> str:
    name = Path(path).name.lower()
    for ext in _IMAGE_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return ""


def _json_value(x):
    """Plain JSON: numpy/jax scalars and arrays to Python, NaN/inf to None."""
    if isinstance(x, dict):
        return {str(k): _json_value(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_value(v) for v in x]
    if isinstance(x, (str, bool)) or x is None:
        return x
    if isinstance(x, Path):
        return os.fspath(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    try:
        array = np.asarray(x)
    except Exception:
        return repr(x)
    if array.dtype.kind in "iub":
        return array.tolist()
    if array.dtype.kind == "f":
        if array.ndim == 0:
            value = float(array)
            return value if math.isfinite(value) else None
        return [_json_value(v) for v in array]
    return repr(x)


def _write_text(path: Path, text: str, *, overwrite: bool):
    """Atomic text write (:func:`jaxreg.io.write_atomically`); an existing file is a usage error."""
    from jaxreg.io import write_atomically

    if not overwrite and os.path.lexists(path):
        raise UsageError(f"{path} exists (pass --overwrite to replace it)")
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite)


def _write_json(path: Path, data: dict, *, overwrite: bool):
    _write_text(path, json.dumps(_json_value(data), indent=2) + "\n", overwrite=overwrite)


# ------------------------------------------------------------------------ compile cache


def _cache_dir() -> Path:
    explicit = os.environ.get("JAXREG_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxreg" / "jax"


@contextlib.contextmanager
def _compilation_cache(enabled: bool):
    """JAX's persistent compilation cache on (small programs too) or off, for one command;
    the previous settings come back afterwards (main() may be called in-process)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = (
        "jax_enable_compilation_cache",
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {name: getattr(jax.config, name) for name in names}
    changed = False
    try:
        if enabled:
            directory = saved["jax_compilation_cache_dir"]
            if not directory:  # a user's own JAX setting wins
                directory = _cache_dir()
                try:
                    directory.mkdir(parents=True, exist_ok=True)
                except OSError as err:
                    _warn(f"compilation cache disabled: cannot create {directory}: {err.strerror}")
                    directory = None
            if directory is not None:
                compilation_cache.reset_cache()
                changed = True
                jax.config.update("jax_enable_compilation_cache", True)
                jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
                jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
                jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        else:
            compilation_cache.reset_cache()
            changed = True
            jax.config.update("jax_enable_compilation_cache", False)
        yield
    finally:
        if changed:
            for name, value in saved.items():
                jax.config.update(name, value)
            compilation_cache.reset_cache()


# ------------------------------------------------------------------------------- images


class _Loaded(NamedTuple):
    """An image as registered (singleton axes dropped) and its file's own layout."""

    image: object  # jaxreg.Image
    shape: tuple  # the file's spatial shape
    affine: np.ndarray  # the file's voxel-to-world matrix
    path: Path


def _load(path, name: str, *, dtype=None, check: bool = True) -> _Loaded:
    from jaxreg import io

    path = Path(path)
    full = io.load(path, dtype=dtype)
    image = io.squeeze(full)
    if image.has_channels:
        raise CommandError(f"{name} {path} has {image.shape[-1]} channels; register takes scalar images")
    if image.ndim not in (2, 3):
        raise CommandError(f"{name} {path} is {image.ndim}-D; only 2-D and 3-D images are supported")
    if check:
        try:
            io.check_image(image, name=f"{name} {path}")
        except ValueError as err:
            raise CommandError(str(err)) from None
    return _Loaded(image, tuple(full.shape[: full.ndim]), np.asarray(full.affine), path)


def _save_like(data, reference: _Loaded, path: Path, *, protect, overwrite: bool):
    """Save ``data`` (on the reference's squeezed grid) with the reference file's layout."""
    from jaxreg import io
    from jaxreg.grid import Image

    data = np.asarray(data)
    spatial = reference.image.shape[: reference.image.ndim]
    channels = data.shape[len(spatial) :]
    return io.save(Image(data.reshape(reference.shape + channels), reference.affine), path, overwrite=overwrite, protect=protect)


def _grid_record(grid) -> dict:
    return {"shape": list(grid.shape), "affine": np.asarray(grid.affine, dtype=np.float64).tolist()}


def _grid_from_record(record):
    from jaxreg.grid import Grid

    return Grid(record["shape"], np.asarray(record["affine"], dtype=np.float32))


# ------------------------------------------------------------------------ output folders


def _check_out_dir(out: Path, inputs: Sequence, *, overwrite: bool):
    """The output folder may not be an input, nor an existing non-empty folder unless
    ``overwrite``; usage errors."""
    from jaxreg.io import _same_file

    for path in inputs:
        if path is not None and os.path.lexists(out) and _same_file(out, path):
            raise UsageError(f"--out {out} is the input file {path}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"output folder {out} exists and is not empty (pass --overwrite to write into it)")
    _check_writable(out)


def _check_writable(folder: Path, target: Path | None = None):
    """A usage error unless files can be made in ``folder``, or, where it does not exist
    yet, in its nearest existing parent: found before any work, not when writing
    ``target`` (default: the folder itself)."""
    target = folder if target is None else target
    existing = Path(os.path.abspath(folder))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot write {target}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {target}: no write permission in {existing}")


def _check_not_input(path: Path, inputs: Sequence):
    from jaxreg.io import _same_file

    for other in inputs:
        if other is not None and os.path.lexists(path) and _same_file(path, other):
            raise UsageError(f"refusing to write {path}: it is the input file {other}")


class _Staging:
    """A temporary folder inside ``out`` whose files are moved into ``out`` on publish.

    Nothing reaches ``out`` unless the whole command succeeds; the folder is removed
    whatever happens. Files are never moved over an input file."""

    def __init__(self, out: Path, inputs: Sequence, *, overwrite: bool):
        self.out = out
        self.inputs = [p for p in inputs if p is not None]
        self.overwrite = overwrite
        out.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=".jaxreg-", dir=out))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)

    def publish(self, names: Sequence[str]):
        for name in names:
            _check_not_input(self.out / name, self.inputs)
            if not self.overwrite and os.path.lexists(self.out / name):
                raise UsageError(f"{self.out / name} exists (pass --overwrite to replace it)")
        for name in names:
            target = self.out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path / name, target)


# ------------------------------------------------------------------------------ register


def _parse_transform(text: str):
    """``affine+svf`` -> ("affine", "svf"); ``rigid`` -> ("rigid", None); ``svf`` -> (None, "svf")."""
    parts = [p.strip().lower() for p in text.split("+") if p.strip()]
    linear = [p for p in parts if p in _AFFINE_KINDS]
    dense = [p for p in parts if p in _DEFORMABLE_KINDS]
    unknown = [p for p in parts if p not in _AFFINE_KINDS + _DEFORMABLE_KINDS]
    choices = "|".join(_AFFINE_KINDS + _DEFORMABLE_KINDS)
    if unknown or not parts:
        raise UsageError(f"--transform {text!r}: expected a linear kind, a deformable kind or both joined by '+' ({choices})")
    if len(linear) > 1 or len(dense) > 1 or (linear and dense and parts.index(dense[0]) < parts.index(linear[0])):
        raise UsageError(f"--transform {text!r}: at most one linear then one deformable kind, e.g. affine+svf")
    return (linear[0] if linear else None), (dense[0] if dense else None)


def _register_options(args) -> dict:
    """Keyword arguments for registration.register: only what the user set."""
    from jaxreg import registration
    from jaxreg.losses import SIMILARITIES

    options: dict = {}
    if args.preset is not None:
        if args.preset not in registration.PRESETS:
            raise UsageError(f"unknown --preset {args.preset!r}; choose from {', '.join(sorted(registration.PRESETS))}")
        options["preset"] = args.preset
    if args.transform is not None:
        options["affine"], options["deformable"] = _parse_transform(args.transform)
    if args.similarity is not None:
        if args.similarity not in SIMILARITIES:
            raise UsageError(f"unknown --similarity {args.similarity!r}; choose from {', '.join(SIMILARITIES)}")
        options["similarity"] = args.similarity
    if args.regularization is not None:
        if not math.isfinite(args.regularization) or args.regularization < 0:
            raise UsageError(f"--regularization must be a finite number >= 0; got {args.regularization}")
        options["regularization"] = float(args.regularization)
    if args.shrink is not None:
        options["shrink"] = _int_list(args.shrink, name="--shrink", minimum=1)
    if args.steps is not None:
        steps = _int_list(args.steps, name="--steps", minimum=0)
        options["steps"] = steps[0] if len(steps) == 1 else steps
    if "shrink" in options and isinstance(options.get("steps"), tuple) and len(options["steps"]) != len(options["shrink"]):
        raise UsageError(f"--steps has {len(options['steps'])} values for {len(options['shrink'])} --shrink levels")
    if (args.fixed_landmarks is None) != (args.moving_landmarks is None):
        raise UsageError("--fixed-landmarks and --moving-landmarks go together")
    if getattr(args, "model", None) is not None:
        classical = [name for name, key in (("--preset", "preset"), ("--transform", "affine"), ("--similarity", "similarity"),
                                            ("--regularization", "regularization"), ("--shrink", "shrink"), ("--steps", "steps")) if key in options]
        if classical:
            raise UsageError(f"--model runs a trained network; {', '.join(classical)} set(s) classical options it would ignore")
        if args.fixed_landmarks is not None or args.fixed_mask is not None:
            raise UsageError("--model does not take --fixed-mask or landmarks")
        options = {"model": args.model}
    return options


def _network_register(fixed, moving, checkpoint: str):
    """A trained network's registration as a registration.Result (transform sampled on the fixed grid)."""
    import jax

    from jaxreg import nn as jnn
    from jaxreg.registration import Result
    from jaxreg.transforms import Displacement

    path = Path(checkpoint)
    # Missing, corrupt, spec-less or foreign checkpoints raise errors that name the file.
    network, spec = jnn.training.load_network(path)
    input_shape = spec.get("input_shape") or spec.get("kwargs", {}).get("shape")
    if input_shape is not None and len(input_shape) != fixed.ndim:
        raise CommandError(f"--model {path} registers {len(input_shape)}-D images; the inputs are {fixed.ndim}-D")
    if spec.get("kwargs", {}).get("ndim") not in (None, fixed.ndim):
        raise CommandError(f"--model {path} registers {spec['kwargs']['ndim']}-D images; the inputs are {fixed.ndim}-D")
    start = time.perf_counter()
    prediction = jnn.inference.register_images(network, fixed, moving, input_shape=input_shape)
    transform = jax.jit(Displacement.from_transform, static_argnums=1)(prediction.transform, fixed.grid)
    seconds = time.perf_counter() - start
    return Result(transform=transform, inverse=None, warped=prediction.warped, losses=(), stages=("network",),
                  compile_seconds=None, run_seconds=seconds)


def _call_register(fixed, moving, options: dict, progress: Callable | None):
    """registration.register, its bad-option errors as one-line command errors."""
    from jaxreg import registration

    if "model" in options:
        return _network_register(fixed, moving, options["model"])
    try:
        return registration.register(fixed, moving, progress=progress, **options)
    except (ValueError, TypeError) as err:
        raise CommandError(f"registration failed: {err}") from err


def _similarity_name(options: dict) -> str:
    from jaxreg import registration

    if isinstance(options.get("similarity"), str):
        return options["similarity"]
    preset = registration.PRESETS.get(options.get("preset") or "brain-mri", {})
    stage = "deformable_options" if options.get("deformable", preset.get("deformable")) else "affine_options"
    name = preset.get(stage, {}).get("similarity_loss")
    return name if isinstance(name, str) else "ncc"


def _register_pipeline(
    fixed_path,
    moving_path,
    out: Path,
    *,
    options: dict,
    args,
    fixed_mask=None,
    landmark_paths=None,
    landmark_format: str = "auto",
    extra: Callable | None = None,
    extra_inputs: Sequence = (),
    check_out: bool = True,
) -> dict:
    """Load, register, write everything into ``out``; return the metrics written."""
    import jax

    import jaxreg
    from jaxreg import _programs, itk
    from jaxreg import metrics as jmetrics
    from jaxreg.losses import SIMILARITIES
    from jaxreg.transforms import Affine, jacobian_determinant, warp

    fixed_path, moving_path = Path(fixed_path), Path(moving_path)
    inputs = [fixed_path, moving_path, fixed_mask, *(landmark_paths or ()), *extra_inputs]
    if check_out:
        _check_out_dir(out, inputs, overwrite=args.overwrite)
    ext = _extension(fixed_path)
    warped_name = "warped" + (".mha" if ext == ".mhd" else ext or ".nii.gz")
    for name in (warped_name, *_TRANSFORM_NAMES, REPORT_PNG, METRICS_JSON, TRANSFORMS_JSON):
        _check_not_input(out / name, inputs)

    fixed = _load(fixed_path, "fixed")
    moving = _load(moving_path, "moving")
    if fixed.image.ndim != moving.image.ndim:
        raise CommandError(
            f"fixed {fixed_path} is {fixed.image.ndim}-D {fixed.image.shape} and moving {moving_path} is "
            f"{moving.image.ndim}-D {moving.image.shape}; both must have the same rank"
        )
    options = dict(options)
    mask_image = None
    if fixed_mask is not None:
        mask = _load(fixed_mask, "fixed mask", check=False)
        if mask.image.shape != fixed.image.shape:
            raise CommandError(f"fixed mask {fixed_mask} has shape {mask.image.shape}, the fixed image {fixed.image.shape}")
        if not np.all(np.isfinite(mask.image.data)) or np.any(mask.image.data < 0) or not np.any(mask.image.data > 0):
            raise CommandError(f"fixed mask {fixed_mask} must be finite, non-negative and not all zero")
        mask_image = mask.image
        options["fixed_mask"] = mask_image
    landmarks = None
    if landmark_paths:
        from jaxreg.landmarks import read_points

        fixed_points = read_points(landmark_paths[0], format=landmark_format, reference=fixed.image)
        moving_points = read_points(landmark_paths[1], format=landmark_format, reference=moving.image)
        for points, path in ((fixed_points, landmark_paths[0]), (moving_points, landmark_paths[1])):
            if points.shape[1] != fixed.image.ndim:
                raise CommandError(f"landmarks {path} are {points.shape[1]}-D, the images {fixed.image.ndim}-D")
        if fixed_points.shape != moving_points.shape:
            raise CommandError(f"{len(fixed_points)} fixed landmarks but {len(moving_points)} moving ones; they must correspond")
        landmarks = (fixed_points.astype(np.float32), moving_points.astype(np.float32))
        options["landmarks"] = landmarks

    shape_text = "x".join(str(n) for n in fixed.image.shape)
    _info(args, f"registering {moving_path.name} to {fixed_path.name} ({fixed.image.ndim}-D, {shape_text}) on {jax.devices()[0].platform}")
    progress = _Progress(enabled=not args.quiet)
    start = time.perf_counter()
    try:
        result = _call_register(fixed.image, moving.image, options, progress)
        warped = np.asarray(jax.block_until_ready(result.warped.data))
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    if not np.all(np.isfinite(warped)):
        raise CommandError("registration diverged: the warped image has NaN or Inf values (try a larger --regularization or fewer --steps)")

    grid = fixed.image.grid
    name = _similarity_name(options)
    loss = SIMILARITIES[name]()
    weights = None if mask_image is None else np.asarray(mask_image.data, np.float32)

    # One program (op-by-op dispatch would compile every operation apart), kept like a
    # level's: within a process and, with the cache on, its trace across runs.
    def diagnostics(transform, moving_image, fixed_data, warped_data, weights):
        before = warp(moving_image, Affine.identity(grid.ndim), grid).data
        det = jacobian_determinant(transform, grid)
        return det, loss(before, fixed_data, weights), loss(warped_data, fixed_data, weights)

    measured = (result.transform, moving.image, fixed.image.data, warped, weights)
    determinant, before, after = _programs.run(diagnostics, measured, voxels=math.prod(grid.shape))
    determinant = np.asarray(determinant)
    similarity = {"name": name, "before": float(before), "after": float(after)}
    losses = [np.asarray(level, dtype=np.float64) for level in result.losses]
    record = {
        "fixed": os.path.abspath(fixed_path),
        "moving": os.path.abspath(moving_path),
        "fixed_shape": list(fixed.image.shape),
        "moving_shape": list(moving.image.shape),
        "seconds": seconds,
        "compile_seconds": result.compile_seconds,
        "run_seconds": result.run_seconds,
        "stages": list(result.stages),
        "losses": [level.tolist() for level in losses],
        "loss_first_last": [[level[0], level[np.isfinite(level)][-1] if np.isfinite(level).any() else np.nan] if len(level) else [] for level in losses],
        "similarity": similarity,
        "negative_jacobian_fraction": float(np.mean(~(determinant > 0))),
        "jacobian_determinant": {"min": float(np.min(determinant)), "max": float(np.max(determinant)), "mean": float(np.mean(determinant))},
        "options": {k: (v if k not in ("fixed_mask", "landmarks") else None) for k, v in options.items()},
        "inputs": {"fixed_mask": fixed_mask and os.path.abspath(fixed_mask), "landmarks": [os.path.abspath(p) for p in landmark_paths or ()]},
        "versions": {"jaxreg": jaxreg.__version__, "jax": jax.__version__, "python": sys.version.split()[0]},
        "device": {"platform": jax.devices()[0].platform, "name": str(jax.devices()[0]), "count": jax.device_count()},
        "argv": list(getattr(args, "argv", []) or []),
    }
    record["options"].update(fixed_mask=bool(fixed_mask), landmarks=bool(landmark_paths))
    if landmarks is not None:
        tre_before = np.linalg.norm(landmarks[0] - landmarks[1], axis=-1)
        tre_after = np.asarray(jax.jit(jmetrics.target_registration_error)(result.transform, landmarks[0], landmarks[1]))
        record["tre"] = {"before_mean": float(tre_before.mean()), "after_mean": float(tre_after.mean()), "after_max": float(tre_after.max())}

    with _Staging(out, inputs, overwrite=args.overwrite) as staging:
        written = [warped_name]
        _save_like(warped, fixed, staging.path / warped_name, protect=inputs[:2], overwrite=False)
        transform_record = {"format": "jaxreg-transforms/1", "transforms": [], "inverse": [], "whichtoinvert": []}
        files = itk.write_transforms(result.transform, grid, staging.path, inverse=result.inverse)
        relative = lambda paths: [os.path.relpath(p, staging.path) for p in paths]
        transform_record["transforms"] = relative(files)
        transform_record["inverse"] = relative(files.inverse)
        transform_record["whichtoinvert"] = list(files.whichtoinvert)
        written += sorted(set(transform_record["transforms"]) | set(transform_record["inverse"]))
        transform_record.update(
            reference=warped_name,
            fixed=os.path.abspath(fixed_path),
            moving=os.path.abspath(moving_path),
            fixed_grid=_grid_record(grid),
            moving_grid=_grid_record(moving.image.grid),
        )
        if not args.no_report:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                _warn("report.png not written: matplotlib is not installed (pip install 'jaxreg[viz]')")
            else:
                from jaxreg import viz

                viz.report(fixed.image, moving.image, result.warped, result.transform, staging.path / REPORT_PNG,
                           title=f"{moving_path.name} -> {fixed_path.name}")
                written.append(REPORT_PNG)
        if extra is not None:
            more_metrics, more_files = extra(result, fixed, staging.path)
            record.update(more_metrics)
            written += list(more_files)
        record["outputs"] = written + [TRANSFORMS_JSON, METRICS_JSON]
        _write_json(staging.path / TRANSFORMS_JSON, transform_record, overwrite=False)
        _write_json(staging.path / METRICS_JSON, record, overwrite=False)
        staging.publish(record["outputs"])
    return record


def _print_summary(args, record: dict, out: Path):
    if args.quiet:
        return
    sim = record["similarity"]
    compile_s = record.get("compile_seconds")
    timing = f"{record['seconds']:.1f} s" + (f" ({compile_s:.1f} s compiling)" if compile_s is not None else "")
    print(f"registered in {timing}")
    print(f"{sim['name']}: {sim['before']:.4g} -> {sim['after']:.4g}")
    print(f"negative Jacobian fraction: {record['negative_jacobian_fraction']:.3g}")
    if "tre" in record:
        print(f"TRE mean: {record['tre']['before_mean']:.3g} -> {record['tre']['after_mean']:.3g} mm")
    print(f"written to {out}: {', '.join(record['outputs'])}")


def _cmd_register(args) -> int:
    options = _register_options(args)
    out = Path(args.out)
    landmarks = (args.fixed_landmarks, args.moving_landmarks) if args.fixed_landmarks else None
    record = _register_pipeline(
        args.fixed, args.moving, out, options=options, args=args, fixed_mask=args.fixed_mask,
        landmark_paths=landmarks, landmark_format=args.landmarks_format,
    )
    _print_summary(args, record, out)
    return 0


# --------------------------------------------------------------------------------- apply


def _read_transform_dir(directory: Path) -> dict:
    path = directory / TRANSFORMS_JSON
    if not path.is_file():
        raise CommandError(f"{directory} has no {TRANSFORMS_JSON}; is it the --out folder of 'jaxreg register'?")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CommandError(f"cannot read {path}: {err}") from None
    if not isinstance(record, dict) or not isinstance(record.get("transforms"), list):
        raise CommandError(f"{path} does not list transforms")
    if not record["transforms"]:
        raise CommandError(f"{path} lists no transform files")
    return record


def _transform_from_dir(directory: Path, *, inverse: bool = False):
    from jaxreg import itk

    record = _read_transform_dir(directory)
    if inverse:
        files = record.get("inverse") or []
        flags = record.get("whichtoinvert") or [False] * len(files)
        if not files:
            raise CommandError(f"{directory / TRANSFORMS_JSON} lists no inverse transform")
    else:
        files, flags = record["transforms"], None
    paths = [directory / p for p in files]
    return itk.read_transforms(paths, invert=flags), record, paths


def _cmd_apply(args) -> int:
    import jax

    from jaxreg import itk
    from jaxreg.transforms import warp

    sources = [Path(p) for p in args.transforms]
    image_path, out = Path(args.image), Path(args.out)
    reference_path = Path(args.reference) if args.reference else None
    inputs = [*sources, image_path, reference_path]
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give the output image's file name")
    if not _extension(out) or _extension(out) == ".mhd":
        raise UsageError(f"--out {out}: the name must end in .nii.gz, .nii, .mgz, .mgh or .mha")
    _check_not_input(out, inputs)
    if os.path.lexists(out) and not args.overwrite:
        raise UsageError(f"{out} exists (pass --overwrite to replace it)")
    _check_writable(out.parent, out)

    record = None
    if len(sources) == 1 and sources[0].is_dir():
        transform, record, transform_files = _transform_from_dir(sources[0], inverse=args.inverse)
        inputs += transform_files
    else:
        if args.inverse:
            raise UsageError("--inverse needs a registration folder, not transform files")
        for source in sources:
            if source.is_dir():
                raise UsageError(f"{source} is a folder; give one registration folder or transform files")
        if reference_path is None:
            raise UsageError("transform files need --reference (the image whose grid to resample onto)")
        transform = itk.read_transforms(sources)

    # The grid to resample onto, with the layout of the file it comes from.
    if reference_path is not None:
        reference = _load(reference_path, "reference", check=False)
    else:
        directory = sources[0]
        if args.inverse:
            reference = _grid_reference(record, "moving", directory)
        else:
            reference = _grid_reference(record, "fixed", directory)

    order = _INTERP[args.interp]
    from jaxreg import io

    dtype = np.int32 if order == 0 else None
    try:
        full = io.load(image_path, dtype=dtype)
    except ValueError as err:
        if dtype is None or isinstance(err, io.ImageReadError):
            raise
        full = io.load(image_path)  # not whole numbers: nearest-neighbour on floats
    image = io.squeeze(full)
    if image.ndim != transform.ndim or reference.image.ndim != transform.ndim:
        raise CommandError(
            f"image {image_path} is {image.ndim}-D, the reference {reference.image.ndim}-D and the transform "
            f"{transform.ndim}-D; they must agree"
        )
    warped = jax.jit(warp, static_argnames=("order",))(image, transform, reference.image.grid, order=order)
    data = np.asarray(warped.data)
    if order == 0 and np.issubdtype(np.asarray(image.data).dtype, np.integer):
        data = data.astype(np.asarray(image.data).dtype)
    _save_like(data, reference, out, protect=[p for p in inputs if p is not None], overwrite=args.overwrite)
    _info(args, f"wrote {out} ({'x'.join(str(n) for n in data.shape)}, {args.interp})")
    return 0


def _grid_reference(record: dict, which: str, directory: Path) -> _Loaded:
    """The fixed (or moving) grid a registration folder recorded, as a _Loaded."""
    from jaxreg.grid import Image

    if which == "fixed" and record.get("reference") and (directory / record["reference"]).is_file():
        return _load(directory / record["reference"], "reference", check=False)
    source = record.get(which)
    if source and Path(source).is_file():
        return _load(source, which, check=False)
    key = f"{which}_grid"
    if key not in record:
        raise CommandError(f"{directory / TRANSFORMS_JSON} records no {which} grid; pass --reference")
    grid = _grid_from_record(record[key])
    return _Loaded(Image(np.zeros(grid.shape, np.float32), grid.affine), grid.shape, np.asarray(grid.affine), directory)


# ------------------------------------------------------------------------------ evaluate


def _stats(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "median": float(np.median(values)),
        "max": float(values.max()),
        "count": int(values.size),
    }


def _cmd_evaluate(args) -> int:
    import jax

    from jaxreg import metrics as jmetrics
    from jaxreg.transforms import jacobian_determinant

    if (args.fixed_labels is None) != (args.warped_labels is None):
        raise UsageError("--fixed-labels and --warped-labels go together")
    if (args.fixed_landmarks is None) != (args.moving_landmarks is None):
        raise UsageError("--fixed-landmarks and --moving-landmarks go together")
    if args.fixed_labels is None and args.fixed_landmarks is None and args.transform_dir is None:
        raise UsageError("nothing to evaluate: give --fixed-labels/--warped-labels, landmarks or --transform-dir")
    labels = _label_list(args.labels) if args.labels else None
    out = Path(args.out) if args.out else None
    inputs = [args.fixed_labels, args.warped_labels, args.fixed_landmarks, args.moving_landmarks, args.landmarks_reference]
    if args.transform_dir is not None:  # what evaluate reads there is an input too
        directory = Path(args.transform_dir)
        inputs.append(directory / TRANSFORMS_JSON)
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            record = json.loads((directory / TRANSFORMS_JSON).read_text(encoding="utf-8"))
            inputs += [directory / p for p in record.get("transforms", []) + record.get("inverse", [])]
    if out is not None:
        if out.is_dir():
            raise UsageError(f"--out {out} is a folder; give a file name like metrics.json")
        _check_not_input(out, [p for p in inputs if p is not None])
        if os.path.lexists(out) and not args.overwrite:
            raise UsageError(f"{out} exists (pass --overwrite to replace it)")
        _check_writable(out.parent, out)

    result: dict = {}
    fixed_labels = None
    if args.fixed_labels is not None:
        try:
            fixed_labels = _load(args.fixed_labels, "fixed labels", dtype=np.int32, check=False)
            warped_labels = _load(args.warped_labels, "warped labels", dtype=np.int32, check=False)
        except ValueError as err:
            if "whole numbers" in str(err):
                raise CommandError(f"label maps must hold integers: {err}") from None
            raise
        a, b = np.asarray(fixed_labels.image.data), np.asarray(warped_labels.image.data)
        if a.shape != b.shape:
            raise CommandError(f"fixed labels have shape {a.shape} and warped labels {b.shape}; warp the labels onto the fixed grid first (jaxreg apply)")
        present = sorted((set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0}) if labels is None else list(labels)
        if not present:
            raise CommandError("the label maps hold no label other than 0 (background)")
        scores = np.asarray(jax.jit(functools.partial(jmetrics.dice, labels=tuple(present)))(b, a))
        result["labels"] = present
        result["dice"] = {str(l): float(s) for l, s in zip(present, scores)}
        result["dice_mean"] = float(np.nanmean(scores)) if np.isfinite(scores).any() else None
        if not args.no_hd95:
            spacing = fixed_labels.image.grid
            hd95 = jax.jit(functools.partial(jmetrics.hd95, spacing=spacing))
            distances = [float(hd95(a == l, b == l)) for l in present]
            result["hd95"] = {str(l): d for l, d in zip(present, distances)}
            finite = [d for d in distances if math.isfinite(d)]
            result["hd95_mean"] = float(np.mean(finite)) if finite else None

    transform, record = None, None
    if args.transform_dir is not None:
        directory = Path(args.transform_dir)
        if not directory.is_dir():
            raise CommandError(f"--transform-dir {directory} is not a folder")
        transform, record, _ = _transform_from_dir(directory)
        grid = _grid_from_record(record["fixed_grid"]) if "fixed_grid" in record else (
            fixed_labels.image.grid if fixed_labels is not None else None)
        if grid is None:
            raise CommandError(f"{directory / TRANSFORMS_JSON} records no fixed grid")
        determinant = np.asarray(jax.jit(jacobian_determinant)(transform, grid))
        result["negative_jacobian_fraction"] = float(np.mean(~(determinant > 0)))
        result["jacobian_determinant"] = {"min": float(determinant.min()), "max": float(determinant.max())}

    if args.fixed_landmarks is not None:
        from jaxreg.landmarks import read_points

        shared = _load(args.landmarks_reference, "landmarks reference", check=False).image if args.landmarks_reference else None
        fixed_reference = shared if shared is not None else (
            fixed_labels.image if fixed_labels is not None else (_grid_from_record(record["fixed_grid"]) if record else None))
        moving_reference = shared if shared is not None else (
            _grid_from_record(record["moving_grid"]) if record and "moving_grid" in record else None)
        fixed_points = read_points(args.fixed_landmarks, format=args.landmarks_format, reference=fixed_reference)
        moving_points = read_points(args.moving_landmarks, format=args.landmarks_format, reference=moving_reference)
        if fixed_points.shape != moving_points.shape:
            raise CommandError(f"{len(fixed_points)} fixed landmarks ({fixed_points.shape[1]}-D) and {len(moving_points)} moving ones ({moving_points.shape[1]}-D) do not correspond")
        result["tre_before"] = _stats(np.linalg.norm(fixed_points - moving_points, axis=-1))
        if transform is not None:
            if transform.ndim != fixed_points.shape[1]:
                raise CommandError(f"landmarks are {fixed_points.shape[1]}-D, the transform {transform.ndim}-D")
            tre = jax.jit(jmetrics.target_registration_error)
            errors = np.asarray(tre(transform, fixed_points.astype(np.float32), moving_points.astype(np.float32)))
            result["tre"] = _stats(errors)
            result["tre_per_point"] = errors.tolist()

    if out is not None:
        _write_json(out, result, overwrite=args.overwrite)
    if not args.quiet:
        for key in ("dice_mean", "hd95_mean", "negative_jacobian_fraction"):
            if key in result:
                value = result[key]
                print(f"{key}: {'n/a' if value is None else f'{value:.4g}'}")
        if "tre_before" in result:
            print(f"tre_before_mean: {result['tre_before']['mean']:.4g}")
        if "tre" in result:
            print(f"tre_mean: {result['tre']['mean']:.4g}")
        if out is not None:
            print(f"written to {out}")
        else:
            print(json.dumps(_json_value(result), indent=2))
    return 0


# ---------------------------------------------------------------------------------- demo


def _demo_pair(ndim: int, size: int, seed: int):
    """A synthetic pair: blobs, and the blobs moved by a small affine and a random SVF
    (1 mm voxels, world origin at the centre). Returns four Images: fixed, moving and their
    label maps."""
    import jax
    import jax.numpy as jnp

    from jaxreg import synthetic
    from jaxreg.grid import Grid, Image
    from jaxreg.transforms import Affine, compose, rotation_matrix, warp

    shape = (size,) * ndim
    affine = np.eye(ndim + 1, dtype=np.float32)
    affine[:ndim, ndim] = -(size - 1) / 2.0

    # One compiled program: dispatching the same code op by op compiles far more.
    @jax.jit
    def make(key):
        key_image, key_warp = jax.random.split(key)
        image, labels = synthetic.blobs(key_image, shape, labels=4)
        velocity = synthetic.random_velocity(key_warp, Grid(shape, affine), amplitude=0.06 * size, smoothness=0.25 * size)
        angles = jnp.full(ndim * (ndim - 1) // 2, np.deg2rad(4.0), jnp.float32)
        linear = rotation_matrix(angles, ndim) * 1.03
        truth = compose(Affine.from_linear(linear, jnp.full(ndim, 0.03 * size, jnp.float32)), velocity)
        moving = warp(Image(image, affine), truth).data
        moving_labels = warp(Image(labels, affine), truth, order=0).data
        return image, labels, moving, moving_labels

    fixed, fixed_labels, moving, moving_labels = (np.asarray(a) for a in make(jax.random.PRNGKey(seed)))
    return (
        Image(fixed, affine),
        Image(moving, affine),
        Image(fixed_labels.astype(np.int32), affine),
        Image(moving_labels.astype(np.int32), affine),
    )


def _cmd_demo(args) -> int:
    import jax

    from jaxreg import io
    from jaxreg import metrics as jmetrics
    from jaxreg.transforms import warp

    out = Path(args.out)
    ndim = 2 if args.two_d else 3
    size = args.size if args.size is not None else (64 if ndim == 2 else 32)
    if size < 16:
        raise UsageError(f"--size must be at least 16; got {size}")
    shrink = _int_list(args.shrink, name="--shrink", minimum=1)
    steps = _int_list(args.steps, name="--steps", minimum=0)
    if len(steps) != len(shrink):
        raise UsageError(f"--steps has {len(steps)} values for {len(shrink)} --shrink levels")
    _check_out_dir(out, [], overwrite=args.overwrite)

    _info(args, f"making a synthetic {ndim}-D pair of size {size}")
    fixed, moving, fixed_labels, moving_labels = _demo_pair(ndim, size, args.seed)
    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, image in (("fixed", fixed), ("moving", moving), ("fixed_labels", fixed_labels), ("moving_labels", moving_labels)):
        paths[name] = io.save(image, inputs / f"{name}.nii.gz", overwrite=args.overwrite)
    label_ids = (1, 2, 3, 4)

    def extra(result, fixed_loaded, staging: Path):
        warped_labels = jax.jit(warp, static_argnames=("order",))(moving_labels, result.transform, fixed_loaded.image.grid, order=0)
        io.save(warped_labels, staging / "warped_labels.nii.gz")
        mean_dice = jax.jit(functools.partial(jmetrics.mean_dice, labels=label_ids))
        before = float(mean_dice(moving_labels.data, fixed_labels.data))
        after = float(mean_dice(np.asarray(warped_labels.data), fixed_labels.data))
        return {"demo": {"ndim": ndim, "size": size, "seed": args.seed, "dice_before": before, "dice_after": after}}, ["warped_labels.nii.gz"]

    options = dict(
        affine="affine",
        deformable="svf",
        similarity="lncc",
        shrink=shrink,
        steps=steps,
        affine_options=dict(shrink=shrink[:1], steps=(max(steps[0], 1),)),
    )
    record = _register_pipeline(
        paths["fixed"], paths["moving"], out, options=options, args=args, extra=extra, check_out=False,
        extra_inputs=[paths["fixed_labels"], paths["moving_labels"]],
    )
    _print_summary(args, record, out)
    demo = record["demo"]
    print(f"Dice before: {demo['dice_before']:.3f}  after: {demo['dice_after']:.3f}")
    return 0


# ---------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    from jaxreg import __version__

    parser = _Parser(prog=PROG, description="Image registration in JAX.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    common = _Parser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress or summary output")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common.add_argument("--no-cache", action="store_true", help="do not use JAX's persistent compilation cache")

    landmark_formats = ("auto", "text", "elastix", "dirlab")

    reg = sub.add_parser("register", parents=[common], help="register MOVING to FIXED", description="Register MOVING to FIXED and write the results into --out.")
    reg.add_argument("fixed", help="fixed image (NIfTI, MGH, MetaImage)")
    reg.add_argument("moving", help="moving image")
    reg.add_argument("--out", required=True, help="output folder")
    reg.add_argument("--preset", help="named option set (see jaxreg.registration.PRESETS)")
    reg.add_argument("--transform", help="stages: a linear kind (translation|rigid|similarity|affine), a deformable one (svf|greedy|syn|bspline), or both joined by '+'")
    reg.add_argument("--similarity", help="similarity of the deformable stage (mse|ncc|lncc|mi|nmi|ngf|ssim|mind)")
    reg.add_argument("--regularization", type=float, help="weight of the deformable stage's regularizer")
    reg.add_argument("--shrink", help="pyramid shrink factors, coarse to fine, e.g. 4,2,1")
    reg.add_argument("--steps", help="optimisation steps per level, e.g. 100,60,30")
    reg.add_argument("--model", metavar="CHECKPOINT", help="register with a trained network (a jaxreg.nn checkpoint) instead of optimising")
    reg.add_argument("--fixed-mask", help="weights on the fixed grid (nonzero = used)")
    reg.add_argument("--fixed-landmarks", help="landmarks in the fixed image (text, elastix or DIR-Lab file)")
    reg.add_argument("--moving-landmarks", help="the corresponding landmarks in the moving image")
    reg.add_argument("--landmarks-format", choices=landmark_formats, default="auto")
    reg.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, replacing files")
    reg.add_argument("--no-report", action="store_true", help="do not draw report.png")
    reg.set_defaults(func=_cmd_register)

    app = sub.add_parser("apply", parents=[common], help="resample an image through a registration's transform",
                         description="Resample IMAGE onto the fixed grid through the transform of a registration folder (or of ANTs/ITK transform files, in ANTs order).")
    app.add_argument("transforms", nargs="+", metavar="DIR|TRANSFORM", help="a 'jaxreg register' output folder, or transform files in ANTs order")
    app.add_argument("image", metavar="IMAGE")
    app.add_argument("--out", required=True, help="output image file")
    app.add_argument("--interp", choices=tuple(_INTERP), default="linear", help="nearest keeps integer label maps integer")
    app.add_argument("--reference", help="image whose grid to resample onto (default: the fixed grid of DIR)")
    app.add_argument("--inverse", action="store_true", help="warp a fixed-space image into moving space (DIR only)")
    app.add_argument("--overwrite", action="store_true")
    app.set_defaults(func=_cmd_apply)

    ev = sub.add_parser("evaluate", parents=[common], help="Dice, HD95, folding and TRE of a registration")
    ev.add_argument("--fixed-labels", help="label map on the fixed grid")
    ev.add_argument("--warped-labels", help="moving label map warped onto the fixed grid (jaxreg apply --interp nearest)")
    ev.add_argument("--labels", help="labels to score, e.g. 1,2,3 (default: all nonzero labels present)")
    ev.add_argument("--no-hd95", action="store_true", help="skip the (slower) 95th-percentile Hausdorff distances")
    ev.add_argument("--transform-dir", help="a 'jaxreg register' output folder: folding, and TRE after registration")
    ev.add_argument("--fixed-landmarks")
    ev.add_argument("--moving-landmarks")
    ev.add_argument("--landmarks-format", choices=landmark_formats, default="auto")
    ev.add_argument("--landmarks-reference", help="image whose voxel grid voxel-index landmarks refer to")
    ev.add_argument("--out", help="write the metrics as JSON here")
    ev.add_argument("--overwrite", action="store_true")
    ev.set_defaults(func=_cmd_evaluate)

    demo = sub.add_parser("demo", parents=[common], help="register a built-in synthetic pair",
                          description="Make a synthetic pair (blobs moved by an affine and a random SVF), register it, report Dice before and after.")
    demo.add_argument("--out", required=True, help="output folder (inputs go to OUT/inputs)")
    demo.add_argument("--2d", dest="two_d", action="store_true", help="a 2-D pair instead of 3-D")
    demo.add_argument("--size", type=int, help="voxels per axis (default 32 in 3-D, 64 in 2-D)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--shrink", default="1", help="pyramid of the deformable stage (default 1: one level, quick to compile)")
    demo.add_argument("--steps", default="60", help="steps per level")
    demo.add_argument("--overwrite", action="store_true")
    demo.add_argument("--no-report", action="store_true")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _error_message(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    if isinstance(err, KeyError):
        return f"missing entry {err}"
    text = str(err) or type(err).__name__
    return " ".join(text.split()) if "\n" not in text else text.splitlines()[0]


def _out_of_memory(err: BaseException | None) -> BaseException | None:
    """The MemoryError or XLA RESOURCE_EXHAUSTED error that ``err`` is or came from, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err):
            return err
        err = err.__cause__ or err.__context__
    return None


def _out_of_memory_message(err: BaseException, command: str | None) -> str:
    advice = "a device with more memory"
    if command in ("register", "demo"):
        advice = "a coarser pyramid that stops before full resolution (e.g. --shrink 4,2), or " + advice
    detail = _error_message(err)[:200]
    return f"out of memory ({detail}); try {advice}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jaxreg`` command; returns the exit status (0, 1 runtime error, 2 usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    command = None
    try:
        parser = _parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # --help, --version
            return int(exit_.code or 0)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        args.argv = [PROG, *argv]
        command = args.command
        with _compilation_cache(not args.no_cache):
            return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except UsageError as err:
        if debug:
            raise
        print(f"{PROG}: error: {_error_message(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 -- one line for the user; --debug for the rest
        if debug:
            raise
        oom = _out_of_memory(err)
        if oom is not None:
            print(f"{PROG}: error: {_out_of_memory_message(oom, command)}", file=sys.stderr)
            return 1
        known = isinstance(err, (CommandError, OSError, ValueError))
        hint = "" if known else f" ({type(err).__name__}; run with --debug for the traceback)"
        print(f"{PROG}: error: {_error_message(err)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

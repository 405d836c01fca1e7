"""Bad input gives a clear error naming the problem, in Python and through ``jaxreg`` (issue 6).

Python: ``io.load`` raises FileNotFoundError / PermissionError / ``ImageReadError`` naming
the file; ``register`` refuses bad images and absurd options before any pyramid level is
compiled, with shapes and dtypes in the message.

The command: every case runs in-process through ``cli.main`` (one ``jaxreg: error:``
line naming the problem, the right exit status, no traceback; with ``--debug`` the
exception gets out, so the interpreter prints its traceback; inputs and any earlier
results byte-identical afterwards). Every case fails before registration starts. One case
per way of failing also runs as a real ``python -m jaxreg.cli`` process, with and without
``--debug`` at once: a process start imports jax (about a second), so running all of them
that way would take minutes. Out of memory is checked by making registration raise XLA's
RESOURCE_EXHAUSTED (and MemoryError); an interruption, on a real 16x16 registration.

Permissions: as root, files are readable whatever their mode, so permission cases run the
command with the capabilities that override file modes dropped (``PR_CAPBSET_DROP``); they
are skipped where that is not possible.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import ndimage

from jaxreg import _checks, cli, filters, io, registration
from jaxreg.grid import Image
from jaxreg.losses import SIMILARITIES
from tests.test_cli import ROOT, leftovers, sha, tree_hashes

SIZE = 16

# Drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, then runs Python
# with the remaining arguments: file modes then bind even a root process.
_UNPRIVILEGED = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "for cap in (1, 2):\n"
    "    if libc.prctl(24, cap, 0, 0, 0) != 0:\n"
    "        sys.exit(f'cannot drop capability {cap}: errno {ctypes.get_errno()}')\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
)


class Ran(NamedTuple):
    code: int
    stdout: str
    stderr: str


def _python(*args, unprivileged=False, cache=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["JAX_PLATFORMS"] = "cpu"
    if cache is not None:
        env["JAXREG_CACHE_DIR"] = str(cache)
    prefix = [sys.executable, "-c", _UNPRIVILEGED] if unprivileged and os.geteuid() == 0 else [sys.executable]
    return subprocess.Popen([*prefix, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait(process, timeout=120) -> Ran:
    stdout, stderr = process.communicate(timeout=timeout)
    return Ran(process.returncode, stdout, stderr)


def jaxreg_twice(args, *, cache, unprivileged=False) -> tuple[Ran, Ran]:
    """The command run without and with --debug, both at once."""
    plain = _python("-m", "jaxreg.cli", *args, unprivileged=unprivileged, cache=cache)
    debug = _python("-m", "jaxreg.cli", *args, "--debug", unprivileged=unprivileged, cache=cache)
    return _wait(plain), _wait(debug)


def assert_clean_failure(plain: Ran, debug: Ran, code: int, fragments) -> str:
    """One error line, last, with every fragment; the exit status; no traceback; --debug
    has one. (nibabel may print its own notes on a corrupt header before the error.)"""
    lines = [line for line in plain.stderr.splitlines() if line.strip()]
    assert plain.code == code, plain.stderr
    assert "Traceback" not in plain.stderr, plain.stderr
    assert lines and lines[-1].startswith("jaxreg: error: "), plain.stderr
    assert sum(line.startswith("jaxreg:") for line in lines) == 1, plain.stderr
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    assert debug.code != 0 and "Traceback (most recent call last)" in debug.stderr, debug.stderr
    return lines[-1]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    # in-process main() calls turn the persistent compilation cache on: keep it out of ~
    monkeypatch.setenv("JAXREG_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jax-cache"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def smooth_image(seed: int, shape=(SIZE, SIZE)) -> np.ndarray:
    noise = np.random.default_rng(seed).random(shape)
    return ndimage.gaussian_filter(noise, 1.5).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small good and bad inputs, in one folder whose bytes every test checks afterwards."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    paths = {"folder": folder}

    def save(name, data, affine=None):
        paths[name] = io.save(Image(data, affine), folder / name)

    save("fixed.nii.gz", smooth_image(1))
    save("moving.nii.gz", np.roll(smooth_image(1), 1, axis=0))
    save("volume.nii.gz", smooth_image(2, (8, 8, 8)))
    save("channels.nii.gz", rng.random((SIZE, SIZE, 3)).astype(np.float32), np.eye(3))
    nan = smooth_image(3)
    nan[2, 3] = np.nan
    save("nan.nii.gz", nan)
    inf = smooth_image(4)
    inf[5, 6] = -np.inf
    save("inf.nii.gz", inf)
    save("constant.nii.gz", np.full((SIZE, SIZE), 7.0, np.float32))
    save("empty_mask.nii.gz", np.zeros((SIZE, SIZE), np.uint8))

    whole = paths["fixed.nii.gz"].read_bytes()
    paths["truncated.nii.gz"] = folder / "truncated.nii.gz"
    paths["truncated.nii.gz"].write_bytes(whole[: len(whole) // 2])
    plain = bytearray(gzip.decompress(whole))  # the same image as .nii, header overwritten
    plain[:200] = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
    paths["garbage.nii"] = folder / "garbage.nii"
    paths["garbage.nii"].write_bytes(bytes(plain))
    paths["random.nii"] = folder / "random.nii"
    paths["random.nii"].write_bytes(rng.integers(0, 256, len(plain), dtype=np.uint8).tobytes())
    paths["text.nii.gz"] = folder / "text.nii.gz"
    paths["text.nii.gz"].write_text("subject,age\n1,34\n2,29\n")
    empty = bytearray(gzip.decompress(whole))
    empty[42:44] = np.int16(0).tobytes()  # dim[1] = 0
    paths["zero_axis.nii"] = folder / "zero_axis.nii"
    paths["zero_axis.nii"].write_bytes(bytes(empty))
    paths["hashes"] = tree_hashes(folder)
    return paths


@pytest.fixture
def unchanged(files):
    """Every input file byte-identical after the test."""
    yield
    assert tree_hashes(files["folder"]) == files["hashes"]


@pytest.fixture(scope="module")
def permissions_bind(tmp_path_factory):
    """Skip unless a (possibly unprivileged) child process is refused a mode-000 file."""
    probe = tmp_path_factory.mktemp("probe") / "secret"
    probe.write_text("x")
    probe.chmod(0)
    try:
        done = _wait(_python("-c", "import sys; open(sys.argv[1]).read()", probe, unprivileged=True), timeout=60)
    finally:
        probe.chmod(0o600)
    if done.code == 0:
        pytest.skip("file permissions do not bind here (root without a way to drop CAP_DAC_OVERRIDE)")


# ------------------------------------------------------------------------- io.load


@pytest.mark.parametrize(
    "name, error, fragment",
    [
        ("missing.nii.gz", FileNotFoundError, "no such image file"),
        ("truncated.nii.gz", io.ImageReadError, "truncated"),
        ("garbage.nii", io.ImageReadError, "corrupt or unsupported header"),
        ("random.nii", io.ImageReadError, "no NIfTI or MGH header"),
        ("text.nii.gz", io.ImageReadError, "gzip"),
        ("zero_axis.nii", io.ImageReadError, "axis of length 0"),
    ],
)
def test_load_names_the_file_and_the_problem(files, unchanged, name, error, fragment):
    path = files["folder"] / name
    with pytest.raises(error) as info:
        io.load(path)
    assert str(path) in str(info.value) and fragment in str(info.value)
    if isinstance(info.value, io.FileReadError):
        assert info.value.path == str(path)


def test_load_of_a_folder_and_an_unknown_extension(tmp_path):
    (tmp_path / "x.nii").mkdir()
    with pytest.raises(IsADirectoryError, match=r"directory.*x\.nii"):
        io.load(tmp_path / "x.nii")
    (tmp_path / "scan.dcm").write_bytes(b"DICM")
    with pytest.raises(ValueError, match=r"scan\.dcm.*extension"):
        io.load(tmp_path / "scan.dcm")


def test_load_of_an_unreadable_file_is_a_permission_error(tmp_path, permissions_bind):
    path = io.save(smooth_image(0), tmp_path / "secret.nii.gz")
    path.chmod(0)
    try:
        code = (
            "import sys\nfrom jaxreg import io\n"
            "try:\n    io.load(sys.argv[1])\n"
            "except PermissionError as err:\n    print(type(err).__name__, err.filename, err.strerror)\n"
        )
        done = _wait(_python("-c", code, path, unprivileged=True))
    finally:
        path.chmod(0o600)
    assert done.code == 0, done.stderr
    assert done.stdout.split()[:2] == ["PermissionError", str(path)] and "permission denied" in done.stdout


def test_save_never_replaces_an_input_and_errors_name_the_target(files, tmp_path, unchanged):
    source = files["fixed.nii.gz"]
    with pytest.raises(ValueError, match="input file"):
        io.save(smooth_image(9), source, overwrite=True, protect=[source])
    with pytest.raises(FileExistsError, match="overwrite"):
        io.save(smooth_image(9), source)
    # a failed write reports the file asked for, not its temporary name
    target = tmp_path / "no_such_folder" / "out.nii.gz"
    with pytest.raises(FileNotFoundError) as info:
        io.save(smooth_image(9), target)
    assert info.value.filename == str(target)
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------- register (Python)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if registration reaches a pyramid level: errors must come first."""

    def started(*_, **__):
        raise AssertionError("a pyramid level started before the bad input was refused")

    monkeypatch.setattr(registration, "_run_level", started)


def _nan_image():
    data = smooth_image(3)
    data[2, 3] = np.nan
    return data


def _inf_image():
    data = smooth_image(3)
    data[0, 0] = np.inf
    return data


GOOD = smooth_image(1)


REGISTER_CASES = {
    # case: (fixed, moving, options, exception, fragments of its message)
    "2-D against 3-D": (GOOD, smooth_image(2, (8, 8, 8)), {}, ValueError, ["2-D (16, 16)", "3-D (8, 8, 8)", "same rank"]),
    "channels": (Image(np.stack([GOOD] * 3, -1), np.eye(3)), GOOD, {}, ValueError, ["scalar images", "(16, 16, 3)"]),
    "complex dtype": (GOOD.astype(np.complex64), GOOD, {}, TypeError, ["fixed", "complex64", "(16, 16)"]),
    "NaN voxel": (_nan_image(), GOOD, {}, ValueError, ["fixed has 1 NaN or Inf"]),
    "Inf voxel": (GOOD, _inf_image(), {}, ValueError, ["moving has 1 NaN or Inf"]),
    "constant image": (GOOD, np.full((SIZE, SIZE), 2.0, np.float32), {}, ValueError, ["moving is constant"]),
    "empty mask": (GOOD, GOOD, dict(fixed_mask=np.zeros((SIZE, SIZE))), ValueError, ["fixed_mask is empty"]),
    "mask shape": (GOOD, GOOD, dict(fixed_mask=np.ones((8, 8))), ValueError, ["fixed_mask has shape (8, 8)"]),
    "negative regularization": (GOOD, GOOD, dict(regularization=-1.0), ValueError, ["regularization", "-1.0"]),
    "NaN regularization": (GOOD, GOOD, dict(regularization=float("nan")), ValueError, ["regularization"]),
    "empty shrink": (GOOD, GOOD, dict(shrink=()), ValueError, ["shrink", "()"]),
    "zero shrink": (GOOD, GOOD, dict(shrink=(2, 0)), ValueError, ["shrink", "(2, 0)"]),
    "negative steps": (GOOD, GOOD, dict(steps=-5), ValueError, ["steps", "-5"]),
    "fractional steps": (GOOD, GOOD, dict(steps=(10, 2.5)), ValueError, ["steps", "2.5"]),
    "steps per level": (GOOD, GOOD, dict(shrink=(2, 1), steps=(10, 10, 10)), ValueError, ["steps needs one value per level (2)"]),
    "steps per preset level": (GOOD, GOOD, dict(steps=(10, 10, 10)), ValueError, ["steps needs one value per level"]),
    "unknown preset": (GOOD, GOOD, dict(preset="brain-ct"), ValueError, ["unknown preset 'brain-ct'", "brain-mri"]),
    "unknown similarity": (GOOD, GOOD, dict(similarity="psnr"), ValueError, ["unknown similarity 'psnr'", "lncc"]),
    "similarity not callable": (GOOD, GOOD, dict(similarity=3), TypeError, ["similarity must be a name or a callable"]),
    "unknown affine kind": (GOOD, GOOD, dict(affine="warp"), ValueError, ["affine must be"]),
    "unknown deformable kind": (GOOD, GOOD, dict(deformable="demons"), ValueError, ["deformable must be"]),
    "no stage": (GOOD, GOOD, dict(affine=None, deformable=None), ValueError, ["nothing to do"]),
    "negative smoothing sigma": (GOOD, GOOD, dict(affine=None, deformable="svf", deformable_options=dict(smoothing=-1.0)), ValueError, ["sigma must be non-negative"]),
}


@pytest.mark.parametrize("case", list(REGISTER_CASES))
def test_register_refuses_bad_input_before_any_work(no_work, case):
    fixed, moving, options, error, fragments = REGISTER_CASES[case]
    with pytest.raises(error) as info:
        registration.register(fixed, moving, **options)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_stage_functions_refuse_bad_images_and_options(no_work):
    with pytest.raises(ValueError, match="fixed has 1 NaN"):
        registration.register_svf(_nan_image(), GOOD)
    with pytest.raises(ValueError, match=r"3-D \(8, 8, 8\)"):
        registration.register_affine(GOOD, smooth_image(2, (8, 8, 8)))
    with pytest.raises(ValueError, match="sigma"):
        registration.smooth_updates(-0.5)
    with pytest.raises(ValueError, match="sigma"):
        filters.gaussian_smooth(jnp.asarray(GOOD), -1.0)
    with pytest.raises(ValueError, match="max_norm"):
        registration.cap_step(0.0)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        registration.minimize(lambda p: p**2, 1.0, optax.sgd(0.1), steps=-1)


@pytest.mark.parametrize("name", sorted(SIMILARITIES))
def test_similarities_name_mismatched_channels(name):
    two, three = jnp.zeros((SIZE, SIZE, 2)), jnp.zeros((SIZE, SIZE, 3))
    with pytest.raises(ValueError, match=r"same shape; got \(16, 16, 2\) and \(16, 16, 3\)"):
        SIMILARITIES[name]()(two, three)


def test_checks_happen_at_trace_time_and_value_checks_skip_tracers():
    fixed, volume = jnp.asarray(GOOD), jnp.zeros((8, 8, 8), jnp.float32)
    stage = lambda f, m: registration.register_affine(f, m, shrink=(1,), steps=1)[0].matrix  # noqa: E731
    # shapes only (eval_shape traces, never compiles or runs): the rank check still fires
    with pytest.raises(ValueError, match=r"2-D \(16, 16\) and moving is 3-D \(8, 8, 8\)"):
        jax.eval_shape(stage, fixed, volume)
    with pytest.raises(TypeError, match="complex64"):
        jax.eval_shape(stage, fixed.astype(jnp.complex64), fixed)
    # values are unknown while tracing: NaN and constant checks step aside
    assert jax.eval_shape(stage, fixed, fixed).shape == (3, 3)
    checked = jax.jit(lambda x: _checks.check_image_values(x, name="x") or x)
    np.testing.assert_array_equal(checked(jnp.full((3, 3), jnp.nan)), np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="x has 9 NaN or Inf voxels out of 9"):
        _checks.check_image_values(jnp.full((3, 3), jnp.nan), name="x")
    with pytest.raises(ValueError, match="x is constant"):
        _checks.check_image_values(np.zeros((3, 3)), name="x")
    _checks.check_image_values(np.zeros((3, 3)), name="x", constant=False)


# --------------------------------------------------------------------- the command


def _register(fixed, moving, *extra):
    """register arguments that would finish fastest if they ever got that far."""
    return ["register", fixed, moving, "--transform", "translation", "--shrink", "1", "--steps", "1", "--no-report", *extra]


F, M = "fixed.nii.gz", "moving.nii.gz"
CLI_CASES = {
    # case: (arguments from (files, tmp), exit status, fragments of the error line)
    "missing file": (lambda f, t: _register(f["folder"] / "missing.nii.gz", f[M]), 1, ["missing.nii.gz", "no such image file"]),
    "truncated nii.gz": (lambda f, t: _register(f["truncated.nii.gz"], f[M]), 1, ["truncated.nii.gz", "truncated"]),
    "nii with a garbage header": (lambda f, t: _register(f[F], f["garbage.nii"]), 1, ["garbage.nii", "corrupt or unsupported header"]),
    "nii of random bytes": (lambda f, t: _register(f["random.nii"], f[M]), 1, ["random.nii", "no NIfTI or MGH header"]),
    "text as nii.gz": (lambda f, t: _register(f["text.nii.gz"], f[M]), 1, ["text.nii.gz", "gzip"]),
    "empty axis in header": (lambda f, t: _register(f["zero_axis.nii"], f[M]), 1, ["zero_axis.nii", "axis of length 0"]),
    "2-D against 3-D": (lambda f, t: _register(f[F], f["volume.nii.gz"]), 1, ["volume.nii.gz", "(16, 16)", "(8, 8, 8)", "same rank"]),
    "channels": (lambda f, t: _register(f[F], f["channels.nii.gz"]), 1, ["channels.nii.gz", "3 channels"]),
    "NaN voxels": (lambda f, t: _register(f["nan.nii.gz"], f[M]), 1, ["nan.nii.gz", "1 NaN or Inf"]),
    "Inf voxels": (lambda f, t: _register(f[F], f["inf.nii.gz"]), 1, ["inf.nii.gz", "NaN or Inf"]),
    "constant image": (lambda f, t: _register(f[F], f["constant.nii.gz"]), 1, ["constant.nii.gz", "constant"]),
    "empty mask": (lambda f, t: _register(f[F], f[M], "--fixed-mask", f["empty_mask.nii.gz"]), 1, ["empty_mask.nii.gz", "not all zero"]),
    "negative regularization": (lambda f, t: _register(f[F], f[M], "--regularization", "-0.5"), 2, ["--regularization", "-0.5"]),
    "empty shrink": (lambda f, t: _register(f[F], f[M], "--shrink", ""), 2, ["--shrink"]),
    "zero shrink": (lambda f, t: _register(f[F], f[M], "--shrink", "2,0"), 2, ["--shrink", "2,0"]),
    "negative steps": (lambda f, t: _register(f[F], f[M], "--steps", "-3"), 2, ["--steps", "-3"]),
    "steps per level": (lambda f, t: _register(f[F], f[M], "--shrink", "2,1", "--steps", "5,5,5"), 2, ["--steps", "2 --shrink levels"]),
    "unknown preset": (lambda f, t: _register(f[F], f[M], "--preset", "brain-ct"), 2, ["--preset", "brain-ct", "brain-mri"]),
    "unknown similarity": (lambda f, t: _register(f[F], f[M], "--similarity", "psnr"), 2, ["--similarity", "psnr", "lncc"]),
    "unknown transform": (lambda f, t: _register(f[F], f[M], "--transform", "demons"), 2, ["--transform", "demons"]),
    "out is an input": (lambda f, t: _register(f[F], f[M], "--out", f[M], "--overwrite"), 2, [M, "input file"]),
    "out not empty": (lambda f, t: _register(f[F], f[M], "--out", t / "previous"), 2, ["previous", "--overwrite"]),
    "out inside a file": (lambda f, t: _register(f[F], f[M], "--out", t / "affine.mat" / "run"), 2, ["affine.mat", "not a folder"]),
    "apply out is an input": (lambda f, t: ["apply", t / "affine.mat", f[M], "--reference", f[F], "--out", f[M], "--overwrite"], 2, [M, "input file"]),
    "apply missing image": (lambda f, t: ["apply", t / "affine.mat", f["folder"] / "gone.nii.gz", "--reference", f[F], "--out", t / "o.nii.gz"], 1, ["gone.nii.gz", "no such image file"]),
}
# One case per way of failing (missing file, unreadable image, bad image, bad option, a
# finished run in the way) also runs as a real process, with and without --debug.
SUBPROCESS_CASES = ["missing file", "truncated nii.gz", "NaN voxels", "unknown preset", "out not empty"]


@pytest.fixture
def workspace(tmp_path, files):
    """tmp_path with a finished run's folder (``previous``) and a transform file; yields a
    check that it, and every input, is byte-identical afterwards."""
    from jaxreg import itk
    from jaxreg.transforms import Affine

    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "warped.nii.gz").write_bytes(files[M].read_bytes())
    (previous / "metrics.json").write_text("{}\n")
    itk.write_affine(Affine.identity(2), tmp_path / "affine.mat")
    before = tree_hashes(tmp_path)

    def untouched():
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
        assert {k: v for k, v in tree_hashes(tmp_path).items() if not k.startswith("out")} == before
        assert tree_hashes(files["folder"]) == files["hashes"]

    return untouched


def _case_args(case, files, tmp_path) -> list[str]:
    make_args, _, _ = CLI_CASES[case]
    args = [str(a) for a in make_args(files, tmp_path)]
    return args if "--out" in args else args + ["--out", str(tmp_path / "out")]


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_command_fails_with_one_line(files, tmp_path, workspace, capsys, case):
    _, code, fragments = CLI_CASES[case]
    args = _case_args(case, files, tmp_path) + ["--no-cache"]
    assert cli.main(args) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("jaxreg: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    # --debug lets the exception out, so the interpreter prints its traceback
    with pytest.raises(Exception) as info:
        cli.main(args + ["--debug"])
    assert isinstance(info.value, cli.UsageError) == (code == 2)
    workspace()


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_command_fails_cleanly_in_a_real_process(files, cache, tmp_path, workspace, case):
    _, code, fragments = CLI_CASES[case]
    plain, debug = jaxreg_twice(_case_args(case, files, tmp_path), cache=cache)
    assert_clean_failure(plain, debug, code, fragments)
    workspace()


def test_output_folder_without_write_permission_is_refused_up_front(files, cache, tmp_path, unchanged, permissions_bind):
    from jaxreg import itk
    from jaxreg.transforms import Affine

    itk.write_affine(Affine.identity(2), tmp_path / "affine.mat")
    locked = tmp_path / "locked"
    locked.mkdir()
    run, image = locked / "run", locked / "warped.nii.gz"
    register = _register(files[F], files[M], "--out", run)
    apply = ["apply", tmp_path / "affine.mat", files[M], "--reference", files[F], "--out", image]
    locked.chmod(0o555)
    try:
        processes = [_python("-m", "jaxreg.cli", *args, unprivileged=True, cache=cache) for args in (register, apply)]
        done = [_wait(p) for p in processes]
    finally:
        locked.chmod(0o755)
    for ran, target in zip(done, (run, image)):
        assert ran.code == 2 and "Traceback" not in ran.stderr, ran.stderr
        assert ran.stderr.strip() == f"jaxreg: error: cannot write {target}: no write permission in {locked}"
    assert list(locked.iterdir()) == []


def test_unreadable_input_names_the_file(files, cache, tmp_path, unchanged, permissions_bind):
    secret = tmp_path / "secret.nii.gz"
    secret.write_bytes(files[F].read_bytes())
    secret.chmod(0)
    try:
        plain, debug = jaxreg_twice(_register(secret, files[M], "--out", tmp_path / "out"), cache=cache, unprivileged=True)
    finally:
        secret.chmod(0o600)
    assert_clean_failure(plain, debug, 1, [str(secret), "permission denied"])
    assert "PermissionError" in debug.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------- in-process: memory, interrupts


@pytest.mark.parametrize(
    "error",
    [
        jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes.\nmore detail"),
        MemoryError("Unable to allocate 16.0 GiB for an array with shape (2048, 2048, 1024)"),
    ],
    ids=["xla", "host"],
)
def test_out_of_memory_is_one_line_with_advice(files, tmp_path, capsys, monkeypatch, unchanged, error):
    def exhausted(*_, **__):
        raise error

    monkeypatch.setattr(registration, "register", exhausted)
    out = tmp_path / "out"
    args = [str(a) for a in _register(files[F], files[M], "--out", out, "--quiet", "--no-cache")]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("jaxreg: error: out of memory (") and str(error).splitlines()[0] in lines[0]
    assert "--shrink" in lines[0] and "more memory" in lines[0]
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(type(error)):
        cli.main(args + ["--debug"])


def test_out_of_memory_is_found_behind_a_wrapping_error():
    cause = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")
    wrapped = cli.CommandError("registration failed")
    wrapped.__cause__ = cause
    assert cli._out_of_memory(wrapped) is cause
    assert cli._out_of_memory(cli.CommandError("registration failed: bad")) is None
    assert "--shrink" not in cli._out_of_memory_message(MemoryError(), "apply")


def test_nothing_is_lost_on_rerun_or_interruption(files, tmp_path, capsys, monkeypatch, unchanged):
    out = tmp_path / "run"
    args = [str(a) for a in _register(files[F], files[M], "--out", out, "--quiet")]
    assert cli.main(args) == 0
    first = tree_hashes(out)
    assert "warped.nii.gz" in first and "metrics.json" in first and leftovers(out) == []

    # running again into the finished folder needs --overwrite, and changes nothing
    assert cli.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert tree_hashes(out) == first

    # an interruption half way through writing the warped image: the earlier results stay
    # whole, and neither the half-written file nor the staging folder is left behind
    def interrupted(data, affine, path):
        Path(path).write_bytes(b"half an image")
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "_write_nifti", interrupted)
    assert cli.main(args + ["--overwrite"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "jaxreg: interrupted"
    assert tree_hashes(out) == first and leftovers(out) == []

    # the same into a fresh folder leaves no file under any final name
    fresh = tmp_path / "fresh"
    assert cli.main([a if a != str(out) else str(fresh) for a in args]) == 130
    assert not fresh.exists() or list(fresh.rglob("*")) == []
    with pytest.raises(KeyboardInterrupt):
        cli.main([a if a != str(out) else str(fresh) for a in args] + ["--debug"])
    assert sha(files["fixed.nii.gz"]) == files["hashes"]["fixed.nii.gz"]

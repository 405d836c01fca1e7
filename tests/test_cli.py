"""The ``jaxreg`` command: end to end through a subprocess (register, apply, evaluate, demo)
and in-process ``main([...])`` for options, errors and the smaller paths.

Images are small 2-D pairs stored as ``(x, y, 1)`` NIfTI slices (with a z offset, so that
writing outputs back in the input's own layout is checked too); registrations use few
steps so that each test runs in seconds.
"""

from __future__ import annotations

import hashlib
import io as stdio
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest

from jaxreg import cli, io
from jaxreg.grid import Image
from jaxreg.transforms import Affine, warp

ROOT = Path(__file__).resolve().parents[1]
SIZE = 48
LABELS = (1, 2, 3, 4)


# ------------------------------------------------------------------------------ helpers


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_hashes(folder) -> dict:
    return {os.path.relpath(p, folder): sha(p) for p in Path(folder).rglob("*") if p.is_file()}


def as_slice(image: Image, z: float = 7.0) -> Image:
    """A 2-D image as an (x, y, 1) volume at height z."""
    affine = np.eye(4, dtype=np.float32)
    affine[:2, :2] = np.asarray(image.affine)[:2, :2]
    affine[:2, 3] = np.asarray(image.affine)[:2, 2]
    affine[2, 3] = z
    return Image(np.asarray(image.data)[..., None], affine)


def run_cli(*args, cache_dir, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAXREG_CACHE_DIR"] = str(cache_dir)
    return subprocess.run(
        [sys.executable, "-m", "jaxreg.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
    )


def leftovers(folder) -> list:
    """Temporary files or staging folders left in ``folder`` (recursively)."""
    return [p for p in Path(folder).rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("jaxreg: error: "), err
    return lines[0]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    # in-process main() calls turn the persistent compilation cache on: keep it out of ~
    monkeypatch.setenv("JAXREG_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jax-cache"))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """fixed/moving images and label maps of a synthetic 2-D pair, as (x, y, 1) NIfTI files."""
    folder = tmp_path_factory.mktemp("pair")
    fixed, moving, fixed_labels, moving_labels = cli._demo_pair(2, SIZE, seed=1)
    paths = {}
    for name, image in (("fixed", fixed), ("moving", moving), ("fixed_labels", fixed_labels), ("moving_labels", moving_labels)):
        paths[name] = io.save(as_slice(image), folder / f"{name}.nii.gz")
    paths["hashes"] = {name: sha(p) for name, p in paths.items()}
    paths["folder"] = folder
    return paths


@pytest.fixture(scope="module")
def registered(pair, tmp_path_factory):
    """``jaxreg register`` run once in a subprocess; (out folder, completed process, cache)."""
    out = tmp_path_factory.mktemp("registered") / "run"
    cache = tmp_path_factory.mktemp("cache")
    done = run_cli(
        "register", pair["fixed"], pair["moving"], "--out", out,
        "--preset", "fast", "--shrink", "1", "--steps", "30", cache_dir=cache,
    )
    assert done.returncode == 0, done.stderr
    return out, done, cache


# ----------------------------------------------------------------------- end to end


def test_register_writes_every_output_with_sane_metrics(pair, registered):
    out, done, cache = registered
    names = {p.name for p in out.iterdir()}
    assert {"warped.nii.gz", "report.png", "metrics.json", "transforms.json", "warp.nii.gz", "affine.mat"} <= names
    assert leftovers(out) == []
    assert {name: sha(pair[name]) for name in pair["hashes"]} == pair["hashes"]  # inputs untouched

    m = json.loads((out / "metrics.json").read_text())
    for key in ("seconds", "compile_seconds", "run_seconds", "similarity", "negative_jacobian_fraction", "losses", "stages",
                "options", "versions", "device", "outputs"):
        assert key in m, key
    assert m["seconds"] > 0 and 0 <= m["compile_seconds"] <= m["seconds"] and m["run_seconds"] > 0
    assert m["options"]["preset"] == "fast" and m["options"]["shrink"] == [1] and m["options"]["steps"] == 30
    assert m["stages"] == ["affine@4", "svf@1"]
    assert [len(level) for level in m["losses"]] == [80, 30]
    assert all(isinstance(v, float) for level in m["losses"] for v in level)
    assert m["losses"][-1][-1] < m["losses"][-1][0]
    assert m["similarity"]["name"] == "lncc" and m["similarity"]["after"] < 0.5 * m["similarity"]["before"]
    assert m["negative_jacobian_fraction"] == 0.0
    assert m["jacobian_determinant"]["min"] > 0
    assert m["versions"]["jax"] == jax.__version__ and m["device"]["platform"] == "cpu"
    assert sorted(m["outputs"]) == sorted(names)

    # warped is written in the fixed file's own layout: (x, y, 1) at the same place
    fixed_file, warped_file = nib.load(pair["fixed"]), nib.load(out / "warped.nii.gz")
    assert warped_file.shape == fixed_file.shape == (SIZE, SIZE, 1)
    np.testing.assert_allclose(warped_file.affine, fixed_file.affine, atol=1e-6)

    record = json.loads((out / "transforms.json").read_text())
    assert record["transforms"] == ["warp.nii.gz", "affine.mat"]
    assert all((out / name).is_file() for name in record["transforms"] + record["inverse"])
    assert record["fixed_grid"]["shape"] == [SIZE, SIZE]

    import matplotlib.image as mpimg

    picture = mpimg.imread(out / "report.png")
    assert picture.shape[0] > 200 and picture.shape[1] > 1000 and picture[..., :3].std() > 0.05
    assert any(cache.rglob("*")), "the persistent compilation cache stayed empty"
    assert any((cache / "jaxreg-traces").glob("*.pkl")), "no traced program was kept beside it"
    assert "affine" in done.stderr and "svf" in done.stderr and "level 1/1" in done.stderr  # progress per level
    assert "registered in" in done.stdout


def test_apply_labels_nearest_then_evaluate_dice_improves(pair, registered, tmp_path):
    from jaxreg import itk

    out, _, cache = registered
    labels_out = tmp_path / "warped_labels.nii.gz"
    done = run_cli("apply", out, pair["moving_labels"], "--interp", "nearest", "--out", labels_out, cache_dir=cache)
    assert done.returncode == 0, done.stderr
    stored = nib.load(labels_out)
    assert np.issubdtype(stored.get_data_dtype(), np.integer) and stored.shape == (SIZE, SIZE, 1)

    # The same transform applied in Python gives the same labels.
    record = json.loads((out / "transforms.json").read_text())
    transform = itk.read_transforms([out / p for p in record["transforms"]])
    fixed = io.load(pair["fixed"], squeeze=True)
    moving_labels = io.load(pair["moving_labels"], dtype=np.int32, squeeze=True)
    expected = np.asarray(warp(moving_labels, transform, fixed.grid, order=0).data)
    got = io.load(labels_out, dtype=np.int32, squeeze=True).data
    np.testing.assert_array_equal(got, expected)

    before_json, after_json = tmp_path / "before.json", tmp_path / "after.json"
    code = cli.main(["evaluate", "--fixed-labels", str(pair["fixed_labels"]), "--warped-labels", str(pair["moving_labels"]),
                     "--out", str(before_json), "--quiet"])
    assert code == 0
    done = run_cli("evaluate", "--fixed-labels", pair["fixed_labels"], "--warped-labels", labels_out,
                   "--transform-dir", out, "--out", after_json, cache_dir=cache)
    assert done.returncode == 0, done.stderr
    before, after = json.loads(before_json.read_text()), json.loads(after_json.read_text())
    assert before["labels"] == after["labels"] == list(LABELS)
    assert after["dice_mean"] > before["dice_mean"] + 0.05
    assert 0.0 <= before["dice_mean"] <= 1.0 and 0.0 <= after["dice_mean"] <= 1.0
    assert after["hd95_mean"] < before["hd95_mean"]
    assert after["negative_jacobian_fraction"] == 0.0
    # the Dice of the labels evaluate reads equals the library's
    from jaxreg import metrics

    fixed_labels = io.load(pair["fixed_labels"], dtype=np.int32, squeeze=True).data
    np.testing.assert_allclose(after["dice_mean"], float(metrics.mean_dice(got, fixed_labels, labels=LABELS)), rtol=1e-6)
    assert {name: sha(pair[name]) for name in pair["hashes"]} == pair["hashes"]


def test_demo_2d_runs_and_improves_dice(tmp_path, registered):
    _, _, cache = registered
    out = tmp_path / "demo"
    # size and steps of the registration's last level: its compiled program may come from the cache
    done = run_cli("demo", "--2d", "--size", str(SIZE), "--steps", "30", "--out", out, "--no-report", cache_dir=cache)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("Dice before"))
    before, after = float(line.split()[2]), float(line.split()[4])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["demo"]["dice_before"] == pytest.approx(before, abs=1e-3)
    assert after > before + 0.03
    assert {p.name for p in (out / "inputs").iterdir()} == {"fixed.nii.gz", "moving.nii.gz", "fixed_labels.nii.gz", "moving_labels.nii.gz"}
    assert (out / "warped_labels.nii.gz").is_file() and not (out / "report.png").exists()
    assert leftovers(out) == []


# ------------------------------------------------------------------------ in-process


def test_apply_linear_reproduces_the_warped_image(pair, registered, tmp_path):
    out, _, _ = registered
    target = tmp_path / "moving_on_fixed.nii.gz"
    assert cli.main(["apply", str(out), str(pair["moving"]), "--out", str(target), "--quiet"]) == 0
    np.testing.assert_allclose(io.load(target).data, io.load(out / "warped.nii.gz").data, atol=1e-4)
    # transform files with an explicit reference give the same image
    files = tmp_path / "from_files.nii.gz"
    code = cli.main(["apply", str(out / "warp.nii.gz"), str(out / "affine.mat"), str(pair["moving"]),
                     "--reference", str(pair["fixed"]), "--out", str(files), "--quiet"])
    assert code == 0
    np.testing.assert_allclose(io.load(files).data, io.load(target).data, atol=1e-5)
    assert leftovers(tmp_path) == []


def test_apply_inverse_brings_the_fixed_image_to_moving_space(pair, registered, tmp_path):
    out, _, _ = registered
    target = tmp_path / "fixed_on_moving.nii.gz"
    assert cli.main(["apply", str(out), str(pair["fixed"]), "--inverse", "--out", str(target), "--quiet"]) == 0
    moving = io.load(pair["moving"]).data.ravel()
    fixed = io.load(pair["fixed"]).data.ravel()
    back = io.load(target).data.ravel()
    assert np.corrcoef(back, moving)[0, 1] > np.corrcoef(fixed, moving)[0, 1] + 0.02


def test_rerunning_into_a_non_empty_folder_needs_overwrite(pair, registered, capsys):
    out, _, _ = registered
    before = tree_hashes(out)
    assert cli.main(["register", str(pair["fixed"]), str(pair["moving"]), "--out", str(out)]) == 2
    line = error_line(capsys)
    assert "not empty" in line and "--overwrite" in line
    assert tree_hashes(out) == before


def test_outputs_never_replace_inputs(pair, registered, tmp_path, capsys):
    out, _, _ = registered
    hashes = {name: sha(pair[name]) for name in pair["hashes"]}
    for extra in ([], ["--overwrite"]):
        code = cli.main(["apply", str(out), str(pair["moving"]), "--out", str(pair["moving"]), *extra])
        assert code == 2 and "input file" in error_line(capsys)
    code = cli.main(["register", str(pair["fixed"]), str(pair["moving"]), "--out", str(pair["fixed"])])
    assert code == 2 and "input file" in error_line(capsys)
    # a registration folder that holds its own inputs under output names is refused up front
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "warped.nii.gz").write_bytes(Path(pair["moving"]).read_bytes())
    code = cli.main(["register", str(pair["fixed"]), str(folder / "warped.nii.gz"), "--out", str(folder), "--overwrite"])
    assert code == 2 and "input file" in error_line(capsys)
    assert {name: sha(pair[name]) for name in pair["hashes"]} == hashes
    existing = tmp_path / "exists.nii.gz"
    existing.write_bytes(b"keep")
    assert cli.main(["apply", str(out), str(pair["moving"]), "--out", str(existing)]) == 2
    assert "exists" in error_line(capsys) and existing.read_bytes() == b"keep"


def test_evaluate_landmarks_tre_before_and_after(pair, registered, tmp_path):
    from jaxreg import itk

    out, _, _ = registered
    record = json.loads((out / "transforms.json").read_text())
    transform = itk.read_transforms([out / p for p in record["transforms"]])
    fixed = io.load(pair["fixed"], squeeze=True)
    index = np.array([[10, 12], [24, 30], [35, 20], [20, 20]], np.float64)
    fixed_points = index @ np.asarray(fixed.affine, np.float64)[:2, :2].T + np.asarray(fixed.affine, np.float64)[:2, 2]
    moving_points = np.asarray(transform(fixed_points.astype(np.float32)), np.float64) + [[0.5, 0.0]]
    (tmp_path / "p.txt").write_text("\n".join(f"{x} {y}" for x, y in fixed_points))
    # moving points as an elastix file: ITK (LPS) coordinates
    (tmp_path / "q.txt").write_text("point\n4\n" + "\n".join(f"{-x} {-y}" for x, y in moving_points))
    result = tmp_path / "tre.json"
    code = cli.main(["evaluate", "--transform-dir", str(out), "--fixed-landmarks", str(tmp_path / "p.txt"),
                     "--moving-landmarks", str(tmp_path / "q.txt"), "--out", str(result), "--quiet"])
    assert code == 0
    m = json.loads(result.read_text())
    np.testing.assert_allclose(m["tre"]["mean"], 0.5, atol=1e-3)
    np.testing.assert_allclose(m["tre_before"]["mean"], np.linalg.norm(fixed_points - moving_points, axis=1).mean(), rtol=1e-6)
    assert m["tre"]["count"] == 4 and len(m["tre_per_point"]) == 4
    # DIR-Lab style voxel lists (1-based) against the fixed image
    (tmp_path / "p_xyz.txt").write_text("\n".join(f"{int(i) + 1} {int(j) + 1}" for i, j in index))
    code = cli.main(["evaluate", "--transform-dir", str(out), "--fixed-landmarks", str(tmp_path / "p_xyz.txt"),
                     "--moving-landmarks", str(tmp_path / "q.txt"), "--landmarks-reference", str(pair["fixed"]),
                     "--out", str(tmp_path / "tre2.json"), "--quiet"])
    assert code == 0
    np.testing.assert_allclose(json.loads((tmp_path / "tre2.json").read_text())["tre"]["mean"], 0.5, atol=1e-3)


def test_register_rigid_with_mask_and_landmarks(tmp_path, pair):
    fixed = io.load(pair["fixed"], squeeze=True)
    angle = np.deg2rad(6.0)
    matrix = np.eye(3, dtype=np.float32)
    matrix[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    matrix[:2, 2] = [2.0, -1.5]
    truth = Affine(matrix)
    moving = warp(fixed, truth)  # moving(x) = fixed(A x): phi should be A^-1
    io.save(Image(np.asarray(moving.data), fixed.affine), tmp_path / "moving.nii.gz")
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[3:-3, 3:-3] = 1
    io.save(Image(mask, fixed.affine), tmp_path / "mask.nii.gz")
    points = np.array([[-10.0, -8.0], [5.0, 12.0], [12.0, -6.0]])
    moved = np.asarray(truth.inverse()(points.astype(np.float32)), np.float64)
    np.savetxt(tmp_path / "p.txt", points)
    np.savetxt(tmp_path / "q.txt", moved, delimiter=",")
    out = tmp_path / "rigid"
    code = cli.main(["register", str(pair["fixed"]), str(tmp_path / "moving.nii.gz"), "--out", str(out),
                     "--transform", "rigid", "--shrink", "1", "--steps", "60", "--fixed-mask", str(tmp_path / "mask.nii.gz"),
                     "--fixed-landmarks", str(tmp_path / "p.txt"), "--moving-landmarks", str(tmp_path / "q.txt"),
                     "--no-report", "--quiet", "--no-cache"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["stages"] == ["rigid@1"] and m["options"]["affine"] == "rigid" and m["options"]["deformable"] is None
    assert m["options"]["fixed_mask"] is True and m["options"]["landmarks"] is True
    assert m["tre"]["after_mean"] < 0.3 * m["tre"]["before_mean"]
    assert json.loads((out / "transforms.json").read_text())["transforms"] == ["affine.mat"]
    assert not (out / "report.png").exists()


@pytest.mark.parametrize(
    "make_args, code, fragment",
    [
        (lambda p, t: ["register", t / "missing.nii.gz", p["moving"]], 1, "no such image file"),
        (lambda p, t: ["register", t / "garbage.nii.gz", p["moving"]], 1, "cannot read image"),
        (lambda p, t: ["register", t / "volume.nii.gz", p["moving"]], 1, "same rank"),
        (lambda p, t: ["register", t / "nan.nii.gz", p["moving"]], 1, "NaN"),
        (lambda p, t: ["register", p["fixed"], t / "constant.nii.gz"], 1, "constant"),
        (lambda p, t: ["register", p["fixed"], p["moving"], "--transform", "warp"], 2, "--transform"),
        (lambda p, t: ["register", p["fixed"], p["moving"], "--transform", "svf+affine"], 2, "--transform"),
        (lambda p, t: ["register", p["fixed"], p["moving"], "--similarity", "psnr"], 2, "--similarity"),
        (lambda p, t: ["register", p["fixed"], p["moving"], "--regularization", "-1"], 2, "--regularization"),
        (lambda p, t: ["register", p["fixed"], p["moving"], "--shrink", "2,0"], 2, "--shrink"),
        (lambda p, t: ["register", p["fixed"], p["moving"], "--shrink", "2,1", "--steps", "1,2,3"], 2, "--steps"),
        (lambda p, t: ["register", p["fixed"], p["moving"], "--preset", "nope"], 2, "--preset"),
        (lambda p, t: ["register", p["fixed"], p["moving"], "--fixed-landmarks", t / "p.txt"], 2, "go together"),
        (lambda p, t: ["register", p["fixed"], p["moving"], "--fixed-landmarks", t / "bad.txt", "--moving-landmarks", t / "bad.txt"], 1, "landmarks"),
        (lambda p, t: ["register", p["fixed"], p["moving"], "--fixed-mask", t / "volume.nii.gz"], 1, "mask"),
        (lambda p, t: ["register", p["fixed"], p["moving"], "--bogus"], 2, "unrecognized"),
        (lambda p, t: ["apply", p["fixed"], p["moving"]], 2, "--out"),
        (lambda p, t: ["apply", p["fixed"], p["moving"], "--out", t / "o.nii.gz"], 2, "--reference"),
        (lambda p, t: ["apply", t, p["moving"], "--out", t / "o.nii.gz"], 1, "transforms.json"),
        (lambda p, t: ["apply", t / "garbage.nii.gz", p["moving"], "--out", t / "o.txt"], 2, "must end in"),
        (lambda p, t: ["evaluate"], 2, "nothing to evaluate"),
        (lambda p, t: ["evaluate", "--fixed-labels", p["fixed_labels"], "--warped-labels", t / "labels3d.nii.gz"], 1, "shape"),
        (lambda p, t: ["evaluate", "--fixed-labels", p["fixed_labels"], "--warped-labels", p["moving"]], 1, "integers"),
        (lambda p, t: ["demo", "--size", "4"], 2, "--size"),
    ],
)
def test_user_errors_print_one_line_and_exit_with_the_right_code(pair, tmp_path, capsys, make_args, code, fragment):
    (tmp_path / "garbage.nii.gz").write_bytes(b"this is not an image" * 10)
    io.save(Image(np.random.default_rng(0).random((6, 7, 8), np.float32)), tmp_path / "volume.nii.gz")
    nan = np.random.default_rng(0).random((SIZE, SIZE), np.float32)
    nan[3, 4] = np.nan
    io.save(Image(nan), tmp_path / "nan.nii.gz")
    io.save(Image(np.ones((SIZE, SIZE), np.float32)), tmp_path / "constant.nii.gz")
    io.save(Image(np.arange(6 * 7 * 8, dtype=np.int32).reshape(6, 7, 8) % 3), tmp_path / "labels3d.nii.gz")
    (tmp_path / "p.txt").write_text("1 2\n")
    (tmp_path / "bad.txt").write_text("1 2\n3\n")
    args = [str(a) for a in make_args(pair, tmp_path)]
    if args[0] in ("register", "demo") and "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    before = tree_hashes(pair["folder"])
    assert cli.main(args + ["--no-cache"]) == code
    line = error_line(capsys)
    assert fragment in line
    assert not (tmp_path / "out").exists() or args[0] == "demo" and not any((tmp_path / "out").iterdir())
    assert tree_hashes(pair["folder"]) == before


def test_debug_shows_the_exception(pair, tmp_path):
    with pytest.raises(FileNotFoundError):
        cli.main(["register", str(tmp_path / "missing.nii.gz"), str(pair["moving"]), "--out", str(tmp_path / "o"), "--debug", "--no-cache"])
    with pytest.raises(cli.UsageError):
        cli.main(["register", str(pair["fixed"]), str(pair["moving"]), "--out", str(tmp_path / "o"), "--transform", "x", "--debug"])


def test_error_from_the_subprocess_is_one_line_without_traceback(tmp_path):
    done = run_cli("register", tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", "--out", tmp_path / "o", cache_dir=tmp_path / "c")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"jaxreg: error: {tmp_path / 'a.nii.gz'}: no such image file"]


def test_help_version_and_missing_command(capsys):
    assert cli.main(["--help"]) == 0
    assert "register" in capsys.readouterr().out
    assert cli.main(["register", "--help"]) == 0
    assert "--transform" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert cli.main([]) == 2


def test_transform_option_maps_onto_the_stages():
    assert cli._parse_transform("affine+svf") == ("affine", "svf")
    assert cli._parse_transform("rigid") == ("rigid", None)
    assert cli._parse_transform("SyN") == (None, "syn")
    assert cli._parse_transform("similarity+bspline") == ("similarity", "bspline")
    for bad in ("", "svf+syn", "rigid+affine", "svf+affine", "warp"):
        with pytest.raises(cli.UsageError):
            cli._parse_transform(bad)


def test_progress_line_per_level():
    stream = stdio.StringIO()
    progress = cli._Progress(enabled=True, stream=stream)
    progress("affine", 1, 2)
    progress("affine", 2, 2)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "affine" in lines[1] and "level 2/2" in lines[1]

    class Terminal(stdio.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    progress = cli._Progress(enabled=True, stream=tty)
    progress("svf", 1, 3)
    progress("svf", 2, 3)
    progress.close()
    assert tty.getvalue().count("\r") == 2 and tty.getvalue().endswith("\n")
    quiet = stdio.StringIO()
    silent = cli._Progress(enabled=False, stream=quiet)
    silent("svf", 1, 1)
    silent.close()
    assert quiet.getvalue() == "" and silent.count == 1

"""Smoke tests of the AIRLab-style examples: each ``main()`` at a tiny size and few steps.

Every test checks numbers that a broken registration would fail: the error against the
known transform falls by a stated factor, Dice rises by a margin, folds stay below a bound.
"""

import importlib
import json
import sys
from pathlib import Path


from tests.helpers import shared_data

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str):
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


def run(name: str, tmp_path: Path, *argv: str) -> dict:
    result = example(name).main([*argv, "--out", str(tmp_path)])
    assert json.loads((tmp_path / "metrics.json").read_text()) == result
    return result


def test_affine_2d_recovers_the_known_similarity(tmp_path):
    r = run("affine_2d", tmp_path, "--synthetic", "--size", "48", "--steps", "100", "--pyramid", "1")
    assert (tmp_path / "affine_2d.png").stat().st_size > 0
    assert r["before_max_point_error_mm"] > 8.0
    for method in ("pyramid", "explicit"):
        assert r[f"{method}_max_point_error_mm"] < 0.05 * r["before_max_point_error_mm"], method
        assert r[f"{method}_rotation_error_deg"] < 0.5, method
        assert r[f"{method}_scale_error"] < 0.01, method
    assert r["explicit_loss_last"] < 0.05 * r["explicit_loss_first"]


def test_demons_2d_improves_mse_and_dice_without_folds(tmp_path):
    r = run("demons_2d", tmp_path, "--size", "48", "--steps", "40", "--pyramid", "1", "--no-figure")
    for method in ("greedy", "explicit"):
        assert r[f"{method}_mse"] < 0.2 * r["before_mse"], method
        assert r[f"{method}_dice"] > r["before_dice"] + 0.08, method
        assert r[f"{method}_field_error_mm"] < 0.7 * r["before_field_error_mm"], method
        assert r[f"{method}_folds_percent"] < 0.5, method


def test_bspline_ffd_and_diffeomorphic_bspline_improve_dice(tmp_path):
    r = run("bspline_diffeomorphic_2d", tmp_path, "--size", "48", "--steps", "40", "--control-spacing", "6", "--pyramid", "1", "--no-figure")
    for method in ("ffd", "svf"):
        assert r[f"{method}_dice"] > r["before_dice"] + 0.1, method
        assert r[f"{method}_mse"] < 0.25 * r["before_mse"], method
    assert r["ffd_folds_percent"] < 1.0
    assert r["svf_folds_percent"] == 0.0  # exp of a smooth velocity cannot fold
    assert r["svf_min_det_jacobian"] > 0.0


def test_kernel_transform_fits_landmarks_and_images(tmp_path):
    r = run("kernel_transform_2d", tmp_path, "--size", "64", "--steps", "120", "--control-spacing", "8", "--no-figure")
    assert r["fit_train_tre_mm"] < 0.05  # the fit interpolates its own landmarks
    assert r["fit_tre_mm"] < 0.6 * r["before_tre_mm"]  # and generalises to held-out ones
    assert r["image_dice"] > r["before_dice"] + 0.1
    assert r["hybrid_tre_mm"] < 0.5 * r["before_tre_mm"]
    assert r["hybrid_tre_mm"] < r["image_tre_mm"]  # landmarks help where the image is flat
    for method in ("fit", "image", "hybrid"):
        assert r[f"{method}_folds_percent"] < 1.0, method


def test_brain_3d_synthetic(tmp_path):
    r = run("brain_3d", tmp_path, "--synthetic", "--size", "24", "--pyramid", "1", "--steps", "40", "--no-figure")
    assert r["shape"] == [24, 24, 24]
    assert r["stages"] == ["affine@1", "greedy@1"]
    assert r["dice_after"] > r["dice_before"] + 0.1
    assert r["nonpositive_jacobian_percent"] < 1.0
    assert r["compile_seconds"] > 0 and r["run_seconds"] > 0


def test_brain_3d_oasis_downsampled(tmp_path):
    for subject in ("OASIS_OAS1_0001_MR1", "OASIS_OAS1_0002_MR1"):
        for name in ("aligned_norm.nii.gz", "aligned_seg35.nii.gz"):
            shared_data("oasis", subject, name)
    r = run("brain_3d", tmp_path, "--shrink-input", "4", "--pyramid", "1", "--steps", "30", "--no-figure")
    assert r["shape"] == [40, 48, 56] and r["labels"] == 35
    assert r["dice_after"] > r["dice_before"] + 0.05
    assert r["nonpositive_jacobian_percent"] < 1.0

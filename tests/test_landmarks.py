"""jaxreg.landmarks.read_points: plain text, elastix and DIR-Lab files to world RAS points."""

from __future__ import annotations

import numpy as np
import pytest

from jaxreg.grid import Grid, Image
from jaxreg.landmarks import LandmarkError, read_points

AFFINE = np.array([[0.0, -1.5, 0.0, 10.0], [2.0, 0.0, 0.0, -20.0], [0.0, 0.0, 2.5, 5.0], [0, 0, 0, 1]], np.float32)


def write(path, text):
    path.write_text(text)
    return path


def test_plain_text_is_world_ras_with_any_separator_comments_and_a_header(tmp_path):
    path = write(tmp_path / "points.csv", "x,y,z\n# a comment\n1.5, 2, -3\n\n4 5\t6\n7;8;9e1\n")
    np.testing.assert_array_equal(read_points(path), [[1.5, 2, -3], [4, 5, 6], [7, 8, 90]])
    two_d = write(tmp_path / "points2d.txt", "1 2\n3 4\n")
    assert read_points(two_d).shape == (2, 2)


def test_elastix_points_are_lps_and_indices_need_the_reference(tmp_path):
    points = write(tmp_path / "fixed.txt", "point\n2\n1.0 2.0 3.0\n-4 5 6\n")
    np.testing.assert_array_equal(read_points(points), [[-1, -2, 3], [4, -5, 6]])
    indices = write(tmp_path / "index.txt", "index\n2\n0 0 0\n1 2 3\n")
    expected = np.array([[0, 0, 0], [1, 2, 3]]) @ AFFINE[:3, :3].T.astype(np.float64) + AFFINE[:3, 3]
    np.testing.assert_allclose(read_points(indices, reference=Image(np.zeros((4, 5, 6)), AFFINE)), expected)
    np.testing.assert_allclose(read_points(indices, reference=Grid((4, 5, 6), AFFINE)), expected)
    np.testing.assert_allclose(read_points(indices, reference=AFFINE), expected)
    with pytest.raises(LandmarkError, match="reference"):
        read_points(indices)
    with pytest.raises(LandmarkError, match="header says 3 points, file has 2"):
        read_points(write(tmp_path / "bad.txt", "point\n3\n1 2 3\n4 5 6\n"))
    with pytest.raises(LandmarkError, match="number of points"):
        read_points(write(tmp_path / "bad2.txt", "point\nmany\n1 2 3\n"))


def test_dirlab_voxel_lists_are_one_based_indices_of_the_reference(tmp_path):
    path = write(tmp_path / "case1_300_T00_xyz.txt", "  1\t 1\t 1\n 11\t 21\t 31\n")
    reference = Image(np.zeros((40, 40, 40)), AFFINE)
    expected = np.array([[0, 0, 0], [10, 20, 30]]) @ AFFINE[:3, :3].T.astype(np.float64) + AFFINE[:3, 3]
    np.testing.assert_allclose(read_points(path, reference=reference), expected)  # auto: by name
    other = write(tmp_path / "landmarks.txt", "1 1 1\n11 21 31\n")
    np.testing.assert_allclose(read_points(other, format="dirlab", reference=reference), expected)
    np.testing.assert_array_equal(read_points(other), [[1, 1, 1], [11, 21, 31]])  # auto: world text
    with pytest.raises(LandmarkError, match="reference"):
        read_points(path)
    with pytest.raises(LandmarkError, match="integer"):
        read_points(write(tmp_path / "f_xyz.txt", "1.5 2 3\n"), reference=reference)
    with pytest.raises(LandmarkError, match="1-based"):
        read_points(write(tmp_path / "z_xyz.txt", "0 2 3\n"), reference=reference)
    with pytest.raises(LandmarkError, match="2-D"):
        read_points(path, reference=Grid((4, 4), np.eye(3)))


def test_unreadable_files_fail_with_the_line(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_points(tmp_path / "missing.txt")
    with pytest.raises(LandmarkError, match="line 3"):
        read_points(write(tmp_path / "ragged.txt", "1 2 3\n4 5 6\n7 8\n"))
    with pytest.raises(LandmarkError, match="line 2"):
        read_points(write(tmp_path / "words.txt", "1 2 3\n4 five 6\n"))
    with pytest.raises(LandmarkError, match="4 coordinates"):
        read_points(write(tmp_path / "wide.txt", "1 2 3 4\n"))
    with pytest.raises(LandmarkError, match="no points"):
        read_points(write(tmp_path / "empty.txt", "# nothing\n\n"))
    with pytest.raises(LandmarkError, match="non-finite"):
        read_points(write(tmp_path / "nan.txt", "1 nan 3\n"))
    with pytest.raises(LandmarkError, match="not a text file"):
        (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 10)
        read_points(tmp_path / "binary.txt")
    with pytest.raises(ValueError, match="format"):
        read_points(tmp_path / "ragged.txt", format="fcsv")

"""The benchmarks' GPU plumbing, checked on the CPU: CUDA results are waited for before the
clock stops, torch peers go where asked, GPU runs write their own result files."""

import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks import _timing, kernels


class _FakeCudaTensor:
    is_cuda = True

    def __init__(self, device):
        self.device = device


def _fake_torch(monkeypatch, *, available: bool):
    synchronized = []
    cuda = types.SimpleNamespace(is_available=lambda: available, synchronize=synchronized.append,
                                 get_device_name=lambda index=0: "Fake GPU")
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    return synchronized


def test_block_waits_for_cuda_results_once_and_for_nothing_else(monkeypatch):
    synchronized = _fake_torch(monkeypatch, available=True)
    jax_array = jax.numpy.ones(3)
    out = (jax_array, [_FakeCudaTensor("cuda:0"), _FakeCudaTensor("cuda:0")], np.ones(2))
    assert _timing.block(out) is out
    assert synchronized == ["cuda:0"]  # one synchronisation covers every queued kernel
    _timing.block((jax_array, np.ones(2), None, types.SimpleNamespace(is_cuda=False)))
    assert synchronized == ["cuda:0"]


def test_torch_device_follows_the_choice_and_refuses_a_missing_gpu(monkeypatch):
    _fake_torch(monkeypatch, available=False)
    assert _timing.torch_device("auto") == "cpu" and _timing.torch_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="no CUDA device"):
        _timing.torch_device("cuda")
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        _timing.torch_device("gpu")
    _fake_torch(monkeypatch, available=True)
    assert _timing.torch_device("auto") == "cuda" and _timing.torch_device("cpu") == "cpu"


def test_results_of_a_gpu_run_get_their_own_file_name(monkeypatch):
    if jax.default_backend() == "cpu":
        assert _timing.results_suffix() == "" and _timing.accelerator() is None
        assert _timing.device_bandwidth() is None
    else:  # the suite run on the GPU machine (benchmarks/device_run.sh tests)
        assert _timing.results_suffix() == f"-{jax.default_backend()}" and _timing.accelerator() == jax.devices()[0].device_kind
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _timing.results_suffix() == "-gpu"


def test_torch_peer_tensors_go_to_the_chosen_device_and_come_back_as_numpy(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(kernels, "torch", torch)
    monkeypatch.setattr(kernels, "TORCH_DEVICE", "meta")  # a device other than the CPU, without a GPU
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    moved = kernels.t_(x)
    assert moved.device.type == "meta" and moved.dtype == torch.float32 and tuple(moved.shape) == (2, 3)
    monkeypatch.setattr(kernels, "TORCH_DEVICE", "cpu")
    back = kernels.t_np(kernels.t_(x).requires_grad_(True) * 2.0)
    np.testing.assert_array_equal(back, 2.0 * x)
    assert back.dtype == np.float32


def test_a_copy_sent_to_a_device_names_the_commit_it_was_sent_at(tmp_path, monkeypatch):
    root = Path(_timing.__file__).resolve().parents[1]
    monkeypatch.setenv("JAXREG_COMMIT", "0123abcd")
    for repo in (tmp_path, root):  # the sender's word wins over a .git that came along, stale
        assert _timing.code_version(str(repo)) == {"commit": "0123abcd", "uncommitted": [], "commit_from": "JAXREG_COMMIT"}
    monkeypatch.delenv("JAXREG_COMMIT")
    if (root / ".git").exists():  # a git checkout: git says
        assert _timing.code_version(str(root))["commit"] not in ("", "0123abcd")


def test_device_scripts_parse_as_bash():
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    for script in ("device_prepare.sh", "device_run.sh"):
        done = subprocess.run(["bash", "-n", str(folder / script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_fireants_greedy_is_fireants_from_the_identity_with_the_same_environment():
    # FireANTs' own OASIS recipe (greedy alone on pre-aligned pairs) beside its affine + greedy.
    from benchmarks import pairwise

    zeros = np.zeros((4, 4, 4), np.float32)
    pair = pairwise.Pair("oasis3d", "0001→0002", zeros, np.eye(4), zeros, np.eye(4))
    greedy, both = (pairwise.method_spec(m, pair, "full", False, 2) for m in ("fireants-greedy", "fireants"))
    assert greedy["kind"] == both["kind"] == "fireants" and greedy["method"] == "fireants-greedy"
    assert pairwise.method_env("fireants-greedy", 2)["OMP_NUM_THREADS"] == pairwise.method_env("fireants", 2)["OMP_NUM_THREADS"]
    assert "fireants-greedy" in pairwise.METHODS


def test_fine_methods_add_a_full_resolution_level_to_the_brain_preset_and_to_ants_syn():
    from benchmarks import pairwise
    from jaxreg.registration import PRESETS

    zeros = np.zeros((4, 4, 4), np.float32)
    brain = pairwise.Pair("oasis3d", "0001→0002", zeros, np.eye(4), zeros, np.eye(4))
    fine = pairwise.method_spec("jaxreg-fine", brain, "full", False, 2)
    assert fine["kind"] == "jaxreg" and fine["preset"] == "brain-mri-fine"
    coarse, full = PRESETS["brain-mri"]["deformable_options"], PRESETS[fine["preset"]]["deformable_options"]
    assert full["shrink"] == (*coarse["shrink"], 1) and full["steps"][:-1] == coarse["steps"]
    assert "ct" not in pairwise.FINE_PRESETS  # the CT preset already ends at full resolution
    ants_fine, ants = (pairwise.method_spec(m, brain, "full", False, 2) for m in ("ants-syn-fine", "ants-syn"))
    assert ants_fine["type_of_transform"] == ants["type_of_transform"] == "SyN"
    assert ants_fine["fine"] and not ants["fine"]
    assert pairwise.ANTS_FINE["reg_iterations"][-1] > 0 and pairwise.ANTS_QUICK["reg_iterations"][-1] == 0
    assert pairwise.method_env("ants-syn-fine", 2)["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "2"


def test_bspline_methods_pair_jaxregs_spline_stage_with_elastix():
    from benchmarks import pairwise

    zeros = np.zeros((4, 4), np.float32)
    ct = pairwise.Pair("headct", "moving→fixed", zeros, np.eye(3), zeros, np.eye(3), "ct")
    spline = pairwise.method_spec("jaxreg-bspline", ct, "full", False, 2)
    assert spline["kind"] == "jaxreg" and spline["deformable"] == "bspline" and spline["preset"] == "ct"
    assert "deformable" not in pairwise.method_spec("jaxreg-cached", ct, "full", False, 2)
    assert "jaxreg-bspline" in pairwise.CACHED_METHODS  # timed with a warm cache, as jaxreg-cached
    elastix = pairwise.method_spec("elastix-bspline", ct, "full", False, 2)
    assert elastix["kind"] == "elastix" and elastix["method"] in pairwise.METHODS
    assert pairwise.ELASTIX["maps"] == ("affine", "bspline")
    assert pairwise.method_env("elastix-bspline", 3)["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "3"


def test_voxel_centres_are_the_grids_world_points():
    from benchmarks import pairwise
    from jaxreg.grid import Grid
    from tests.helpers import oblique_affine

    affine = oblique_affine(3, seed=5).astype(np.float64)
    np.testing.assert_allclose(pairwise._voxel_centres(affine, (4, 3, 5)), Grid((4, 3, 5), affine).points(), rtol=1e-5, atol=1e-3)

"""Pairwise registration benchmark: jaxreg next to ANTs (and FireANTs if installed), in one
run, on the same real image pairs.

    python benchmarks/pairwise.py                      # everything (long: run it on a quiet machine)
    python benchmarks/pairwise.py --quick              # inputs downsampled by 2, fewer iterations
    python benchmarks/pairwise.py --only oasis3d --methods jaxreg,ants-syn --no-hd95
    python benchmarks/pairwise.py --quick --out /tmp/pairwise   # results elsewhere

Writes ``pairwise.json`` and ``pairwise.md`` into ``--out`` (default ``benchmarks/results``)
after every case, and prints the Markdown. Cases (``--only``): ``oasis3d`` (OASIS 0001 and
0002, both directions, Dice over the 35 labels), ``oasis2d`` (their 2-D slices, labels
present in both), ``headct`` (2-D head CT, NCC in the fixed mask), ``brain2mm`` (two
unaligned 2 mm brains, NCC). Data come from ``../shared/data`` (``--data``); a case whose
files are missing is skipped with a message.

Every method runs in its own fresh Python process (this file with ``--worker``), one at a
time, so wall time and peak memory are its own and a crashing peer costs one row:

- ``jaxreg``: ``jaxreg.registration.register(fixed, moving)`` with the case's preset
  (default ``brain-mri``; ``ct`` for headct), persistent compilation cache off: wall time
  includes tracing and XLA compilation (``Result.compile_seconds``).
- ``jaxreg-cached``: the same with JAX's persistent compilation cache in a fresh temporary
  folder (and so jaxreg's kept traces beside it, ``jaxreg._traces``), run twice in two
  fresh processes; the second run is reported (the first, which fills the cache, is in the
  JSON as ``cache_fill``).
- ``jaxreg-fine``: ``register(fixed, moving, preset="brain-mri-fine")`` (``brain-mri`` plus a
  last level at full resolution) timed as ``jaxreg-cached``; only for the cases whose preset
  is ``brain-mri`` (the others' presets already end at full resolution).
- ``jaxreg-bspline``: ``register(fixed, moving, preset=<the case's>, deformable="bspline")``, the
  preset's affine stage then a cubic B-spline free-form deformation (control points every 5
  voxels, bending penalty 0.1, the preset's levels, steps and similarity), timed as
  ``jaxreg-cached``: the peer of ``elastix-bspline``.
- ``ants-syn``: ``ants.registration(fixed, moving, type_of_transform="SyN")``,
  ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` = cores, ``ANTS_RANDOM_SEED=1``.
- ``ants-syn-fine``: the same with ``reg_iterations=(40, 20, 10)``, ANTsPy's default plus 10
  iterations at full resolution: the peer for ``jaxreg-fine``.
- ``ants-affine``: the same with ``type_of_transform="Affine"`` (reference only).
- ``fireants``: FireANTs ``AffineRegistration`` then ``GreedyRegistration`` on the GPU where
  torch sees one, else on the CPU (``--torch-device``; torch threads = cores), skipped with the reason when ``import fireants`` fails. It is
  ``pip install fireants`` (pure Python; it adds SimpleITK 2.2.1, hydra-core, omegaconf and
  tqdm, and no CUDA when a CPU torch is installed), or put a ``pip install --target DIR``
  folder on ``PYTHONPATH``.
- ``fireants-greedy``: ``GreedyRegistration`` alone from the identity, FireANTs' own recipe
  for OASIS (its ``scripts/pairwise/oasis_test.py``: greedy only, the inputs being affinely
  pre-aligned). On OASIS 0001→0002 the affine stage first made FireANTs' Dice 0.224, below
  the 0.459 before registration, on the CPU and on the GPU alike.
- ``syntx-jax`` / ``syntx-torch``: syntx (``pip install syntx``; SyN in JAX or PyTorch on
  ANTsImages) ``syntx.syn(fixed, moving, type_of_transform="SyN", backend="jax"|"pytorch")``
  with its defaults (torch on ``device="cpu"``, threads = cores), skipped with the reason when
  ``import syntx`` fails. syntx 5.4.15 imports ``antstorch`` at the top level (not on PyPI,
  not a declared dependency, unused by ``syn``): when it is missing an empty placeholder
  module stands in, noted in the row's settings. It writes ANTs files (``1Warp.nii.gz``,
  ``0GenericAffine.mat``), used exactly as ``ants-syn``'s.

- ``elastix-bspline``: elastix (``pip install itk-elastix``) with its default parameter maps
  ``affine`` then ``bspline`` (``ELASTIX`` below; the final resampling made linear),
  ``itk.elastix_registration_method``, ITK threads = cores; labels warped by transformix with
  its nearest-neighbour interpolator, the transform read back as transformix's deformation
  field. Skipped with the reason when ``import itk`` or its elastix module fails.

Every method's labels are warped through its own transform with nearest-neighbour
interpolation (jaxreg ``warp(order=0)``, ``ants.apply_transforms(nearestNeighbor)`` for ANTs and syntx,
FireANTs ``grid_sample(mode="nearest")``, transformix ``FinalNearestNeighborInterpolator`` for elastix); all scores are then computed the same way, here,
with ``jaxreg.metrics``. See the Markdown header for what each number means.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import os
import resource
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._paths import REPO, RESULTS as DEFAULT_OUT, SHARED_DATA as DEFAULT_DATA, repo_env, work_folder  # noqa: E402

CASES = ("oasis3d", "oasis2d", "headct", "brain2mm")
METHODS = ("jaxreg", "jaxreg-cached", "jaxreg-fine", "jaxreg-bspline", "ants-syn", "ants-syn-fine", "ants-affine", "fireants",
           "fireants-greedy", "syntx-jax", "syntx-torch", "elastix-bspline")
# jaxreg-fine: the brain preset with a last level at full resolution, for the cases that use
# the brain preset; ants-syn-fine: ANTsPy's SyN with 10 iterations at full resolution added
# (its default reg_iterations are (40, 20, 0)), and half of each in --quick.
FINE_PRESETS = {None: "brain-mri-fine", "brain-mri": "brain-mri-fine"}
# The jaxreg methods timed in a second process whose persistent compilation cache the first filled.
CACHED_METHODS = ("jaxreg-cached", "jaxreg-fine", "jaxreg-bspline")
ANTS_FINE = dict(reg_iterations=(40, 20, 10))
ANTS_FINE_QUICK = dict(reg_iterations=(20, 10, 5))
REFERENCE = "ants-syn"  # ratios and differences are against this method
QUICK_FACTOR = 2  # --quick: every input downsampled by this factor

# FireANTs settings: greedy as in its OASIS script (fireants/scripts/pairwise/oasis_test.py:
# scales 4,2,1, iterations 100,100,20, CC 7, lr 0.5), after an affine stage (lr 3e-3: its
# default 3e-2 scaled OASIS 0001 by 1.6 with CC 5, a degenerate optimum, in a --quick trial).
FIREANTS = dict(
    affine=dict(scales=(4, 2, 1), iterations=(200, 100, 50), optimizer_lr=3e-3, cc_kernel_size=5),
    greedy=dict(scales=(4, 2, 1), iterations=(100, 100, 20), optimizer_lr=0.5, cc_kernel_size=7,
                smooth_grad_sigma=1.0, smooth_warp_sigma=0.5),
)
FIREANTS_QUICK = dict(affine_iterations=(50, 25, 10), greedy_iterations=(40, 20, 5))
ANTS_QUICK = dict(reg_iterations=(20, 10, 0), aff_iterations=(200, 100, 50, 0))
# syntx settings: `syntx.syn(fixed, moving, type_of_transform="SyN", backend=...)`, its
# ants.registration-style entry point, with everything else at syntx's defaults (levels 4,2,1;
# affine iterations 100,50,20 with Mattes MI; SyN iterations 100,100,50 with CC radius 2;
# grad_step 0.5 voxel; flow_sigma 3 / total_sigma 0 in ITK's variance convention). Note that
# its regularizer default differs by backend: 'sobolev' for pytorch, 'gaussian' for jax.
SYNTX = dict(type_of_transform="SyN")
SYNTX_QUICK = dict(reg_iterations=(50, 50, 25), affine_iterations=(50, 25, 10))
# elastix settings: its own default parameter maps "affine" then "bspline", the pair its
# manual starts from (Mattes mutual information; adaptive stochastic gradient descent on
# 2048 random samples per iteration; 4 resolutions of 256 iterations; B-spline control
# points every 10 mm, refined from 28 mm, with a bending-energy penalty of weight 1). The
# one change: the final resampling is linear, as every other method's warped image is
# scored (its default is cubic).
ELASTIX = dict(maps=("affine", "bspline"), overrides={"ResampleInterpolator": "FinalLinearInterpolator"})
ELASTIX_QUICK = {"MaximumNumberOfIterations": "64"}


class Skip(Exception):
    """A method that cannot run here (not installed)."""


# =============================================================================== worker
#
# Runs in a fresh process: imports only what its method needs, so that peak memory and time
# are the method's. Writes result.json (timings, memory, transform files) and outputs.npz
# (warped image, warped labels, Jacobian determinants) into spec["out"].


def _versions(*distributions) -> dict:
    """Installed version of each distribution (None where it is not installed)."""
    out = {}
    for name in distributions:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _max_rss_mib() -> float | None:
    """Peak resident memory of this process so far (Linux ``VmHWM``), MiB.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: on Linux that starts from the parent's
    resident size at fork/exec, so a worker would report the benchmark driver's memory.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    if sys.platform == "darwin":  # bytes there, and no fork inheritance to worry about
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return None


# RAS <-> LPS by hand (negate world axes 0 and 1, as jaxreg.io does): the ANTs and FireANTs
# workers must not import jaxreg, which imports jax, whose memory would count as theirs.


def _flip_xy(vectors):
    out = np.array(vectors, np.float64)
    out[..., :2] *= -1.0
    return out


def _lps_geometry(affine):
    """RAS voxel-to-world matrix -> ITK/ANTs (LPS) origin, spacing, direction."""
    lps = _flip_xy(np.asarray(affine, np.float64).T).T  # flip the first two rows
    d = lps.shape[0] - 1
    spacing = np.linalg.norm(lps[:d, :d], axis=0)
    return lps[:d, d], spacing, lps[:d, :d] / spacing


def _quick_steps(steps, shrink):
    steps = tuple(steps) if isinstance(steps, (list, tuple)) else (steps,) * len(shrink)
    return tuple(max(1, int(s) // 2) for s in steps)


def _worker_jaxreg(spec, data):
    import jax

    cache = spec.get("cache_dir")
    if cache:
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    else:
        jax.config.update("jax_enable_compilation_cache", False)
    import jax.numpy as jnp

    from benchmarks._timing import block
    from jaxreg.grid import Image
    from jaxreg.registration import PRESETS, register
    from jaxreg.transforms import jacobian_determinant, warp

    fixed = Image(jnp.asarray(data["fixed"]), jnp.asarray(data["fixed_affine"]))
    moving = Image(jnp.asarray(data["moving"]), jnp.asarray(data["moving_affine"]))
    block((fixed, moving))  # the backend is up and the data are on it before the clock starts
    preset = spec["preset"] or "brain-mri"
    options = {"deformable": spec["deformable"]} if spec.get("deformable") else {}
    if spec["quick"]:
        chosen = PRESETS[preset]
        affine_options = chosen.get("affine_options", {})
        options["affine_options"] = dict(steps=_quick_steps(affine_options.get("steps", 100), affine_options.get("shrink", (4, 2, 1))))
        if chosen.get("deformable"):
            dense = chosen.get("deformable_options", {})
            options["steps"] = _quick_steps(dense.get("steps", (100, 60, 30)), dense.get("shrink", (4, 2, 1)))
    rss_before = _max_rss_mib()
    start = time.perf_counter()
    result = block(register(fixed, moving, preset=spec["preset"], **options))
    wall = time.perf_counter() - start
    peak = _max_rss_mib()

    grid = fixed.grid
    outputs = {"warped": np.asarray(result.warped.data, np.float32)}
    if "moving_seg" in data:
        labels = Image(jnp.asarray(data["moving_seg"], jnp.float32), jnp.asarray(data["moving_affine"]))
        outputs["warped_seg"] = np.rint(np.asarray(warp(labels, result.transform, grid, order=0).data)).astype(np.int32)
    outputs["jacdet"] = np.asarray(jax.jit(jacobian_determinant)(result.transform, grid), np.float32)
    return outputs, dict(
        wall_s=wall,
        compile_s=result.compile_seconds,
        run_s=result.run_seconds,
        rss_before_mib=rss_before,
        peak_rss_mib=peak,
        stages=list(result.stages),
        settings=dict(preset=preset, overrides=options, persistent_cache=cache or None),
        versions=dict(jax=jax.__version__),
        device=jax.devices()[0].device_kind,
    )


def _ants_image(ants, array, affine):
    """An ANTsImage of ``array`` with the LPS geometry of a RAS ``affine``."""
    origin, spacing, direction = _lps_geometry(affine)
    return ants.from_numpy(np.asarray(array, np.float32), origin=list(origin), spacing=list(spacing), direction=direction)


def _timed_ants_style(ants, register, fixed, data):
    """Time ``register()`` (a call returning an ``ants.registration``-style dict), then warp
    the moving labels through its ``fwdtransforms`` with nearest neighbour, the same way for
    ANTs and for tools that write ANTs transform files (syntx)."""
    rss_before = _max_rss_mib()
    start = time.perf_counter()
    reg = register()
    wall = time.perf_counter() - start
    peak = _max_rss_mib()
    forward = list(reg["fwdtransforms"])
    outputs = {"warped": reg["warpedmovout"].numpy().astype(np.float32)}
    if "moving_seg" in data:
        labels = _ants_image(ants, data["moving_seg"], data["moving_affine"])
        warped = ants.apply_transforms(fixed, labels, forward, interpolator="nearestNeighbor")
        outputs["warped_seg"] = np.rint(warped.numpy()).astype(np.int32)
    return reg, forward, outputs, dict(wall_s=wall, rss_before_mib=rss_before, peak_rss_mib=peak, transform_files=forward)


def _worker_ants(spec, data):
    try:
        import ants
    except ImportError as e:
        raise Skip(f"import ants failed: {e}") from None

    fixed = _ants_image(ants, data["fixed"], data["fixed_affine"])
    moving = _ants_image(ants, data["moving"], data["moving_affine"])
    kind = spec["type_of_transform"]
    options = {}
    if spec.get("fine"):
        options = dict(ANTS_FINE_QUICK if spec["quick"] else ANTS_FINE)
    elif spec["quick"]:
        options = dict(reg_iterations=ANTS_QUICK["reg_iterations"]) if kind == "SyN" else dict(aff_iterations=ANTS_QUICK["aff_iterations"])
    prefix = os.path.join(spec["out"], "ants_")
    register = lambda: ants.registration(fixed, moving, type_of_transform=kind, outprefix=prefix, **options)  # noqa: E731
    reg, forward, outputs, timing = _timed_ants_style(ants, register, fixed, data)
    extra = {}
    fields = [f for f in forward if f.endswith((".nii.gz", ".nii"))]
    if fields:
        # ANTs' own Jacobian, twice: of fwdtransforms[0] alone (the warp field, without the
        # affine that follows it) and of the composition of the whole list as one field.
        outputs["jacdet_ants_warp"] = ants.create_jacobian_determinant_image(fixed, fields[0]).numpy().astype(np.float32)
        composite = ants.apply_transforms(fixed, moving, forward, compose=os.path.join(spec["out"], "composite_"))
        outputs["jacdet_ants_composite"] = ants.create_jacobian_determinant_image(fixed, composite).numpy().astype(np.float32)
        extra = dict(ants_warp_file=fields[0], ants_composite_file=composite)
    return outputs, dict(
        **timing,
        settings=dict(type_of_transform=kind, overrides={k: list(v) for k, v in options.items()},
                      threads=os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"),
                      random_seed=os.environ.get("ANTS_RANDOM_SEED")),
        versions=dict(ants=getattr(ants, "__version__", None)),
        **extra,
    )


def _worker_fireants(spec, data):
    try:
        import SimpleITK as sitk
        import torch
        import torch.nn.functional as F
        from fireants.io.image import BatchedImages
        from fireants.io.image import Image as FireImage
        from fireants.registration.affine import AffineRegistration
        from fireants.registration.greedy import GreedyRegistration
    except Exception as e:  # ImportError, or a dependency that fails on import
        raise Skip(f"import fireants failed: {type(e).__name__}: {e}") from None
    torch.set_num_threads(spec["threads"])
    device = spec.get("torch_device", "cpu")  # resolved by the parent (_timing.torch_device)

    def itk(array, affine):
        origin, spacing, direction = _lps_geometry(affine)
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, np.float32).T))  # ITK arrays are z, y, x
        img.SetOrigin([float(v) for v in origin])
        img.SetSpacing([float(v) for v in spacing])
        img.SetDirection([float(v) for v in direction.ravel()])
        return img

    fixed = BatchedImages([FireImage(itk(data["fixed"], data["fixed_affine"]), device=device)])
    moving = BatchedImages([FireImage(itk(data["moving"], data["moving_affine"]), device=device)])
    affine_cfg, greedy_cfg = dict(FIREANTS["affine"]), dict(FIREANTS["greedy"])
    if spec["quick"]:
        affine_cfg["iterations"], greedy_cfg["iterations"] = FIREANTS_QUICK["affine_iterations"], FIREANTS_QUICK["greedy_iterations"]
    affine_loss = "mi" if spec["preset"] == "ct" else "cc"
    greedy_only = spec["method"] == "fireants-greedy"  # from the identity, as FireANTs' OASIS script
    # What ran, recorded before the constructors' arguments are popped from the dicts.
    settings = dict(affine=None if greedy_only else {**affine_cfg, "loss_type": affine_loss}, greedy=dict(greedy_cfg))
    rss_before = _max_rss_mib()
    start = time.perf_counter()
    init_affine = None
    if not greedy_only:
        affine = AffineRegistration(list(affine_cfg.pop("scales")), list(affine_cfg.pop("iterations")), fixed, moving,
                                    loss_type=affine_loss, optimizer="Adam", progress_bar=False, **affine_cfg)
        affine.optimize()
        init_affine = affine.get_affine_matrix().detach()
    greedy = GreedyRegistration(list(greedy_cfg.pop("scales")), list(greedy_cfg.pop("iterations")), fixed, moving,
                                loss_type="cc", deformation_type="compositive", optimizer="Adam",
                                init_affine=init_affine, progress_bar=False, **greedy_cfg)
    greedy.optimize()
    with torch.no_grad():
        coords = greedy.get_warped_coordinates(fixed, moving)
        moved = greedy.evaluate(fixed, moving)
    if device == "cuda":
        torch.cuda.synchronize()  # CUDA kernels run after the call returns: the clock waits for them
    wall = time.perf_counter() - start
    coords = coords.cpu()
    peak = _max_rss_mib()

    outputs = {"warped": np.ascontiguousarray(moved[0, 0].cpu().numpy().T).astype(np.float32)}
    if "moving_seg" in data:
        seg = torch.from_numpy(np.ascontiguousarray(np.asarray(data["moving_seg"], np.float32).T))[None, None]
        with torch.no_grad():
            warped = F.grid_sample(seg, coords.to(seg.dtype), mode="nearest", align_corners=True)
        outputs["warped_seg"] = np.rint(warped[0, 0].numpy().T).astype(np.int32)
    # The transform as world points: grid_sample coordinates of the moving image (normalized,
    # x-y-z order, on the fixed grid in z-y-x order) through the moving image's torch-to-LPS
    # matrix, then RAS. (FireANTs' own save_as_ants_transforms fails on 2-D images.)
    d = coords.shape[-1]
    torch2phy = moving.get_torch2phy()[0].cpu().numpy().astype(np.float64)
    points = coords[0].cpu().numpy().astype(np.float64) @ torch2phy[:d, :d].T + torch2phy[:d, d]
    points = np.transpose(points, tuple(range(d - 1, -1, -1)) + (d,))  # back to x, y(, z) axis order
    outputs["mapped_points"] = _flip_xy(points).astype(np.float32)
    versions = _versions("fireants", "torch", "SimpleITK")
    return outputs, dict(
        wall_s=wall,
        rss_before_mib=rss_before,
        peak_rss_mib=peak,
        settings=dict(**settings, torch_threads=torch.get_num_threads(), device=device,
                      cuda_device=torch.cuda.get_device_name(0) if device == "cuda" else None),
        versions=versions,
    )


def _import_syntx():
    """``import syntx``; returns (module, note). syntx 5.4.15's ``__init__`` imports
    ``syntx.surface``, which does a top-level ``import antstorch`` (ANTsTorch, not on PyPI and
    not a declared dependency of syntx). antstorch is only used by its surface-curvature,
    sulcal-guidance and denoising helpers, none of which ``syntx.syn(..., type_of_transform="SyN")``
    calls with its defaults; so when antstorch is missing an empty placeholder module is put in
    ``sys.modules`` (any attribute use raises) and the fact is recorded in the row's settings."""
    try:
        import syntx

        return syntx, None
    except ModuleNotFoundError as e:
        if e.name != "antstorch":
            raise
    import types

    class _Missing(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):  # inspect.getmodule() probes __file__ etc. of every module
                raise AttributeError(name)
            raise ImportError(f"antstorch is not installed (placeholder module; antstorch.{name} was used)")

    sys.modules["antstorch"] = _Missing("antstorch")
    for name in [m for m in sys.modules if m == "syntx" or m.startswith("syntx.")]:
        del sys.modules[name]
    import syntx

    return syntx, "antstorch missing: an empty placeholder module was used for syntx's top-level import"


def _worker_syntx(spec, data):
    backend = spec["backend"]
    if backend == "pytorch":
        try:
            import torch
        except Exception as e:
            raise Skip(f"import torch failed: {type(e).__name__}: {e}") from None
        torch.set_num_threads(spec["threads"])
    try:
        import ants

        syntx, stub_note = _import_syntx()
    except Exception as e:  # ImportError, or a dependency that fails on import
        raise Skip(f"import syntx failed: {type(e).__name__}: {e}") from None

    fixed = _ants_image(ants, data["fixed"], data["fixed_affine"])
    moving = _ants_image(ants, data["moving"], data["moving_affine"])
    options = dict(SYNTX)
    if backend == "pytorch":
        options["device"] = "cpu"
    if spec["quick"]:
        options.update(SYNTX_QUICK)
    prefix = os.path.join(spec["out"], "syntx_")
    if backend == "jax":
        import jax

        jax.numpy.zeros(1).block_until_ready()  # the backend is up before the clock starts
    register = lambda: syntx.syn(fixed, moving, backend=backend, outprefix=prefix, **options)  # noqa: E731
    reg, forward, outputs, timing = _timed_ants_style(ants, register, fixed, data)
    versions = _versions("syntx", "torch", "jax", "antspyx")
    return outputs, dict(
        **timing,
        settings=dict(backend=backend, **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
                      torch_threads=torch.get_num_threads() if backend == "pytorch" else None,
                      import_note=stub_note,
                      syn_losses_last=(reg.get("syn_losses") or [None])[-1],
                      inverse_identity_errors=reg.get("inverse_identity_errors")),
        versions=versions,
    )


def _worker_elastix(spec, data):
    try:
        import itk

        itk.ElastixRegistrationMethod  # itk loads its modules lazily: without itk-elastix this fails here
    except Exception as e:  # ImportError, AttributeError, or a module that fails on import
        raise Skip(f"import itk (itk-elastix) failed: {type(e).__name__}: {e}") from None
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(spec["threads"])

    def image(array, affine):
        origin, spacing, direction = _lps_geometry(affine)
        img = itk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, np.float32).T))  # ITK arrays are z, y, x
        img.SetOrigin([float(v) for v in origin])
        img.SetSpacing([float(v) for v in spacing])
        img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
        return img

    fixed = image(data["fixed"], data["fixed_affine"])
    moving = image(data["moving"], data["moving_affine"])
    overrides = {**ELASTIX["overrides"], **(ELASTIX_QUICK if spec["quick"] else {})}
    parameters = itk.ParameterObject.New()
    for name in ELASTIX["maps"]:
        stage = parameters.GetDefaultParameterMap(name)
        for key, value in overrides.items():
            stage[key] = [value]
        parameters.AddParameterMap(stage)
    rss_before = _max_rss_mib()
    start = time.perf_counter()
    warped, transform = itk.elastix_registration_method(fixed, moving, parameter_object=parameters, log_to_console=False)
    wall = time.perf_counter() - start
    peak = _max_rss_mib()

    outputs = {"warped": np.asarray(itk.GetArrayFromImage(warped), np.float32).T.copy()}
    if "moving_seg" in data:
        nearest = itk.ParameterObject.New()
        for i in range(transform.GetNumberOfParameterMaps()):
            nearest.AddParameterMap(transform.GetParameterMap(i))
        nearest.SetParameter("ResampleInterpolator", "FinalNearestNeighborInterpolator")
        labels = itk.transformix_filter(image(data["moving_seg"], data["moving_affine"]), nearest)
        outputs["warped_seg"] = np.rint(np.asarray(itk.GetArrayFromImage(labels)).T).astype(np.int32)
    # The transform as world points: transformix's deformation field is the LPS displacement
    # of each fixed voxel centre (z, y, x array order), added to the RAS centres after the flip.
    transformix = itk.TransformixFilter.New(moving, transform_parameter_object=transform)
    transformix.SetOutputDirectory(spec["out"])  # it writes deformationField.nii there, not in the working folder
    transformix.SetComputeDeformationField(True)
    transformix.Update()
    field = np.asarray(itk.GetArrayFromImage(transformix.GetOutputDeformationField()), np.float64)
    d = field.shape[-1]
    field = np.transpose(field, tuple(range(d - 1, -1, -1)) + (d,))
    outputs["mapped_points"] = (_voxel_centres(data["fixed_affine"], field.shape[:-1]) + _flip_xy(field)).astype(np.float32)
    versions = _versions("itk-elastix", "itk")
    return outputs, dict(
        wall_s=wall,
        rss_before_mib=rss_before,
        peak_rss_mib=peak,
        settings=dict(maps=list(ELASTIX["maps"]), overrides=overrides,
                      threads=spec["threads"],
                      transforms=[str(transform.GetParameterMap(i)["Transform"][0]) for i in range(transform.GetNumberOfParameterMaps())]),
        versions=versions,
    )


def _voxel_centres(affine, shape):
    """RAS world points of every voxel centre of a grid, shape + (d,)."""
    affine = np.asarray(affine, np.float64)
    d = len(shape)
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    return index @ affine[:d, :d].T + affine[:d, d]


WORKERS = {"jaxreg": _worker_jaxreg, "ants": _worker_ants, "fireants": _worker_fireants, "syntx": _worker_syntx,
           "elastix": _worker_elastix}


def worker_main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    out = spec["out"]
    started = time.perf_counter()
    try:
        with np.load(spec["inputs"]) as npz:
            data = {k: npz[k] for k in npz.files}
        outputs, record = WORKERS[spec["kind"]](spec, data)
    except Skip as e:
        record = {"skipped": str(e)}
    else:
        np.savez(os.path.join(out, "outputs.npz"), **outputs)
        record["process_s"] = time.perf_counter() - started
        record["process_peak_rss_mib"] = _max_rss_mib()  # the scoring outputs included
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(record, f, indent=1, default=str)
    return 0


# =============================================================================== inputs


@dataclass
class Pair:
    """One registration problem: moving onto fixed, with what is scored."""

    case: str
    direction: str  # "moving→fixed"
    fixed: np.ndarray
    fixed_affine: np.ndarray
    moving: np.ndarray
    moving_affine: np.ndarray
    preset: str | None = None
    fixed_seg: np.ndarray | None = None
    moving_seg: np.ndarray | None = None
    labels: tuple = ()
    mask: np.ndarray | None = None  # where NCC is computed (None: the whole fixed grid)
    mask_name: str = ""
    notes: list = field(default_factory=list)


def _downsample(data, affine, factor, *, labels=False):
    """Every ``factor``-th voxel (after a Gaussian of sigma factor/2 voxels for intensities);
    the voxel-to-world matrix follows, so world coordinates are unchanged."""
    if factor == 1:
        return data, affine
    import scipy.ndimage as ndi

    if not labels:
        data = ndi.gaussian_filter(np.asarray(data, np.float32), factor / 2.0, mode="nearest")
    d = data.ndim
    data = np.ascontiguousarray(data[(slice(None, None, factor),) * d])
    affine = np.asarray(affine, np.float64) @ np.diag([factor] * d + [1])
    return data, affine.astype(np.float32)


def _load(path, *, labels=False, squeeze=False):
    from jaxreg import io

    image = io.load(path, dtype=np.int32 if labels else None, squeeze=squeeze)
    return np.asarray(image.data), np.asarray(image.affine, np.float32)


def _require(paths):
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"data missing: {', '.join(missing)}")


def _oasis_pairs(case, root, factor):
    subjects = ("0001", "0002")
    folder = {s: os.path.join(root, "oasis", f"OASIS_OAS1_{s}_MR1") for s in subjects}
    two_d = case == "oasis2d"
    image_name, seg_name = ("slice_norm.nii.gz", "slice_seg24.nii.gz") if two_d else ("aligned_norm.nii.gz", "aligned_seg35.nii.gz")
    _require([os.path.join(folder[s], n) for s in subjects for n in (image_name, seg_name)])
    loaded = {}
    for s in subjects:
        image, affine = _load(os.path.join(folder[s], image_name), squeeze=two_d)
        seg, seg_affine = _load(os.path.join(folder[s], seg_name), labels=True, squeeze=two_d)
        if seg.shape != image.shape or not np.allclose(seg_affine, affine):
            raise ValueError(f"{folder[s]}: labels and image are on different grids")
        loaded[s] = (*_downsample(image, affine, factor), _downsample(seg, affine, factor, labels=True)[0])
    pairs = []
    for moving, fixed in (("0001", "0002"), ("0002", "0001")):
        f_img, f_aff, f_seg = loaded[fixed]
        m_img, m_aff, m_seg = loaded[moving]
        if two_d:  # labels present in both maps
            labels = tuple(int(v) for v in np.intersect1d(np.unique(f_seg), np.unique(m_seg)) if v != 0)
        else:
            labels = tuple(range(1, 36))
        pairs.append(Pair(case, f"{moving}→{fixed}", f_img, f_aff, m_img, m_aff, None, f_seg, m_seg, labels))
    return pairs


def _headct_pairs(root, factor):
    folder = os.path.join(root, "headct")
    names = ("CT_2D_head_fixed.mha", "CT_2D_head_moving.mha", "CT_2D_head_fixed_mask.mha")
    _require([os.path.join(folder, n) for n in names])
    fixed, f_aff = _downsample(*_load(os.path.join(folder, names[0])), factor)
    moving, m_aff = _downsample(*_load(os.path.join(folder, names[1])), factor)
    mask, mask_aff = _load(os.path.join(folder, names[2]))
    mask = _downsample(mask, mask_aff, factor, labels=True)[0] > 0
    return [Pair("headct", "moving→fixed", fixed, f_aff, moving, m_aff, "ct", mask=mask, mask_name="fixed mask")]


def _brain2mm_pairs(root, factor):
    folder = os.path.join(root, "brain2mm")
    names = ("atlas_2mm_1000_3.nii.gz", "atlas_2mm_1001_3.nii.gz")
    _require([os.path.join(folder, n) for n in names])
    fixed, f_aff = _downsample(*_load(os.path.join(folder, names[0])), factor)
    moving, m_aff = _downsample(*_load(os.path.join(folder, names[1])), factor)
    return [Pair("brain2mm", "1001→1000", fixed, f_aff, moving, m_aff, None, mask_name="whole fixed grid")]


def case_pairs(case, root, factor):
    if case in ("oasis3d", "oasis2d"):
        return _oasis_pairs(case, root, factor)
    if case == "headct":
        return _headct_pairs(root, factor)
    return _brain2mm_pairs(root, factor)


def save_inputs(pair: Pair, path: str):
    arrays = dict(fixed=pair.fixed, fixed_affine=pair.fixed_affine, moving=pair.moving, moving_affine=pair.moving_affine)
    if pair.moving_seg is not None:
        arrays["moving_seg"] = pair.moving_seg
    np.savez(path, **arrays)


# =============================================================================== running


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)  # the worker runs in its own session: its group is ours to end
    except ProcessLookupError:
        pass


def run_worker(spec: dict, folder: str, timeout: float, env: dict) -> dict:
    """Run one method in a fresh process; return its result.json plus what the parent saw."""
    os.makedirs(folder, exist_ok=True)
    spec = dict(spec, out=folder)
    spec_path = os.path.join(folder, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=1)
    log_path = os.path.join(folder, "log.txt")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", spec_path], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            proc.wait()
    elapsed = time.perf_counter() - start
    record = {}
    result_path = os.path.join(folder, "result.json")
    if os.path.exists(result_path) and proc.returncode == 0:
        with open(result_path) as f:
            record = json.load(f)
    else:
        with open(log_path, errors="replace") as f:
            tail = [line.strip() for line in f.read().splitlines() if line.strip()][-3:]
        why = f"timed out after {timeout:.0f} s" if timed_out else f"exit code {proc.returncode}"
        record["error"] = f"{why}: {' | '.join(tail)[-300:]}"
    record["subprocess_s"] = elapsed
    record["log"] = log_path
    return record


def method_env(method: str, threads: int) -> dict:
    env = repo_env()
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if method.startswith(("ants", "elastix")):
        env["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
        env["ANTS_RANDOM_SEED"] = "1"
    if method in ("fireants", "fireants-greedy", "syntx-torch"):
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def method_spec(method: str, pair: Pair, inputs: str, quick: bool, threads: int) -> dict:
    kind = {"jaxreg": "jaxreg", "jaxreg-cached": "jaxreg", "jaxreg-fine": "jaxreg", "jaxreg-bspline": "jaxreg", "ants-syn": "ants",
            "ants-syn-fine": "ants", "ants-affine": "ants", "fireants": "fireants", "fireants-greedy": "fireants", "syntx-jax": "syntx",
            "syntx-torch": "syntx", "elastix-bspline": "elastix"}[method]
    spec = dict(method=method, kind=kind, inputs=inputs, quick=quick, preset=pair.preset, threads=threads)
    if method == "jaxreg-fine":
        spec["preset"] = FINE_PRESETS[pair.preset]
    if method == "jaxreg-bspline":
        spec["deformable"] = "bspline"
    if kind == "syntx":
        spec["backend"] = "jax" if method == "syntx-jax" else "pytorch"
    if method in ("ants-syn", "ants-syn-fine"):
        spec["type_of_transform"] = "SyN"
        spec["fine"] = method == "ants-syn-fine"
    elif method == "ants-affine":
        spec["type_of_transform"] = "Affine"
    return spec


def run_method(method, pair, inputs, folder, args, threads):
    spec = dict(method_spec(method, pair, inputs, args.quick, threads), torch_device=args.torch_device)
    env = method_env(method, threads)
    if method not in CACHED_METHODS:
        return run_worker(spec, folder, args.timeout, env)
    cache = os.path.join(folder, "jax-cache")  # fresh per pair: the other direction must not warm it
    os.makedirs(cache, exist_ok=True)
    fill = run_worker(dict(spec, cache_dir=cache), os.path.join(folder, "fill"), args.timeout, env)
    if "error" in fill or "skipped" in fill:
        return fill
    record = run_worker(dict(spec, cache_dir=cache), os.path.join(folder, "cached"), args.timeout, env)
    record["cache_fill"] = {k: fill.get(k) for k in ("wall_s", "compile_s", "run_s", "peak_rss_mib", "process_s")}
    record["cache_entries"] = len(os.listdir(cache))
    return record


# =============================================================================== scoring


def ncc(a, b, mask=None) -> float:
    """Pearson correlation of ``a`` and ``b`` over ``mask`` (all voxels if None), float64."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if mask is not None:
        keep = np.asarray(mask).ravel() > 0
        a, b = a[keep], b[keep]
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@functools.lru_cache(maxsize=None)
def _hd95_program(shape, spacing):
    import jax

    from jaxreg.metrics import hausdorff_distance

    return jax.jit(lambda a, b: hausdorff_distance(a, b, percentile=95.0, spacing=spacing))


def hd95_per_label(a, b, labels, spacing, bucket=16):
    """jaxreg.metrics.hausdorff_distance (95th percentile) per label, on a crop.

    Each label is scored on the bounding box of both masks plus one empty voxel (or the
    image border), zero-padded up to a multiple of ``bucket`` voxels so that few programs
    are compiled. Exact: the surfaces and every surface-to-surface distance are unchanged.
    A label missing from either map gives inf.
    """
    spacing = tuple(float(s) for s in spacing)
    out = []
    for label in labels:
        in_a, in_b = a == label, b == label
        if not in_a.any() or not in_b.any():
            out.append(float("inf"))
            continue
        nonzero = np.nonzero(in_a | in_b)
        lo = [max(int(i.min()) - 1, 0) for i in nonzero]
        hi = [min(int(i.max()) + 2, n) for i, n in zip(nonzero, a.shape)]
        crop = tuple(slice(l, h) for l, h in zip(lo, hi))
        shape = tuple(-(-(h - l) // bucket) * bucket for l, h in zip(lo, hi))
        pad = [(0, s - (h - l)) for s, l, h in zip(shape, lo, hi)]
        ca, cb = np.pad(in_a[crop], pad), np.pad(in_b[crop], pad)
        out.append(float(_hd95_program(shape, spacing)(ca, cb)))
    return out


def _finite_mean(values):
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else None


class Scorer:
    """Scores of one pair: the 'before' values once, then each method's outputs."""

    def __init__(self, pair: Pair, hd95: bool):
        import jax
        import jax.numpy as jnp

        from jaxreg.grid import Grid, Image
        from jaxreg.metrics import dice
        from jaxreg.transforms import Affine, warp

        self.pair, self.hd95 = pair, hd95
        self.grid = Grid(pair.fixed.shape, pair.fixed_affine)
        self.spacing = np.asarray(self.grid.spacing)
        identity = Affine.identity(pair.fixed.ndim)
        self.before = {}
        if pair.labels:
            self._dice = jax.jit(functools.partial(dice, labels=pair.labels))
            moved = warp(Image(jnp.asarray(pair.moving_seg, jnp.float32), pair.moving_affine), identity, self.grid, order=0)
            self.before.update(self.labels(np.rint(np.asarray(moved.data)).astype(np.int32)))
        else:
            moved = warp(Image(jnp.asarray(pair.moving), pair.moving_affine), identity, self.grid)
            self.before["ncc"] = ncc(pair.fixed, np.asarray(moved.data), pair.mask)

    def labels(self, warped_seg) -> dict:
        scores = np.asarray(self._dice(self.pair.fixed_seg, warped_seg), np.float64)
        out = {"dice": float(np.nanmean(scores)), "dice_per_label": [None if np.isnan(s) else round(float(s), 5) for s in scores]}
        if self.hd95:
            start = time.perf_counter()
            distances = hd95_per_label(self.pair.fixed_seg, warped_seg, self.pair.labels, self.spacing)
            out.update(hd95=_finite_mean(distances), hd95_per_label=[round(d, 4) if np.isfinite(d) else None for d in distances],
                       hd95_seconds=time.perf_counter() - start)
        return out

    def folds(self, jacdet) -> dict:
        jacdet = np.asarray(jacdet, np.float64)
        return {"folds_pct": 100.0 * float(np.mean(jacdet <= 0)), "jacdet_min": float(jacdet.min()),
                "jacdet_median": float(np.median(jacdet)), "jacdet_max": float(jacdet.max())}

    def jacobian_of_files(self, files):
        """Jacobian determinant of an ANTs transform list, by jaxreg (as for jaxreg's own)."""
        import jax

        from jaxreg import itk
        from jaxreg.transforms import jacobian_determinant

        return np.asarray(jax.jit(jacobian_determinant)(itk.read_transforms(files), self.grid))

    def jacobian_of_points(self, mapped_points):
        """Jacobian determinant of the map fixed voxel centre -> ``mapped_points`` (RAS world)."""
        import jax

        from jaxreg.transforms import jacobian_determinant

        return np.asarray(jax.jit(jacobian_determinant)(self.transform_of_points(mapped_points), self.grid))

    def transform_of_points(self, mapped_points):
        """The map fixed voxel centre -> ``mapped_points`` (RAS world) as a Displacement."""
        import jax.numpy as jnp

        from jaxreg.transforms import Displacement

        return Displacement(jnp.asarray(mapped_points) - self.grid.points(), self.grid.affine)

    def score(self, method: str, record: dict) -> dict:
        outputs_path = os.path.join(os.path.dirname(record["log"]), "outputs.npz")
        with np.load(outputs_path) as npz:
            outputs = {k: npz[k] for k in npz.files}
        scores = {}
        if self.pair.labels:
            scores.update(self.labels(outputs["warped_seg"]))
        else:
            scores["ncc"] = ncc(self.pair.fixed, outputs["warped"], self.pair.mask)
        if "jacdet" in outputs:
            jacdet, how = outputs["jacdet"], "jaxreg.transforms.jacobian_determinant(result.transform, fixed.grid)"
        elif "mapped_points" in outputs:
            jacdet = self.jacobian_of_points(outputs["mapped_points"])
            how = "jaxreg.transforms.jacobian_determinant(Displacement(mapped_points - grid points), fixed.grid)"
        else:
            jacdet = self.jacobian_of_files(record["transform_files"])
            how = "jaxreg.transforms.jacobian_determinant(jaxreg.itk.read_transforms(files), fixed.grid)"
        scores.update(self.folds(jacdet), jacdet_method=how)
        if "jacdet_ants_warp" in outputs:
            warp_only, composite = outputs["jacdet_ants_warp"], outputs["jacdet_ants_composite"]
            affine_files = [f for f in record["transform_files"] if f.endswith(".mat")]
            check = {
                "folds_pct_warp_only": 100.0 * float(np.mean(warp_only <= 0)),
                "folds_pct_composite": 100.0 * float(np.mean(composite <= 0)),
                "median_composite_over_warp_only": float(np.median(composite / np.where(warp_only == 0, np.nan, warp_only))),
                "median_abs_diff_composite_vs_jaxreg": float(np.median(np.abs(composite - jacdet))),
                "p99_abs_diff_composite_vs_jaxreg": float(np.percentile(np.abs(composite - jacdet), 99)),
            }
            if affine_files:
                from jaxreg import itk

                check["affine_det"] = float(np.linalg.det(np.asarray(itk.read_affine(affine_files[0]).linear, np.float64)))
            scores["ants_jacobian"] = check
        if method == "elastix-bspline":
            scores["field_check"] = self.field_check(outputs)
        return scores

    def field_check(self, outputs) -> dict:
        """Whether the read-back field is elastix's transform: the moving image and labels
        warped through it by jaxreg, against transformix's own warped image and labels."""
        import jax.numpy as jnp

        from jaxreg.grid import Image
        from jaxreg.transforms import warp

        transform = self.transform_of_points(outputs["mapped_points"])
        image = np.asarray(warp(Image(jnp.asarray(self.pair.moving), self.pair.moving_affine), transform, self.grid).data)
        check = {"max_abs_diff_warped": float(np.max(np.abs(image - outputs["warped"]))),
                 "moving_max_abs": float(np.max(np.abs(self.pair.moving)))}
        if "warped_seg" in outputs:
            labels = warp(Image(jnp.asarray(self.pair.moving_seg, jnp.float32), self.pair.moving_affine), transform, self.grid, order=0)
            check["labels_agree_pct"] = 100.0 * float(np.mean(np.rint(np.asarray(labels.data)).astype(np.int32) == outputs["warped_seg"]))
        return check


# =============================================================================== report


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def _secs(value):
    return "" if value is None else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _machine(threads) -> dict:
    from benchmarks._timing import machine_info

    info = machine_info()
    info["cores_available"] = threads
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    for dist in ("antspyx", "fireants", "SimpleITK", "optax", "syntx"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    return info


def render(result) -> str:
    from benchmarks._timing import code_line, cpu_label

    m = result["machine"]
    lines = [
        f"# Pairwise registration ({'quick' if result['settings']['quick'] else 'full'})",
        "",
        f"- machine: {cpu_label(m)} ({m['machine']}), {m['cores_available']} cores available "
        f"(os.cpu_count() = {m['cpu_count']}), {m.get('mem_total_gib', '?')} GiB RAM; {result['started']}",
        f"- software: jax {m['jax']} (jaxlib {m['jaxlib']}, {', '.join(m['jax_devices'])}), antspyx {m['antspyx']}, "
        f"fireants {m['fireants']}, syntx {m.get('syntx')}, torch {m['torch']}, python {m['python']}",
        *([f"- accelerators: JAX (jaxreg) on {m.get('jax_device_kind') or 'the CPU'}; FireANTs on "
           f"{m.get('torch_cuda_device', 'the GPU') if result['settings'].get('torch_device') == 'cuda' else 'the CPU'}; "
           "ANTs on the CPU"] if m.get("jax_device_kind") or m.get("torch_cuda_device") else []),
        code_line(result),
        f"- inputs: {result['settings']['inputs']}",
        "- protocol: each method runs alone in a fresh process (`--worker`). **wall s**: the registration call only "
        "(jaxreg `register()` until every output array is ready, tracing and XLA compilation included; "
        "`ants.registration()`, which writes its transform files; FireANTs affine (not for fireants-greedy) + greedy `optimize()` and the warped "
        "image; `syntx.syn()`, which also writes its transform files and warps both images; elastix's `elastix_registration_method()` and its warped image), not the imports or data loading. **compile s** / **run s**: jaxreg's `Result.compile_seconds` "
        "(lower + compile of every pyramid level) and `Result.run_seconds` (the compiled levels running); the rest of "
        "wall is eager work (pyramids, the inverse, the final warp). **jaxreg-cached**: JAX persistent compilation cache "
        "in a fresh folder (with jaxreg's traced programs kept beside it), filled by one process, then a second "
        "fresh process is timed (reported); **jaxreg-fine** the same with preset `brain-mri-fine` (a last level at full "
        "resolution), **jaxreg-bspline** the same with `deformable=\"bspline\"` (the preset's affine stage, then a cubic B-spline "
        "free-form deformation, control points every 5 voxels), **ants-syn-fine** ANTs SyN with `reg_iterations=(40, 20, 10)` "
        "(its default is (40, 20, 0)), **elastix-bspline** elastix's default `affine` and `bspline` parameter maps. "
        "**peak MiB**: peak resident memory (`VmHWM`) of the method's process right after registration (imports "
        "and data included), with the growth during the registration call in brackets (a peak reached while "
        "importing hides a smaller one later: +0).",
        "- scores (all computed here, the same way for every method): **Dice** = mean over the labels of "
        "`jaxreg.metrics.dice(fixed_seg, warped_seg)`, the moving labels warped by the method's own transform with "
        "nearest-neighbour interpolation (labels absent from both maps left out); **before** = the moving labels "
        "resampled on the fixed grid through the identity. **HD95** = mean over labels of "
        "`jaxreg.metrics.hausdorff_distance(percentile=95)` in mm (labels missing from either map left out). "
        "**NCC** = Pearson correlation of the fixed image and the warped moving image (linear interpolation) "
        "over the stated mask. **% folds** = % of fixed-grid voxels where the Jacobian determinant of the whole "
        "transform (affine and deformable) is <= 0, by `jaxreg.transforms.jacobian_determinant` (central "
        "differences in mm) -- for ANTs and syntx on their `fwdtransforms` files read by `jaxreg.itk.read_transforms`, for "
        "FireANTs on the world points its `get_warped_coordinates` maps the fixed voxels to, for elastix on transformix's "
        "deformation field. "
        f"**× {REFERENCE}** = wall / {REFERENCE} wall of the same direction; **ΔDice**, **ΔNCC** = method - {REFERENCE}.",
        "",
    ]
    for case in result["cases"]:
        lines += [f"## {case['case']}", ""]
        if "skipped" in case:
            lines += [f"skipped: {case['skipped']}", ""]
            continue
        lines += [f"{case['description']}", ""]
        by_label = any("dice" in r.get("before", {}) for r in case["rows"])
        if by_label:
            headers = ["method", "moving→fixed", "Dice before", "Dice after", f"ΔDice vs {REFERENCE}", "HD95 before", "HD95 after"]
        else:
            headers = ["method", "moving→fixed", "NCC before", "NCC after", f"ΔNCC vs {REFERENCE}"]
        headers += ["% folds", "wall s", "compile s", "run s", "peak MiB", f"× {REFERENCE} wall", "note"]
        rows = []
        for r in case["rows"]:
            s, before = r.get("scores", {}), r.get("before", {})
            peak = r.get("peak_rss_mib")
            peak_text = "" if peak is None else f"{peak:.0f} (+{peak - (r.get('rss_before_mib') or peak):.0f})"
            if by_label:
                quality = [_fmt(before.get("dice"), ".3f"), _fmt(s.get("dice"), ".3f"), _fmt(r.get("delta_vs_reference"), "+.3f"),
                           _fmt(before.get("hd95"), ".2f"), _fmt(s.get("hd95"), ".2f")]
            else:
                quality = [_fmt(before.get("ncc"), ".3f"), _fmt(s.get("ncc"), ".3f"), _fmt(r.get("delta_vs_reference"), "+.3f")]
            note = r.get("note", "")
            if r["method"] in CACHED_METHODS and r.get("cache_fill"):
                note = (note + "; " if note else "") + f"cache-filling run: wall {r['cache_fill']['wall_s']:.1f} s, compile {r['cache_fill']['compile_s']:.1f} s"
            rows.append([r["method"], r["direction"], *quality, _fmt(s.get("folds_pct"), ".3f"), _secs(r.get("wall_s")),
                         _secs(r.get("compile_s")), _secs(r.get("run_s")), peak_text,
                         _fmt(r.get("wall_vs_reference"), ".2f"), note])
        from benchmarks._timing import markdown_table

        lines += [markdown_table(headers, rows), ""]
        checks = [r for r in case["rows"] if "ants_jacobian" in r.get("scores", {})]
        for r in checks:
            c = r["scores"]["ants_jacobian"]
            lines.append(
                f"- ANTs Jacobian check ({r['direction']}): `ants.create_jacobian_determinant_image(fixed, fwdtransforms[0])` "
                f"gives {c['folds_pct_warp_only']:.3f} % folds; of the composite field (`apply_transforms(..., compose=)`, "
                f"warp and affine) {c['folds_pct_composite']:.3f} %; median ratio composite / warp-only "
                f"{c['median_composite_over_warp_only']:.4f} vs det(affine) {_fmt(c.get('affine_det'), '.4f')}; "
                f"|composite - jaxreg's determinant| median {c['median_abs_diff_composite_vs_jaxreg']:.2e}, "
                f"99th percentile {c['p99_abs_diff_composite_vs_jaxreg']:.2e}."
            )
        fields = [r for r in case["rows"] if "field_check" in r.get("scores", {})]
        for r in fields:
            c = r["scores"]["field_check"]
            agree = f"; labels warped by jaxreg through it agree with transformix's at {c['labels_agree_pct']:.3f} % of voxels" \
                if "labels_agree_pct" in c else ""
            lines.append(
                f"- elastix field check ({r['direction']}): the moving image warped by jaxreg through transformix's deformation "
                f"field differs from elastix's own warped image by at most {c['max_abs_diff_warped']:.2e} "
                f"(image values up to {c['moving_max_abs']:.3g}){agree}."
            )
        if checks or fields:
            lines.append("")
    return "\n".join(lines)


CASE_TEXT = {
    "oasis3d": "OASIS OAS1 0001 and 0002 `aligned_norm` (160×192×224, 1 mm, affinely pre-aligned), both directions; "
               "Dice and HD95 over labels 1..35 of `aligned_seg35`.",
    "oasis2d": "The `slice_norm` 2-D slices of the same two brains (160×192); Dice and HD95 over the labels of "
               "`slice_seg24` present in both maps.",
    "headct": "ITKElastix's 2-D head CT pair (256×256); jaxreg preset `ct`; NCC inside `CT_2D_head_fixed_mask`.",
    "brain2mm": "FireANTs' two unaligned 2 mm brains `atlas_2mm_1001_3` (moving) onto `atlas_2mm_1000_3` (fixed), "
                "96×116×128, intensities as stored (up to ~3500, background noise of about ±1); NCC over the whole "
                "fixed grid.",
}


def compare(rows):
    """Fill wall_vs_reference and delta_vs_reference against REFERENCE of the same direction."""
    reference = {r["direction"]: r for r in rows if r["method"] == REFERENCE and r.get("wall_s")}
    for r in rows:
        ref = reference.get(r["direction"])
        if ref is None or not r.get("wall_s"):
            continue
        r["wall_vs_reference"] = r["wall_s"] / ref["wall_s"]
        key = "dice" if "dice" in ref.get("scores", {}) else "ncc"
        if key in r.get("scores", {}) and key in ref.get("scores", {}):
            r["delta_vs_reference"] = r["scores"][key] - ref["scores"][key]


def run_case(case, args, threads, workdir, skipped_methods) -> dict:
    factor = QUICK_FACTOR if args.quick else 1
    try:
        pairs = case_pairs(case, args.data, factor)
    except FileNotFoundError as e:
        print(f"[{case}] skipped: {e}", file=sys.stderr, flush=True)
        return {"case": case, "skipped": str(e)}
    record = {"case": case, "description": CASE_TEXT[case], "rows": []}
    for p, pair in enumerate(pairs):
        folder = os.path.join(workdir, case, f"pair{p}")
        os.makedirs(folder, exist_ok=True)
        inputs = os.path.join(folder, "inputs.npz")
        save_inputs(pair, inputs)
        scorer = Scorer(pair, hd95=not args.no_hd95)
        pair_info = {"shape": list(pair.fixed.shape), "spacing": [float(s) for s in scorer.spacing],
                     "labels": list(pair.labels), "ncc_mask": pair.mask_name or None, "preset": pair.preset or "brain-mri"}
        record.setdefault("pairs", {})[pair.direction] = pair_info
        for method in args.methods:
            row = {"method": method, "direction": pair.direction, "before": scorer.before}
            if method in skipped_methods:
                row["note"] = f"skipped: {skipped_methods[method]}"
                record["rows"].append(row)
                continue
            if method == "jaxreg-fine" and pair.preset not in FINE_PRESETS:
                row["note"] = f"not run: preset {pair.preset!r} already ends at full resolution"
                record["rows"].append(row)
                continue
            print(f"[{case} {pair.direction}] {method} ...", file=sys.stderr, flush=True)
            result = run_method(method, pair, inputs, os.path.join(folder, method), args, threads)
            row.update({k: v for k, v in result.items() if k not in ("skipped", "error")})
            if "skipped" in result:
                skipped_methods[method] = result["skipped"]
                row["note"] = f"skipped: {result['skipped']}"
            elif "error" in result:
                row["note"] = f"error: {result['error']}"
            else:
                try:
                    row["scores"] = scorer.score(method, result)
                except Exception as e:  # a peer's odd output must not end the run
                    traceback.print_exc()
                    row["note"] = f"scoring failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            record["rows"].append(row)
            s = row.get("scores", {})
            quality = f"Dice {s['dice']:.3f}" if "dice" in s else f"NCC {s['ncc']:.3f}" if "ncc" in s else ""
            print(f"    wall {_fmt(row.get('wall_s'), '.1f')} s  compile {_fmt(row.get('compile_s'), '.1f')} s  {quality}  "
                  f"folds {_fmt(s.get('folds_pct'), '.3f')} %  {row.get('note', '')}", file=sys.stderr, flush=True)
    compare(record["rows"])
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"inputs downsampled by {QUICK_FACTOR}, about half the iterations")
    parser.add_argument("--only", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for pairwise.json and pairwise.md")
    parser.add_argument("--data", default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--no-hd95", action="store_true", help="skip HD95 (the slowest score on full-size 3-D labels)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per method run (default 7200, quick 1200)")
    parser.add_argument("--threads", type=int, default=None, help="threads for ANTs/FireANTs (default: cores available)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (inputs, outputs, logs, transforms)")
    parser.add_argument("--torch-device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where FireANTs runs (auto: the GPU where torch sees one)")
    parser.add_argument("--tag", default="", help="results file suffix: --tag gpu writes pairwise-gpu.json and .md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)

    for name, allowed in (("only", CASES), ("methods", METHODS)):
        chosen = [k.strip() for k in getattr(args, name).split(",") if k.strip()]
        unknown = sorted(set(chosen) - set(allowed))
        if unknown:
            parser.error(f"unknown --{name} {unknown}; choose from {list(allowed)}")
        setattr(args, name, [k for k in allowed if k in chosen])
    args.timeout = args.timeout or (1200.0 if args.quick else 7200.0)
    threads = args.threads or len(os.sched_getaffinity(0))

    from benchmarks._timing import code_version, torch_device, write_atomic

    try:
        args.torch_device = torch_device(args.torch_device)  # 'auto' decided once, for every worker
    except ValueError as err:
        parser.error(str(err))

    start = time.perf_counter()
    result = {
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": _machine(threads),
        "code": code_version(REPO),
        "load_average_start": os.getloadavg(),
        "settings": {
            "quick": args.quick, "cases": args.only, "methods": args.methods, "reference": REFERENCE,
            "hd95": not args.no_hd95, "timeout_s": args.timeout, "threads": threads, "torch_device": args.torch_device,
            "inputs": (f"downsampled by {QUICK_FACTOR} (Gaussian sigma {QUICK_FACTOR / 2} voxels, then every "
                       f"{QUICK_FACTOR}nd voxel; labels every {QUICK_FACTOR}nd voxel); jaxreg steps halved, "
                       f"ANTs {ANTS_QUICK}, FireANTs {FIREANTS_QUICK}, syntx {SYNTX_QUICK}") if args.quick else "full resolution, default settings",
            "fireants": FIREANTS,
            "syntx": dict(SYNTX, quick=SYNTX_QUICK if args.quick else None),
        },
        "cases": [],
    }
    os.makedirs(args.out, exist_ok=True)
    stem = "pairwise" + (f"-{args.tag}" if args.tag else "")
    json_path, md_path = os.path.join(args.out, f"{stem}.json"), os.path.join(args.out, f"{stem}.md")
    skipped_methods = {}
    with work_folder("jaxreg-pairwise-", keep=args.keep) as workdir:
        for case in args.only:
            result["cases"].append(run_case(case, args, threads, workdir, skipped_methods))
            # Rewritten after every case, so that a run killed later still leaves its results.
            result["total_s"] = time.perf_counter() - start
            result["load_average_end"] = os.getloadavg()
            write_atomic(json_path, json.dumps(result, indent=1, default=str) + "\n")
            write_atomic(md_path, render(result))
    print(render(result))
    print(f"wrote {json_path} and {md_path} in {result['total_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

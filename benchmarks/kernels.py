"""Kernel benchmarks: jaxreg next to its peers, in one run, on the same data.

    python benchmarks/kernels.py                  # everything (several minutes)
    python benchmarks/kernels.py --quick          # two smallest sizes per kernel, N=3
    python benchmarks/kernels.py --only warp,smooth --out /tmp/k.json

Writes ``benchmarks/results/kernels.json`` and ``kernels.md`` (next to ``--out``) and prints
the table. Every implementation gets its natural input layout, prepared outside the timed
call: jaxreg index coordinates ``(..., d)``; jax.scipy a list of ``d`` arrays; torch a
``(1, ..., d)`` grid normalized to [-1, 1] in x, y, z order (``align_corners=True``).
Warp gradients are taken w.r.t. the coordinates (identity + displacement), which equals the
gradient w.r.t. the displacement. A peer that is missing or fails is a row with a note.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._timing import (
    RETAINED_NOTE,
    ROTATION_NOTE,
    block,
    code_line,
    code_version,
    compile_jax,
    cpu_label,
    dispatch_floor,
    dispatch_text,
    machine_info,
    markdown_table,
    memory_bandwidth,
    device_bandwidth,
    results_suffix,
    time_in_rounds,
    torch_device,
    write_atomic,
)
from jaxreg import filters
from jaxreg.losses.similarity import lncc, mutual_information
from jaxreg.nn import conv as jaxreg_conv
from jaxreg.runtime import retain_host_memory
from jaxreg.sampling import sample
from jaxreg.transforms import Displacement, Velocity, compose

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = F = None
try:
    import scipy.ndimage as ndi
except ImportError:
    ndi = None
try:
    import SimpleITK as sitk
except ImportError:
    sitk = None

OASIS = (160, 192, 224)
SIZES_3D = [(64, 64, 64), (128, 128, 128), OASIS]
SIZES = {
    "warp": [(64, 64), (256, 256)] + SIZES_3D,
    "cubic": [(64, 64), (256, 256)] + SIZES_3D,
    "svf": SIZES_3D,
    "compose": SIZES_3D,
    "smooth": SIZES_3D,
    "lncc": SIZES_3D,
    "mi": SIZES_3D,
    "conv": [(32, 32, 32), (64, 64, 64)],
}
DATA = (
    "image: white noise smoothed with a Gaussian (sigma 2 voxels), scaled to max |I| = 1; "
    "displacements/velocities: white noise per component smoothed with sigma 4 voxels, "
    "scaled to max |u_k| = 2 voxels; conv3d: standard normal input, weights 0.1 x standard normal; float32, seeds fixed"
)
WARP_BYTES = "warp fwd GB/s = (image.nbytes + coords.nbytes + output.nbytes) / median time, float32"


class Skip(Exception):
    """A peer that cannot run here."""


def need(module, name):
    if module is None:
        raise Skip(f"{name} not installed")


# ----------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=8)
def smooth_noise(shape, channels, sigma, amplitude, seed):
    """Cached (read-only) smoothed white noise ``(*shape[, channels])`` with max |x| = amplitude."""
    noise = np.random.default_rng(seed).standard_normal(tuple(shape) + ((channels,) if channels else ()), np.float32)
    smooth = jax.jit(lambda x: filters.gaussian_smooth(x, sigma, ndim=len(shape)))  # one program, not ~100 eager ops
    x = np.asarray(smooth(noise))
    x = x * np.float32(amplitude / np.abs(x).max())
    x.flags.writeable = False
    return x


def identity(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), axis=-1)


def image_of(shape, seed=0):
    return smooth_noise(shape, 0, 2.0, 1.0, seed)


def field_of(shape, seed=1):
    return smooth_noise(shape, len(shape), 4.0, 2.0, seed)


# ---------------------------------------------------------------------------- torch layout

#: Where the torch peers run: set by ``main`` from ``--torch-device`` (a GPU where torch sees
#: one, unless told otherwise).
TORCH_DEVICE = "cpu"


def t_(x):
    return torch.from_numpy(np.array(x, np.float32)).to(TORCH_DEVICE)  # a writable, contiguous copy


def t_np(tensor):
    """A torch result as a numpy array, from whichever device it is on."""
    return tensor.detach().cpu().numpy()


def t_scale(shape):
    return np.array([2.0 / (n - 1) for n in shape], np.float32)


def t_grid(coords):
    """Index coordinates ``(..., d)`` -> grid_sample's ``(1, ..., d)``, normalized, x-y-z order."""
    return t_((coords * t_scale(coords.shape[:-1]) - 1.0)[..., ::-1])[None]


def t_grad_to_index(grad):
    """grid_sample grid gradient -> gradient w.r.t. index coordinates ``(..., d)``."""
    g = t_np(grad[0])[..., ::-1]
    return g * t_scale(g.shape[:-1])


def t_first(field):
    """``(*spatial, d)`` -> ``(1, d, *spatial)``."""
    return t_(np.moveaxis(field, -1, 0))[None]


def t_last(field):
    return np.moveaxis(t_np(field[0]), 0, -1)


def t_sample_field(field, index, padding):
    """Sample a channels-first field at channels-first index coordinates (voxelmorph style)."""
    d = index.shape[1]
    scale = torch.from_numpy(t_scale(index.shape[2:])).to(index.device).view(1, d, *[1] * d)
    grid = (index * scale - 1.0).permute(0, *range(2, d + 2), 1).flip(-1)
    return F.grid_sample(field, grid, mode="bilinear", padding_mode=padding, align_corners=True)


def t_box(x, radius):
    """Zero-padded box sums of ``(1, C, *spatial)`` along every axis, as 1-D convolutions."""
    d, channels = x.ndim - 2, x.shape[1]
    conv = {2: F.conv2d, 3: F.conv3d}[d]
    for axis in range(d):
        shape, pad = [1] * d, [0] * d
        shape[axis], pad[axis] = 2 * radius + 1, radius
        x = conv(x, torch.ones(channels, 1, *shape, device=x.device), padding=tuple(pad), groups=channels)
    return x


def torch_backward(leaf, loss_fn, convert):
    """An eager callable: forward, backward, gradient of ``leaf`` converted to numpy layout."""
    leaf.requires_grad_(True)

    def run():
        leaf.grad = None
        loss_fn().backward()
        return leaf.grad

    return ("eager", run, (), convert)


def torch_forward(fn, convert):
    def run():
        with torch.no_grad():
            return fn()

    return ("eager", run, (), convert)


def jax_case(f, *args, convert=np.asarray):
    return ("jax", f, jax.tree_util.tree_map(jnp.asarray, args), convert)


# ------------------------------------------------------------------------------ kernels


def warp_cases(shape, grad):
    """Linear warp, mode constant (zeros), loss = mean(warped**2) for the gradient."""
    image = image_of(shape)
    coords = identity(shape) + field_of(shape)
    coord_list = list(np.moveaxis(coords, -1, 0))

    def ours(img, c):
        return sample(img, c, order=1, mode="constant")

    def theirs(img, cs):
        return jax.scipy.ndimage.map_coordinates(img, cs, order=1, mode="constant")

    stack = np.asarray
    if grad:
        ours = jax.grad(lambda img, c, f=ours: jnp.mean(f(img, c) ** 2), argnums=1)
        theirs = jax.grad(lambda img, cs, f=theirs: jnp.mean(f(img, cs) ** 2), argnums=1)
        stack = lambda gs: np.stack([np.asarray(g) for g in gs], axis=-1)  # noqa: E731

    def torch_case():
        need(torch, "torch")
        img, grid = t_(image)[None, None], t_grid(coords)
        run = lambda: F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True)  # noqa: E731
        if grad:
            return torch_backward(grid, lambda: run().square().mean(), t_grad_to_index)
        return torch_forward(run, lambda out: t_np(out[0, 0]))

    def sitk_case():
        need(sitk, "SimpleITK")
        # GetImageFromArray reads numpy axes in reverse (index x = last axis), so the
        # displacement's components are reversed to ITK's x, y(, z) order.
        moving = sitk.GetImageFromArray(np.array(image, np.float32))
        field = sitk.GetImageFromArray(np.array((coords - identity(shape))[..., ::-1], np.float64), isVector=True)
        transform = sitk.DisplacementFieldTransform(field)
        run = lambda: sitk.Resample(moving, moving, transform, sitk.sitkLinear, 0.0)  # noqa: E731
        note = ("max rel diff from points outside [0, n-1]: ITK reads up to half a voxel beyond the edge "
                "(edge value), jaxreg's constant mode fades to 0 there; inside, the outputs agree to float32 rounding")
        return ("eager", run, (), sitk.GetArrayFromImage, note)

    nbytes = None if grad else image.nbytes + coords.nbytes + image.nbytes
    cases = [
        ("jaxreg", lambda: jax_case(ours, image, coords)),
        ("jax.scipy map_coordinates", lambda: jax_case(theirs, image, coord_list, convert=stack)),
        ("torch grid_sample", torch_case),
    ]
    # jax.scipy on jaxreg's layout: one (..., d) array, split inside the program; its own
    # row takes d separate arrays, which suit its element gathers (each reads one
    # contiguous plane per axis). With the gradient, XLA also fuses those gathers into the
    # loop that writes the interleaved gradient.
    def interleaved(img, c):
        return jax.scipy.ndimage.map_coordinates(img, [c[..., k] for k in range(c.shape[-1])], order=1, mode="constant")

    if grad:
        interleaved = jax.grad(lambda img, c, f=interleaved: jnp.mean(f(img, c) ** 2), argnums=1)
    cases.insert(2, ("jax.scipy map_coordinates, coords (..., d)", lambda: jax_case(interleaved, image, coords)))
    if not grad:
        cases.append(("SimpleITK Resample (displacement field)", sitk_case))
    return nbytes, cases


def cubic_cases(shape):
    """Cubic B-spline sample with prefilter, mode mirror (scipy's prefilter boundary too)."""
    image = image_of(shape)
    coords = identity(shape) + field_of(shape)
    coord_list = list(np.moveaxis(coords, -1, 0))

    def scipy_case():
        need(ndi, "scipy")
        stacked = np.ascontiguousarray(np.moveaxis(coords, -1, 0))
        run = lambda: ndi.map_coordinates(image, stacked, order=3, mode="mirror", prefilter=True)  # noqa: E731
        return ("eager", run, (), np.asarray)

    return None, [
        ("jaxreg", lambda: jax_case(lambda i, c: sample(i, c, order=3, mode="mirror"), image, coords)),
        (
            "jax.scipy map_coordinates",
            lambda: jax_case(lambda i, cs: jax.scipy.ndimage.map_coordinates(i, cs, order=3, mode="mirror"), image, coord_list),
        ),
        ("scipy.ndimage map_coordinates", scipy_case),
    ]


def svf_cases(shape, grad=False):
    """Velocity(v).exp(), 7 squarings (border mode) vs voxelmorph's VecInt with grid_sample;
    with ``grad``, the gradient of mean(exp(v)**2) with respect to v (what an SVF
    registration or a diffeomorphic network differentiates: the field is both the image
    read and the points it is read at, so the backward scatters)."""
    velocity = field_of(shape, seed=2)

    def ours(v):
        return Velocity(v, steps=7).exp().field

    if grad:
        ours = jax.grad(lambda v, f=ours: jnp.mean(f(v) ** 2))

    def torch_case():
        need(torch, "torch")
        v, ident = t_first(velocity), t_first(identity(shape))

        def run():
            u = v / 2.0**7
            for _ in range(7):
                u = u + t_sample_field(u, ident + u, "border")
            return u

        if grad:
            return torch_backward(v, lambda: run().square().mean(), t_last)
        return torch_forward(run, t_last)

    return None, [
        ("jaxreg", lambda: jax_case(ours, velocity)),
        ("torch grid_sample (voxelmorph VecInt)", torch_case),
    ]


def compose_cases(shape):
    """Displacement field of compose(D(u1), D(u2)): u2 + u1(x + u2(x)), border mode."""
    u1, u2 = field_of(shape, seed=3), field_of(shape, seed=4)

    def ours(a, b):
        inner = Displacement(b)
        grid = inner.grid
        return compose(Displacement(a), inner).mapped_points(grid) - grid.points()

    def torch_case():
        need(torch, "torch")
        a, b, ident = t_first(u1), t_first(u2), t_first(identity(shape))
        return torch_forward(lambda: b + t_sample_field(a, ident + b, "border"), t_last)

    return None, [("jaxreg", lambda: jax_case(ours, u1, u2)), ("torch grid_sample", torch_case)]


def smooth_cases(shape):
    """Gaussian smoothing, sigma 2, truncate 4 (17 taps), mode nearest."""
    image = image_of(shape)

    def scipy_case():
        need(ndi, "scipy")
        return ("eager", lambda: ndi.gaussian_filter(image, 2.0, mode="nearest", truncate=4.0), (), np.asarray)

    def torch_case():
        need(torch, "torch")
        taps = t_(filters.gaussian_kernel_1d(2.0))
        r, d, x = (len(taps) - 1) // 2, len(shape), t_(image)[None, None]

        def run():
            y = F.pad(x, (r,) * 2 * d, mode="replicate")
            for axis in range(d):
                view = [1] * d
                view[axis] = -1
                y = F.conv3d(y, taps.view(1, 1, *view))
            return y

        return torch_forward(run, lambda out: t_np(out[0, 0]))

    def sitk_discrete():
        need(sitk, "SimpleITK")
        img = sitk.GetImageFromArray(np.array(image, np.float32))
        # ITK's discrete Gaussian kernel (Bessel, not the sampled Gaussian), capped at 17 taps.
        run = lambda: sitk.DiscreteGaussian(img, 4.0, 17, 1e-6, False)  # noqa: E731
        return ("eager", run, (), sitk.GetArrayFromImage)

    def sitk_recursive():
        need(sitk, "SimpleITK")
        img = sitk.GetImageFromArray(np.array(image, np.float32))
        run = lambda: sitk.SmoothingRecursiveGaussian(img, 2.0)  # noqa: E731  (IIR: cost independent of sigma)
        return ("eager", run, (), sitk.GetArrayFromImage)

    return None, [
        ("jaxreg", lambda: jax_case(lambda i: filters.gaussian_smooth(i, 2.0), image)),
        ("scipy.ndimage gaussian_filter", scipy_case),
        ("torch conv3d separable", torch_case),
        ("SimpleITK DiscreteGaussian", sitk_discrete),
        ("SimpleITK SmoothingRecursiveGaussian", sitk_recursive),
    ]


def lncc_cases(shape):
    """LNCC, radius 4, box window: gradient w.r.t. the warped image (jaxreg's formula in torch)."""
    a, b = image_of(shape, seed=0), image_of(shape, seed=5)
    eps, radius = 1e-5, 4

    def torch_case():
        need(torch, "torch")
        ta, tb = t_(a), t_(b)

        def loss():
            x, y = ta - ta.mean(), tb - tb.mean()
            stats = torch.stack([torch.ones_like(x), x, y, x * x, y * y, x * y])[None]
            s = t_box(stats, radius)[0]
            inv = 1.0 / s[0].clamp_min(np.finfo(np.float32).tiny)
            mean_x, mean_y = s[1] * inv, s[2] * inv
            var_x = (s[3] * inv - mean_x * mean_x).clamp_min(0.0)
            var_y = (s[4] * inv - mean_y * mean_y).clamp_min(0.0)
            cov = s[5] * inv - mean_x * mean_y
            return 1.0 - ((cov + eps) / torch.sqrt((var_x + eps) * (var_y + eps))).mean()

        return torch_backward(ta, loss, t_np)

    return None, [
        ("jaxreg", lambda: jax_case(jax.grad(lncc(radius=radius, eps=eps)), a, b)),
        ("torch conv separable box", torch_case),
    ]


def mi_cases(shape):
    """Parzen-window MI, 32 bins: gradient w.r.t. the warped image (jaxreg's formula in torch).

    The torch peer is the textbook form (softmax over the bins, autograd through it); jaxreg
    computes the same weights relative to the nearest bin centre with a closed-form
    derivative, an algorithmic difference that torch code could adopt too.
    """
    a, b = image_of(shape, seed=0), image_of(shape, seed=5)
    bins = 32

    def torch_case():
        need(torch, "torch")
        ta, tb = t_(a), t_(b)
        centres = (torch.arange(bins, dtype=torch.float32, device=TORCH_DEVICE) + 0.5) / bins

        def memberships(x):
            lo, hi = x.detach().min(), x.detach().max()
            unit = ((x - lo) / (hi - lo)).reshape(-1, 1)
            return torch.softmax(-0.5 * ((unit - centres) * (2.0 * bins)) ** 2, dim=-1)

        def entropy(p):
            return -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0).sum()

        def loss():
            joint = memberships(ta).T @ memberships(tb) / ta.numel()
            return entropy(joint) - entropy(joint.sum(1)) - entropy(joint.sum(0))

        return (*torch_backward(ta, loss, t_np),
                "textbook softmax + autograd; jaxreg: weights relative to the nearest centre, closed-form derivative")

    return None, [
        ("jaxreg", lambda: jax_case(jax.grad(mutual_information(bins=bins)), a, b)),
        ("torch softmax + matmul", torch_case),
    ]


CONV_BATCH, CONV_IN, CONV_OUT = 2, 8, 16


def conv_cases(shape):
    """A U-Net layer: 3x3x3 convolution, 8 -> 16 channels, batch 2, 'same' padding; gradient
    of sum(out**2) w.r.t. input and weights. jaxreg's networks (flax ``nnx.Conv``) call
    ``jaxreg.nn.conv.conv_general_dilated``, which on CPU runs a 3-D convolution as a 2-D
    one over depth-stacked channels; XLA's own 3-D convolution is the jax row; torch's
    ``conv3d`` runs oneDNN, on its default NCDHW layout (as torch networks, icon's among
    them, hold their activations) and on ``channels_last_3d``, which picks other kernels."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((CONV_BATCH, *shape, CONV_IN)).astype(np.float32)
    w = (rng.standard_normal((3, 3, 3, CONV_IN, CONV_OUT)) * 0.1).astype(np.float32)

    def gradients(convolution):
        def energy(x, w):
            out = convolution(x, w, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
            return jnp.sum(out**2)

        return jax.grad(energy, argnums=(0, 1))

    ours, theirs = gradients(jaxreg_conv.conv_general_dilated), gradients(jax.lax.conv_general_dilated)

    def torch_case(channels_last=False):
        need(torch, "torch")
        # Contiguous NCDHW, torch's default layout (np.array of a transposed view would keep
        # the view's memory order, channels last, and with it oneDNN's other kernels).
        tx = t_(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
        tw = t_(np.ascontiguousarray(np.transpose(w, (4, 3, 0, 1, 2))))
        if channels_last:
            tx, tw = tx.to(memory_format=torch.channels_last_3d), tw.to(memory_format=torch.channels_last_3d)
        tx.requires_grad_(True)
        tw.requires_grad_(True)

        def run():
            tx.grad, tw.grad = None, None
            (F.conv3d(tx, tw, padding=1) ** 2).sum().backward()
            return tx.grad, tw.grad

        def convert(grads):
            gx, gw = grads
            return np.concatenate([np.moveaxis(t_np(gx), 1, -1).ravel(), np.transpose(t_np(gw), (2, 3, 4, 1, 0)).ravel()])

        return ("eager", run, (), convert)

    flat = lambda grads: np.concatenate([np.asarray(g).ravel() for g in grads])  # noqa: E731
    return None, [
        ("jaxreg", lambda: jax_case(ours, x, w, convert=flat)),
        ("lax conv_general_dilated (3-D)", lambda: jax_case(theirs, x, w, convert=flat)),
        ("torch conv3d", torch_case),
        ("torch conv3d, channels_last_3d", lambda: torch_case(channels_last=True)),
    ]


KERNELS = {
    "warp": [("warp fwd", lambda s: warp_cases(s, grad=False)), ("warp fwd+grad", lambda s: warp_cases(s, grad=True))],
    "cubic": [("cubic fwd (prefilter)", cubic_cases)],
    "svf": [("svf exp (7 squarings)", svf_cases), ("svf exp fwd+grad", lambda s: svf_cases(s, grad=True))],
    "compose": [("compose 2 displacements", compose_cases)],
    "smooth": [("gaussian_smooth sigma 2", smooth_cases)],
    "lncc": [("lncc r=4 box fwd+grad", lncc_cases)],
    "mi": [("mi 32 bins fwd+grad", mi_cases)],
    "conv": [("conv3d 3³ 8→16 ch, batch 2, fwd+grad", conv_cases)],
}


# ------------------------------------------------------------------------------- runner


ROUND_BUDGET_S = 3.0  # fast kernels get more rounds, up to MAX_ROUNDS, within about this time
MAX_ROUNDS = 200


def run_case(kernel, shape, n, nbytes, impls):
    """Build, compile and warm up every implementation, then time them in interleaved rounds
    (:func:`benchmarks._timing.time_in_rounds`): at least ``n`` rounds, more for fast kernels."""
    rows, ready = [], []
    for impl, build in impls:
        row = {"kernel": kernel, "size": "×".join(map(str, shape)), "impl": impl}
        rows.append(row)
        try:
            kind, fn, args, convert, *note = build()
            if note:
                row["note"] = note[0]
            if kind == "jax":
                call, row["compile_s"], row["temp_bytes"] = compile_jax(fn, *args)
            else:
                call = fn
            start = time.perf_counter()
            out = convert(block(call()))  # the warm-up call
            ready.append((row, call, out, time.perf_counter() - start))
        except Skip as e:
            row["note"] = f"skipped: {e}"
        except NotImplementedError as e:
            row["note"] = f"not supported: {str(e).splitlines()[0][:120]}"
        except Exception as e:  # a failing peer must not end the run
            traceback.print_exc()
            row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    if ready:
        one_round = sum(warm for *_, warm in ready)
        rounds = max(n, min(MAX_ROUNDS, int(ROUND_BUDGET_S / max(one_round, 1e-9))))
        times = time_in_rounds([call for _, call, _, _ in ready], rounds)
        for (row, _, _, _), spent in zip(ready, times):
            row.update(n=rounds, median_s=float(np.median(spent)), min_s=min(spent), times_s=spent)
            if nbytes:
                row["gb_per_s"] = nbytes / row["median_s"] / 1e9
        reference = next(((row, out) for row, _, out, _ in ready if row["impl"] == "jaxreg"), None)
        if reference is not None:
            ours, ours_out = reference
            scale = max(float(np.abs(ours_out).max()), 1e-30)
            for row, _, out, _ in ready:
                if row is not ours:
                    row["ratio"] = row["median_s"] / ours["median_s"]
                    row["max_rel_diff"] = float(np.abs(np.asarray(out, np.float64) - ours_out).max()) / scale
    for row in rows:
        print(f"  {kernel:26s} {row['size']:12s} {row['impl']:40s} {_fmt_ms(row.get('median_s'))} ms"
              f"  {row.get('note', '')}", file=sys.stderr, flush=True)
    return rows


def _fmt_ms(seconds):
    if seconds is None:
        return ""
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _fmt(value, spec):
    return None if value is None else format(value, spec)


def render(result) -> str:
    headers = ["kernel", "size", "impl", "compile s", "median ms", "min ms", "peer/jaxreg", "GB/s",
               "XLA temp MiB", "max rel diff", "note"]
    rows = [
        [
            r["kernel"], r["size"], r["impl"], _fmt(r.get("compile_s"), ".2f"), _fmt_ms(r.get("median_s")),
            _fmt_ms(r.get("min_s")), _fmt(r.get("ratio"), ".2f"), _fmt(r.get("gb_per_s"), ".1f"),
            _fmt(None if r.get("temp_bytes") is None else r["temp_bytes"] / 2**20, ".1f"),
            _fmt(r.get("max_rel_diff"), ".1e"), r.get("note", ""),
        ]
        for r in result["rows"]
    ]
    m, bw, device_bw = result["machine"], result["memory_bandwidth"], result.get("device_bandwidth")
    torch_on = result["settings"].get("torch_device") or "cpu"
    if torch_on == "cuda" and m.get("torch_cuda_device"):
        torch_on += f" ({m['torch_cuda_device']})"
    accelerator = f" ({m['jax_device_kind']})" if m.get("jax_device_kind") else ""
    return "\n".join([
        f"# Kernel benchmarks ({'quick' if result['settings']['quick'] else 'full'})",
        "",
        f"- machine: {cpu_label(m)} ({m['machine']}), os.cpu_count() = {m['cpu_count']}, "
        f"jax {m['jax']} on {', '.join(m['jax_devices'])}{accelerator}, torch {m['torch']} on {torch_on}, "
        f"scipy {m['scipy']}, SimpleITK {m.get('SimpleITK')}; {result['started']}",
        code_line(result, total=False),
        f"- memory bandwidth: {bw['gb_per_s']:.1f} GB/s ({bw['method']})",
        *([f"- device memory bandwidth: {device_bw['gb_per_s']:.0f} GB/s ({device_bw['method']}); the GB/s column "
           "of JAX rows compares with this, scipy's and SimpleITK's run on the CPU"] if device_bw else []),
        *[f"- {text}" for text in [dispatch_text(result.get("dispatch"))] if text],
        f"- {WARP_BYTES}",
        *([f"- allocator: {RETAINED_NOTE}"] if result["settings"].get("retain_host_memory") else []),
        f"- data: {DATA}",
        "- protocol: JAX compile = `jax.jit(f).lower(...).compile()` (tracing included); torch/scipy eager. "
        "Every implementation of a row group gets 1 warm-up call, then N timed rounds in which each is called once, "
        "in turn (N = `n` in the JSON: at least 5, or 3 at 160×192×224, and more for fast kernels, up to "
        f"{MAX_ROUNDS} or about {ROUND_BUDGET_S:.0f} s), each call ended by `block_until_ready`, so that a slow "
        "spell of the machine hits every implementation alike"
        + (f"; {ROTATION_NOTE}. " if result["settings"].get("timing") == "rotated rounds" else ". ") +
        "peer/jaxreg = peer median / jaxreg median (> 1: jaxreg faster). "
        "max rel diff = max |peer - jaxreg| / max |jaxreg| over the kernel's output (gradients for fwd+grad rows).",
        "",
        markdown_table(headers, rows),
        "",
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two smallest sizes per kernel, N=3")
    parser.add_argument("--only", default=",".join(KERNELS), help=f"comma-separated subset of {','.join(KERNELS)}")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/kernels.json; "
                        "kernels-gpu.json where JAX computes on a GPU)")
    parser.add_argument("--torch-device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where the torch peers run (auto: the GPU where torch sees one)")
    parser.add_argument("--retain-host-memory", action="store_true",
                        help="call jaxreg.retain_host_memory() first: glibc keeps freed memory for every "
                        "implementation in this process, torch's too (default: the C library's defaults)")
    args = parser.parse_args(argv)
    retained = retain_host_memory() if args.retain_host_memory else None
    if args.retain_host_memory and not retained:
        parser.error("--retain-host-memory: the allocator settings could not be applied here (not glibc, or JAX started)")
    if args.out is None:
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"kernels{results_suffix()}.json")
    global TORCH_DEVICE
    TORCH_DEVICE = torch_device(args.torch_device) if torch is not None else "cpu"
    only = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = sorted(set(only) - set(KERNELS))
    if unknown:
        parser.error(f"unknown kernel(s) {unknown}; choose from {list(KERNELS)}")
    if torch is not None:
        torch.set_num_threads(os.cpu_count())
    if sitk is not None:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(os.cpu_count())

    start = time.perf_counter()
    result = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {**machine_info(), "SimpleITK": sitk.Version_VersionString() if sitk is not None else None},
        "code": code_version(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        "load_average_start": os.getloadavg(),
        "memory_bandwidth": memory_bandwidth(),
        "device_bandwidth": device_bandwidth(),
        "dispatch": dispatch_floor(),
        "settings": {"quick": args.quick, "kernels": only, "data": DATA, "warp_bytes": WARP_BYTES, "timing": "rotated rounds",
                     "torch_threads": torch.get_num_threads() if torch is not None else None,
                     "torch_device": TORCH_DEVICE if torch is not None else None,
                     "simpleitk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() if sitk is not None else None,
                     "retain_host_memory": bool(retained)},
        "rows": [],
    }
    md_path = os.path.splitext(args.out)[0] + ".md"
    for name in only:
        for kernel, cases in KERNELS[name]:
            for shape in sorted(SIZES[name], key=np.prod)[: 2 if args.quick else None]:
                # Fewer than 5 rounds let one slow spell of the shared host set the median
                # (a 3-round warp of 160x192x224: 58.9, 58.2, 21.6 ms; 22 ms in 8 rounds).
                n = 3 if args.quick else 5
                nbytes, impls = cases(shape)
                result["rows"] += run_case(kernel, shape, n, nbytes, impls)
        # Rewritten after every kernel, so that a run killed later still leaves its results.
        result["total_s"] = time.perf_counter() - start
        result["load_average_end"] = os.getloadavg()
        write_atomic(args.out, json.dumps(result, indent=1) + "\n")
        write_atomic(md_path, render(result))
    print(render(result))
    print(f"wrote {args.out} and {md_path} in {result['total_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

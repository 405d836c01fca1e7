"""icon_registration (PyTorch) side of the MNIST multistep experiment.

    python benchmarks/peers/icon_mnist.py --steps 2000 --out results/icon_mnist.json
    python benchmarks/peers/icon_mnist.py --steps 200 --loss gradicon --lmbda 0.75 --out /tmp/icon

Runs in its own process (when ``benchmarks/amortized.py`` starts it, taking turns with the
jaxreg runs every 50 training steps; see ``benchmarks/_turns.py``) and writes one JSON (``--out``: a ``.json`` path, or a folder
that receives ``metrics.json``). It is the peer of ``examples/mnist_multistep.py``; both
follow one specification, so that steps per second, accuracy and the objective compare:

Data. ``np.load(--data)`` (``mnist.npz``; ``x_train`` is grouped by digit), uint8 / 255 as
float32. Training images: the fives of ``x_train[perm]`` with
``perm = np.random.default_rng(seed).permutation(len(x_train))``. Evaluation: the fives,
then the sevens, of ``x_test``; 256 pairs of each drawn by one
``rng = np.random.default_rng(seed + 1)`` (``i = rng.integers(0, n, 256)``,
``j = rng.integers(0, n, 256)``; moving ``images[i]``, fixed ``images[j]``; fives first).
Each training step takes 128 (moving, fixed) pairs drawn with replacement from the training
fives (``torch.Generator`` seeded with ``seed``).

Network. One MLP, ``concat(moving, fixed)`` flattened (1568) -> 50 -> ReLU -> 50 -> ReLU ->
1568, the last layer's weight and bias zero (the untrained network is the identity map),
reshaped to a 2×28×28 displacement in PIXELS (component k along array axis k). icon
represents points in [0, 1] per axis, so the module multiplies by icon's spacing
``1 / (28 - 1)`` before handing the field to ``icon_registration.FunctionFromVectorField``:
the parameters then mean the same as on the jaxreg side, where Adam sees a displacement in
pixels. The same module (shared weights) is applied 8 times by a chain of
``TwoStepRegistration``: ``net = f; net = TwoStepRegistration(net, f)`` seven times. Step
``k`` warps the ORIGINAL moving image with the current map φ, the MLP looks at (warped,
fixed), and the map becomes ``φ ∘ (id + u_k)``; icon's balanced nesting
``TwoStep(TwoStep(..), TwoStep(..))`` would instead re-warp an already warped image in its
second half, which is not the specification.

Loss (``--loss``), with ``--lmbda`` λ given in jaxreg's convention (pixel units) and
converted here to icon's ``lmbda``:

- ``diffusion`` (default λ = 0.05): jaxreg minimises ``SSD + λ·D`` per pair, SSD the mean
  squared difference of warped moving and fixed, ``D(u) = Σ_axes mean_x Σ_k (Δu_k)²``
  (``jaxreg.losses.regularizers.diffusion()`` of the displacement in pixels, forward
  differences). icon's ``DiffusionRegularizedNet`` (a ``BendingEnergyNet``) returns
  ``all_loss = 2·SSD + lmbda·D_icon`` with ``D_icon = n²·Σ_axes mean_{k,x} (Δu_icon,k)²``
  (``n = 28``, the MEAN over the d = 2 components, ``u_icon = u / (n - 1)``). Hence
  ``D = d·(n - 1)²/n² · D_icon = c·D_icon`` with ``c = 2·27²/28² = 1.859694``, and with
  ``lmbda = 2·c·λ`` the loss trained here, ``all_loss / 2``, is ``SSD + λ·D``: the very same
  function of the network's parameters as on the jaxreg side. ``c`` is also measured on a
  random smooth field (icon's ``compute_bending_energy_loss`` against a numpy copy of
  jaxreg's diffusion, and jaxreg's own where importable, after training).
- ``icon``: jaxreg: ``SSD(A∘φ_AB, B) + SSD(B∘φ_BA, A) + λ·mean_x |φ_AB(φ_BA(x)) - x|²``
  (pixels², grid points, one direction). icon's ``InverseConsistentNet`` sums the same two
  similarities and ``lmbda·[mean_{k,x} e_AB,k² + mean_{k,x} e_BA,k²]`` over both directions,
  in [0, 1] units, at grid points jittered by N(0, 1/28²). One direction in pixels is
  ``d·(n - 1)²`` times one icon direction, and icon counts two, so ``lmbda = d·(n - 1)²/2·λ
  = 729·λ`` makes the objectives equal in expectation over the pair order (not exactly:
  icon evaluates at jittered points and both round trips).
- ``gradicon``: jaxreg: the same similarities ``+ λ·mean_x ||D(φ_AB∘φ_BA)(x) - I||_F²``,
  Jacobian by central differences in pixels. icon's ``GradientICON`` takes one direction
  too: ``Σ_j mean_{k,x} (∂_j e_k)²`` by finite differences of step 0.001 in [0, 1] units
  (dimensionless, so no pixel factor), the MEAN over components; hence
  ``lmbda = d·λ = 2·λ`` (equal up to the two finite-difference stencils).

The measured factors (icon term / jaxreg term on random smooth maps) are in the JSON
(``conversion``).

Optimiser Adam, learning rate 1e-3, torch threads = cores. The JSON reports training steps
per second (steps after the first 10), training seconds, the final loss (mean of the last
50 steps, jaxreg's convention), peak resident memory (VmHWM), inference pairs per second
(batches of 256, no gradient), and for ``fives`` and ``sevens``: ``ssd_before/after``,
``dice_before/after`` (digit = intensity > 0.5; Dice of the warped moving mask and the
fixed mask, mean over pairs; the moving image warped bilinearly, then thresholded),
``folded_fraction`` (pixels with Jacobian determinant <= 0 of the final map, central
differences as ``numpy.gradient``) and ``objective_after`` (SSD + λ_obj·D, λ_obj = λ for
``diffusion`` and 0.05 otherwise), all computed here with numpy from the final map in pixels
so that they compare across tools.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "mnist", "mnist.npz")
if REPO not in sys.path:  # run as a script: the turns it shares the machine by live in benchmarks/
    sys.path.insert(0, REPO)
from benchmarks._turns import Turn  # noqa: E402

SIZE = 28
BATCH = 128
EVAL_PAIRS = 256
INFERENCE_BATCH = 256
STEPS_PER_PAIR = 8  # MLP applications per registration
WARMUP_STEPS = 10
BLOCK = 50  # training steps per turn when sharing the machine: examples/mnist_multistep.BLOCK (a test checks)
LAST_STEPS = 50
LEARNING_RATE = 1e-3
OBJECTIVE_LMBDA = 0.05  # λ of the reported objective when the training loss is not diffusion
DEFAULT_LMBDA = {"diffusion": 0.05, "icon": 0.05, "gradicon": 0.05}


def peak_rss_mib() -> float | None:
    """Peak resident memory of this process (Linux ``VmHWM``), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


# ------------------------------------------------------------------------ data (numpy)


def load_mnist(path: str, seed: int) -> dict:
    """Training fives (shuffled with ``seed``) and the 256 + 256 evaluation pairs."""
    with np.load(path) as npz:
        x_train, y_train, x_test, y_test = (npz[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    to_float = lambda x: (x.astype(np.float32) / np.float32(255.0))  # noqa: E731
    perm = np.random.default_rng(seed).permutation(len(x_train))
    train = to_float(x_train[perm][y_train[perm] == 5])
    rng = np.random.default_rng(seed + 1)
    pairs = {}
    for name, digit in (("fives", 5), ("sevens", 7)):
        images = to_float(x_test[y_test == digit])
        i = rng.integers(0, len(images), EVAL_PAIRS)
        j = rng.integers(0, len(images), EVAL_PAIRS)
        pairs[name] = (images[i], images[j])
    return {"train": train, "pairs": pairs}


# ---------------------------------------------- evaluation, in jaxreg's convention (numpy)


def bilinear(values: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Sample ``values`` ``(P, H, W[, C])`` at index points ``(P, H, W, 2)``, linear, border mode."""
    p, h, w = values.shape[:3]
    y = np.clip(points[..., 0], 0, h - 1)
    x = np.clip(points[..., 1], 0, w - 1)
    y0 = np.clip(np.floor(y).astype(np.int64), 0, h - 2)
    x0 = np.clip(np.floor(x).astype(np.int64), 0, w - 2)
    fy, fx = y - y0, x - x0
    if values.ndim == 4:
        fy, fx = fy[..., None], fx[..., None]
    b = np.arange(p)[:, None, None]
    return ((1 - fy) * (1 - fx) * values[b, y0, x0] + (1 - fy) * fx * values[b, y0, x0 + 1]
            + fy * (1 - fx) * values[b, y0 + 1, x0] + fy * fx * values[b, y0 + 1, x0 + 1])


def identity_points(shape) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)


def diffusion(u: np.ndarray) -> np.ndarray:
    """jaxreg's ``diffusion()`` per field of ``(P, *spatial, d)`` (pixels): Σ_axes mean Σ_k Δ²."""
    d = u.shape[-1]
    return sum(np.mean(np.sum(np.diff(u, axis=1 + a) ** 2, axis=-1), axis=tuple(range(1, d + 1))) for a in range(d))


def jacobian(points: np.ndarray) -> np.ndarray:
    """``(P, H, W, 2)`` map -> ``(P, H, W, 2, 2)``, ``J[..., i, j] = ∂φ_i/∂x_j`` (numpy.gradient)."""
    return np.stack([np.gradient(points, axis=1 + j) for j in range(points.shape[-1])], axis=-1)


def jaxreg_icon_term(u_ab: np.ndarray, u_ba: np.ndarray) -> np.ndarray:
    """``mean_x |φ_AB(φ_BA(x)) - x|²`` in pixels, per pair (φ = id + u)."""
    x = identity_points(u_ab.shape[1:-1])
    inner = x + u_ba
    round_trip = inner + bilinear(u_ab, inner)
    return np.mean(np.sum((round_trip - x) ** 2, axis=-1), axis=(1, 2))


def jaxreg_gradicon_term(u_ab: np.ndarray, u_ba: np.ndarray) -> np.ndarray:
    """``mean_x ||D(φ_AB∘φ_BA)(x) - I||_F²`` by central differences in pixels, per pair."""
    x = identity_points(u_ab.shape[1:-1])
    inner = x + u_ba
    deviation = jacobian(inner + bilinear(u_ab, inner)) - np.eye(2)
    return np.mean(np.sum(deviation**2, axis=(-2, -1)), axis=(1, 2))


def scores(moving, fixed, points, lmbda_objective) -> dict:
    """The evaluation numbers for pairs ``moving, fixed`` ``(P, H, W)`` and the final map in pixels."""
    moving, fixed, points = (np.asarray(a, np.float64) for a in (moving, fixed, points))
    warped = bilinear(moving, points)
    u = points - identity_points(moving.shape[1:])
    ssd_before = np.mean((moving - fixed) ** 2, axis=(1, 2))
    ssd_after = np.mean((warped - fixed) ** 2, axis=(1, 2))

    def dice(a, b):
        a, b = a > 0.5, b > 0.5
        inter = np.sum(a & b, axis=(1, 2))
        total = np.sum(a, axis=(1, 2)) + np.sum(b, axis=(1, 2))
        return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)

    jac = jacobian(points)
    det = jac[..., 0, 0] * jac[..., 1, 1] - jac[..., 0, 1] * jac[..., 1, 0]
    return {
        "pairs": int(len(moving)),
        "ssd_before": float(ssd_before.mean()),
        "ssd_after": float(ssd_after.mean()),
        "dice_before": float(dice(moving, fixed).mean()),
        "dice_after": float(dice(warped, fixed).mean()),
        "folded_fraction": float(np.mean(det <= 0)),
        "jacobian_determinant_min": float(det.min()),
        "diffusion": float(diffusion(u).mean()),
        "objective_after": float((ssd_after + lmbda_objective * diffusion(u)).mean()),
        "objective_lmbda": lmbda_objective,
        "mean_displacement_px": float(np.mean(np.linalg.norm(u, axis=-1))),
    }


def smooth_field(rng, shape, amplitude, sigma=3.0) -> np.ndarray:
    """White noise per component, Gaussian-smoothed by FFT (periodic), max |u_k| = amplitude; ``(*shape, 2)``."""
    noise = rng.standard_normal((*shape, 2))
    freq = [np.fft.fftfreq(n) for n in shape]
    k2 = sum(np.meshgrid(*[f**2 for f in freq], indexing="ij"))
    smooth = np.real(np.fft.ifftn(np.fft.fftn(noise, axes=(0, 1)) * np.exp(-2 * np.pi**2 * sigma**2 * k2)[..., None], axes=(0, 1)))
    return smooth * (amplitude / np.abs(smooth).max())


# --------------------------------------------------------------------------- icon (torch)


def import_icon():
    import torch

    import icon_registration as icon  # noqa: F401  (not torchvision: icon's core does not import it)
    import icon_registration.losses

    return torch, icon


def make_inner_net(torch, spacing: float):
    nn = torch.nn
    n = SIZE * SIZE

    class PixelMLP(nn.Module):
        """(moving, fixed) ``[B, 1, 28, 28]`` each -> displacement ``[B, 2, 28, 28]`` in icon units."""

        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(2 * n, 50), nn.ReLU(), nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, 2 * n))
            nn.init.zeros_(self.layers[-1].weight)
            nn.init.zeros_(self.layers[-1].bias)
            self.spacing = spacing

        def forward(self, image_a, image_b):
            x = torch.cat([image_a, image_b], dim=1).flatten(1)
            return self.layers(x).view(-1, 2, SIZE, SIZE) * self.spacing  # pixels -> icon's [0, 1] units

    return PixelMLP()


def build(torch, icon, loss: str, lmbda_icon: float, inner):
    """The 8-step chain around one shared module, wrapped in icon's loss module."""
    step = icon.FunctionFromVectorField(inner)
    net = step
    for _ in range(STEPS_PER_PAIR - 1):
        net = icon.TwoStepRegistration(net, step)
    wrapper = {"diffusion": icon.losses.DiffusionRegularizedNet, "icon": icon.losses.InverseConsistentNet,
               "gradicon": icon.losses.GradientICON}[loss]
    model = wrapper(net, icon.losses.SSD(), lmbda_icon)
    model.assign_identity_map([1, 1, SIZE, SIZE])
    return model


# Conversion of λ: lmbda_icon = LMBDA_FACTOR[loss] * λ; the trained loss is LOSS_SCALE * all_loss.
D, N = 2, SIZE
DIFFUSION_C = D * (N - 1) ** 2 / N**2  # jaxreg diffusion / icon DiffusionRegularizedNet term
LMBDA_FACTOR = {"diffusion": 2.0 * DIFFUSION_C, "icon": D * (N - 1) ** 2 / 2.0, "gradicon": float(D)}
LOSS_SCALE = {"diffusion": 0.5, "icon": 1.0, "gradicon": 1.0}
DERIVATION = {
    "diffusion": "icon DiffusionRegularizedNet: all_loss = 2*SSD + lmbda*D_icon, D_icon = n^2 * sum_axes mean_{b,k,x} "
                 "(forward diff of u_icon,k)^2 with u_icon = u_px/(n-1); jaxreg: SSD + lambda*D, D = sum_axes mean_x sum_k "
                 "(forward diff of u_px,k)^2. So D = d*(n-1)^2/n^2 * D_icon = c*D_icon (c = 2*27^2/28^2), and "
                 "lmbda = 2*c*lambda with the trained loss all_loss/2 = SSD + lambda*D exactly.",
    "icon": "icon InverseConsistentNet: sim_AB + sim_BA + lmbda*(mean_{k,x}(e_AB)^2 + mean_{k,x}(e_BA)^2) in [0,1] units at "
            "jittered grid points; jaxreg: sim_AB + sim_BA + lambda*mean_x |phi_AB(phi_BA(x)) - x|^2 in pixels (one "
            "direction). One direction: jaxreg = d*(n-1)^2 * icon; icon counts two directions: lmbda = d*(n-1)^2/2 * lambda "
            "(equal in expectation over the pair order).",
    "gradicon": "icon GradientICON: sim_AB + sim_BA + lmbda*sum_j mean_{k,x}(d_j e_k)^2 (one direction, finite differences "
                "of step 0.001 in [0,1] units: dimensionless, mean over the d components); jaxreg: the same similarities + "
                "lambda*mean_x ||D(phi_AB o phi_BA) - I||_F^2 (central differences in pixels, sum over components): "
                "lmbda = d * lambda.",
}


def measure_factors(torch, icon, seed: int = 0, repeats: int = 8) -> dict:
    """icon's regularisers against jaxreg's (numpy copies) on the same random smooth maps.

    Returns, per loss, the measured ratio (jaxreg term / icon term per direction as the
    conversion uses it) and the analytic one: ``factor = LMBDA_FACTOR / (2 if diffusion)``
    expressed as jaxreg/icon.
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    spacing = 1.0 / (SIZE - 1)
    u_ab = smooth_field(rng, (SIZE, SIZE), 2.0)[None]  # pixels, (1, H, W, 2)
    u_ba = smooth_field(rng, (SIZE, SIZE), 2.0)[None]
    to_icon = lambda u: torch.from_numpy(np.moveaxis(u, -1, 1).astype(np.float32) * spacing)  # noqa: E731

    class Fixed(icon.RegistrationModule):
        """phi_AB when called with (A, B), phi_BA with (B, A): A is all zeros, B all ones."""

        def __init__(self):
            super().__init__()

        def forward(self, image_a, image_b):
            field = self.as_function(to_icon(u_ab if float(image_a.mean()) < 0.5 else u_ba))
            return lambda coords: coords + field(coords)

    a, b = torch.zeros(1, 1, SIZE, SIZE), torch.ones(1, 1, SIZE, SIZE)
    out = {}
    with torch.no_grad():
        diff = icon.losses.DiffusionRegularizedNet(Fixed(), icon.losses.SSD(), 1.0)
        diff.assign_identity_map([1, 1, SIZE, SIZE])
        d_icon = float(diff.compute_bending_energy_loss(diff.identity_map + to_icon(u_ab)))
        d_jax = float(diffusion(u_ab)[0])
        out["diffusion"] = dict(jaxreg_term=d_jax, icon_term=d_icon, measured=d_jax / d_icon, analytic=DIFFUSION_C,
                                lmbda_factor=LMBDA_FACTOR["diffusion"], loss_scale=LOSS_SCALE["diffusion"])
        ic = icon.losses.InverseConsistentNet(Fixed(), icon.losses.SSD(), 1.0)
        ic.assign_identity_map([1, 1, SIZE, SIZE])
        ic_icon = statistics.fmean(float(ic(a, b).inverse_consistency_loss) for _ in range(repeats))
        ic_jax = float(jaxreg_icon_term(u_ab, u_ba)[0])
        out["icon"] = dict(jaxreg_term=ic_jax, icon_term_both_directions=ic_icon, measured=ic_jax / ic_icon,
                           analytic=LMBDA_FACTOR["icon"], lmbda_factor=LMBDA_FACTOR["icon"], loss_scale=1.0,
                           jitter_draws=repeats)
        gi = icon.losses.GradientICON(Fixed(), icon.losses.SSD(), 1.0)
        gi.assign_identity_map([1, 1, SIZE, SIZE])
        gi_icon = statistics.fmean(float(gi.compute_gradient_icon_loss(gi.regis_net(a, b), gi.regis_net(b, a)))
                                   for _ in range(repeats))
        gi_jax = float(jaxreg_gradicon_term(u_ab, u_ba)[0])
        out["gradicon"] = dict(jaxreg_term=gi_jax, icon_term=gi_icon, measured=gi_jax / gi_icon, analytic=LMBDA_FACTOR["gradicon"],
                               lmbda_factor=LMBDA_FACTOR["gradicon"], loss_scale=1.0, jitter_draws=repeats)
    for name, rec in out.items():
        rec["derivation"] = DERIVATION[name]
    out["fields"] = "two random smooth displacements, 28x28, white noise Gaussian-smoothed (sigma 3 px), max |u_k| = 2 px"
    return out


def check_with_jaxreg(u: np.ndarray) -> dict:
    """jaxreg's own diffusion on ``u`` next to the numpy copy used here (imports jax: call last)."""
    try:
        from jaxreg.losses import regularizers
    except Exception as e:  # not installed in this environment
        return {"skipped": f"import jaxreg failed: {type(e).__name__}: {e}"}
    ours = float(diffusion(u[None])[0])
    theirs = float(regularizers.diffusion()(np.asarray(u, np.float32)))
    return {"numpy_copy": ours, "jaxreg": theirs, "relative_difference": abs(ours - theirs) / max(abs(theirs), 1e-30)}


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss", choices=("diffusion", "icon", "gradicon"), default="diffusion")
    parser.add_argument("--lmbda", type=float, default=None, help="λ in jaxreg's convention (default 0.05)")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--out", required=True, help="a .json path, or a folder that receives metrics.json")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cores available)")
    args = parser.parse_args(argv)
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    out_path = args.out if args.out.endswith(".json") else os.path.join(args.out, "metrics.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    lmbda = DEFAULT_LMBDA[args.loss] if args.lmbda is None else args.lmbda
    lmbda_objective = lmbda if args.loss == "diffusion" else OBJECTIVE_LMBDA
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load_start = os.getloadavg()

    def write(record):
        tmp = f"{out_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, out_path)

    try:
        torch, icon = import_icon()
    except Exception as e:  # ImportError, or a dependency failing on import
        write({"tool": "icon_registration", "skipped": f"import icon_registration failed: {type(e).__name__}: {e}",
               "started": started})
        print(f"skipped: import icon_registration failed: {e}", file=sys.stderr)
        return 0
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    data = load_mnist(args.data, args.seed)

    factors = measure_factors(torch, icon, seed=args.seed)
    for name in ("diffusion", "gradicon"):  # exact conversions: the measurement must agree
        rec = factors[name]
        tolerance = 1e-4 if name == "diffusion" else 0.05
        if abs(rec["measured"] / rec["analytic"] - 1.0) > tolerance:
            raise SystemExit(f"{name}: measured jaxreg/icon factor {rec['measured']:.6g} disagrees with the analytic "
                             f"{rec['analytic']:.6g}; the conversion of λ would be wrong")
    lmbda_icon = LMBDA_FACTOR[args.loss] * lmbda
    scale = LOSS_SCALE[args.loss]

    torch.manual_seed(args.seed)
    inner = make_inner_net(torch, 1.0 / (SIZE - 1))
    model = build(torch, icon, args.loss, lmbda_icon, inner)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    train = torch.from_numpy(data["train"])[:, None]  # [N, 1, 28, 28]
    generator = torch.Generator().manual_seed(args.seed)
    losses, step_seconds = [], []
    rss_before = peak_rss_mib()
    model.train()
    turn = Turn.from_environment()  # None when run on its own
    for step in range(args.steps):
        if turn is not None and step % BLOCK == 0:
            turn()
        t0 = time.perf_counter()
        index = torch.randint(0, len(train), (2, BATCH), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss = scale * model(train[index[0]], train[index[1]]).all_loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        step_seconds.append(time.perf_counter() - t0)
        if (step + 1) % max(1, args.steps // 10) == 0:
            print(f"step {step + 1}/{args.steps}  loss {losses[-1]:.5f}  {sum(step_seconds):.1f} s", file=sys.stderr, flush=True)
    if turn is not None:
        turn()  # evaluation and the inference timing below run in a turn of their own
    train_seconds = sum(step_seconds)  # steps only: not the waits for a turn
    steps_per_second = (args.steps - WARMUP_STEPS) / sum(step_seconds[WARMUP_STEPS:])
    block_steps_per_second = [len(block) / sum(block) for block in
                              (step_seconds[i:i + BLOCK] for i in range(0, len(step_seconds), BLOCK))]

    # Evaluation: the final map phi(identity) in icon units -> pixels, scored with numpy.
    model.eval()
    net = model.regis_net
    identity = model.identity_map

    def final_map(moving, fixed):
        phi = net(moving, fixed)
        return phi(identity)

    results = {}
    with torch.no_grad():
        for name, (moving, fixed) in data["pairs"].items():
            m, f = torch.from_numpy(moving)[:, None], torch.from_numpy(fixed)[:, None]
            points = final_map(m, f).numpy().astype(np.float64)  # [P, 2, H, W] in [0, 1]
            points = np.moveaxis(points, 1, -1) * (SIZE - 1)
            results[name] = scores(moving, fixed, points, lmbda_objective)
        # Inference throughput: map + warped moving image for a batch of 256 pairs.
        m, f = (torch.from_numpy(a)[:, None] for a in data["pairs"]["fives"])
        m, f = m[:INFERENCE_BATCH], f[:INFERENCE_BATCH]

        def infer():
            field = final_map(m, f)
            return net.as_function(m)(field)

        infer()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            infer()
            times.append(time.perf_counter() - t0)
    peak = peak_rss_mib()

    record = {
        "tool": "icon_registration",
        "started": started,
        "versions": {name: _version(name) for name in ("icon_registration", "torch", "numpy")},
        "settings": {
            "steps": args.steps, "seed": args.seed, "loss": args.loss, "lmbda": lmbda, "lmbda_icon": lmbda_icon,
            "loss_scale": scale, "batch": BATCH, "learning_rate": LEARNING_RATE, "optimizer": "torch.optim.Adam",
            "threads": torch.get_num_threads(), "data": os.path.abspath(args.data), "warmup_steps": WARMUP_STEPS,
            "network": "MLP 1568-50-50-1568 (ReLU), last layer zero, output in pixels x 1/(n-1) -> icon units; "
                       f"{STEPS_PER_PAIR} applications, chain net = TwoStepRegistration(net, FunctionFromVectorField(mlp))",
            "loss_module": type(model).__name__, "similarity": "icon_registration.losses.SSD",
            "evaluation": "numpy: bilinear warp (border), Dice of > 0.5 masks, folds by numpy.gradient, "
                          f"objective = SSD + {lmbda_objective} * jaxreg diffusion (pixels)",
        },
        "conversion": factors,
        "steps_per_second": steps_per_second,
        "block_steps": BLOCK,
        "block_steps_per_second": block_steps_per_second,
        "train_seconds": train_seconds,
        "final_loss": float(np.mean(losses[-LAST_STEPS:])),
        "loss_history_every_10": [float(np.mean(losses[i:i + 10])) for i in range(0, len(losses), 10)],
        "rss_before_training_mib": rss_before,
        "peak_rss_mib": peak,
        "inference_pairs_per_second": INFERENCE_BATCH / statistics.median(times),
        "inference_batch": INFERENCE_BATCH,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        **results,
    }
    # Last, so that jax's memory is not counted above: jaxreg's own diffusion on the test field.
    field = smooth_field(np.random.default_rng(args.seed), (SIZE, SIZE), 2.0)
    record["conversion"]["diffusion"]["jaxreg_check"] = check_with_jaxreg(field)
    write(record)
    print(json.dumps({k: record[k] for k in ("steps_per_second", "train_seconds", "final_loss", "peak_rss_mib",
                                             "inference_pairs_per_second")}), flush=True)
    for name in ("fives", "sevens"):
        r = record[name]
        print(f"{name}: SSD {r['ssd_before']:.4f} -> {r['ssd_after']:.4f}  Dice {r['dice_before']:.3f} -> {r['dice_after']:.3f}  "
              f"folded {r['folded_fraction']:.4f}  objective {r['objective_after']:.4f}", flush=True)
    print(f"wrote {out_path}", file=sys.stderr)
    return 0


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())

"""icon_registration (PyTorch) side of the 3-D GradICON network (``examples/gradicon_3d.py``).

    python benchmarks/peers/icon_3d.py --steps 200 --out /tmp/icon3d
    python benchmarks/peers/icon_3d.py --steps 20 --size 24 --no-oasis --out /tmp/icon3d-quick

``benchmarks/amortized.py`` runs it after ``examples/gradicon_3d.py`` with the same
arguments. Both follow one specification, so that steps per second and accuracy compare:

Data. The very same training pairs: the jaxreg example's ``synthetic_sampler`` (imported
from it) is drawn here with the keys ``jaxreg.nn.train`` uses (``key = jax.random.key(seed)``;
each step ``key, draw = jax.random.split(key)``, batch = ``sampler(draw)``), then handed to
torch. Drawing a batch is timed apart (``data_seconds_per_step``) and **left out** of
icon's steps per second; on the jaxreg side the draw runs inside the compiled step and is
counted, so the comparison favours icon by that much.

Network. ICON's coarse-to-fine pair, built from icon's own modules:
``TwoStepRegistration(DownsampleRegistration(FunctionFromVectorField(unet_a)),
FunctionFromVectorField(unet_b))`` inside ``GradientICON(…, losses.SSD(), lmbda)``. Each
U-Net is a torch copy of ``jaxreg.nn.modules.UNet`` with the same ``--features``: a 3³
stem, one stride-2 3³ convolution per level, nearest upsampling and a 3³ convolution over
(upsampled, skip) on the way back, leaky ReLU 0.2, a zero-initialised 3³ output
convolution (the untrained network is the identity map), LeCun-normal kernels and zero
biases as flax initialises them, flax's SAME padding (at stride 2: none before, one voxel
after). Given the same weights it computes the same function (``tests/test_benchmark_amortized.py``);
the parameter counts are equal (``parameters`` in the
JSON, checked against jaxreg's when jaxreg's model can be built). Its output is a
displacement in voxels, multiplied by icon's spacing ``1 / (n - 1)`` per axis so that
Adam sees the same parametrisation as on the jaxreg side. (icon's stock ``tallUNet2`` is
a much larger network; a speed comparison needs the same one.)

Loss. jaxreg's ``gradicon(lmbda=λ)``: ``MSE(A∘φ_AB, B) + MSE(B∘φ_BA, A) +
λ·mean_x ||D(φ_AB∘φ_BA)(x) - I||_F²``. icon's ``GradientICON`` sums the same two MSEs
(``losses.SSD`` is a mean) and ``lmbda·Σ_j mean_{k,x} (∂_j e_k)²``: the Frobenius norm
with a MEAN over the d = 3 components, evaluated at grid points jittered by N(0, 1/n²),
by finite differences of step 0.001 (dimensionless). Hence ``lmbda = d·λ = 3·λ``.

Optimiser Adam, learning rate ``--lr``, batch ``--batch``, ``--threads`` torch threads (default the cores).

Evaluation, by the jaxreg example's own functions on icon's maps: Dice of the 4 labels and
the folded fraction on 32 new synthetic pairs (``score_synthetic``), and the OASIS pair in
both directions (``evaluate_oasis``: the brains resampled onto the ``--oasis-shape`` grid
and intensity-normalised as :func:`jaxreg.nn.inference.register_images` does, icon's map
lifted back to world space, the labels warped at full resolution). Writes
``DIR/metrics.json`` in the layout of the example's.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
EXAMPLES = REPO / "examples"
WARMUP_STEPS = 5  # steps left out of steps/s: torch's first calls allocate and tune


def make_unet(torch, *, ndim: int, features, in_channels: int = 2):
    """A torch copy of ``jaxreg.nn.modules.UNet`` (3-D)."""
    if ndim != 3:
        raise ValueError("this peer is 3-D")
    nn = torch.nn
    features = [int(f) for f in features]

    def conv(a, b, stride=1):
        # flax's SAME padding: 1 voxel per side at stride 1; at stride 2 on an even size, 0
        # before and 1 after (ConstantPad3d below), which torch's symmetric padding is not.
        layer = nn.Conv3d(a, b, 3, stride=stride, padding=1 if stride == 1 else 0)
        fan_in = a * 27
        std = (1.0 / fan_in) ** 0.5 / 0.87962566103423978  # flax lecun_normal: truncated at 2 std
        nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(layer.bias)
        return layer

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.depth = len(features) - 1
            self.stem = conv(in_channels, features[0])
            self.down = nn.ModuleList([conv(a, b, stride=2) for a, b in zip(features[:-1], features[1:])])
            self.up = nn.ModuleList([conv(b + a, a) for a, b in zip(features[:-1], features[1:])])
            self.out = nn.Conv3d(features[0], ndim, 3, padding=1)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

        def forward(self, x):
            if any(n % 2**self.depth for n in x.shape[2:]):
                raise ValueError(f"input {tuple(x.shape[2:])} is not a multiple of {2**self.depth}")
            act = lambda y: torch.nn.functional.leaky_relu(y, 0.2)  # noqa: E731
            x = act(self.stem(x))
            skips = []
            for layer in self.down:
                skips.append(x)
                x = act(layer(torch.nn.functional.pad(x, (0, 1, 0, 1, 0, 1))))
            for layer, skip in zip(reversed(self.up), reversed(skips)):
                x = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
                x = act(layer(torch.cat([x, skip], dim=1)))
            return self.out(x)

    return UNet()


def make_network(torch, *, size: int, features, lmbda: float):
    """GradientICON over ICON's TwoStep(Downsample(net), net) with jaxreg's U-Nets."""
    from icon_registration import losses, network_wrappers

    class VoxelDisplacement(torch.nn.Module):
        """``(image_A, image_B) -> displacement`` in icon's units from a net that outputs voxels."""

        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, image_a, image_b):
            u = self.unet(torch.cat([image_a, image_b], dim=1))
            spacing = torch.tensor([1.0 / (n - 1) for n in u.shape[2:]], dtype=u.dtype).view(1, -1, 1, 1, 1)
            return u * spacing

    coarse = network_wrappers.FunctionFromVectorField(VoxelDisplacement(make_unet(torch, ndim=3, features=features)))
    fine = network_wrappers.FunctionFromVectorField(VoxelDisplacement(make_unet(torch, ndim=3, features=features)))
    two_step = network_wrappers.TwoStepRegistration(network_wrappers.DownsampleRegistration(coarse, dimension=3), fine)
    net = losses.GradientICON(two_step, losses.SSD(), lmbda=3.0 * lmbda)
    net.assign_identity_map([1, 1, size, size, size])
    return net


def icon_displacement(torch, net, moving, fixed) -> np.ndarray:
    """icon's map φ_AB for ``(moving, fixed)`` batches ``(B, *shape)`` as displacements in
    voxels of the fixed grid, channels last ``(B, *shape, 3)``."""
    with torch.no_grad():
        a = torch.from_numpy(np.array(moving, np.float32))[:, None]  # a copy: jax arrays are read-only
        b = torch.from_numpy(np.array(fixed, np.float32))[:, None]
        phi = net.regis_net(a, b)
        points = phi(net.identity_map).numpy()  # (B, 3, *shape) in [0, 1] per axis
    shape = points.shape[2:]
    scale = np.array([n - 1 for n in shape], np.float64).reshape(1, 3, 1, 1, 1)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))[None]
    return np.moveaxis(points * scale - index, 1, -1).astype(np.float32)


def oasis_register(torch, net, input_shape):
    """``register(fixed, moving) -> Prediction`` with the icon network, prepared and lifted
    by the same functions as :func:`jaxreg.nn.inference.register_images`."""
    import jax.numpy as jnp

    from jaxreg.nn.inference import _lift, _network_inputs
    from jaxreg.transforms import Displacement

    def register(fixed, moving):
        fixed, moving, grid, fixed_input, moving_input = _network_inputs(fixed, moving, input_shape, normalize=True)
        net.assign_identity_map([1, 1, *grid.shape])
        field = icon_displacement(torch, net, np.asarray(moving_input)[None], np.asarray(fixed_input)[None])[0]
        return _lift(Displacement(jnp.asarray(field)), grid, fixed, moving)

    return register


def parameter_count_jaxreg(example, features) -> int | None:
    try:
        import jax
        from flax import nnx

        import jaxreg.nn as jnn

        model = jnn.build(example.spec(features))
        return int(sum(np.size(p) for p in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))))
    except Exception:  # noqa: BLE001  (only a cross-check)
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lmbda", type=float, default=1.0, help="jaxreg's λ (icon's lmbda = 3λ)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--amplitude", type=float, default=3.0)
    parser.add_argument("--features", default="8,16,16,32")
    parser.add_argument("--oasis-shape", default="80,96,112")
    parser.add_argument("--no-oasis", action="store_true", help="leave out the OASIS evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: the cores)")
    parser.add_argument("--out", type=Path, required=True, help="folder that receives metrics.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    features = tuple(int(f) for f in args.features.split(","))

    import jax

    sys.path.insert(0, str(EXAMPLES))
    import gradicon_3d as example  # the jaxreg example: its sampler, scoring and metrics file

    try:
        import torch

        import icon_registration.losses  # noqa: F401
    except Exception as e:  # noqa: BLE001  (a peer that cannot run is a row that says why)
        example.write_metrics(args.out, {"tool": "icon_registration", "skipped": f"import failed: {type(e).__name__}: {e}"})
        print(f"icon_registration unavailable: {e}")
        return 0

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    net = make_network(torch, size=args.size, features=features, lmbda=args.lmbda)
    parameters = sum(p.numel() for p in net.parameters())
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    sampler = jax.jit(example.synthetic_sampler(args.size, args.batch, args.amplitude))

    key = jax.random.key(args.seed)
    step_seconds, data_seconds, losses = [], [], []
    turn = example.benchmark_turn()
    for step in range(args.steps):
        if turn is not None and step % example.BLOCK == 0:
            turn()
        t0 = time.perf_counter()
        key, draw = jax.random.split(key)
        batch = jax.device_get(sampler(draw))
        moving = torch.from_numpy(np.array(batch["moving"], np.float32))[:, None]
        fixed = torch.from_numpy(np.array(batch["fixed"], np.float32))[:, None]
        t1 = time.perf_counter()
        optimizer.zero_grad()
        loss = net(moving, fixed).all_loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        t2 = time.perf_counter()
        data_seconds.append(t1 - t0)
        step_seconds.append(t2 - t1)
    if turn is not None:
        turn()  # the evaluation below runs in a turn of its own
    train_seconds = sum(step_seconds) + sum(data_seconds)  # not the waits for a turn
    timed = step_seconds[WARMUP_STEPS:] or step_seconds
    blocks = (step_seconds[i : i + example.BLOCK] for i in range(0, len(step_seconds), example.BLOCK))

    eval_batch = jax.device_get(example.synthetic_sampler(args.size, 32, args.amplitude)(jax.random.key(args.seed + 1000)))
    fields = np.concatenate([
        icon_displacement(torch, net, eval_batch["moving"][i : i + 8], eval_batch["fixed"][i : i + 8]) for i in range(0, 32, 8)
    ])
    ours = parameter_count_jaxreg(example, features)
    result = {
        "experiment": "gradicon-unet-3d",
        "tool": "icon_registration",
        "icon_registration": importlib.metadata.version("icon_registration"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "steps": args.steps,
        "size": args.size,
        "batch": args.batch,
        "lmbda": args.lmbda,
        "icon_lmbda": 3.0 * args.lmbda,
        "features": list(features),
        "parameters": parameters,
        "parameters_jaxreg": ours,
        "train_seconds": train_seconds,
        "steps_per_second": len(timed) / sum(timed),
        "block_steps": example.BLOCK,
        "block_steps_per_second": [len(block) / sum(block) for block in blocks],
        "warmup_steps_left_out": len(step_seconds) - len(timed),
        "data_seconds_per_step": float(np.median(data_seconds)),
        "final_loss": float(np.mean(losses[-25:])),
        "synthetic": example.score_synthetic(eval_batch, fields),
    }
    if not args.no_oasis and example.oasis_path(1, "aligned_norm.nii.gz").exists():
        input_shape = tuple(int(n) for n in args.oasis_shape.split(","))
        result["oasis"] = example.evaluate_oasis(oasis_register(torch, net, input_shape), args.out)
    else:
        result["oasis"] = "skipped: --no-oasis" if args.no_oasis else f"skipped: no OASIS data under {example.OASIS}"
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    example.write_metrics(args.out, result)
    example.print_summary(result, prefix=f"icon 3-D ({parameters} parameters, jaxreg's {ours}): ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Named network architectures, rebuilt from a JSON-able spec (how checkpoints name their network).

``build({"name": "mnist-multistep", "kwargs": {...}})`` returns a fresh network; a
checkpoint written by :func:`jaxreg.nn.training.train` with ``spec=`` carries the spec, so
``jaxreg register --model CHECKPOINT`` can rebuild the network before loading its weights.

- ``mnist-multistep``: the MLP of the MNIST experiment (the pair flattened, two hidden
  layers of 50, ReLU) as a displacement head, applied ``steps`` times with shared weights;
- ``unet-two-step``: a U-Net displacement net at half resolution followed by one at full
  resolution (ICON/GradICON's coarse-to-fine pair), for 2-D or 3-D;
- ``unet``: a single U-Net displacement (or ``velocity=True``) net.
"""

from __future__ import annotations

from typing import Sequence

from flax import nnx

from jaxreg.nn.modules import MLP, DisplacementField, Downsampled, Multistep, TwoStep, UNet, VelocityField

__all__ = ["mnist_multistep", "unet", "unet_two_step", "build", "ARCHITECTURES"]


def mnist_multistep(*, shape: Sequence[int] = (28, 28), hidden: Sequence[int] = (50, 50), steps: int = 8, seed: int = 0) -> nnx.Module:
    return Multistep(DisplacementField(MLP(shape, hidden=hidden, rngs=nnx.Rngs(seed))), steps=steps)


def _field_head(backbone, velocity: bool):
    return VelocityField(backbone) if velocity else DisplacementField(backbone)


def unet(*, ndim: int, features: Sequence[int] = (16, 32, 32, 64), velocity: bool = False, seed: int = 0) -> nnx.Module:
    return _field_head(UNet(ndim, features=features, rngs=nnx.Rngs(seed)), velocity)


def unet_two_step(*, ndim: int, features: Sequence[int] = (16, 32, 32, 64), velocity: bool = False, seed: int = 0) -> nnx.Module:
    rngs = nnx.Rngs(seed)
    coarse = _field_head(UNet(ndim, features=features, rngs=rngs), velocity)
    fine = _field_head(UNet(ndim, features=features, rngs=rngs), velocity)
    return TwoStep(Downsampled(coarse, factor=2, ndim=ndim), fine)


ARCHITECTURES = {"mnist-multistep": mnist_multistep, "unet": unet, "unet-two-step": unet_two_step}


def build(spec: dict) -> nnx.Module:
    """A fresh network from ``{"name": ..., "kwargs": {...}}`` (other keys are ignored)."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"a model spec is a dict with 'name' (one of {sorted(ARCHITECTURES)}) and 'kwargs'; got {spec!r}")
    name = spec["name"]
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](**spec.get("kwargs", {}))

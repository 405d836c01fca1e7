"""Amortized registration: flax nnx networks whose call is ``(moving, fixed) -> Transform``.

- :mod:`jaxreg.nn.modules` -- backbones (MLP, U-Net), heads (displacement, velocity,
  affine), wrappers (``TwoStep``, weight-shared ``Multistep``, ``Downsampled``);
- :mod:`jaxreg.nn.losses` -- ``regularized`` (diffusion/bending), ``icon``, ``gradicon``,
  ``supervised`` (distillation), each ``loss(net, pair) -> (loss, metrics)``;
- :mod:`jaxreg.nn.training` -- pure train steps, the ``train`` loop, checkpoints,
  data parallelism, ``fine_tune`` (instance optimisation);
- :mod:`jaxreg.nn.models` -- named architectures rebuilt from a checkpoint's spec;
- :mod:`jaxreg.nn.inference` -- run a trained network on images in physical space;
- :mod:`jaxreg.nn.conv` -- the networks' convolutions in forms XLA's CPU backend runs fast
  (3-D ones as 2-D ones; gradients that stay fast in loops and under vmap).
"""

from jaxreg.nn import conv, inference, losses, models, modules, training
from jaxreg.nn.losses import gradicon, icon, regularized, supervised
from jaxreg.nn.models import build
from jaxreg.nn.modules import MLP, AffineHead, DisplacementField, Downsampled, Multistep, TwoStep, UNet, VelocityField
from jaxreg.nn.training import TrainState, fine_tune, load_checkpoint, restore_model, save_checkpoint, train

__all__ = [
    "AffineHead",
    "DisplacementField",
    "Downsampled",
    "MLP",
    "Multistep",
    "TrainState",
    "TwoStep",
    "UNet",
    "VelocityField",
    "build",
    "conv",
    "fine_tune",
    "gradicon",
    "icon",
    "inference",
    "load_checkpoint",
    "losses",
    "models",
    "modules",
    "regularized",
    "restore_model",
    "save_checkpoint",
    "supervised",
    "train",
    "training",
]

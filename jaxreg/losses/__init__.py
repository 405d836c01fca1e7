"""Losses: similarities of two images and regularizers of a displacement, as factories.

``similarity.lncc(radius=4)`` returns ``f(warped, fixed, mask=None) -> scalar`` (lower is
better); ``regularizers.diffusion()`` returns ``f(displacement, spacing=1.0) -> scalar``.
Registries map names to factories for command lines and configs.
"""

from jaxreg.losses import regularizers, similarity
from jaxreg.losses.regularizers import REGULARIZERS
from jaxreg.losses.similarity import SIMILARITIES

__all__ = ["REGULARIZERS", "SIMILARITIES", "regularizers", "similarity"]

"""jaxreg: image registration in JAX."""

from jaxreg.grid import Grid, Image, as_image

__version__ = "0.1.0"

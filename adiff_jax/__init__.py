"""adiff-jax: AnimateDiff (SD1.5 video UNet + motion modules) in JAX/Flax."""

__version__ = "0.1.0"

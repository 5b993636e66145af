"""tm-diffusers: the tmcore adapter for diffusers' UNets and diffusion transformers (diffusers 0.30-0.42)."""

from tm_diffusers.adapter import Diffusers

__version__ = "0.1.0"
__all__ = ["Diffusers"]

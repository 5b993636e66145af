"""tm-timm: the tmcore adapter for timm's VisionTransformer family (timm 1.0.x)."""

from tm_timm.adapter import TimmViT

__version__ = "0.1.0"
__all__ = ["TimmViT"]

"""tm-transformers: the tmcore adapter for Hugging Face transformers encoders (transformers 5.x)."""

from tm_transformers.adapter import TransformersEncoders

__version__ = "0.1.0"
__all__ = ["TransformersEncoders"]

"""tm-tomecis: ToMeCIS, token merging with class importance score (IECON 2023), as a tmcore reducer.

tmcore.apply(model, "tomecis", r=13)   # ToMe's matching, merges weighted by class importance
"""

from tm_tomecis.reducer import ToMeCIS, ToMeCISConfig, class_importance

__version__ = "0.1.0"
__all__ = ["ToMeCIS", "ToMeCISConfig", "class_importance"]

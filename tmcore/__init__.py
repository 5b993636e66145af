"""tmcore: token reduction (merging, pruning, pooling) for transformers, as plugins.

import timm, tmcore
model = timm.create_model("deit_small_patch16_224")
tmcore.apply(model, "tome", r=13)
"""

from tmcore import config, models
from tmcore.adapter import Adapter, Patch
from tmcore.api import adapters, apply, get_patch, get_reducer, load, plugins, reducers, remove, save, trace
from tmcore.errors import (
    AlreadyAppliedError,
    IncompatibleVersionError,
    InvalidConfigError,
    InvalidFileError,
    InvalidInputError,
    NoAdapterError,
    NotAppliedError,
    PluginError,
    PluginLoadWarning,
    ScheduleClampWarning,
    TmcoreError,
    TraceError,
    UnknownReducerError,
    UnsupportedModelError,
)
from tmcore.hookspecs import hookimpl
from tmcore.matching import bipartite_soft_matching
from tmcore.plan import Plan, merge_amax, merge_mlerp, merge_tokens, merge_weighted, reduce, unmerge
from tmcore.reducer import BaseReducer, ModelInfo, ReducerConfig, TokenReducer
from tmcore.runtime import Runtime, check_plans
from tmcore.schedule import BipartiteSchedule, RSchedule, parse_r
from tmcore.scores import Scores
from tmcore.state import LayerInputs, TokenState
from tmcore.tracing import Trace

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AlreadyAppliedError",
    "BaseReducer",
    "BipartiteSchedule",
    "IncompatibleVersionError",
    "InvalidConfigError",
    "InvalidFileError",
    "InvalidInputError",
    "LayerInputs",
    "ModelInfo",
    "NoAdapterError",
    "NotAppliedError",
    "Patch",
    "Plan",
    "PluginError",
    "PluginLoadWarning",
    "RSchedule",
    "ReducerConfig",
    "Runtime",
    "Scores",
    "ScheduleClampWarning",
    "TmcoreError",
    "TokenReducer",
    "TokenState",
    "Trace",
    "TraceError",
    "UnknownReducerError",
    "UnsupportedModelError",
    "adapters",
    "apply",
    "bipartite_soft_matching",
    "check_plans",
    "config",
    "get_patch",
    "get_reducer",
    "hookimpl",
    "load",
    "merge_amax",
    "merge_mlerp",
    "merge_tokens",
    "merge_weighted",
    "models",
    "parse_r",
    "plugins",
    "reduce",
    "reducers",
    "remove",
    "save",
    "trace",
    "unmerge",
]

"""autosplit: split a PyTorch model over several devices automatically.

The public surface is small; everything not listed in ``__all__`` is internal.
"""

from autosplit.api import autosplit, plan
from autosplit.errors import (AutosplitError, ConfigError, InfeasibleError, InputSignatureError, MicrobatchError,
                              OpaqueCallError, TraceError)
from autosplit.graph import OpGraph
from autosplit.plan import Plan
from autosplit.rewrite import PlanMismatchError, SplitModule
from autosplit.solver import SolverOptions, solve
from autosplit.trace import TensorSpec, Traced, capture, spec

__all__ = [
    "AutosplitError",
    "ConfigError",
    "InfeasibleError",
    "InputSignatureError",
    "MicrobatchError",
    "OpaqueCallError",
    "OpGraph",
    "Plan",
    "PlanMismatchError",
    "SolverOptions",
    "SplitModule",
    "TensorSpec",
    "TraceError",
    "Traced",
    "autosplit",
    "capture",
    "plan",
    "solve",
    "spec",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # autosplit.distributed loads torch.distributed.pipelining (about a second): only when used
    if name == "distributed":
        import importlib

        return importlib.import_module("autosplit.distributed")
    raise AttributeError(f"module 'autosplit' has no attribute {name!r}")

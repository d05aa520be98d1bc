"""autosplit: split a PyTorch model over several devices automatically.

The public surface is small; everything not listed in ``__all__`` is internal.
"""

from autosplit.errors import AutosplitError, InfeasibleError, InputSignatureError, TraceError
from autosplit.graph import OpGraph
from autosplit.plan import Plan
from autosplit.solver import SolverOptions, solve
from autosplit.trace import TensorSpec, Traced, capture, spec

__all__ = [
    "AutosplitError",
    "InfeasibleError",
    "InputSignatureError",
    "OpGraph",
    "Plan",
    "SolverOptions",
    "TensorSpec",
    "TraceError",
    "Traced",
    "capture",
    "solve",
    "spec",
]
__version__ = "0.1.0"

"""autosplit: split a PyTorch model over several devices automatically.

The public surface is small; everything not listed in ``__all__`` is internal.
"""

from autosplit.errors import AutosplitError, InputSignatureError, TraceError
from autosplit.graph import OpGraph
from autosplit.trace import TensorSpec, Traced, capture, spec

__all__ = [
    "AutosplitError",
    "InputSignatureError",
    "OpGraph",
    "TensorSpec",
    "TraceError",
    "Traced",
    "capture",
    "spec",
]
__version__ = "0.1.0"

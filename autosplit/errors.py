"""The errors autosplit raises for bad input. Each message names what was wrong and what to do."""

from __future__ import annotations


class AutosplitError(Exception):
    """Base class of every error autosplit raises on purpose."""


class TraceError(AutosplitError):
    """The model could not be captured as a graph by any tracer that was tried."""


class InputSignatureError(AutosplitError, TypeError):
    """The example inputs do not fit the model's forward signature."""


class InfeasibleError(AutosplitError):
    """No split of the model fits the cluster's memory; the message says what would."""


class MicrobatchError(AutosplitError, ValueError):
    """A batch that cannot be cut into microbatches, outputs that cannot be joined from them, or
    layers that would compute differently per microbatch (batch statistics)."""


class ConfigError(AutosplitError, ValueError):
    """A request the model cannot meet as asked, found once the model is known: more stages than
    ops a cut can separate, a pin on a stage that does not exist or inside one block."""


class OpaqueCallError(TraceError):
    """A custom ``torch.autograd.Function`` or a ``torch.utils.checkpoint`` region that capture
    cannot keep as one call: inlined, it would lose its own backward or its recomputation."""


class DistributedError(AutosplitError, RuntimeError):
    """The ranks of a distributed run cannot run the plan together: a world size other than the
    plan's stage count, ranks that hold different plans, a rank that failed to build its stage,
    or a rank that failed in a step (its message is reported on every rank)."""

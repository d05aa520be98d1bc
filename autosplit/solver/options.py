"""How to split: ``SolverOptions``, and the memory rules they set.

    options = SolverOptions(stages=8, microbatches=16, schedule="interleaved-1f1b", stages_per_device=2)

Every option is checked where it is made (``__post_init__``, with the fix in the message), so the
passes take it as given. ``memory_rules`` turns the options into the keywords of
``cost_models.memory``'s peak terms: one memory model for every stage and every pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from cost_models.memory import (
    INTERLEAVED,
    MODES,
    OPTIMIZER_STATES,
    SCHEDULES,
    TRAINING_PRECISIONS,
    training_state_bytes,
    weight_bytes,
)


SHARED_WEIGHTS = ("sent", "copies")
"""How weights read on several stages are held (``SolverOptions.shared_weights``)."""


@dataclass(frozen=True)
class SolverOptions:
    """How to split: stage count, schedule, memory rules, limits and constraints."""

    stages: int | None = None
    """Number of pipeline stages; default: one per device of a replica (the cluster's devices ÷
    ``data_parallel``), times ``stages_per_device``."""
    mode: str = "train"
    """``"train"`` (forward + backward, optimizer state) or ``"infer"`` (forward only)."""
    schedule: str = "1f1b"
    """``"gpipe"`` (all microbatches in flight), ``"1f1b"`` (stage s holds S − s) or
    ``"interleaved-1f1b"`` (``stages_per_device`` stages on each device, Megatron's virtual
    stages: a smaller bubble for more transfers; see ``autosplit.interleaved``)."""
    stages_per_device: int = 1
    """Stages each device runs, v (``"interleaved-1f1b"`` only): the pipeline's S stages go to
    D = S ÷ v devices, stage s to the (s mod D)-th, as PyTorch's ``ScheduleInterleaved1F1B``
    places them. E.g. 2 on 4 devices: 8 stages, device 0 runs stages 0 and 4."""
    microbatches: int = 1
    """Microbatches per step; the traced graph is one microbatch."""
    memory_headroom: float = 0.1
    """Share of every device's memory left free, e.g. 0.1 for 10%."""
    precision: str = "bf16-mixed"
    """Training state per parameter (see ``cost_models.memory.TRAINING_PRECISIONS``)."""
    optimizer: str = "adamw"
    weight_dtype: str = "bf16"
    """Inference weights: a dtype or a quantized format (``"int4"``)."""
    time_limit_s: float = 10.0
    """Deterministic time limit of each CP-SAT solve (about seconds)."""
    workers: int = 2
    """CP-SAT workers; the search is interleaved, so the result does not depend on timing."""
    seed: int = 0
    pin: Mapping[str, int] = field(default_factory=dict)
    """``{"module.path": stage}``: every op of that module runs on that stage."""
    no_split: tuple[type | str, ...] = ()
    """Module classes (``GPT2Attention`` or its name) or qualified paths never cut inside."""
    refine: bool = True
    """Try op-level cuts inside the blocks next to each cut."""
    samples_per_microbatch: int = 1
    """Batch size of the traced graph, for the predicted throughput."""
    tokens_per_sample: int | None = None
    """Sequence length, for tokens per second."""
    shared_weights: str = "sent"
    """How a weight read on several stages (a tied embedding and LM head) is held, as the runtime
    that runs the plan holds it. ``"sent"`` (``autosplit()`` in one process): stored on its first
    reader and sent once per call to the others, its gradient sent back; the others keep a copy
    and its gradient for the call. ``"copies"`` (``autosplit.distributed``): every stage that
    reads it keeps its own copy with gradient, master weight and optimizer state, and the copies'
    gradients are all-reduced once per step."""
    data_parallel: int = 1
    """Replicas of the pipeline, each on its own devices and its own slice of every batch, with
    each stage replicated over its replicas by FSDP2 (``autosplit.distributed``). The cluster
    holds all replicas' devices, ``data_parallel`` equal runs of them: the stages are planned on
    the first run (replica 0), and each stage's memory and per-step communication count what
    FSDP2 keeps and sends (``cost_models.memory.data_parallel_factors``,
    ``cost_models.sharded_data_parallel_s``). 1: no replicas."""
    global_batch: int | None = None
    """Samples per optimizer step over all replicas. Given, the mesh (data_parallel × stages ×
    tensor_parallel), the microbatch size and count, every node's tensor layout and each
    stage's recomputation are chosen together for the shortest step (``autosplit.solver.joint``); the
    graph is traced at ``samples_per_microbatch`` samples and its costs scaled to the size chosen."""
    tensor_parallel: int | None = None
    """Devices that run each stage together, each node in a DTensor layout (needs
    ``global_batch``). None: chosen with ``global_batch``, else 1."""
    recompute: str | None = None
    """What every stage recomputes in backward: ``"none"``, ``"selective"`` or ``"full"``
    (``autosplit.solver.joint.RECOMPUTE``; needs ``global_batch``). None: chosen per stage with
    ``global_batch``, else none."""

    def __post_init__(self) -> None:
        if self.global_batch is not None and (not isinstance(self.global_batch, int)
                                              or isinstance(self.global_batch, bool) or self.global_batch < 1):
            raise ValueError(f"global_batch must be a positive int (samples per step), e.g. 256; got {self.global_batch!r}")
        tp = self.tensor_parallel
        if tp is not None and (not isinstance(tp, int) or isinstance(tp, bool) or tp < 1):
            raise ValueError(f"tensor_parallel must be a positive int, e.g. 8; got {tp!r}")
        if self.recompute is not None and self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"recompute must be 'none', 'selective' or 'full'; got {self.recompute!r}")
        if self.global_batch is None and ((tp or 1) > 1 or self.recompute not in (None, "none")):
            raise ValueError("tensor_parallel and recompute are chosen with the global batch: give global_batch "
                             "(samples per step), e.g. global_batch=256")
        if self.global_batch is not None and self.schedule == INTERLEAVED:
            raise ValueError(f"global_batch plans use schedule '1f1b' or 'gpipe'; got {self.schedule!r}")
        if self.stages is not None and (not isinstance(self.stages, int) or self.stages < 1):
            raise ValueError(f"stages must be a positive int, e.g. 4; got {self.stages!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, e.g. 'train'; got {self.mode!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, e.g. '1f1b'; got {self.schedule!r}")
        v = self.stages_per_device
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"stages_per_device must be a positive int, e.g. 2; got {v!r}")
        if v > 1 and self.schedule != INTERLEAVED:
            raise ValueError(f"stages_per_device={v} needs schedule={INTERLEAVED!r}, which runs several stages per "
                             f"device; schedule {self.schedule!r} runs one")
        if v > 1 and isinstance(self.data_parallel, int) and self.data_parallel > 1:
            raise ValueError(f"stages_per_device={v} with data_parallel={self.data_parallel}: interleaved plans run one "
                             "replica of the pipeline; use stages_per_device=1 with replicas, or data_parallel=1")
        if self.schedule == INTERLEAVED and self.mode != "train":
            raise ValueError(f"schedule {INTERLEAVED!r} interleaves forwards and backwards, so it trains: use "
                             f"mode='train', or schedule '1f1b' for mode={self.mode!r}")
        if self.stages is not None and isinstance(self.stages, int) and self.stages % v:
            raise ValueError(f"stages={self.stages} must be a multiple of stages_per_device={v}: every device runs "
                             f"{v} stages, e.g. stages={v * max(2, self.stages // v)}")
        if not isinstance(self.microbatches, int) or self.microbatches < 1:
            raise ValueError(f"microbatches must be a positive int, e.g. 8; got {self.microbatches!r}")
        if not 0 <= self.memory_headroom < 1:
            raise ValueError(f"memory_headroom must be in [0, 1), e.g. 0.1; got {self.memory_headroom!r}")
        if self.precision not in TRAINING_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(TRAINING_PRECISIONS)}; got {self.precision!r}")
        if not isinstance(self.optimizer, str) or self.optimizer.lower() not in OPTIMIZER_STATES:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_STATES)}, e.g. 'adamw'; "
                             f"got {self.optimizer!r}")
        if self.shared_weights not in SHARED_WEIGHTS:
            raise ValueError(f"shared_weights must be one of {SHARED_WEIGHTS}: 'sent' for autosplit() in one process, "
                             f"'copies' for autosplit.distributed; got {self.shared_weights!r}")
        if not isinstance(self.data_parallel, int) or isinstance(self.data_parallel, bool) or self.data_parallel < 1:
            raise ValueError(f"data_parallel must be a positive int (replicas of the pipeline), e.g. 2; "
                             f"got {self.data_parallel!r}")
        if not self.time_limit_s > 0 or self.workers < 1:
            raise ValueError(f"time_limit_s and workers must be positive, e.g. 10.0 and 2; "
                             f"got {self.time_limit_s!r}, {self.workers!r}")
        no_split = tuple(rule.__name__ if isinstance(rule, type) else rule for rule in self.no_split)
        if not all(isinstance(rule, str) for rule in no_split):
            raise TypeError(f"no_split takes module classes or names, e.g. (GPT2Attention, 'model.layers.0'); "
                            f"got {self.no_split!r}")
        object.__setattr__(self, "no_split", no_split)
        object.__setattr__(self, "pin", dict(self.pin))


def memory_rules(options: SolverOptions) -> dict[str, Any]:
    """The options that set what a parameter and an activation cost (``cost_models.memory.peak_terms``)."""
    return dict(mode=options.mode, precision=options.precision, optimizer=options.optimizer,
                weight_dtype=options.weight_dtype, data_parallel=options.data_parallel,
                shared_weights=options.shared_weights)


def _state_bytes_per_param(options: SolverOptions) -> float:
    if options.mode == "train":
        return training_state_bytes(1, precision=options.precision, optimizer=options.optimizer).total_bytes
    return weight_bytes(1, options.weight_dtype)

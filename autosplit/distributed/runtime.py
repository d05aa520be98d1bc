"""A Plan run over ranks by torch.distributed.pipelining: one stage per rank, or several with
interleaved 1F1B (rank r runs stages r, r + W, r + 2W... of a plan for W devices), and as many
data-parallel replicas of the pipeline as the world holds.

    pipe = build(model, plan, loss_fn=loss_fn, example_inputs=(x,))   # the same line on every rank
    opt = torch.optim.AdamW(pipe.parameters())   # this rank's parameters, named as in the model
    for x, y in data:
        loss = pipe.step(x, target=y)            # the batch's mean loss on the last stage, None elsewhere
        opt.step(); opt.zero_grad()

:func:`build` runs these steps on every rank, in this order:

1. The process group: the caller's, or one it starts from torchrun's environment (nccl on
   ``cuda:<LOCAL_RANK>`` where CUDA is available, gloo on the CPU otherwise), with a timeout.
2. Agreement: the ranks compare sha256 digests of their plans and all refuse if any differs.
   Planning is not deterministic across processes (CPU calibration drifts), so one rank plans
   (:func:`plan_and_broadcast`) or every rank loads one plan file. Then a world that is not the
   plan's ``data_parallel`` replicas of its stages is refused (every rank knows both, so every
   rank refuses). With several replicas, the ranks form a ``DeviceMesh`` with dims
   ``("dp", "pp")`` (see "Data parallel" below).
3. Its own stage: the model is captured on one microbatch exactly as ``autosplit()`` captures it
   (:func:`autosplit.api.capture_microbatch`), the plan's fingerprint is checked, the stages are
   built (:func:`autosplit.distributed.stages.stage_chain`), this rank's stages are made to
   recompute in backward the blocks the plan says, each under its policy, with
   ``torch.utils.checkpoint`` (:mod:`autosplit.distributed.recompute`), and the tensors its stage
   reads, with those the plan stores on it, move to the rank's device; the rest of the model is
   left where it is. A model built on ``meta`` gets memory for those tensors' modules only,
   initialized by its own code (:mod:`autosplit.distributed.materialize`) or read from a
   checkpoint (:mod:`autosplit.distributed.checkpoint`). A failure on any rank is raised on
   every rank, with that rank's message.
4. Replicas: with several, the stage is sharded over its replicas with FSDP2 (below).
5. The pipeline's own process groups (:class:`autosplit.distributed.failures.FailureChannel`):
   the stages' sends and receives go over the replica's ranks; for each set of ranks of one
   replica that read a common weight (a tied embedding and LM head: each of them holds a copy)
   one group sums its gradients, made in the same order on every rank; and a rank that fails in
   a step reports it under a store key, so that every rank raises its error at once instead of
   waiting for it until the group's timeout (see ``failures.py``).
6. ``PipelineStage`` with the chain's fixed shapes (no shape inference runs, so later stages
   never compute on uninitialized inputs), and the schedule the plan names with its microbatches.

Loss and gradients. PyTorch 2.13's schedules compute ``loss_fn(output, target)`` on every
microbatch and back-propagate each; with ``scale_grads=True`` they then divide every gradient of
the stage by the number of microbatches m, the gradients accumulated by earlier steps included.
Here each microbatch's loss is divided by m instead (``scale_grads=False``): for a loss that is a
mean over its microbatch, the m terms sum to the mean over the batch (the microbatches are
equal), so loss and gradients equal the unsplit model's ``loss_fn(model(x), y)``, and gradients
accumulated over several steps without ``zero_grad`` stay as they were. :meth:`DistributedPipeline.step`
returns that sum. A loss that sums over its samples would need no division; it is not supported.

Data parallel. A world of k × S ranks runs k replicas of the plan's S stages (the plan must be
made for them: ``Plan.data_parallel`` = k, which prices what FSDP2 keeps per rank). Ranks are
numbered row-major over the mesh ``(dp, pp)`` = (k, S):

    rank = replica × S + stage        e.g. k = 2, S = 2: ranks 0, 1 are replica 0's stages 0, 1;
                                                         ranks 2, 3 are replica 1's stages 0, 1

so a replica's stages are consecutive ranks (one host's devices, where hosts hold S each) and a
stage's replicas are S ranks apart. ``step(x, target=y)`` takes the global batch on every rank;
replica r runs rows [r·B/k, (r+1)·B/k) of it (along each input's batch dimension, and dimension
0 of the target) as its m microbatches. Each stage is wrapped with FSDP2's ``fully_shard`` over
its ``dp`` sub-mesh, one unit per stage with ``reshard_after_forward=False``: the schedule's
``PipelineStage`` turns gradient sync off for every microbatch's backward and reduce-scatters
once after the last (``perform_reduce_grad``), averaging over the replicas; the weights are
gathered once per step. Each replica's loss is the mean over its rows, so the average over
replicas (an all-reduce of the loss over ``dp``, returned on every last-stage rank) and the
averaged gradients equal the unsplit model's on the global batch. A shared weight's copies are
summed as before, over the ranks of one replica that read it; each copy is sharded alike (the
same shape over the same ``dp`` size), so each rank sums its own shard.

Why FSDP2. With PyTorch 2.13 on gloo (checked on 2 × 2 ranks with a tied-embedding LM), FSDP2's
``fully_shard``, ``replicate`` (FSDP2's all-reduce variant) and ``DistributedDataParallel`` all
train these stage graph modules to the unsplit model's loss and gradients under GPipe and 1F1B.
FSDP2 is the one that divides the state: each rank keeps 1/k of the weights, gradients and
optimizer state (plus, through the step, the stage's weights and gradients whole), while DDP
keeps whole weights, gradients and optimizer state plus gradient buckets, and ``replicate``
whole weights and optimizer state; and pipelining drives FSDP2 through its public switches
(``set_requires_gradient_sync``...), where for DDP it reaches into the reducer. Each rank sends
one all-gather and one reduce-scatter per step, which the plan prices
(``Stage.data_parallel_s``). The parameters become sharded ``DTensor`` parameters:
:meth:`DistributedPipeline.parameters` gives those, under the model's names, for any
optimizer; ``p.full_tensor()`` gathers one whole.

Tensor parallel. A plan with ``tensor_parallel`` = t > 1 (the joint search's, ``global_batch=``)
runs each stage on a group of t ranks: the world is a ``DeviceMesh`` with dims ``("dp", "pp",
"tp")`` and rank = (replica × S + stage) × t + i, so a group is t consecutive ranks, one host's
devices as the plan places them. Each rank's stage graph is laid out by
:func:`autosplit.distributed.tensor_parallel.parallelize_stage`: its weights become DTensors on
the group in their planned placements (``Shard(d)``, ``Replicate()``), each op's tensor inputs
are redistributed to the placements of its layout first (explicit nodes, one per value and
placement: the plan's layout changes, priced as all-gathers, reduce-scatters, all-reduces), and
DTensor's own propagation runs each op on its shards. Between stages, rank i of a group sends
its shard to rank i of the next group (each tensor in the placement its producer's layout
names, so nothing is gathered at a boundary); the last stage's output is made whole on every
rank of its group for the loss. A weight shared by stages is sharded alike on each and its
copies' gradients are summed over the ranks at one group position. With replicas too, FSDP2
shards each stage's DTensor weights again over ``dp`` (2-D placements). On the CPU, where SDPA
runs an attention op DTensor has no rule for, the step runs inside
:func:`autosplit.sharding.cpu_attention_strategy` (split by heads, as on CUDA).

A joint plan is priced for microbatches of ``Plan.microbatch_size`` from a graph traced at
another batch (``Plan.traced_batch``); the runtime checks the plan's fingerprint against a
capture at that batch, then builds the stages from a capture at the microbatch's.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.pipelining.microbatch import TensorChunkSpec, _Replicate
from torch.distributed.tensor import DTensor

from autosplit.api import capture_microbatch, solve_captured
from autosplit.distributed.failures import FailureChannel
from autosplit.distributed.materialize import materialize_tensors
from autosplit.distributed.recompute import recompute_stages
from autosplit.distributed.stages import Receive, Send, StageChain, Wire, shared_weights, stage_chain, stage_tensors
from autosplit.distributed.tensor_parallel import parallelize_stage
from autosplit.errors import DistributedError, InputSignatureError, MicrobatchError
from autosplit.plan import Plan
from autosplit.rewrite import check_fingerprint, move_state, refuse_batch_statistics, transfer
from autosplit.sharding import cpu_attention_strategy
from autosplit.trace import TensorSpec, Traced, require_module
from cost_models.memory import INTERLEAVED, interleaved_rounds

logger = logging.getLogger(__name__)

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, INTERLEAVED: ScheduleInterleaved1F1B}
"""The pipelining schedule of each ``Plan.schedule``; the interleaved one takes all of a rank's
stages, the others its one stage."""

DEFAULT_TIMEOUT_S = 600.0
"""How long a collective or a send may wait for the other ranks before it fails (a process group
this module starts, and the groups it makes for shared weights)."""


class DistributedPipeline:
    """This rank's part of a model pipelined over ranks (:func:`build` makes it).

    Holds the rank's stage (a graph module over the model's own submodules and parameters), or
    its stages under interleaved 1F1B, and the schedule that runs them. :meth:`parameters` and
    :meth:`named_parameters` give the parameters its stages read or the plan stores on them,
    under the model's names, for the optimizer; a weight that other ranks read too is this
    rank's copy, kept equal to theirs by summing the copies' gradients in every :meth:`step`.
    With several data-parallel replicas the stage's parameters are FSDP2's sharded ``DTensor``
    parameters.
    """

    last_step_memory: Any = None
    """What the last step measured with :meth:`measure_memory` used (a
    :class:`autosplit.distributed.memory.StepMemory`); None before one."""

    def __init__(self, model: nn.Module, plan: Plan, chain: StageChain, stages: Sequence[int], device: torch.device,
                 schedule: Any, shared: Sequence[tuple[str, nn.Parameter, Any]], held: set[int],
                 batch_dims: Sequence[int | None], fixed_kwargs: Mapping[str, Any], failures: FailureChannel, *,
                 replica: int = 0, mesh: DeviceMesh | None = None):
        self.plan = plan
        self.stages = tuple(stages)
        """The indices of this rank's stages: one, or several under interleaved 1F1B."""
        self.stage = self.stages[0]
        """The index of this rank's (first) stage."""
        self.replica = replica
        """The index of this rank's data-parallel replica (rank = replica × stages + stage)."""
        self.data_parallel = mesh.size(0) if mesh is not None else 1
        """How many replicas of the pipeline run, each on its share of every batch."""
        self.tensor_parallel = plan.tensor_parallel
        """How many ranks run each stage together, each op in the plan's layout."""
        self.mesh = mesh
        """The ranks as a DeviceMesh with dims ``("dp", "pp")``, or ``("dp", "pp", "tp")`` for a
        tensor-parallel plan; None for one replica of a pipeline-only plan."""
        self.device = device
        self.modules = [chain.modules[s] for s in self.stages]
        """The stages' graph modules: each takes what the previous stage sends, returns what it sends."""
        self.module = self.modules[0]
        """The (first) stage's graph module."""
        self.microbatches = plan.microbatches
        self.is_first = 0 in self.stages
        self.is_last = len(plan.stages) - 1 in self.stages
        self.shared_weights = {name for name, _, _ in shared}
        """The parameters this rank holds a copy of that other ranks hold too (canonical names)."""
        self._model = model
        self._chain = chain
        self._schedule = schedule
        self._shared = list(shared)
        self._held = held
        self._batch_dims = list(batch_dims)
        self._fixed_kwargs = dict(fixed_kwargs)
        self._batch_norms = [(name, m) for name, m in model.named_modules()
                             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._failures = failures
        self._steps = 0

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters under the model's names (a tied weight under its first name)."""
        for name, p in self._model.named_parameters():
            if id(p) in self._held:
                yield name, p

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, b in self._model.named_buffers():
            if id(b) in self._held:
                yield name, b

    def train(self, mode: bool = True) -> "DistributedPipeline":
        """Switch dropout and batch norm as ``model.train(mode)`` does."""
        self._model.train(mode)
        for stage in self.modules:  # the stages' own containers and mode-following ops too
            for module in stage.modules():
                module.training = mode
        return self

    def eval(self) -> "DistributedPipeline":
        return self.train(False)

    def step(self, *args: Any, target: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
        """Run forward and backward of one batch through the pipeline, on every rank.

        Call it on every rank with the same arguments as the model's forward (``pipe.step(x,
        target=y)``): the first stage reads the batch, the last computes ``loss_fn`` on each
        microbatch's output and its slice of ``target`` (cut along dimension 0). With several
        data-parallel replicas, every rank gets the global batch and each replica runs its share
        (see the module docstring). Afterwards each rank's parameters hold their gradients
        (averaged over the replicas), shared weights the sum over the ranks that read them, added
        to any gradient already there.

        Returns:
            On the last stage's ranks, the loss of the batch: the mean of the microbatches'
            losses (averaged over the replicas), as ``loss_fn(model(x), y)`` for a loss that is a
            mean over samples; None elsewhere.

        Raises:
            InputSignatureError: the inputs differ from the ones the pipeline was built with in
                shape, dtype or a fixed value (checked on every rank that is given them).
            MicrobatchError: the target cannot be cut into the microbatches, or a BatchNorm layer
                is in training mode with several microbatches.
            DistributedError: another rank refused the batch (as above: nothing ran, and the
                pipeline stays usable); or a rank failed during the step, e.g. in ``loss_fn``:
                raised on every rank within a fraction of a second, not at the group's timeout,
                naming the failing rank and its error (on that rank chained to the error). The
                pipeline then refuses further steps; the default process group stays usable.
        """
        self._failures.require_usable()
        step, self._steps = self._steps, self._steps + 1
        first, refusal = None, None
        try:
            first = self._checked_inputs(args, kwargs, target)
        except Exception as e:  # the ranks agree on refusals before anything is sent (see failures.py)
            refusal = e
        return self._failures.run(step, refusal, lambda: self._run_schedule(first, target))

    def _checked_inputs(self, args: tuple, kwargs: dict, target: Any) -> tuple[torch.Tensor, ...] | None:
        """The first stage's inputs of a call (None on other ranks not given the batch), after
        checking the call, the target and the batch norms."""
        if target is None:
            raise ValueError("step() trains the model: pass the batch's target on every rank, pipe.step(x, target=y); "
                             "the last stage computes loss_fn(output, target) with it")
        first = self._first_inputs(args, kwargs) if args or kwargs else None
        if self.is_first and first is None:
            raise ValueError(f"rank {dist.get_rank()} runs the first stage and needs the batch: call pipe.step(x, "
                             "target=y) with the same inputs on every rank")
        self._check_target(target)
        refuse_batch_statistics(self._batch_norms, self.microbatches * self.data_parallel)
        return first

    def _run_schedule(self, first: tuple[torch.Tensor, ...] | None, target: torch.Tensor) -> torch.Tensor | None:
        target = self._share(target, 0)
        set_aside = [p.grad for _, p, _ in self._shared]
        for _, p, _ in self._shared:
            p.grad = None
        losses: list[torch.Tensor] = []
        # CPU attention has no DTensor rule of its own: the one the planner priced it by
        with cpu_attention_strategy() if self.tensor_parallel > 1 and self.device.type == "cpu" \
                else contextlib.nullcontext():
            self._schedule.step(*(first if self.is_first else ()),
                                target=transfer(target, self.device) if self.is_last else None,
                                losses=losses if self.is_last else None, return_outputs=False)
        self._sum_shared_gradients(set_aside)
        if not self.is_last:
            return None
        loss = torch.stack([loss.detach() for loss in losses]).sum()
        if self.mesh is not None:  # each replica's loss is the mean over its share: average them
            dist.all_reduce(loss, group=self.mesh.get_group("dp"))
            loss = loss / self.data_parallel
        return loss

    def _share(self, value: torch.Tensor, dim: int | None) -> torch.Tensor:
        """This replica's rows of a global-batch tensor along ``dim`` (all of it for one replica,
        or for an input without a batch dimension)."""
        if self.data_parallel == 1 or dim is None:
            return value
        size = value.shape[dim] // self.data_parallel
        return value.narrow(dim, self.replica * size, size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's parameters and persistent buffers under the model's names (a tied weight
        under its first name), sharing memory with them: what a checkpoint of this rank holds."""
        from autosplit.distributed.checkpoint import pipeline_state_dict
        return pipeline_state_dict(self)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Copy this rank's tensors from ``state_dict``: the unsplit model's, or any rank's of any
        plan (entries of tensors other ranks hold are skipped). With ``strict``, every tensor of
        this rank must have an entry and every entry must name a tensor of the model."""
        from autosplit.distributed.checkpoint import load_pipeline_state_dict
        load_pipeline_state_dict(self, state_dict, strict)

    def measure_memory(self, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """A context that measures the memory of the steps run inside it, for :meth:`memory_report`
        (``with pipe.measure_memory(optimizer=opt): pipe.step(x, target=y); opt.step()``)."""
        from autosplit.distributed.memory import MemoryProbe
        return MemoryProbe(self, optimizer)

    def memory_report(self, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """This rank's memory next to the plan's figure for its stage, by kind, with the peak
        (an :class:`autosplit.distributed.memory.MemoryReport`; see that module for what is
        measured and how)."""
        from autosplit.distributed.memory import memory_report
        return memory_report(self, optimizer)

    def _first_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        """The first stage's inputs of a call, after checking the call against the capture."""
        try:
            given = inspect.signature(self._model.forward).bind_partial(*args, **kwargs).arguments
        except TypeError as e:
            raise InputSignatureError(f"step() takes the arguments of the model's forward and target=: {e}") from None
        kwargs = {**{k: v for k, v in self._fixed_kwargs.items() if k not in given}, **kwargs}
        try:
            flat = self._chain.flat_inputs(*args, **kwargs)
        except TypeError as e:
            raise InputSignatureError(f"step() takes the arguments of the model's forward and target=: {e}") from None
        m, k = self.microbatches, self.data_parallel
        for value, was, name, dim in zip(flat, self._chain.input_values, self._chain.input_arguments,
                                         self._batch_dims, strict=True):
            if isinstance(was, torch.Tensor):
                expected = list(was.shape)
                if dim is not None:
                    expected[dim] *= m * k
                got = (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else None
                if got != (tuple(expected), was.dtype):
                    what = f"shape {got[0]} ({got[1]})" if got else f"a {type(value).__name__}"
                    replicas = f"{k} replicas × " if k > 1 else ""
                    per = (f": {replicas}{m} microbatches of {tuple(was.shape)}"
                           if dim is not None and m * k > 1 else "")
                    raise InputSignatureError(
                        f"input {name!r} is {what}, but the pipeline was built for shape {tuple(expected)} "
                        f"({was.dtype}){per}, and its stages exchange tensors of fixed shapes. Pass batches of that "
                        "shape (e.g. drop_last=True in the DataLoader), or build the pipeline again for this shape")
            elif _differs(was, value):
                raise InputSignatureError(
                    f"argument {name!r} was {was!r} when the pipeline was built, and its stages compute with that "
                    f"value, not {value!r}: pass {was!r}, or build the pipeline again with {name}={value!r}")
        return tuple(self._share(flat[i], self._batch_dims[i]) for i in self._chain.first_inputs)

    def _check_target(self, target: Any) -> None:
        if not isinstance(target, torch.Tensor) or target.dim() == 0:
            got = "a scalar tensor" if isinstance(target, torch.Tensor) else type(target).__name__
            raise TypeError(f"target must be a tensor whose dimension 0 is the batch, cut into {self.microbatches} "
                            f"microbatches; got {got}")
        pieces = self.microbatches * self.data_parallel
        if target.shape[0] % pieces:
            replicas = f" for each of {self.data_parallel} replicas" if self.data_parallel > 1 else ""
            raise MicrobatchError(f"a target of {target.shape[0]} samples cannot be cut into {self.microbatches} "
                                  f"equal microbatches{replicas}: pass a batch that is a multiple of {pieces}")

    def _sum_shared_gradients(self, set_aside: list[torch.Tensor | None]) -> None:
        """Sum this step's gradients of each shared weight over the ranks of this replica that
        read it, then add back what was accumulated before the step. A weight that got no
        gradient on any of those ranks keeps None, as in the unsplit model. Under FSDP2 each rank
        sums its shard: the copies are sharded alike over the same replicas."""
        for (_, p, group), before in zip(self._shared, set_aside):
            got = torch.tensor([int(p.grad is not None)], device=self.device)
            dist.all_reduce(got, op=dist.ReduceOp.MAX, group=group)
            if got.item():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                with torch.no_grad():
                    dist.all_reduce(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad, group=group)
            if before is not None:
                p.grad = before if p.grad is None else before.add_(p.grad)


def build(model: nn.Module, plan: Plan, *, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
          example_inputs: Any = None, example_kwargs: dict[str, Any] | None = None,
          batch_dims: Mapping[str, int | None] | None = None, tracer: str = "auto",
          leaf_modules: Sequence[type[nn.Module] | str] = (), data_parallel: int | None = None,
          timeout_s: float = DEFAULT_TIMEOUT_S, init_fn: Callable[[nn.Module], None] | None = None,
          checkpoint: str | os.PathLike | None = None) -> DistributedPipeline:
    """Build this rank's stage of ``plan`` and the schedule that runs it (see the module docstring).

    Every rank calls it with the same arguments. The process group is the caller's, or one this
    call starts (launch with ``torchrun --nproc-per-node=<stages × replicas>``).

    Args:
        model: the model, the same on every rank: with real weights (same seed or checkpoint),
            or built on ``meta``, in which case each rank gives memory to its own stage only
            and initializes it (seeded with rank 0's ``torch.initial_seed()``, so that ranks
            holding a copy of a tied weight agree) or reads it from ``checkpoint``.
        plan: the plan every rank applies (``Plan.load(path)`` on every rank, or
            :func:`plan_and_broadcast`); its schedule (``"gpipe"``, ``"1f1b"``: one stage per
            rank; ``"interleaved-1f1b"``: v per rank, see :func:`stages_of_ranks`) and
            microbatches are the ones run.
        loss_fn: ``loss_fn(output, target)`` on one microbatch, a mean over its samples (e.g.
            ``F.cross_entropy``); ``output`` has the model's output structure.
        example_inputs, example_kwargs: a batch (all microbatches of every replica) of the
            model's inputs, as :meth:`DistributedPipeline.step` will get them; the first
            microbatch is captured.
        batch_dims: the batch dimension of inputs that are not batch-first (see ``autosplit()``).
        tracer, leaf_modules: how the model is captured; as when the plan was made.
        data_parallel: how many replicas of the pipeline to run; default: world size ÷ stage
            count. Either way it must be the plan's ``data_parallel``.
        timeout_s: how long a rank waits for the others before failing.
        init_fn: for a model on ``meta``: ``init_fn(module)`` sets the tensors of modules that
            have neither ``reset_parameters()`` nor a Hugging Face ``_init_weights``.
        checkpoint: a checkpoint directory (:func:`autosplit.distributed.save`, under any plan
            or from the unsplit model) to read this rank's tensors from after building.

    Raises:
        DistributedError: the world size is not the plan's replicas × stages, the ranks hold
            different plans, or a rank failed to build its stage (raised on every rank).
        PlanMismatchError: the plan was made for another graph.

    Example:
        >>> plan = Plan.load("plan.json")
        >>> with torch.device("meta"):
        ...     model = GPT(config)                # no rank holds the whole model
        >>> pipe = autosplit.distributed.build(model, plan, loss_fn=F.cross_entropy, example_inputs=(x,))
        >>> loss = pipe.step(x, target=y)
    """
    require_module(model, "autosplit.distributed.build")
    if not isinstance(plan, Plan):
        raise TypeError("build() applies a Plan: load the same plan file on every rank (Plan.load(path)), or plan "
                        "on rank 0 and share it with autosplit.distributed.plan_and_broadcast(model, "
                        f"example_inputs=..., microbatches=...); got {type(plan).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function loss_fn(output, target) -> scalar tensor, e.g. "
                        f"torch.nn.functional.cross_entropy; got {type(loss_fn).__name__}")
    if plan.schedule not in SCHEDULES:
        raise ValueError(f"the plan's schedule is {plan.schedule!r}, and the distributed runtime runs "
                         f"{', '.join(map(repr, SCHEDULES))}: plan again with one of them")
    require_runnable(plan)
    if plan.reads_weights_across_stages and plan.shared_weights != "copies":
        raise ValueError("the plan prices each weight read on several stages (a tied embedding and head) as sent once "
                         "per call from the stage storing it, as autosplit() runs it in one process; here every rank "
                         "that reads one keeps a copy with its own gradient and optimizer state, the gradients summed "
                         "each step: plan with shared_weights='copies' (plan_and_broadcast does; autosplit.plan(..., "
                         "shared_weights='copies'), or `autosplit plan ... --shared-weights copies`)")
    if plan.mode != "train":
        raise ValueError(f"the plan was made for mode={plan.mode!r}, and the distributed runtime trains (its memory "
                         "holds gradients and optimizer state): plan again with mode='train'")
    if plan.schedule == "1f1b" and plan.microbatches < len(plan.stages):
        raise ValueError(f"1F1B needs at least as many microbatches as stages, and the plan has {plan.microbatches} "
                         f"for {len(plan.stages)} stages: plan again with microbatches >= {len(plan.stages)}, or "
                         "schedule='gpipe'")
    if plan.schedule == INTERLEAVED:
        interleaved_rounds(len(plan.device_stages()), plan.microbatches)  # a count the schedule runs
    args, kwargs = _example_batch(example_inputs, example_kwargs)
    device = init_process_group(timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    check_same_plan(plan)
    replicas = replica_count(plan, world, data_parallel)
    stages = stages_of_ranks(plan, world, data_parallel)[rank]
    tp = plan.tensor_parallel
    stage, replica = stages[0], rank // (len(plan.device_stages()) * tp)
    mesh = pipeline_mesh(device, replicas, len(plan.device_stages()), timeout_s, tp) \
        if replicas > 1 or tp > 1 else None
    seed = _seed_of_rank_0()

    error = None
    try:  # the first of every replica's microbatches is captured: one microbatch, as planned
        captured = capture_microbatch(model, args, kwargs, microbatches=plan.microbatches * replicas,
                                      batch_dims=batch_dims, training=plan.mode == "train", tracer=tracer,
                                      leaf_modules=leaf_modules)
        checked = check_traced_batch(model, plan, args, kwargs, replicas, batch_dims, tracer, leaf_modules)
        refuse_replicated_writes(captured.traced, replicas, tp)
        chain = stage_chain(model, captured, plan, device, check_plan=not checked)
        held = _held_tensors(model, chain, stages)
        materialize_tensors(model, [t for t in held.values() if t.is_meta], device, seed=seed, init_fn=init_fn,
                            checkpoint_follows=checkpoint is not None)
        move_state([(t, device) for t in held.values()])
        if tp > 1:
            held = parallelize_stages(model, chain, captured.traced, plan, stages, mesh["tp"], held)
        recompute_stages(plan, chain.modules, stages)  # around the layouts' placement nodes too
        if replicas > 1:
            held = shard_stage(model, chain.modules[stage], mesh, held)
    except Exception as e:  # every rank must learn of it, or the others would wait for this one
        error = e
    raise_on_every_rank(error, "build its stage")

    failures = FailureChannel.create(stage, len(plan.stages), timeout_s,
                                     group=mesh.get_group("pp") if mesh is not None else None)
    for dim in ("dp", "tp") if mesh is not None else ():
        if dim in mesh.mesh_dim_names and mesh[dim].size() > 1:
            failures.add_group(mesh.get_group(dim))
    shared = _shared_weight_groups(model, chain, plan, replicas, timeout_s)
    for group in {id(group): group for _, _, group in shared}.values():
        failures.add_group(group)
    dims = [captured.batch_dims.get(name) if plan.microbatches * replicas > 1 else None
            for name in chain.input_arguments]
    first_dims = [dims[i] for i in chain.first_inputs]
    pipeline_stages = [PipelineStage(chain.modules[s], s, len(plan.stages), device,
                                     input_args=_local_metas(chain.modules[s], chain.received[s], Receive),
                                     output_args=_local_metas(chain.modules[s], chain.sent[s], Send),
                                     group=failures.group) for s in stages]
    schedule = SCHEDULES[plan.schedule](
        pipeline_stages if plan.schedule == INTERLEAVED else pipeline_stages[0], plan.microbatches,
        loss_fn=MicrobatchLoss(loss_fn, chain.output, plan.microbatches),
        args_chunk_spec=tuple(TensorChunkSpec(d) if d is not None else _Replicate() for d in first_dims),
        scale_grads=False)
    fixed_kwargs = {k: v for k, v in captured.traced.example_kwargs.items() if not _holds_tensor(v)}
    logger.info("rank %d runs stage(s) %s of %d (replica %d of %d) on %s: %d parameters, %d shared with other "
                "ranks", rank, ", ".join(map(str, stages)), len(plan.stages), replica, replicas, device,
                sum(isinstance(t, nn.Parameter) for t in held.values()), len(shared))
    pipe = DistributedPipeline(model, plan, chain, stages, device, schedule, shared, set(held), dims, fixed_kwargs,
                               failures, replica=replica, mesh=mesh)
    if checkpoint is not None:
        from autosplit.distributed.checkpoint import load
        load(pipe, checkpoint)
    return pipe


class MicrobatchLoss:
    """``loss_fn`` as the schedule calls it: on the last stage's flat output, rebuilt into the
    model's output structure, and divided by the number of microbatches so that the losses of
    the microbatches sum to the loss of the batch (see the module docstring)."""

    def __init__(self, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor], output: Wire, microbatches: int):
        self.loss_fn = loss_fn
        self.output = output
        self.microbatches = microbatches

    def __call__(self, output: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.output.decode(output), target) / self.microbatches


def plan_and_broadcast(model: nn.Module, *, example_inputs: Any = None, example_kwargs: dict[str, Any] | None = None,
                       microbatches: int = 1, devices: int | Sequence[str | torch.device] | None = None,
                       cluster: Any = None, mode: str = "train", batch_dims: Mapping[str, int | None] | None = None,
                       tracer: str = "auto", leaf_modules: Sequence[type[nn.Module] | str] = (),
                       data_parallel: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, **options: Any) -> Plan:
    """Plan on rank 0 and give every rank that plan: the ranks must apply one plan, and plans
    made in separate processes can differ (CPU calibration drifts between them).

    Called on every rank with the same arguments, like :func:`build` (whose ``example_inputs``
    it takes: a batch of all microbatches of every replica, of which the first microbatch is
    captured). Rank 0 plans one stage per rank of a replica (``stages_per_device`` per rank with
    ``schedule="interleaved-1f1b"``); the others wait for its plan (``broadcast_object_list``).

    Args:
        devices: what to plan for, as in ``autosplit.plan``; default: as many local devices as
            ranks. ``cluster`` describes other hardware, e.g. ``"2x8xh100"`` for two hosts.
        microbatches, mode, options: the solver's (``schedule``, ``memory_headroom``, ``pin``...).
            With ``global_batch=`` (the samples of ``example_inputs``) the joint search chooses
            the mesh (data × pipeline × tensor parallel), microbatches, layouts and
            recomputation for the world's devices, from a capture of one sample.
        data_parallel: replicas of the pipeline; each runs world size ÷ ``data_parallel`` stages.
            Default: 1, or the joint search's choice with ``global_batch``.

    Raises:
        DistributedError: rank 0 could not plan (its message is raised on every rank), or the
            world size is not a multiple of ``data_parallel``.

    Example:
        >>> plan = autosplit.distributed.plan_and_broadcast(model, example_inputs=(x,), microbatches=8)
        >>> pipe = autosplit.distributed.build(model, plan, loss_fn=loss_fn, example_inputs=(x,))
    """
    require_module(model, "autosplit.distributed.plan_and_broadcast")
    args, kwargs = _example_batch(example_inputs, example_kwargs)
    init_process_group(timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    joint = options.get("global_batch") is not None
    if data_parallel is None and not joint:
        data_parallel = 1
    if data_parallel is not None and (not isinstance(data_parallel, int) or isinstance(data_parallel, bool)
                                      or not 1 <= data_parallel <= world or world % data_parallel):
        raise DistributedError(f"data_parallel={data_parallel!r} replicas must split the {world} ranks evenly, each "
                               f"running its own pipeline: use one of "
                               f"{', '.join(str(d) for d in range(1, world + 1) if world % d == 0)}")
    plan, error = None, None
    if rank == 0:
        try:
            pieces = options["global_batch"] if joint else microbatches * data_parallel
            captured = capture_microbatch(model, args, kwargs, microbatches=pieces, batch_dims=batch_dims,
                                          training=mode == "train", tracer=tracer, leaf_modules=leaf_modules)
            if not joint:
                options.setdefault("stages", world // data_parallel * options.get("stages_per_device", 1))
            if data_parallel is not None:
                options["data_parallel"] = data_parallel
            options.setdefault("shared_weights", "copies")  # how build() holds them
            plan = solve_captured(captured.traced, devices if devices is not None else world, cluster, mode,
                                  microbatches, options)
        except Exception as e:
            error = e
    message = [plan, None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(message, src=0)
    if message[1] is not None:
        if error is not None:
            raise error
        raise DistributedError(f"rank 0 could not plan the model: {message[1]}")
    return message[0]


def init_process_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the caller's process group, or start one from torchrun's environment variables;
    returns this rank's device: ``cuda:<LOCAL_RANK>`` under nccl, the CPU under gloo.

    Raises:
        DistributedError: no process group and no torchrun environment to start one from.
    """
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed: install one that has (the official "
                               "Linux and macOS builds do)")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise DistributedError(f"no process group is initialized and {', '.join(missing)} "
                                   f"{'is' if len(missing) == 1 else 'are'} not set: launch with torchrun "
                                   "--nproc-per-node=<stages> script.py, which sets them, or call "
                                   "torch.distributed.init_process_group() before")
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else None
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s), device_id=device)
    if "nccl" not in str(dist.get_backend()):
        return torch.device("cpu")
    # torchrun's LOCAL_RANK; a caller that started the group itself has chosen the device already
    local_rank = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else torch.cuda.current_device()
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def stages_of_ranks(plan: Plan, world_size: int, data_parallel: int | None = None) -> list[tuple[int, ...]]:
    """The stages each rank runs. Within a replica, rank r runs the stages of the plan's r-th
    device: stage r with one stage per device; stages r, r + W, r + 2W... under interleaved 1F1B
    (v stages on each of W devices, stage s on the device of stage s mod W, as
    ``ScheduleInterleaved1F1B`` places them). Replica k's rank r is world rank k × W + r.

    Raises:
        DistributedError: the world is not the plan's replicas × devices (:func:`replica_count`),
            or the plan places its stages otherwise.
    """
    replica_count(plan, world_size, data_parallel)
    count = len(plan.stages)
    devices = list(plan.device_stages().values())
    width = len(devices)
    looped = [tuple(range(rank, count, width)) for rank in range(width)]
    if devices != looped:
        raise DistributedError(f"the plan puts stages {devices} on its devices, and the runtime runs stages r, r + "
                               f"{width}, ... on rank r: plan again with this autosplit")
    tp = plan.tensor_parallel  # rank = (replica × width + position) × tp + i
    return [looped[(rank // tp) % width] for rank in range(world_size)]


def replica_count(plan: Plan, world_size: int, data_parallel: int | None = None) -> int:
    """How many data-parallel replicas of the pipeline the world runs: ``data_parallel``, by
    default world size ÷ stage count, which must be the plan's ``data_parallel``.

    Raises:
        DistributedError: the world size is not a multiple of the stage count, or not
            ``data_parallel`` × stages, or the plan was made for another number of replicas;
            says what would fit.
    """
    tp = plan.tensor_parallel
    count = len(plan.device_stages()) * tp  # ranks per replica: one per device the plan uses
    ranks = f"{world_size} rank{'s' if world_size != 1 else ''}"
    stages = f"{count} stages" if tp == 1 else f"{count // tp} stages × {tp} tensor-parallel ranks"
    if plan.stages_per_device > 1 and world_size != count:
        raise DistributedError(
            f"the plan has {len(plan.stages)} stages on {count} devices ({plan.stages_per_device} per device, "
            f"{plan.schedule}), one device per rank, but {ranks} run: launch {count} processes (torchrun "
            f"--nproc-per-node={count} ...), or plan for {world_size} devices (interleaved plans run one replica)")
    if world_size % count:
        fits = [k * count for k in (world_size // count, world_size // count + 1) if k >= 1]
        launch = " or ".join(f"{n} ({n // count} replica{'s' if n != count else ''})" for n in fits)
        divisors = [d for d in range(world_size, 0, -1) if world_size % d == 0 and d != count][:3]
        plans = ", ".join(f"{d} stage{'s' if d != 1 else ''} × {world_size // d} "
                          f"replica{'s' if d != world_size else ''}" for d in divisors)
        raise DistributedError(
            f"the plan has {stages}, one per rank of each data-parallel replica, but {ranks} run, not a "
            f"multiple of {count}: launch {launch} processes (torchrun --nproc-per-node={fits[0]} ...), or plan for "
            f"this world ({plans}: plan_and_broadcast(model, ..., data_parallel=replicas) plans world ÷ replicas "
            f"stages)")
    replicas = world_size // count
    if data_parallel is not None and data_parallel != replicas:
        raise DistributedError(
            f"data_parallel={data_parallel} replicas of the plan's {stages} need {data_parallel * count} ranks, "
            f"but {ranks} run: launch {data_parallel * count} processes (torchrun "
            f"--nproc-per-node={data_parallel * count} ...), or pass data_parallel={replicas} (or leave it out)")
    if plan.data_parallel != replicas:
        planned = plan.data_parallel * count
        raise DistributedError(
            f"the plan was made for {plan.data_parallel} data-parallel replica{'s' if plan.data_parallel != 1 else ''} "
            f"of {stages} ({planned} ranks), and its memory counts what each rank keeps for that many, but "
            f"{ranks} run ({replicas} replica{'s' if replicas != 1 else ''}): launch {planned} processes (torchrun "
            f"--nproc-per-node={planned} ...), or plan for {replicas} replicas (plan_and_broadcast(model, ..., "
            f"data_parallel={replicas}), or SolverOptions(data_parallel={replicas}) on a cluster of all "
            f"{world_size} devices)")
    return replicas


def pipeline_mesh(device: torch.device, replicas: int, stages: int, timeout_s: float = DEFAULT_TIMEOUT_S,
                  tensor_parallel: int = 1) -> DeviceMesh:
    """The world as a DeviceMesh of shape (replicas, stages) with dims ``("dp", "pp")``: rank =
    replica × stages + stage; or, for a tensor-parallel plan, of shape (replicas, stages, tp)
    with dims ``("dp", "pp", "tp")``: rank = (replica × stages + stage) × tp + i, so a stage's
    group is tp consecutive ranks (one host's devices, as the plan places them). Its process
    groups (``mesh.get_group("dp")``: a stage's replicas; ``"pp"``: a replica's stages, at one
    position of their groups; ``"tp"``: a stage's group) wait ``timeout_s`` for their peers."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
    else:
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
    shape, names = ((replicas, stages), ("dp", "pp")) if tensor_parallel == 1 else \
        ((replicas, stages, tensor_parallel), ("dp", "pp", "tp"))
    return init_device_mesh(device.type, shape, mesh_dim_names=names,
                            backend_override={name: (backend, options) for name in names})


def refuse_replicated_writes(traced: Traced, replicas: int, tensor_parallel: int = 1) -> None:
    """Refuse a model that writes its own parameters or buffers in forward (a step counter, an
    EMA) when it runs as several data-parallel replicas: each replica would update its copy from
    its share of the batch, and the copies would part from each other and from the model's; or
    on tensor-parallel groups, whose DTensor weights are not written in place.

    Raises:
        MicrobatchError: the model writes a parameter or buffer, and ``replicas`` > 1 or
            ``tensor_parallel`` > 1.
    """
    written = traced.written()
    if replicas == 1 and tensor_parallel == 1 or not written:
        return
    name = next(iter(written))
    more = f" (and {len(written) - 1} more)" if len(written) > 1 else ""
    if replicas == 1:
        raise MicrobatchError(
            f"the model updates {name}{more} in forward, and its stages run on groups of {tensor_parallel} ranks that "
            "hold their weights and buffers as DTensors, which this runtime does not write in place: plan with "
            "tensor_parallel=1, or move the update out of forward (e.g. into the training loop, once per step)")
    raise MicrobatchError(
        f"the model updates {name}{more} in forward, and with {replicas} data-parallel replicas each would update "
        "its own copy from its share of the batch, instead of the model's once from the whole batch: run one "
        "replica, or move the update out of forward (e.g. into the training loop, once per step)")


def shard_stage(model: nn.Module, module: nn.Module, mesh: DeviceMesh, held: dict[int, torch.Tensor]
                ) -> dict[int, torch.Tensor]:
    """Shard a stage over its replicas with FSDP2 (``fully_shard`` on the ``dp`` sub-mesh, the
    stage one unit, gathered once per step: ``reshard_after_forward=False``), and put FSDP2's
    sharded parameters in the model wherever it held the originals (a tied weight stays tied,
    and no whole copy is left behind). Returns the rank's tensors by id, as ``held``, with the
    sharded parameters in place of the originals."""
    slots = [(owner, name, p) for owner in module.modules()
             for name, p in owner.named_parameters(recurse=False, remove_duplicate=False)]
    if not slots:  # nothing to shard or reduce
        return held
    fully_shard(module, mesh=mesh["dp"], reshard_after_forward=False)
    sharded = {id(p): getattr(owner, name) for owner, name, p in slots}
    for owner in model.modules():
        for name, p in list(owner.named_parameters(recurse=False, remove_duplicate=False)):
            if id(p) in sharded and sharded[id(p)] is not p:
                setattr(owner, name, sharded[id(p)])
    return {id(sharded.get(key, t)): sharded.get(key, t) for key, t in held.items()}


def plan_digest(plan: Plan) -> str:
    """sha256 of the plan's JSON (keys sorted): equal for equal plans, wherever they were made
    or loaded."""
    return hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def check_same_plan(plan: Plan) -> None:
    """Refuse, on every rank, to go on unless every rank holds the same plan.

    Raises:
        DistributedError: the plans' digests differ; says which ranks hold which.
    """
    mine = (plan_digest(plan), len(plan.stages), plan.microbatches, plan.schedule, plan.fingerprint)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if len({digest for digest, *_ in everyone}) == 1:
        return
    held = "; ".join(f"rank {r}: {d[:12]} ({n} stages, {m} microbatches, {s}, graph {f[:12]})"
                     for r, (d, n, m, s, f) in enumerate(everyone))
    raise DistributedError(
        f"the ranks hold different plans ({held}), and every rank must run its part of one plan. Save one plan and "
        "load it on every rank (plan.save(path), Plan.load(path)), or plan on rank 0 and share it with "
        "autosplit.distributed.plan_and_broadcast(...)")


def raise_on_every_rank(error: BaseException | None, doing: str) -> None:
    """Tell every rank whether any failed to ``doing``; raise on every rank if one did: the
    failing rank its own error, the others a :class:`DistributedError` with its message."""
    messages: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if error is not None:
        raise error
    if failed:
        raise DistributedError("; ".join(f"rank {rank} could not {doing}: {message}" for rank, message in failed))


def _seed_of_rank_0() -> int:
    """Rank 0's ``torch.initial_seed()``, on every rank: the seed a model on ``meta`` is
    initialized from, the same on every rank whether or not the ranks seeded alike."""
    seed = [torch.initial_seed()]
    dist.broadcast_object_list(seed, src=0)
    return seed[0]


def _held_tensors(model: nn.Module, chain: StageChain, stages: Sequence[int]) -> dict[int, torch.Tensor]:
    """The tensors this rank holds, by id: what its stages read, and the parameters and buffers
    the plan stores on them (read by no op, they still belong to one rank)."""
    held = {id(t): t for stage in stages for t in stage_tensors(chain.modules[stage])}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if chain.homes.get(name) in stages:
            held.setdefault(id(t), t)
    return held


def _shared_weight_groups(model: nn.Module, chain: StageChain, plan: Plan, replicas: int, timeout_s: float
                          ) -> list[tuple[str, nn.Parameter, Any]]:
    """A process group for every set of ranks of one replica that read a common weight (with
    tensor parallelism, the ranks at one position of their stages' groups: each holds the same
    shard of its copy), made in the same order on every rank (``new_group`` is collective); this
    rank's shared weights with their groups."""
    tp = plan.tensor_parallel
    count = len(plan.device_stages()) * tp  # ranks per replica
    stages_of = stages_of_ranks(plan, count * replicas, replicas)
    shared = shared_weights(chain, model)
    rank = dist.get_rank()
    groups: dict[tuple[int, ...], Any] = {}
    mine = []
    for replica in range(replicas):
        for i in range(tp):
            at_i = range(replica * count + i, (replica + 1) * count, tp)  # position i of every group
            rank_of = {stage: r for r in at_i for stage in stages_of[r]}
            ranks_of = {name: tuple(sorted({rank_of[s] for s in stages})) for name, stages in shared.items()}
            for ranks in sorted({ranks for ranks in ranks_of.values() if len(ranks) > 1}):
                groups[ranks] = dist.new_group(list(ranks), timeout=timedelta(seconds=timeout_s))
            mine += [(name, ranks) for name, ranks in ranks_of.items() if len(ranks) > 1 and rank in ranks]
    parameters = dict(model.named_parameters())
    return [(name, parameters[name], groups[ranks]) for name, ranks in mine]


def require_runnable(plan: Plan) -> None:
    """Refuse, before any process group starts, a plan this runtime cannot run as priced."""
    if plan.tensor_parallel > 1 and plan.stages_per_device > 1:
        raise ValueError(f"the plan runs {plan.stages_per_device} stages per device group ({plan.schedule}) on "
                         f"groups of {plan.tensor_parallel}, which autosplit.distributed does not run: plan with "
                         "stages_per_device=1, or tensor_parallel=1")


def check_traced_batch(model: nn.Module, plan: Plan, args: tuple, kwargs: dict, replicas: int,
                       batch_dims: Mapping[str, int | None] | None, tracer: str,
                       leaf_modules: Sequence[type[nn.Module] | str]) -> bool:
    """Check the plan against the model captured at the plan's traced batch, when it runs
    microbatches of another size (``Plan.traced_batch``: a joint plan made from one traced
    microbatch, priced at the size it chose); True when it did, so that the capture at the
    run's microbatch is not checked against the plan's fingerprint again.

    Raises:
        PlanMismatchError: the plan was made for another graph.
        MicrobatchError: the batch is not a multiple of the traced batch.
    """
    traced_batch = plan.traced_batch
    if traced_batch is None or plan.microbatch_size is None:
        return False
    samples = plan.microbatches * replicas * plan.microbatch_size
    if samples % traced_batch:
        raise MicrobatchError(f"the plan was made from a capture of {traced_batch} samples and runs {samples} per "
                              f"step, which is not a multiple of it: plan again with example inputs of a size that "
                              f"divides {samples}")
    checked = capture_microbatch(model, args, kwargs, microbatches=samples // traced_batch, batch_dims=batch_dims,
                                 training=plan.mode == "train", tracer=tracer, leaf_modules=leaf_modules)
    check_fingerprint(checked.traced, plan)
    return True


def parallelize_stages(model: nn.Module, chain: StageChain, traced: Traced, plan: Plan, stages: Sequence[int],
                       mesh: DeviceMesh, held: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Lay this rank's stages out on their tensor-parallel group (``mesh``) as the plan says
    (:func:`autosplit.distributed.tensor_parallel.parallelize_stage`), and put the DTensor
    weights in the model wherever it held the originals (a tied weight stays tied, and no whole
    copy is left behind). Returns the rank's tensors by id, as ``held``, with the DTensors in
    place of the originals."""
    replaced: dict[int, torch.Tensor] = {}
    for s in stages:
        replaced.update(parallelize_stage(chain.modules[s], traced, plan.layouts, mesh, last=s == len(plan.stages) - 1))
    for owner in model.modules():
        for name, t in [*owner.named_parameters(recurse=False, remove_duplicate=False),
                        *owner.named_buffers(recurse=False, remove_duplicate=False)]:
            if id(t) in replaced and replaced[id(t)] is not t:
                value = replaced[id(t)]
                if isinstance(value, nn.Parameter):
                    owner._parameters[name] = value
                else:
                    owner._buffers[name] = value
    return {id(replaced.get(key, t)): replaced.get(key, t) for key, t in held.items()}


def _local_metas(module: fx.GraphModule, metas: tuple[torch.Tensor, ...], kind: type) -> tuple[torch.Tensor, ...]:
    """What one rank of a stage receives or sends (``kind``: ``Receive``, ``Send``): the whole
    tensors' metas, or each rank's shards' on a tensor-parallel stage."""
    for m in module.modules():
        if isinstance(m, kind) and m.layout is not None:
            return m.layout.local_metas(metas)
    return metas


def _example_batch(example_inputs: Any, example_kwargs: dict[str, Any] | None) -> tuple[tuple, dict]:
    if example_inputs is None and not example_kwargs:
        raise ValueError("the pipeline is built from an example batch: pass example_inputs=(x,) (and "
                         "example_kwargs=...), a batch as step() will get it")
    args = example_inputs if isinstance(example_inputs, tuple) else (
        (example_inputs,) if example_inputs is not None else ())
    if any(isinstance(x, TensorSpec) for x in args):
        raise ValueError("the pipeline runs the model, so it needs real example tensors, not specs")
    return args, dict(example_kwargs or {})


def _holds_tensor(value: Any) -> bool:
    return any(isinstance(x, (torch.Tensor, TensorSpec)) for x in torch.utils._pytree.tree_leaves(value))


def _differs(was: Any, value: Any) -> bool:
    if isinstance(value, torch.Tensor) or isinstance(was, torch.Tensor):
        return True
    try:
        return bool(was != value)
    except Exception:  # objects without a usable comparison are not checked
        return False

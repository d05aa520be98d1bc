"""A Plan run over ranks by torch.distributed.pipelining: one stage per rank.

    pipe = build(model, plan, loss_fn=loss_fn, example_inputs=(x,))   # the same line on every rank
    opt = torch.optim.AdamW(pipe.parameters())   # this rank's parameters, named as in the model
    for x, y in data:
        loss = pipe.step(x, target=y)            # the batch's mean loss on the last rank, None elsewhere
        opt.step(); opt.zero_grad()

:func:`build` runs these steps on every rank, in this order:

1. The process group: the caller's, or one it starts from torchrun's environment (nccl on
   ``cuda:<LOCAL_RANK>`` where CUDA is available, gloo on the CPU otherwise), with a timeout.
2. Agreement: a world size other than the plan's stage count is refused (every rank knows both,
   so every rank refuses); then the ranks compare sha256 digests of their plans and all refuse
   if any differs. Planning is not deterministic across processes (CPU calibration drifts), so
   one rank plans (:func:`plan_and_broadcast`) or every rank loads one plan file.
3. Its own stage: the model is captured on one microbatch exactly as ``autosplit()`` captures it
   (:func:`autosplit.api.capture_microbatch`), the plan's fingerprint is checked, the stages are
   built (:func:`autosplit.distributed.stages.stage_chain`), and the tensors this rank's stage
   reads, with those the plan stores on it, move to the rank's device; the rest of the model is
   left where it is. A failure on any rank is raised on every rank, with that rank's message.
4. The pipeline's own process groups (:class:`autosplit.distributed.failures.FailureChannel`):
   one over all ranks for the stages' sends and receives, and for each set of ranks that read a
   common weight (a tied embedding and LM head: each of them holds a copy) one for summing its
   gradients, made in the same order on every rank; and the store key under which a rank that
   fails in a step reports it, so that every rank raises its error at once instead of waiting
   for it until the group's timeout (see ``failures.py``).
5. ``PipelineStage`` with the chain's fixed shapes (no shape inference runs, so later stages
   never compute on uninitialized inputs), and the schedule the plan names with its microbatches.

Loss and gradients. PyTorch 2.13's schedules compute ``loss_fn(output, target)`` on every
microbatch and back-propagate each; with ``scale_grads=True`` they then divide every gradient of
the stage by the number of microbatches m, the gradients accumulated by earlier steps included.
Here each microbatch's loss is divided by m instead (``scale_grads=False``): for a loss that is a
mean over its microbatch, the m terms sum to the mean over the batch (the microbatches are
equal), so loss and gradients equal the unsplit model's ``loss_fn(model(x), y)``, and gradients
accumulated over several steps without ``zero_grad`` stay as they were. :meth:`DistributedPipeline.step`
returns that sum. A loss that sums over its samples would need no division; it is not supported.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.pipelining.microbatch import TensorChunkSpec, _Replicate

from autosplit.api import capture_microbatch, solve_captured
from autosplit.distributed.failures import FailureChannel
from autosplit.distributed.stages import StageChain, Wire, shared_weights, stage_chain, stage_tensors
from autosplit.errors import DistributedError, InputSignatureError, MicrobatchError
from autosplit.plan import Plan
from autosplit.rewrite import move_state, refuse_batch_statistics, transfer
from autosplit.trace import TensorSpec, require_module

logger = logging.getLogger(__name__)

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
"""The pipelining schedule of each ``Plan.schedule``."""

DEFAULT_TIMEOUT_S = 600.0
"""How long a collective or a send may wait for the other ranks before it fails (a process group
this module starts, and the groups it makes for shared weights)."""


class DistributedPipeline:
    """This rank's part of a model pipelined over ranks (:func:`build` makes it).

    Holds the rank's stage (a graph module over the model's own submodules and parameters) and
    the schedule that runs it. :meth:`parameters` and :meth:`named_parameters` give the
    parameters the stage reads or the plan stores on it, under the model's names, for the
    optimizer; a weight that other stages read too is this rank's copy, kept equal to theirs by
    summing the copies' gradients in every :meth:`step`.
    """

    def __init__(self, model: nn.Module, plan: Plan, chain: StageChain, stage: int, device: torch.device,
                 schedule: Any, shared: Sequence[tuple[str, nn.Parameter, Any]], held: set[int],
                 batch_dims: Sequence[int | None], fixed_kwargs: Mapping[str, Any], failures: FailureChannel):
        self.plan = plan
        self.stage = stage
        """The index of this rank's stage."""
        self.device = device
        self.module = chain.modules[stage]
        """The stage's graph module: takes what the previous stage sends, returns what it sends."""
        self.microbatches = plan.microbatches
        self.is_first = stage == 0
        self.is_last = stage == len(plan.stages) - 1
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
        for module in self.module.modules():  # the stage's own containers and mode-following ops too
            module.training = mode
        return self

    def eval(self) -> "DistributedPipeline":
        return self.train(False)

    def step(self, *args: Any, target: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
        """Run forward and backward of one batch through the pipeline, on every rank.

        Call it on every rank with the same arguments as the model's forward (``pipe.step(x,
        target=y)``): the first stage reads the batch, the last computes ``loss_fn`` on each
        microbatch's output and its slice of ``target`` (cut along dimension 0). Afterwards each
        rank's parameters hold their gradients, shared weights the sum over the ranks that read
        them, added to any gradient already there.

        Returns:
            On the last rank, the loss of the batch: the mean of the microbatches' losses, as
            ``loss_fn(model(x), y)`` for a loss that is a mean over samples; None elsewhere.

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
        refuse_batch_statistics(self._batch_norms, self.microbatches)
        return first

    def _run_schedule(self, first: tuple[torch.Tensor, ...] | None, target: torch.Tensor) -> torch.Tensor | None:
        set_aside = [p.grad for _, p, _ in self._shared]
        for _, p, _ in self._shared:
            p.grad = None
        losses: list[torch.Tensor] = []
        self._schedule.step(*(first if self.is_first else ()),
                            target=transfer(target, self.device) if self.is_last else None,
                            losses=losses if self.is_last else None, return_outputs=False)
        self._sum_shared_gradients(set_aside)
        if not self.is_last:
            return None
        return torch.stack([loss.detach() for loss in losses]).sum()

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
        m = self.microbatches
        for value, was, name, dim in zip(flat, self._chain.input_values, self._chain.input_arguments,
                                         self._batch_dims, strict=True):
            if isinstance(was, torch.Tensor):
                expected = list(was.shape)
                if dim is not None:
                    expected[dim] *= m
                got = (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else None
                if got != (tuple(expected), was.dtype):
                    what = f"shape {got[0]} ({got[1]})" if got else f"a {type(value).__name__}"
                    per = f": {m} microbatches of {tuple(was.shape)}" if dim is not None and m > 1 else ""
                    raise InputSignatureError(
                        f"input {name!r} is {what}, but the pipeline was built for shape {tuple(expected)} "
                        f"({was.dtype}){per}, and its stages exchange tensors of fixed shapes. Pass batches of that "
                        "shape (e.g. drop_last=True in the DataLoader), or build the pipeline again for this shape")
            elif _differs(was, value):
                raise InputSignatureError(
                    f"argument {name!r} was {was!r} when the pipeline was built, and its stages compute with that "
                    f"value, not {value!r}: pass {was!r}, or build the pipeline again with {name}={value!r}")
        return tuple(flat[i] for i in self._chain.first_inputs)

    def _check_target(self, target: Any) -> None:
        if not isinstance(target, torch.Tensor) or target.dim() == 0:
            got = "a scalar tensor" if isinstance(target, torch.Tensor) else type(target).__name__
            raise TypeError(f"target must be a tensor whose dimension 0 is the batch, cut into {self.microbatches} "
                            f"microbatches; got {got}")
        if target.shape[0] % self.microbatches:
            raise MicrobatchError(f"a target of {target.shape[0]} samples cannot be cut into {self.microbatches} "
                                  f"equal microbatches: pass a batch that is a multiple of {self.microbatches}")

    def _sum_shared_gradients(self, set_aside: list[torch.Tensor | None]) -> None:
        """Sum this step's gradients of each shared weight over the ranks that read it, then add
        back what was accumulated before the step. A weight that got no gradient on any of those
        ranks keeps None, as in the unsplit model."""
        for (_, p, group), before in zip(self._shared, set_aside):
            got = torch.tensor([int(p.grad is not None)], device=self.device)
            dist.all_reduce(got, op=dist.ReduceOp.MAX, group=group)
            if got.item():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=group)
            if before is not None:
                p.grad = before if p.grad is None else before.add_(p.grad)


def build(model: nn.Module, plan: Plan, *, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
          example_inputs: Any = None, example_kwargs: dict[str, Any] | None = None,
          batch_dims: Mapping[str, int | None] | None = None, tracer: str = "auto",
          leaf_modules: Sequence[type[nn.Module] | str] = (), timeout_s: float = DEFAULT_TIMEOUT_S
          ) -> DistributedPipeline:
    """Build this rank's stage of ``plan`` and the schedule that runs it (see the module docstring).

    Every rank calls it with the same arguments. The process group is the caller's, or one this
    call starts (launch with ``torchrun --nproc-per-node=<stages>``).

    Args:
        model: the model, with real weights, the same on every rank (same seed or checkpoint).
        plan: the plan every rank applies (``Plan.load(path)`` on every rank, or
            :func:`plan_and_broadcast`); one stage per rank, its schedule (``"gpipe"`` or
            ``"1f1b"``) and microbatches are the ones run.
        loss_fn: ``loss_fn(output, target)`` on one microbatch, a mean over its samples (e.g.
            ``F.cross_entropy``); ``output`` has the model's output structure.
        example_inputs, example_kwargs: a batch (all microbatches) of the model's inputs, as
            :meth:`DistributedPipeline.step` will get them; the first microbatch is captured.
        batch_dims: the batch dimension of inputs that are not batch-first (see ``autosplit()``).
        tracer, leaf_modules: how the model is captured; as when the plan was made.
        timeout_s: how long a rank waits for the others before failing.

    Raises:
        DistributedError: the world size differs from the stage count, the ranks hold different
            plans, or a rank failed to build its stage (raised on every rank).
        PlanMismatchError: the plan was made for another graph.

    Example:
        >>> plan = Plan.load("plan.json")
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
    if plan.mode != "train":
        raise ValueError(f"the plan was made for mode={plan.mode!r}, and the distributed runtime trains (its memory "
                         "holds gradients and optimizer state): plan again with mode='train'")
    if plan.schedule == "1f1b" and plan.microbatches < len(plan.stages):
        raise ValueError(f"1F1B needs at least as many microbatches as stages, and the plan has {plan.microbatches} "
                         f"for {len(plan.stages)} stages: plan again with microbatches >= {len(plan.stages)}, or "
                         "schedule='gpipe'")
    args, kwargs = _example_batch(example_inputs, example_kwargs)
    device = init_process_group(timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    (stage,) = stages_of_ranks(plan, world)[rank]
    check_same_plan(plan)

    error = None
    try:
        captured = capture_microbatch(model, args, kwargs, microbatches=plan.microbatches, batch_dims=batch_dims,
                                      training=plan.mode == "train", tracer=tracer, leaf_modules=leaf_modules)
        chain = stage_chain(model, captured, plan, device)
        held = _held_tensors(model, chain, stage)
        move_state([(t, device) for t in held.values()])
    except Exception as e:  # every rank must learn of it, or the others would wait for this one
        error = e
    raise_on_every_rank(error, "build its stage")

    failures = FailureChannel.create(stage, len(plan.stages), timeout_s)
    shared = _shared_weight_groups(model, chain, plan, timeout_s)
    for group in {id(group): group for _, _, group in shared}.values():
        failures.add_group(group)
    dims = [captured.batch_dims.get(name) if plan.microbatches > 1 else None for name in chain.input_arguments]
    first_dims = [dims[i] for i in chain.first_inputs]
    pipeline_stage = PipelineStage(chain.modules[stage], stage, len(plan.stages), device,
                                   input_args=chain.received[stage], output_args=chain.sent[stage],
                                   group=failures.group)
    schedule = SCHEDULES[plan.schedule](
        pipeline_stage, plan.microbatches, loss_fn=MicrobatchLoss(loss_fn, chain.output, plan.microbatches),
        args_chunk_spec=tuple(TensorChunkSpec(d) if d is not None else _Replicate() for d in first_dims),
        scale_grads=False)
    fixed_kwargs = {k: v for k, v in captured.traced.example_kwargs.items() if not _holds_tensor(v)}
    logger.info("rank %d runs stage %d of %d on %s: %d parameters, %d shared with other ranks", rank, stage,
                len(plan.stages), device, sum(isinstance(t, nn.Parameter) for t in held.values()), len(shared))
    return DistributedPipeline(model, plan, chain, stage, device, schedule, shared, set(held), dims, fixed_kwargs,
                               failures)


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
                       timeout_s: float = DEFAULT_TIMEOUT_S, **options: Any) -> Plan:
    """Plan on rank 0 and give every rank that plan: the ranks must apply one plan, and plans
    made in separate processes can differ (CPU calibration drifts between them).

    Called on every rank with the same arguments, like :func:`build` (whose ``example_inputs``
    it takes: a batch of all microbatches, of which the first is captured). Rank 0 plans one
    stage per rank; the others wait for its plan (``broadcast_object_list``).

    Args:
        devices: what to plan for, as in ``autosplit.plan``; default: as many local devices as
            ranks. ``cluster`` describes other hardware, e.g. ``"2x8xh100"`` for two hosts.
        microbatches, mode, options: the solver's (``schedule``, ``memory_headroom``, ``pin``...).

    Raises:
        DistributedError: rank 0 could not plan (its message is raised on every rank).

    Example:
        >>> plan = autosplit.distributed.plan_and_broadcast(model, example_inputs=(x,), microbatches=8)
        >>> pipe = autosplit.distributed.build(model, plan, loss_fn=loss_fn, example_inputs=(x,))
    """
    require_module(model, "autosplit.distributed.plan_and_broadcast")
    args, kwargs = _example_batch(example_inputs, example_kwargs)
    init_process_group(timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    plan, error = None, None
    if rank == 0:
        try:
            captured = capture_microbatch(model, args, kwargs, microbatches=microbatches, batch_dims=batch_dims,
                                          training=mode == "train", tracer=tracer, leaf_modules=leaf_modules)
            options.setdefault("stages", world)
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


def stages_of_ranks(plan: Plan, world_size: int) -> list[tuple[int, ...]]:
    """The stages each rank runs: stage r on rank r. (A schedule that gives a rank several
    stages, such as interleaved 1F1B, would map rank r to stages r, r + W, r + 2W...)

    Raises:
        DistributedError: the world size differs from the plan's stage count.
    """
    count = len(plan.stages)
    if world_size != count:
        raise DistributedError(
            f"the plan has {count} stages, one per rank, but {world_size} rank{'s' if world_size != 1 else ''} "
            f"run: launch {count} processes (torchrun --nproc-per-node={count} ...), or plan {world_size} stages "
            f"for this world (plan_and_broadcast(model, ...) plans one per rank; autosplit.plan(model, "
            f"devices={world_size}, ...))")
    return [(rank,) for rank in range(world_size)]


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


def _held_tensors(model: nn.Module, chain: StageChain, stage: int) -> dict[int, torch.Tensor]:
    """The tensors this rank holds, by id: what its stage reads, and the parameters and buffers
    the plan stores on it (read by no op, they still belong to one rank)."""
    held = {id(t): t for t in stage_tensors(chain.modules[stage])}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if chain.homes.get(name) == stage:
            held.setdefault(id(t), t)
    return held


def _shared_weight_groups(model: nn.Module, chain: StageChain, plan: Plan, timeout_s: float
                          ) -> list[tuple[str, nn.Parameter, Any]]:
    """A process group for every set of ranks that read a common weight, made in the same order
    on every rank (``new_group`` is collective); this rank's shared weights with their groups."""
    rank_of = {stage: rank for rank, stages in enumerate(stages_of_ranks(plan, dist.get_world_size()))
               for stage in stages}
    ranks_of = {name: tuple(sorted({rank_of[s] for s in stages}))
                for name, stages in shared_weights(chain, model).items()}
    ranks_of = {name: ranks for name, ranks in ranks_of.items() if len(ranks) > 1}
    groups = {ranks: dist.new_group(list(ranks), timeout=timedelta(seconds=timeout_s))
              for ranks in sorted(set(ranks_of.values()))}
    parameters = dict(model.named_parameters())
    rank = dist.get_rank()
    return [(name, parameters[name], groups[ranks]) for name, ranks in ranks_of.items() if rank in ranks]


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

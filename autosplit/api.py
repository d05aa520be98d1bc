"""The two entry points: ``autosplit.plan`` (where would it run?) and ``autosplit.autosplit``
(run it there).

    sm = autosplit.autosplit(model, devices=4, example_inputs=(x,))
    opt = torch.optim.AdamW(sm.parameters())                     # the loop is unchanged
    loss = loss_fn(sm(x), y.to(sm.output_device)); loss.backward(); opt.step()
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.utils._pytree as pytree
from torch import nn

from autosplit.errors import AutosplitError, InputSignatureError, MicrobatchError
from autosplit.graph import OpGraph
from autosplit.modes import in_mode, written_flags
from autosplit.pipeline import batch_size, check_batch_dims, cut_microbatches, resolve_batch_dims
from autosplit.plan import Plan
from autosplit.rewrite import SplitModule, split_module
from autosplit.schedule import recheck_schedule
from autosplit.solver import SolverOptions, solve
from autosplit.trace import TRACERS, TensorSpec, Traced, capture, require_module
from cost_models import Cluster, price_graph

logger = logging.getLogger(__name__)

_SOLVER_FIELDS = {f.name for f in dataclasses.fields(SolverOptions)}


def resolve_devices(devices: int | Sequence[str | torch.device]) -> list[torch.device]:
    """An int means the first N accelerators (N CPU devices on a machine without one)."""
    if isinstance(devices, int) and not isinstance(devices, bool):
        if devices < 1:
            raise ValueError(f"devices must be at least 1, e.g. devices=4; got {devices}")
        if torch.cuda.is_available():
            if devices > torch.cuda.device_count():
                raise ValueError(f"devices={devices} but this machine has {torch.cuda.device_count()} CUDA "
                                 "devices: ask for fewer, or list them, e.g. ['cuda:0', 'cuda:1', 'cpu']")
            return [torch.device("cuda", i) for i in range(devices)]
        return [torch.device("cpu")] * devices
    if isinstance(devices, (str, torch.device)):
        devices = [devices]
    resolved = [torch.device(d) for d in devices]
    if not resolved:
        raise ValueError("devices must name at least one device, e.g. ['cuda:0', 'cuda:1']")
    return resolved


def plan(model: nn.Module, *, devices: int | Sequence[str | torch.device] = 4, example_inputs: Any = None,
         example_kwargs: dict[str, Any] | None = None, mode: str = "train", microbatches: int = 1,
         cluster: Cluster | str | None = None, tracer: str = "auto",
         leaf_modules: Sequence[type[nn.Module] | str] = (), **options: Any) -> Plan:
    """Plan the split of ``model``: capture, price and solve; no device is touched.

    Args:
        model: the model (its weights may be on ``meta``).
        devices: how many devices (an int) or which (``["cuda:0", "cuda:1", "cpu"]``).
        example_inputs, example_kwargs: one microbatch of inputs: tensors or ``spec`` shapes.
        mode, microbatches: see :class:`SolverOptions`; other ``options`` are its fields
            (``schedule``, ``memory_headroom``, ``pin``, ``no_split``...).
        cluster: plan for other hardware than the local devices, e.g. ``"8xh100"``.
        tracer: how the model is captured (see :func:`autosplit.capture`): ``"auto"`` (torch.fx,
            or torch.export where fx cannot capture the model or would drop its buffer writes),
            ``"fx"`` or ``"export"``.
        leaf_modules: module classes or qualified names that fx keeps as single nodes, e.g. a
            module whose forward fx cannot trace (the capture error names it).

    Example:
        >>> p = autosplit.plan(model, cluster="8xh100", example_inputs=(spec((1, 4096), dtype=torch.long),))
    """
    require_module(model, "plan")
    if example_inputs is None and not example_kwargs:
        raise ValueError("plan() needs example inputs, e.g. example_inputs=(x,) or "
                         "(autosplit.spec((8, 1024), dtype=torch.long),)")
    _check_tracer(tracer)
    traced = capture(model, example_inputs if example_inputs is not None else (), example_kwargs, tracer=tracer,
                     leaf_modules=leaf_modules)
    return solve_captured(traced, devices, cluster, mode, microbatches, options)


def autosplit(model: nn.Module, *, devices: int | Sequence[str | torch.device] = 4, example_inputs: Any = None,
              example_kwargs: dict[str, Any] | None = None, mode: str = "train", microbatches: int | None = None,
              cluster: Cluster | str | None = None, plan: Plan | None = None, output_device: Any = None,
              batch_dims: Mapping[str, int | None] | None = None, tracer: str = "auto",
              leaf_modules: Sequence[type[nn.Module] | str] = (), **options: Any) -> SplitModule:
    """Split ``model`` over ``devices`` and return a module that trains like it.

    Without example inputs the split is planned on the first forward call, with that batch. With
    ``plan`` (e.g. ``Plan.load(path)``) that plan is applied instead of solving again, on the
    devices it assigns each stage; its memory is checked again for the GPipe wavefront this
    runner runs (a plan made for 1F1B may not fit when every stage holds all microbatches).

    With ``microbatches`` = m > 1 (default: the plan's, else 1) every call cuts its batch into m
    equal microbatches along dimension 0 and runs the stages in a GPipe wavefront, so the devices
    work at the same time; each output is joined again along its own batch dimension (found by
    capturing the model again at the whole batch, :func:`autosplit.rewrite.output_batch_dims`),
    and outputs and gradients equal m = 1. The split is captured and planned for one microbatch.
    Layers that couple the samples of a batch (BatchNorm in training mode), scalar outputs and
    outputs without a batch dimension of their own are refused with m > 1.

    ``batch_dims`` says which dimension of each input holds the batch, by forward-argument name
    (positional inputs by their parameter's name, keyword inputs by key): ``{"x": 1}`` cuts x
    along dimension 1, ``{"table": None}`` passes it whole to every microbatch; the dimension
    applies to every tensor of an argument that is a container. Undeclared inputs are taken as
    batch first: the batch is dimension 0 of the first tensor, and another tensor is cut along
    dimension 0 where that is its only dimension of the batch's size, passed whole where it has
    none. An input of the batch's size in another dimension, e.g. (seq, batch, hidden) with
    seq = batch or a (batch, batch) matrix, is refused until declared. The dimensions are fixed
    with the first batch and kept for every call.

    Buffers that ``forward`` writes in place (a step counter, an EMA, running statistics of a
    custom norm) are updated by the split once per call, as by the model, on the stage that
    stores them. ``tracer`` chooses the capture (see :func:`plan`); ``"auto"`` takes torch.export
    where fx would drop such a write, and ``tracer="fx"`` on such a model is refused. With
    microbatches > 1 such a model is refused: the update would run once per microbatch (but for
    an overwrite with a value computed from weights alone, which repeats the same result).

    Example:
        >>> sm = autosplit(model, devices=2, example_inputs=(x,))
        >>> sm(x).sum().backward()
    """
    require_module(model, "autosplit")
    if options.get("global_batch") is not None:
        raise ValueError("autosplit() runs the batches it is given, one process over its devices, a pipeline of whole "
                         "layers: plan a global batch (mesh, tensor layouts, microbatch size) with "
                         "autosplit.plan(..., global_batch=N) instead")
    if microbatches is None:
        microbatches = plan.microbatches if plan is not None else 1
    if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
        raise ValueError(f"microbatches must be a positive int, e.g. microbatches=4; got {microbatches!r}")
    resolved = resolve_devices(devices)
    _check_options(options)
    _check_tracer(tracer)
    replicas = plan.data_parallel if plan is not None else options.get("data_parallel", 1)
    if replicas != 1:
        raise ValueError(f"data_parallel={replicas} runs replicas of the pipeline in separate processes, each on "
                         "its own slice of the batch: launch them with torchrun and call "
                         "autosplit.distributed.build(model, plan, ...) on every rank; in one process, split one "
                         "replica (a plan made without data_parallel)")
    if batch_dims is not None:
        if not isinstance(batch_dims, Mapping):
            raise TypeError(f"batch_dims must map forward-argument names to the batch dimension or None, "
                            f"e.g. batch_dims={{'x': 1}}; got {type(batch_dims).__name__}")
        names = _input_names(model)
        check_batch_dims(batch_dims, names if names is not None else list(batch_dims))
    if options.setdefault("schedule", "gpipe") != "gpipe":
        raise ValueError(f"schedule={options['schedule']!r}: in one process the stages run a GPipe wavefront "
                         "(forward of every microbatch, then backward); leave schedule out or pass 'gpipe'")
    if plan is not None and plan.reads_weights_across_stages and plan.shared_weights != "sent":
        raise ValueError("the plan prices each weight read on several stages (a tied embedding and head) as a copy "
                         "trained on every stage that reads it, as autosplit.distributed runs it; in one process the "
                         "stage storing it sends it to the others once per call: plan with shared_weights='sent' (the "
                         "default of autosplit.plan), or run the plan with autosplit.distributed.build")
    if plan is not None:  # refuse a plan for other devices or memory before anything is captured or moved
        if plan.stages_per_device > 1:
            raise ValueError(f"the plan runs {plan.stages_per_device} stages on each device with schedule "
                             f"{plan.schedule!r}, which the distributed runtime runs (autosplit.distributed.build, one "
                             "process per device); in one process the stages run a GPipe wavefront: plan again with "
                             "schedule='gpipe' for autosplit()")
        stage_devices(plan, resolved, cluster)
        if (plan.schedule, plan.microbatches) != ("gpipe", microbatches):
            plan = recheck_schedule(plan, "gpipe", microbatches)  # what the one-process runner runs
    split = SplitModule(model, None, plan, resolved, torch.device(output_device) if output_device else resolved[-1],
                        microbatches)

    def build(args: tuple, kwargs: dict) -> None:
        captured = capture_microbatch(model, args, kwargs, microbatches=microbatches, batch_dims=batch_dims,
                                      training=mode == "train", tracer=tracer, leaf_modules=leaf_modules)
        traced = captured.traced
        chosen = plan if plan is not None else solve_captured(traced, resolved, cluster, mode, microbatches, options)
        built = split_module(model, traced, chosen, stage_devices(chosen, resolved, cluster), output_device,
                             microbatches, captured.written_flags, batch_dims=captured.batch_dims)
        split.attach(built)

    if example_inputs is not None or example_kwargs:
        inputs = example_inputs if isinstance(example_inputs, tuple) else ((example_inputs,) if example_inputs is not None else ())
        if any(isinstance(x, TensorSpec) for x in inputs):
            raise ValueError("autosplit() runs the model, so it needs real example tensors, not specs")
        build(inputs, dict(example_kwargs or {}))
    else:
        split.build_on_first_call(build)
    return split


@dataclasses.dataclass(frozen=True)
class CapturedMicrobatch:
    """A model captured for a split run with microbatches: what every runtime needs to build
    its stages from a plan."""

    traced: Traced
    """The capture of the first microbatch (the graph the plan was made for)."""
    args: tuple
    kwargs: dict
    """The first microbatch itself."""
    batch_dims: dict[str, int | None]
    """The batch dimension of every input by forward-argument name (empty for one microbatch)."""
    written_flags: frozenset[str]
    """Dropout and batch-norm flags the model's code fixes whatever its mode
    (:func:`autosplit.modes.written_flags`)."""


def capture_microbatch(model: nn.Module, args: tuple, kwargs: dict, *, microbatches: int,
                       batch_dims: Mapping[str, int | None] | None = None, training: bool = True,
                       tracer: str = "auto", leaf_modules: Sequence[type[nn.Module] | str] = ()) -> CapturedMicrobatch:
    """Capture ``model`` on the first of ``microbatches`` equal microbatches of a batch, in
    training or eval mode: the one-process split and the distributed runtime capture a model
    this way, so both build their stages from the graph a plan was made for.

    Raises:
        MicrobatchError: the batch cannot be cut, or a default tensor argument has the batch's size.
    """
    dims = input_batch_dims(model, args, kwargs, batch_dims, microbatches) if microbatches > 1 else {}
    if microbatches > 1:
        _refuse_batched_defaults(model, args, kwargs, dims, microbatches)
    args, kwargs = first_microbatch(args, kwargs, microbatches, batch_dims=dims, model=model)
    with _mode(model, training=training):
        traced = capture(model, args, kwargs, tracer=tracer, leaf_modules=leaf_modules)
    return CapturedMicrobatch(traced, args, kwargs, dims, _written_flags(model, traced, args, kwargs, leaf_modules))


def stage_devices(plan: Plan, devices: Sequence[torch.device], cluster: Cluster | str | None = None
                  ) -> list[torch.device]:
    """The device of each stage: the plan names a rank of its cluster per stage (the solver
    chooses which device runs which stage, e.g. cpu, rtx4090, rtx3090 for
    ``"rtx4090+rtx3090+cpu"``; with an interleaved schedule several stages name one rank), and
    rank r is ``devices[r]``. The devices (or ``cluster``, which describes them) must be of the
    kinds the plan was made for.

    Raises:
        ValueError: a stage's rank is not among the devices, or its device is of another kind.
    """
    if cluster is None:
        cluster = Cluster.from_devices([str(d) for d in devices])
    elif isinstance(cluster, str):
        cluster = Cluster.parse(cluster)
    ranks = plan.device_ranks()
    planned = [stage.devices[0].rpartition(":")[0] for stage in plan.stages]
    given = [cluster.devices[r].name if r < len(cluster) else None for r in ranks]
    if len(cluster) < len(devices) or any(r >= len(devices) for r in ranks) or planned != given:
        raise ValueError(
            f"the plan was made for {plan.cluster} (its stages run on {', '.join(s.devices[0] for s in plan.stages)}), "
            f"but the devices given are {cluster} ({', '.join(map(str, devices))}): apply it to devices of those kinds "
            "in that order, or plan again for these devices")
    return [devices[r] for r in ranks]


def _written_flags(model: nn.Module, traced: Traced, args: tuple, kwargs: dict,
                   leaf_modules: Sequence[type[nn.Module] | str] = ()) -> frozenset[str]:
    """The mode flags that the model's code fixes whatever its mode: found by capturing it once
    more in the other mode, when the graph has such flags at all."""
    if not any(in_mode(n, model, traced.training) for n in traced.graph.nodes):
        return frozenset()
    try:
        with _mode(model, training=not traced.training):
            other = capture(model, args, kwargs, tracer=traced.tracer, leaf_modules=leaf_modules)
    except AutosplitError as e:  # the split still works; flags equal to the capture's mode follow the mode
        logger.warning("could not capture the model in %s mode to tell fixed dropout flags from mode-following "
                       "ones (%s); every flag equal to the capture's mode will follow train()/eval()",
                       "training" if not traced.training else "eval", e)
        return frozenset()
    return written_flags(traced, other)


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Put ``model`` in train or eval mode for the capture, then give every module its own mode
    back. Captured in training mode, dropout and batch norm keep their rates and statistics
    updates in the graph, and the split module switches them with ``train()``/``eval()``."""
    modes = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, was in modes:
            module.training = was


def first_microbatch(args: tuple, kwargs: dict, microbatches: int, *, model: nn.Module | None = None,
                     batch_dims: Mapping[str, int | None] | None = None) -> tuple[tuple, dict]:
    """The first of ``microbatches`` equal microbatches of a call's inputs (the batch itself for 1):
    what a pipelined split is captured and planned with. Inputs are cut along the dimensions
    :func:`input_batch_dims` gives them (``batch_dims`` declares some or all); without ``model``
    every tensor is taken as an input of its own, batch first."""
    if microbatches == 1:
        return args, kwargs
    if model is None:
        flat, structure = pytree.tree_flatten((args, kwargs))
        return pytree.tree_unflatten(cut_microbatches(flat, microbatches)[0], structure)
    names, _ = _arguments(model, args, kwargs)
    dims = input_batch_dims(model, args, kwargs, batch_dims, microbatches)
    values = [*args, *kwargs.values()]
    first = cut_microbatches(values, microbatches, [dims[name] for name in [*names, *kwargs]])[0]
    return tuple(first[: len(args)]), dict(zip(kwargs, first[len(args):]))


def input_batch_dims(model: nn.Module, args: tuple, kwargs: dict, batch_dims: Mapping[str, int | None] | None,
                     microbatches: int) -> dict[str, int | None]:
    """The batch dimension (or None) of every input of a call, by forward-argument name:
    ``batch_dims`` where declared, the batch-first rule elsewhere (see :func:`autosplit`)."""
    _, arguments = _arguments(model, args, kwargs)
    declared = {name: dim for name, dim in (batch_dims or {}).items() if name in arguments}
    return resolve_batch_dims(arguments, declared, microbatches=microbatches)


def _refuse_batched_defaults(model: nn.Module, args: tuple, kwargs: dict, dims: Mapping[str, int | None],
                             microbatches: int) -> None:
    """A default tensor argument of ``forward`` left out of the call is part of the graph, whole:
    if it has a dimension of the batch's size it would meet microbatches of another size."""
    _, arguments = _arguments(model, args, kwargs)
    batch = batch_size(list(arguments.values()), [dims.get(name) for name in arguments])
    for p in inspect.signature(model.forward).parameters.values():
        default = p.default
        if p.name in arguments or not isinstance(default, torch.Tensor) or batch not in tuple(default.shape):
            continue
        raise MicrobatchError(
            f"{type(model).__name__}.forward's default for {p.name!r} is a tensor of shape {tuple(default.shape)}, "
            f"with the batch's size ({batch}): with microbatches={microbatches} it would meet microbatches of "
            f"{batch // microbatches}. Pass it at every call (it is then cut like the other inputs; "
            f"batch_dims={{{p.name!r}: None}} passes it whole), or use microbatches=1")


def _arguments(model: nn.Module, args: tuple, kwargs: dict) -> tuple[list[str], dict[str, Any]]:
    """The name of each positional input, and every input by name in the forward's order
    (``*args`` as one argument, ``**kwargs`` entries by key, after the named parameters)."""
    parameters = list(inspect.signature(model.forward).parameters.values())
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    rest = next((p.name for p in parameters if p.kind == p.VAR_POSITIONAL), None)
    if len(args) > len(positional) and rest is None:
        raise InputSignatureError(f"{type(model).__name__}.forward takes {len(positional)} positional inputs, "
                                  f"got {len(args)}: pass the rest by keyword")
    names = [positional[i] if i < len(positional) else rest for i in range(len(args))]
    given: dict[str, Any] = {}
    for name, value in zip(names, args):
        if name == rest:
            given.setdefault(name, []).append(value)
        else:
            given[name] = value
    given.update(kwargs)
    order = {p.name: i for i, p in enumerate(parameters)}
    return names, {name: given[name] for name in sorted(given, key=lambda n: order.get(n, len(order)))}


def _input_names(model: nn.Module) -> list[str] | None:
    """The names ``batch_dims`` may use: the forward's parameters (any name with ``**kwargs``)."""
    parameters = inspect.signature(model.forward).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters]


def solve_captured(traced: Traced, devices: int | Sequence[str | torch.device], cluster: Cluster | str | None,
                   mode: str, microbatches: int, options: dict[str, Any]) -> Plan:
    """Price and solve a captured graph for ``devices`` (or ``cluster``, which describes them)
    with the solver's ``options``: the plan that ``plan()``, ``autosplit()`` and the distributed
    runtime make."""
    _check_options(options)
    if cluster is None:
        cluster = Cluster.from_devices([str(d) for d in resolve_devices(devices)])
    elif isinstance(cluster, str):
        cluster = Cluster.parse(cluster)
    if options.get("global_batch") is not None and "samples_per_microbatch" not in options:
        options = dict(options, samples_per_microbatch=traced_batch(traced))
    solver_options = SolverOptions(mode=mode, microbatches=microbatches, **options)
    plan = solve_traced(traced, cluster, solver_options, price_graph(traced.graph_module, training=mode == "train"))
    return with_capture_notes(plan, traced)


def traced_batch(traced: Traced) -> int:
    """The batch the graph was captured at: dimension 0 of its first tensor input (1 without one)."""
    for leaf in pytree.tree_leaves((traced.example_args, traced.example_kwargs)):
        if isinstance(leaf, TensorSpec) and len(leaf.shape):
            return int(leaf.shape[0])
    return 1


def solve_traced(traced: Traced, cluster: Cluster, options: SolverOptions, costs: Mapping[str, Any]) -> Plan:
    """The plan of a captured graph: the pipeline solver, or with ``options.global_batch`` the
    joint search over meshes, tensor layouts, microbatches and recomputation."""
    graph = OpGraph.from_traced(traced)
    if options.global_batch is None:
        return solve(graph, cluster, options, costs=costs, parameters=traced.parameters, buffers=traced.buffers)
    from autosplit.solver.joint import sharding_for, solve_joint

    return solve_joint(graph, cluster, options, costs=costs, parameters=traced.parameters, buffers=traced.buffers,
                       sharding=sharding_for(traced, cluster, costs, options))


def with_capture_notes(plan: Plan, traced: Traced) -> Plan:
    """The plan with what the capture chose for the user among its solver notes."""
    if not traced.notes:
        return plan
    return dataclasses.replace(plan, solver=dataclasses.replace(plan.solver, notes=(*traced.notes, *plan.solver.notes)))


def _check_tracer(tracer: Any) -> None:
    if tracer not in TRACERS:
        raise ValueError(f"tracer must be one of {', '.join(map(repr, TRACERS))}, got {tracer!r}: \"auto\" picks "
                         "torch.fx, or torch.export where fx cannot capture the model or would drop its buffer writes")


def _check_options(options: dict[str, Any]) -> None:
    unknown = set(options) - _SOLVER_FIELDS
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; options are {', '.join(sorted(_SOLVER_FIELDS))}")

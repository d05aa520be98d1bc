"""Apply a Plan in one process: a module whose stages run on their devices.

    split = split_module(model, traced, plan, ["cuda:0", "cuda:1"])
    loss = loss_fn(split(x), y.to(split.output_device)); loss.backward(); opt.step()

The captured graph is copied node by node. Every node runs on its stage's device; a value read
on a later stage is relayed there stage by stage (``Tensor.to``, so autograd carries its
gradient back), as the plan prices it and as a multi-process pipeline sends it. Each parameter
and buffer is stored on the stage the plan names (``Stage.weights``: the first that reads it) and
sent from there to each other stage that reads it once per call, whatever the microbatch count
(a tied embedding and head stay one parameter; a module called at several depths reads its
weights where each call runs). Device arguments baked into the graph
(``arange(..., device=cpu)``) are pointed at the stage's device.
The module keeps the model's own submodules, so parameter names, ``state_dict`` keys, optimizers
and checkpoints are the model's.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import operator
from typing import Any, Callable, Collection, Mapping, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from autosplit.errors import AutosplitError, InputSignatureError, MicrobatchError
from autosplit.graph import LAYOUT_ONLY, OpGraph, draws_random
from autosplit.modes import in_mode
from autosplit.pipeline import SCALAR_OUTPUT, Pipeline, cut_microbatches, resolve_batch_dims, tensor_leaves
from autosplit.plan import Plan
from autosplit.trace import TensorSpec, Traced, capture

logger = logging.getLogger(__name__)

TRACED_NODE = "autosplit_traced_node"
"""``node.meta`` key of each op of a split graph: the traced node it runs, the name a plan knows
it by (an op fixed to the capture's mode becomes ``in_mode_k``; a value rebuilt on another
stage, a copy with a fresh name)."""


class PlanMismatchError(AutosplitError):
    """The plan was made for another graph than the model's."""


def transfer(value: Any, device: torch.device) -> Any:
    """Move every tensor in ``value`` to ``device`` (other values pass through)."""
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, value)


def deliver(value: Any, device: torch.device) -> Any:
    """Move the outputs to the device the caller asked for (nothing when they are there)."""
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) and x.device != device else x,
                           value)


def call_with_state(module: nn.Module, state: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
    """Call ``module`` with some of its parameters and buffers replaced by ``state`` (local name →
    tensor): copies sent to this stage of the weights it stores elsewhere."""
    return torch.func.functional_call(module, state, args, kwargs)


class SplitModule(nn.Module):
    """The model split over devices by a Plan; parameters keep their original names."""

    def __init__(self, model: nn.Module, graph_module: fx.GraphModule | None, plan: Plan | None,
                 devices: Sequence[torch.device], output_device: torch.device, microbatches: int = 1):
        super().__init__()
        # Every name the model's root holds, aliases included (``self.lin1 = self.lin0``: one module,
        # two names in the state_dict), and its buffers as persistent or not as they are: the split's
        # state_dict has the model's keys, so checkpoints load either way.
        for name, child in model._modules.items():
            self.add_module(name, child)
        for name, parameter in model._parameters.items():
            self.register_parameter(name, parameter)
        for name, buffer in model._buffers.items():
            self.register_buffer(name, buffer, persistent=name not in model._non_persistent_buffers_set)
        self.__dict__["graph_module"] = graph_module  # shares the submodules; not one of them
        self.__dict__["_model"] = model  # owns the ops at the top of the graph (their train/eval flags)
        self.training = model.training
        self.__dict__["_build"] = None
        self.plan = plan
        self.devices = list(devices)
        self.output_device = output_device
        self.microbatches = microbatches
        self.__dict__["_fixed_shapes"] = {}
        self.__dict__["_batch_norms"] = [name for name, m in model.named_modules()
                                         if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def build_on_first_call(self, build: Any) -> None:
        """Plan and split with the first batch: ``build(args, kwargs)`` then :meth:`attach`."""
        self.__dict__["_build"] = build

    def attach(self, built: "SplitModule") -> None:
        """Take over the graph, plan and devices of ``built`` (a split of the same model)."""
        self.__dict__["graph_module"] = built.graph_module
        self.plan, self.devices, self.output_device = built.plan, built.devices, built.output_device
        self.microbatches = built.microbatches
        self.__dict__["_fixed_shapes"] = built._fixed_shapes
        self.__dict__["_signature"] = built.__dict__.get("_signature")
        self.__dict__["_captured"] = built.__dict__.get("_captured")
        self.__dict__["_first_layers"] = built.__dict__.get("_first_layers", {})
        self.train(self.training)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.graph_module is None:
            if self._build is None:
                raise RuntimeError("this SplitModule has no plan: build it with autosplit.autosplit()")
            self._build(args, kwargs)  # kept until it succeeds: a refused batch leaves it to retry
            self.__dict__["_build"] = None
        if self.__dict__.get("_captured") is not None:
            kwargs = self._check_arguments(args, kwargs)
        if self._fixed_shapes:
            self._check_shapes(args, kwargs)
        if self.microbatches > 1:
            self._check_batch_coupling()
        try:
            return self.graph_module(*args, **kwargs)
        except RuntimeError as e:
            raise self._shape_change(args, kwargs, e) or e

    def capture_arguments(self, model: nn.Module, traced: Traced) -> None:
        """Record what each argument of ``model.forward`` was at capture (a tensor's shape, None,
        a fixed value), so a call that differs in a way the graph cannot follow is refused with
        the argument's name (:meth:`_check_arguments`)."""
        try:
            bound = inspect.signature(model.forward).bind(*traced.example_args, **traced.example_kwargs)
        except TypeError:
            return
        given = set(bound.arguments)
        bound.apply_defaults()
        self.__dict__["_captured"] = (inspect.signature(model.forward), dict(bound.arguments), given)
        first_layers = {}
        for node in traced.graph_module.graph.nodes:  # the first layer that reads each input
            if node.op == "placeholder":
                layer = next((u for u in _users_in_order(node) if u.op == "call_module"), None)
                if layer is not None:
                    first_layers[node.name] = (layer.target, type(traced.graph_module.get_submodule(layer.target)).__name__)
        self.__dict__["_first_layers"] = first_layers

    def _check_arguments(self, args: tuple, kwargs: dict) -> dict:
        """Refuse a call whose arguments the graph cannot follow: a tensor where capture saw None
        (the split never reads it), None or nothing where it saw a tensor, a fixed value (a number,
        a flag) passed with another value. An argument left out keeps its value at capture: the
        returned keyword arguments pass it to the graph where the graph takes it."""
        signature, captured, passed = self._captured
        try:
            given = signature.bind(*args, **kwargs).arguments
        except TypeError as e:
            raise InputSignatureError(f"this split takes the arguments of the model's forward{signature}: {e}") from None
        graph_takes = inspect.signature(self.graph_module.forward).parameters
        kept = {name: was for name, was in captured.items() if name not in given and name in graph_takes
                and graph_takes[name].default is inspect.Parameter.empty and not _has_tensor(was)}
        for name, was in captured.items():
            value = given.get(name)
            if name in given and was is None and _has_tensor(value):
                raise InputSignatureError(
                    f"argument {name!r} was None when this split was captured, so the split does not read it and "
                    f"would ignore it. To use it, split the model again with it as an example: "
                    f"autosplit(model, ..., example_kwargs={{{name!r}: ...}})")
            if _has_tensor(was) and value is None and name in passed:
                raise InputSignatureError(
                    f"argument {name!r} was given when this split was captured, and the split reads it: pass it "
                    f"again, or, to run without it, split the model again without it")
            if name in given and not _has_tensor(was) and not _has_tensor(value) and _fixed_differs(was, value):
                raise InputSignatureError(
                    f"argument {name!r} was fixed to {was!r} when this split was captured, and the split computes "
                    f"with {was!r}, not {value!r}. Split the model again with example_kwargs={{{name!r}: {value!r}}}; "
                    f"to vary it between calls, capture it as a tensor (example_kwargs={{{name!r}: "
                    f"torch.tensor({value!r})}}) and pass a tensor at every call")
        return {**kwargs, **kept}

    def _shape_change(self, args: tuple, kwargs: dict, error: RuntimeError) -> Exception | None:
        """The error a call raised, told in terms of the input whose shape differs from capture."""
        if self.__dict__.get("_captured") is None:
            return None
        signature, captured, _ = self._captured
        try:
            bound = signature.bind(*args, **kwargs).arguments
        except TypeError:
            return None
        for name, value in bound.items():
            was = captured.get(name)
            if isinstance(value, torch.Tensor) and hasattr(was, "shape") and _beyond_batch(tuple(was.shape),
                                                                                           tuple(value.shape)):
                per = self.microbatches
                layer = self.__dict__.get("_first_layers", {}).get(name)
                where = f"; the first layer that reads it, {layer[0]} ({layer[1]}), was traced for that shape" \
                    if layer else ""
                shape = tuple(was.shape)
                return InputSignatureError(
                    f"input {name!r} has shape {tuple(value.shape)}, but this split was captured with "
                    f"{shape if per == 1 else f'{shape} per microbatch (of {per})'}{where}, and the call failed: "
                    f"{str(error).splitlines()[0]}. Pass inputs of the captured shape (sizes other than the batch), "
                    "or split the model again with an example of this shape")
        return None

    def fix_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Refuse calls whose tensor inputs (one microbatch of them) differ from ``shapes``, by
        argument name: a graph exported with these shapes computes with them fixed."""
        self.__dict__["_fixed_shapes"] = dict(shapes)
        self.__dict__["_signature"] = inspect.signature(self.graph_module.forward)

    def _check_shapes(self, args: tuple, kwargs: dict) -> None:
        try:
            bound = self._signature.bind(*args, **kwargs).arguments
        except TypeError:
            return  # the graph's own call reports arguments that do not fit
        values = list(bound.values())
        if self.microbatches > 1:  # cut as the pipeline will: along the batch dimensions it keeps
            kept = {name: dim for name, dim in self.graph_module.pipeline.batch_dims.items() if name in bound}
            dims = kept if kept.keys() == bound.keys() else \
                resolve_batch_dims(bound, kept, microbatches=self.microbatches)
            values = cut_microbatches(values, self.microbatches, [dims[name] for name in bound])[0]
        for name, value in zip(bound, values):
            expected = self._fixed_shapes.get(name)
            if expected is not None and isinstance(value, torch.Tensor) and tuple(value.shape) != expected:
                per = f" per microbatch (of {self.microbatches})" if self.microbatches > 1 else ""
                raise InputSignatureError(
                    f"input {name!r} has shape {tuple(value.shape)}{per}, but this split was captured by torch.export "
                    f"for {expected}, and an exported graph keeps the shapes it was captured with. Pass inputs of "
                    "that shape (e.g. drop_last=True in the DataLoader), or plan and split the model for this shape")

    def _check_batch_coupling(self) -> None:
        refuse_batch_statistics([(name, self.get_submodule(name)) for name in self._batch_norms], self.microbatches)

    def to(self, *args: Any, **kwargs: Any) -> "SplitModule":
        """Casts dtypes (``split.to(torch.bfloat16)``); moving to one device would undo the split."""
        device, _, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            self._refuse_move(f"to({device})")
        return super().to(*args, **kwargs)

    def cuda(self, device: Any = None) -> "SplitModule":
        self._refuse_move("cuda()")

    def cpu(self) -> "SplitModule":
        self._refuse_move("cpu()")

    def _refuse_move(self, call: str) -> None:
        raise RuntimeError(
            f"SplitModule.{call} would move every stage to one device and undo the split over "
            f"{', '.join(map(str, self.devices))}: its parameters already live on their stages' devices. Cast dtypes "
            "with .to(dtype); to run elsewhere, split again with autosplit(model, devices=...)")

    def train(self, mode: bool = True) -> "SplitModule":
        super().train(mode)
        self._model.training = mode
        if self.graph_module is not None:
            for module in self.graph_module.modules():  # the graph's own containers of our layers too
                module.training = mode
        return self


def refuse_batch_statistics(modules: Sequence[tuple[str, nn.Module]], microbatches: int) -> None:
    """Refuse BatchNorm in training mode among ``modules`` (name, module) when the batch runs as
    ``microbatches`` > 1: it normalizes with the statistics of the batch it sees, and per
    microbatch they differ from the whole batch's, and so would outputs and running stats.

    Raises:
        MicrobatchError: such a layer is in training mode.
    """
    if microbatches == 1:
        return
    coupled = [(name, m) for name, m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if coupled:
        name, module = coupled[0]
        raise MicrobatchError(
            f"{name} ({type(module).__name__}"
            f"{f' and {len(coupled) - 1} more' if len(coupled) > 1 else ''}) computes batch statistics in "
            f"training mode, and with microbatches={microbatches} it would see {microbatches} "
            "small batches instead of one, changing outputs and running statistics. Use microbatches=1, "
            "put those layers in eval mode (frozen statistics), or replace them with GroupNorm/LayerNorm")


def _output_labels(output: fx.Node) -> dict[str, str]:
    """The place of every node the graph returns in the model's output, as a user reads it:
    ``output``, ``output[1]``, ``output['loss']``."""
    structure = output.args[0] if output.args else None
    if isinstance(structure, fx.Node):
        return {structure.name: "output"}
    labels: dict[str, str] = {}
    for path, leaf in pytree.tree_flatten_with_path(structure)[0]:
        if isinstance(leaf, fx.Node):
            labels.setdefault(leaf.name, "output" + pytree.keystr(path))
    return labels


def _users_in_order(node: fx.Node) -> list[fx.Node]:
    order = {n: k for k, n in enumerate(node.graph.nodes)}
    return sorted(node.users, key=order.__getitem__)


def _beyond_batch(was: tuple[int, ...], now: tuple[int, ...]) -> bool:
    """Whether a shape differs from the captured one in more than its first (batch) size."""
    return len(was) != len(now) or was[1:] != now[1:]


def _has_tensor(value: Any) -> bool:
    return any(isinstance(t, (torch.Tensor, TensorSpec)) for t in pytree.tree_leaves(value))


def _fixed_differs(was: Any, value: Any) -> bool:
    """Whether a non-tensor argument differs from its value at capture (numbers, flags, strings)."""
    try:
        return bool(was != value)
    except Exception:  # objects without a usable comparison are not checked
        return False


def split_module(model: nn.Module, traced: Traced, plan: Plan, devices: Sequence[torch.device | str],
                 output_device: torch.device | str | None = None, microbatches: int = 1,
                 written_flags: Collection[str] = (), batch_dims: Mapping[str, int | None] | None = None
                 ) -> SplitModule:
    """Build the :class:`SplitModule` of ``model`` for ``plan`` on ``devices`` (one per stage).

    With ``microbatches`` > 1 each call cuts its batch into that many microbatches and runs the
    stages in a GPipe wavefront (:mod:`autosplit.pipeline`); ``traced`` is then the capture of
    one microbatch. ``batch_dims`` maps forward arguments to the dimension that holds their batch
    (None: passed whole); specs captured with a dimension named ``"batch"`` declare it too, and
    the rest are resolved at the first call (:func:`autosplit.pipeline.resolve_batch_dims`).

    Dropout and batch-norm flags that the capture fixed follow ``train()``/``eval()`` again, but
    for the nodes in ``written_flags`` (:func:`autosplit.modes.written_flags`).

    Raises:
        PlanMismatchError: the plan was made for another graph.
        ValueError: the number of devices differs from the number of stages, or a weight is on meta.
    """
    if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
        raise ValueError(f"microbatches must be a positive int, e.g. microbatches=4; got {microbatches!r}")
    plan.require_pipeline_only("autosplit() in one process")
    devices = [torch.device(d) for d in devices]
    if len(devices) != len(plan.stages):
        raise ValueError(f"the plan has {len(plan.stages)} stages but {len(devices)} devices were given: "
                         f"pass one device per stage, e.g. {[f'cuda:{i}' for i in range(len(plan.stages))]}")
    refuse_meta(model, devices)
    rewritten = split_graph(model, traced, plan, devices, output_device, written_flags, microbatches)
    split, placed, once = rewritten.graph_module, rewritten.stage_of, rewritten.once
    gm = traced.graph_module
    output_device = rewritten.output_device
    if microbatches > 1:  # refused here, before anything moves, if an output cannot be joined
        declared = {**_spec_batch_dims(model, traced), **dict(batch_dims or {})}
        join_dims = output_batch_dims(model, traced, declared, microbatches)
        _refuse_unjoinable(gm, join_dims)
        split = _pipelined(split, placed, once, devices, microbatches, placeholder_arguments(model, gm), declared,
                           _renamed(join_dims, gm, split))
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(split, attr, getattr(gm, attr))
    move_state(rewritten.moves)
    result = SplitModule(model, split, plan, devices, output_device, microbatches)
    result.capture_arguments(model, traced)
    if traced.tracer == "export":
        result.fix_shapes({n.name: tuple(n.meta["val"].shape) for n in gm.graph.nodes
                           if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)})
    return result


@dataclasses.dataclass
class SplitGraph:
    """The captured graph rewritten for a plan: every computing node on its stage, values read on
    later stages relayed there stage by stage, weights sent from the stage that stores them."""

    graph_module: fx.GraphModule
    """Computes what the model computes, with the model's inputs and output structure."""
    stage_of: dict[fx.Node, int]
    """The stage of every node that computes (the moves too: a move belongs to the stage that
    receives the value)."""
    once: set[fx.Node]
    """The moves of weights to the other stages that read them: they depend on no input, so a
    microbatched run computes them once per call."""
    moves: list[tuple[torch.Tensor, torch.device]]
    """Every parameter and buffer with the device of the stage that stores it."""
    homes: dict[str, int]
    """The stage storing each parameter and buffer, by canonical name."""
    output_device: torch.device


def split_graph(model: nn.Module, traced: Traced, plan: Plan, devices: Sequence[torch.device],
                output_device: torch.device | str | None = None, written_flags: Collection[str] = (),
                microbatches: int = 1, check_plan: bool = True) -> SplitGraph:
    """Rewrite ``traced`` for ``plan`` on ``devices`` (one per stage) without moving anything: the
    graph both the one-process split and the per-rank stages of the distributed runtime are cut
    from. See :func:`split_module` for ``written_flags``. Weights may still be on ``meta``: the
    distributed runtime materializes only those of its rank's stage, after this rewrite.
    ``check_plan=False`` skips the fingerprint check, for a caller that checked the plan against
    a capture of the same model at the plan's traced batch (``Plan.traced_batch``).

    Raises:
        PlanMismatchError: the plan was made for another graph.
        MicrobatchError: the graph writes weights in place and runs per microbatch.
    """
    if check_plan:
        check_fingerprint(traced, plan)
    _check_microbatched_writes(traced, microbatches)
    gm = traced.graph_module
    stage_of = _stages_of_nodes(gm, plan)
    homes = _weight_homes(model, traced, plan)
    moves = _state_moves(model, gm, traced, homes, stage_of, list(devices))
    output_device = torch.device(output_device) if output_device is not None else devices[-1]
    placed: dict[fx.Node, int] = {}
    once: set[fx.Node] = set()
    in_modes: dict[str, nn.Module] = {}
    graph = _rewrite(gm, traced, stage_of, homes, _rebuilt_on(plan), list(devices), output_device, placed, once,
                     in_modes, _mode_followers(model, traced, written_flags))
    split = fx.GraphModule(_targets(gm, graph, in_modes), graph, class_name="SplitGraph")
    split.graph.lint()
    return SplitGraph(split, placed, once, moves, homes, output_device)


def refuse_meta(model: nn.Module, devices: Sequence[torch.device]) -> None:
    """Refuse a one-process split of a model whose weights are on ``meta``, or onto ``meta``.

    Raises:
        ValueError: names the first weight on meta.
    """
    weightless = next((name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if weightless is not None or any(d.type == "meta" for d in devices):
        raise ValueError(f"{weightless or 'a device'} is on meta: a split module runs real tensors. Load the weights "
                         "first (model.to_empty(device=...) then load_state_dict), or only plan with autosplit.plan()")


def _pipelined(split: fx.GraphModule, placed: dict[fx.Node, int], once: set[fx.Node], devices: list[torch.device],
               microbatches: int, arguments: list[str], batch_dims: dict[str, int | None],
               join_dims: dict[str, tuple[int | str, ...]]) -> fx.GraphModule:
    """The split graph with its body replaced by a :class:`Pipeline` over the same stages: the
    inputs and the output structure stay the split graph's. The nodes in ``once`` (weights sent
    to the other stages that read them) run once per call, before the microbatches; each result
    joins along the dimensions ``join_dims`` gives it (:func:`output_batch_dims`)."""
    pipeline = Pipeline.from_graph(split, placed, devices, microbatches, arguments, batch_dims, once=once)
    pipeline.join_dims = dict(join_dims)
    top = fx.Graph()
    top._codegen = split.graph._codegen
    inputs = [top.node_copy(n) for n in split.graph.nodes if n.op == "placeholder"]
    call = top.call_module("pipeline", tuple(inputs))
    output = next(n for n in split.graph.nodes if n.op == "output")
    by_name = {name: top.call_function(operator.getitem, (call, j)) for j, name in enumerate(pipeline.results)}
    pipeline.labels = _output_labels(output)
    top.output(fx.node.map_arg(output.args[0], lambda n: by_name[n.name]) if output.args else None)
    top.lint()
    return fx.GraphModule({"pipeline": pipeline}, top, class_name="PipelinedSplitGraph")


def output_batch_dims(model: nn.Module, traced: Traced, batch_dims: Mapping[str, int | None],
                      microbatches: int) -> dict[str, tuple[int | str, ...]]:
    """Where each output holds the batch, found by capturing the model again at ``microbatches``
    times the batch of ``traced`` (one microbatch) and comparing every output's shape: the batch
    dimension of a tensor is the one whose size is the batch in both captures. For each node the
    graph returns, one entry per tensor of its value (:func:`autosplit.pipeline.tensor_leaves`
    order): that dimension, or a str saying why the tensor has none (a scalar, a statistic over
    the batch, the batch mixed with other sizes). ``batch_dims`` gives the inputs' batch
    dimensions (the rest follow :func:`autosplit.pipeline.resolve_batch_dims`).

    Returns {} where the model cannot be captured again at the larger batch (data-dependent
    shapes): the outputs then join along dimension 0 where only it has the microbatch's size.
    """
    try:
        bound = inspect.signature(model.forward).bind(*traced.example_args, **traced.example_kwargs)
        arguments = {name: pytree.tree_map(_spec_as_meta, value) for name, value in bound.arguments.items()}
        dims = resolve_batch_dims(arguments, {k: v for k, v in batch_dims.items() if k in arguments}, microbatches=1)
        source = next(name for name, dim in dims.items() if dim is not None)
        small = next(t for t in pytree.tree_leaves(arguments[source]) if isinstance(t, torch.Tensor) and t.dim() > 0
                     ).shape[dims[source]]
        for name, dim in dims.items():
            if dim is not None:
                bound.arguments[name] = pytree.tree_map(lambda x, d=dim: _grown(x, d, microbatches), bound.arguments[name])
        large = capture(model, tuple(bound.args), dict(bound.kwargs), tracer=traced.tracer,
                        leaf_modules=traced.leaf_modules)
    except Exception as e:  # the outputs join by size instead, refusing what that cannot tell
        logger.info("no batch dimensions of the outputs: capturing %s at %d× the batch failed (%s)",
                    type(model).__name__, microbatches, e)
        return {}
    values = {n.name: n.meta.get("val") for n in large.graph.nodes}
    output = next(n for n in traced.graph.nodes if n.op == "output")
    found: dict[str, tuple[int | str, ...]] = {}
    for node in output.all_input_nodes:
        if node.name not in values or "val" not in node.meta:
            continue
        pairs = list(zip(tensor_leaves(node.meta["val"]), tensor_leaves(values[node.name])))
        if len(pairs) == len(tensor_leaves(node.meta["val"])):
            found[node.name] = tuple(_batch_dim(a, b, small, small * microbatches) for a, b in pairs)
    return found


def _spec_as_meta(value: Any) -> Any:
    return value.materialize(torch.device("meta")) if isinstance(value, TensorSpec) else value


def _grown(value: Any, dim: int, factor: int) -> Any:
    """A spec ``factor`` times as large along ``dim``."""
    if not isinstance(value, TensorSpec) or len(value.shape) <= dim:
        return value
    shape = list(value.shape)
    shape[dim] *= factor
    return TensorSpec(tuple(shape), value.dtype, value.dims)


def _batch_dim(small: torch.Tensor, large: torch.Tensor, batch: int, grown: int) -> int | str:
    """The dimension of an output that holds the batch: ``batch`` in the ``small`` capture and
    ``grown`` in the ``large`` one, every other dimension the same; or why there is none."""
    was, now = tuple(small.shape), tuple(large.shape)
    if not was and not now:
        return SCALAR_OUTPUT
    changed = [d for d in range(len(was)) if len(was) == len(now) and was[d] != now[d]]
    if len(was) == len(now) and not changed:
        return (f"has shape {was} whatever the batch size, so it holds no batch to join microbatches along "
                "(e.g. a statistic over the whole batch): return per-sample values, or use microbatches=1")
    if len(changed) == 1 and (was[changed[0]], now[changed[0]]) == (batch, grown):
        return changed[0]
    return (f"has shape {was} for a batch of {batch} and {now} for {grown}: no one dimension of it is the batch "
            "(e.g. the batch flattened with the sequence), so microbatches cannot be joined exactly. Return it with "
            "the batch as a dimension of its own, or use microbatches=1")


def _refuse_unjoinable(gm: fx.GraphModule, join_dims: Mapping[str, tuple[int | str, ...]]) -> None:
    """Refuse, before anything moves, an output the capture found no batch dimension in."""
    labels = _output_labels(next(n for n in gm.graph.nodes if n.op == "output"))
    for name, dims in join_dims.items():
        reason = next((d for d in dims if isinstance(d, str)), None)
        if reason is not None:
            raise MicrobatchError(f"the model's {labels.get(name, 'output')} {reason}")


def _renamed(join_dims: Mapping[str, tuple[int | str, ...]], gm: fx.GraphModule, split: fx.GraphModule
             ) -> dict[str, tuple[int | str, ...]]:
    """``join_dims`` keyed by the split graph's result nodes (which may be transfers to the
    output device): the two graphs return the same structure, leaf for leaf."""
    def leaves(graph: fx.Graph) -> list[Any]:
        output = next(n for n in graph.nodes if n.op == "output")
        return pytree.tree_leaves(output.args[0] if output.args else None)

    return {new.name: join_dims[old.name] for old, new in zip(leaves(gm.graph), leaves(split.graph))
            if isinstance(old, fx.Node) and isinstance(new, fx.Node) and old.name in join_dims}


def placeholder_arguments(model: nn.Module, gm: fx.GraphModule) -> list[str]:
    """The forward argument each input placeholder of ``gm`` comes from. An fx graph has one per
    argument, named after it; an exported graph one per tensor of the flattened (args, kwargs),
    in the order of its input tree: positional arguments take their parameter's name."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        return [str(n.target) for n in placeholders]
    parameters = inspect.signature(model.forward).parameters.values()
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    rest = next((p.name for p in parameters if p.kind == p.VAR_POSITIONAL), "args")
    args_spec, kwargs_spec = spec.children()
    names = [positional[i] if i < len(positional) else rest for i in range(args_spec.num_children)]
    names += list(kwargs_spec.context)
    children = [*args_spec.children(), *kwargs_spec.children()]
    arguments = [name for name, child in zip(names, children) for _ in range(child.num_leaves)]
    assert len(arguments) == len(placeholders), (arguments, placeholders)
    return arguments


def _spec_batch_dims(model: nn.Module, traced: Traced) -> dict[str, int]:
    """Batch dimensions declared by the specs the model was captured with: ``dims=("batch", ...)``."""
    try:
        bound = inspect.signature(model.forward).bind(*traced.example_args, **traced.example_kwargs).arguments
    except TypeError:
        return {}
    declared = {}
    for name, value in bound.items():
        named = [x.dims.index("batch") for x in pytree.tree_leaves(value)
                 if isinstance(x, TensorSpec) and "batch" in x.dims]
        if named:
            declared[name] = named[0]
    return declared


def check_fingerprint(traced: Traced, plan: Plan) -> None:
    """Refuse a plan made for another graph than ``traced``, naming the first node that differs."""
    graph = OpGraph.from_traced(traced)
    if graph.fingerprint() == plan.fingerprint:
        return
    raise PlanMismatchError(
        f"this plan was made for another graph (fingerprint {plan.fingerprint}, this model's is "
        f"{graph.fingerprint()}): {_first_difference(traced, graph, plan)}. Plan again for this model and "
        "these input shapes.")


def _first_difference(traced: Traced, graph: OpGraph, plan: Plan) -> str:
    """Where the model's graph first departs from the planned one, in graph order."""
    planned = plan.node_digests
    for name, digest in graph.node_digests().items():
        if planned and planned.get(name) != digest:
            info = traced.nodes[name]
            what = "is not in the plan" if name not in planned else "differs from the planned node of that name"
            return (f"node {name!r} ({info.target} in {info.module_path or 'the model'}, output shapes "
                    f"{', '.join(str(tuple(s)) for s in info.shapes) or 'none'}) {what}")
    missing = next((n for stage in plan.stages for n in stage.nodes if n not in traced.nodes), None)
    if missing:
        return f"the plan's node {missing!r} is not in this model's graph"
    return "the nodes have the same names but differ in ops, shapes or owners"


def _stages_of_nodes(gm: fx.GraphModule, plan: Plan) -> dict[str, int]:
    """Stage of every node: the plan's, the first stage for inputs, the last for the output.
    A node the plan lists on several stages (an input-derived mask) is counted on the first of
    them here, and rebuilt on the others (:func:`_rebuilt_on`). A ``contiguous`` the plan does
    not list runs on its input's stage: export records it or not depending on the strides a
    device's kernels produce (a model captured on ``meta`` has some that the same model captured
    with real weights lacks), and the plan's fingerprint looks through it."""
    stage_of: dict[str, int] = {}
    for stage in plan.stages:
        for name in stage.nodes:
            stage_of.setdefault(name, stage.index)
    last = len(plan.stages) - 1
    for node in gm.graph.nodes:
        if node.name in stage_of:
            continue
        sources = node.all_input_nodes
        if str(node.target) in LAYOUT_ONLY and len(sources) == 1:
            stage_of[node.name] = stage_of[sources[0].name]
        else:
            stage_of[node.name] = 0 if node.op == "placeholder" else last
    return stage_of


def _rebuilt_on(plan: Plan) -> dict[str, list[int]]:
    """The later stages on which each node the plan lists more than once is computed again."""
    listed: dict[str, list[int]] = {}
    for stage in plan.stages:
        for name in stage.nodes:
            listed.setdefault(name, []).append(stage.index)
    return {name: stages[1:] for name, stages in listed.items() if len(stages) > 1}


def _weight_homes(model: nn.Module, traced: Traced, plan: Plan) -> dict[str, int]:
    """The stage storing each parameter and buffer (canonical name), as the plan says; one the
    plan does not list (no op reads it) stays with the first stage."""
    homes = {name: stage.index for stage in plan.stages for name in stage.weights}
    return {name: homes.get(name, 0) for name in [*traced.parameters, *traced.buffers, *homes]}


def _state_moves(model: nn.Module, gm: fx.GraphModule, traced: Traced, homes: dict[str, int],
                 stage_of: dict[str, int], devices: list[torch.device]) -> list[tuple[torch.Tensor, torch.device]]:
    """Where every parameter and buffer goes: the device of the stage that stores it. A tensor
    of the captured graph that is not the model's (a constant) goes to the stage of its node."""
    target: dict[int, tuple[torch.Tensor, torch.device]] = {}
    for name, stage in homes.items():
        try:
            t = model.get_parameter(name) if name in traced.parameters else model.get_buffer(name)
        except AttributeError:  # a constant the capture made (a default tensor argument): the graph's own
            t = _fetch(gm, name)
        target.setdefault(id(t), (t, devices[stage]))
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _fetch(gm, node.target)
            if isinstance(value, torch.Tensor):
                target.setdefault(id(value), (value, devices[stage_of[node.name]]))
    return list(target.values())


def move_state(moves: list[tuple[torch.Tensor, torch.device]]) -> None:
    """Move every tensor in place (``.data``), so parameters stay the same objects; if any move
    fails, every tensor goes back where it was."""
    done: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for tensor, device in moves:
            if tensor.device != device:
                done.append((tensor, tensor.data))
                tensor.data = tensor.data.to(device)
    except Exception:
        for tensor, original in done:
            tensor.data = original
        raise


def _mode_followers(model: nn.Module, traced: Traced, written: Collection[str]
                    ) -> Callable[[fx.Node], nn.Module | None]:
    """For each node, the :class:`~autosplit.modes.InMode` that makes it follow the mode of the
    model's module that owns it (the model itself for top-level ops), or None."""
    modules = dict(model.named_modules())
    written = set(written)

    def follower(node: fx.Node) -> nn.Module | None:
        if node.name in written:
            return None
        info = traced.nodes.get(node.name)
        owner = modules.get(info.module_path, model) if info is not None else model
        return in_mode(node, owner, traced.training)
    return follower


def _targets(gm: fx.GraphModule, graph: fx.Graph, extra: dict[str, nn.Module]) -> dict[str, Any]:
    """What the graph's ``get_attr`` and ``call_module`` nodes name: ``gm``'s objects plus ``extra``."""
    return {**{n.target: _fetch(gm, n.target) for n in graph.nodes
               if n.op in ("get_attr", "call_module") and n.target not in extra}, **extra}


def _rewrite(gm: fx.GraphModule, traced: Traced, stage_of: dict[str, int], homes: dict[str, int],
             rebuilt_on: dict[str, list[int]], devices: list[torch.device], output_device: torch.device,
             placed: dict[fx.Node, int], once: set[fx.Node], in_modes: dict[str, nn.Module],
             follower: Callable[[fx.Node], nn.Module | None]) -> fx.Graph:
    """The graph with every node on its stage's device, and a copy of each node in ``rebuilt_on``
    on each of its other stages (values computed from the inputs alone are rebuilt where they are
    read, not sent); ``placed`` receives the stage of every node that computes (a move belongs to
    the stage that receives the value), ``once`` the moves of weights (run once per call),
    ``in_modes`` the :class:`~autosplit.modes.InMode` modules that replace ops fixed to the
    capture's mode.

    Running example: a tied embedding (stage 0) and head (stage 2). The head's weight is stored
    on stage 0 and one ``transfer`` node sends it to stage 2 (in ``once``); the hidden state
    made on stage 0 and read on stage 2 goes 0 → 1 → 2, one ``transfer`` per hop."""
    last = len(devices) - 1
    graph = fx.Graph(owning_module=gm)
    graph._codegen = gm.graph._codegen
    copied: dict[fx.Node, fx.Node] = {}
    moved: dict[tuple[str, int], fx.Node] = {}
    sent: dict[tuple[str, int], fx.Node] = {}
    canonical = {id(t): name for name, t in _model_state(gm, traced)}

    def weight_on(key: str, home: int, stage: int, fetch: Callable[[], fx.Node]) -> fx.Node:
        """A weight stored on ``home`` as read by ``stage``: sent there once per call."""
        if home == stage:
            return fetch()
        if (key, stage) not in sent:
            sent[(key, stage)] = graph.call_function(transfer, (fetch(), devices[stage]))
            _place(placed, sent[(key, stage)], stage)
            once.add(sent[(key, stage)])
        return sent[(key, stage)]

    def value_on(source: fx.Node, stage: int) -> fx.Node:
        """The copy of ``source`` as seen by ``stage``: relayed from the stage before it."""
        if source.op == "get_attr":
            key = _weight_key(traced, source)
            return weight_on(key, homes.get(key, stage_of[source.name]), stage, lambda: copied[source])
        key = (source.name, stage)
        if stage_of[source.name] == stage:
            return copied[source]
        if key not in moved:
            assert stage > stage_of[source.name], f"{source.name} is read on stage {stage} before it is made"
            moved[key] = graph.call_function(transfer, (value_on(source, stage - 1), devices[stage]))
            _place(placed, moved[key], stage)
        return moved[key]

    def emit(node: fx.Node, stage: int) -> fx.Node:
        """A copy of the computing ``node`` that runs on ``stage``."""
        _check_writes(node, traced, homes, stage)
        replacement = follower(node)
        args = lambda n: value_on(n, stage)  # noqa: E731
        if replacement is not None:
            target = f"in_mode_{len(in_modes)}"
            in_modes[target] = replacement
            new = graph.create_node("call_module", target, fx.node.map_arg(node.args, args),
                                    fx.node.map_arg(node.kwargs, args))
            new.meta = dict(node.meta)
        elif node.op == "call_module" and (foreign := _foreign_state(gm, node, canonical, homes, stage)):
            module = graph.get_attr(node.target)
            state = {local: weight_on(key, homes[key], stage, lambda p=f"{node.target}.{local}": graph.get_attr(p))
                     for local, key in foreign.items()}
            new = graph.call_function(call_with_state, (module, state, *fx.node.map_arg(node.args, args)),
                                      fx.node.map_arg(node.kwargs, args))
            new.meta = dict(node.meta)
        else:
            new = graph.node_copy(node, args)
        new.meta[TRACED_NODE] = node.name  # an op that replaces it has another name
        new.args = _on_device(new.args, devices[stage])
        new.kwargs = _on_device(new.kwargs, devices[stage])
        _place(placed, new, stage)
        return new

    def to_output(source: fx.Node) -> fx.Node:
        node = graph.call_function(deliver, (value_on(source, last), output_device))
        _place(placed, node, last)
        return node

    for node in gm.graph.nodes:
        stage = stage_of[node.name]
        if node.op == "output":
            copied[node] = graph.output(fx.node.map_arg(node.args[0], to_output) if node.args else None)
            continue
        if node.op == "placeholder":  # inputs go to the first stage's device (if not already there)
            copied[node] = graph.call_function(deliver, (graph.node_copy(node), devices[0]))
            _place(placed, copied[node], 0)
            continue
        if node.op == "get_attr":
            copied[node] = graph.node_copy(node, lambda n: copied[n])
            continue
        copied[node] = emit(node, stage)
        for other in rebuilt_on.get(node.name, ()):
            moved[(node.name, other)] = emit(node, other)
    misplaced = audit_placement(graph, gm, {id(t): homes[name] for name, t in _model_state(gm, traced)})
    assert not misplaced, f"the rewrite reads tensors off their stage: {misplaced[:3]}"
    return graph


def _place(placed: dict[fx.Node, int], node: fx.Node, stage: int) -> None:
    placed[node] = node.meta["stage"] = stage


def audit_placement(graph: fx.Graph, gm: fx.GraphModule, home_of: dict[int, int]) -> list[str]:
    """Every place where a node would read a tensor that is not on its stage's device, found
    without running anything (so without needing the devices): every computing node carries
    its stage (``node.meta["stage"]``), and each value is tagged with the
    stage whose device holds it (a weight: its home, ``home_of`` by tensor id; a moved value:
    the stage it was moved to; anything else: the stage that computed it), and every computing
    node must read only values, and call only modules whose weights, tagged with its own stage.
    Returns one line per violation (none for a correct split)."""
    tag: dict[fx.Node, int] = {}
    problems = []
    for node in graph.nodes:
        if node.op == "get_attr":
            value = _fetch(gm, node.target)
            if isinstance(value, torch.Tensor) and id(value) in home_of:
                tag[node] = home_of[id(value)]
            continue
        if "stage" not in node.meta:
            continue
        stage = tag[node] = node.meta["stage"]
        if node.target in (transfer, deliver):
            continue  # a move reads from anywhere: that is its job
        for source in node.all_input_nodes:
            if source in tag and tag[source] != stage:
                problems.append(f"{node.name} on stage {stage} reads {source.name} from stage {tag[source]}")
        if node.op == "call_module" and not node.target.startswith("in_mode_"):
            module = gm.get_submodule(node.target)
            for local, t in [*module.named_parameters(), *module.named_buffers()]:
                if home_of.get(id(t), stage) != stage:
                    problems.append(f"{node.name} on stage {stage} calls {node.target} whose {local} is on stage "
                                    f"{home_of[id(t)]}")
    return problems


def _model_state(gm: fx.GraphModule, traced: Traced) -> list[tuple[str, torch.Tensor]]:
    """The model's parameters and buffers by canonical name, as the captured graph holds them."""
    state = []
    for name in [*traced.parameters, *traced.buffers]:
        try:
            state.append((name, _fetch(gm, name)))
        except AttributeError:
            continue  # lifted into the graph under another name (export): found through get_attr nodes
    return state


def _weight_key(traced: Traced, node: fx.Node) -> str:
    """The canonical name of the tensor a ``get_attr`` node reads (its target for a constant)."""
    reads = traced.nodes[node.name].reads if node.name in traced.nodes else ()
    return reads[0] if reads else node.target


def _foreign_state(gm: fx.GraphModule, node: fx.Node, canonical: dict[int, str], homes: dict[str, int],
                   stage: int) -> dict[str, str]:
    """The parameters and buffers of a called module stored on another stage: local name →
    canonical name. A module whose buffers it updates itself (batch norm statistics in
    training) must run where they are stored."""
    module = gm.get_submodule(node.target)
    foreign = {}
    for local, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        key = canonical.get(id(t))
        if key is not None and homes.get(key, stage) != stage:
            foreign[local] = key
    buffers = {local for local, _ in module.named_buffers(remove_duplicate=False)}
    if foreign.keys() & buffers and isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
        key = foreign[next(iter(foreign.keys() & buffers))]
        raise AutosplitError(
            f"{node.target} ({type(module).__name__}) runs on stage {stage} but its statistics ({key}) are stored on "
            f"stage {homes[key]}, and it updates them in training: pin both calls of the module to one stage "
            f"(pin={{'{node.target}': {homes[key]}}}) or plan again")
    return foreign


def _check_writes(node: fx.Node, traced: Traced, homes: dict[str, int], stage: int) -> None:
    """Refuse an in-place write to a weight stored on another stage: it would change a copy.
    The write may go through a view or an earlier in-place result (``NodeInfo.writes``)."""
    info = traced.nodes.get(node.name)
    if info is None or node.op not in ("call_function", "call_method"):
        return
    for key in info.writes:
        if homes.get(key, stage) != stage:
            raise AutosplitError(
                f"{node.name} ({info.target} in {info.module_path or 'the model'}) writes {key} on stage {stage}, but "
                f"{key} is stored on stage {homes[key]}: the write would change a copy. Pin the module that writes "
                f"it to stage {homes[key]} (pin={{'{info.module_path}': {homes[key]}}}) or plan again")


def _check_microbatched_writes(traced: Traced, microbatches: int) -> None:
    """Refuse a graph that writes parameters or buffers in place when it runs per microbatch:
    the pipeline runs every op once per microbatch, so a counter would count m times and an
    EMA or running statistic would take m steps on small batches instead of one on the batch.
    Writes that give the same result however often they run are kept (:func:`_repeatable`)."""
    written = {name: writers for name, writers in traced.written().items()
               if not all(_repeatable(traced, writer, traced.written()) for writer in writers)}
    if microbatches == 1 or not written:
        return
    name, writers = next(iter(written.items()))
    info = traced.nodes[writers[0]]
    more = f" (and {len(written) - 1} more)" if len(written) > 1 else ""
    raise MicrobatchError(
        f"the model updates {name}{more} in forward ({info.target} in {info.module_path or 'the model'}), and with "
        f"microbatches={microbatches} the update would run {microbatches} times per call on parts of the batch "
        "instead of once on the whole batch. Use microbatches=1, or move the update out of forward (e.g. into "
        "the training loop, once per step)")


_OVERWRITES = frozenset({"copy_", "fill_", "zero_"})


def _repeatable(traced: Traced, writer: str, written: Mapping[str, Any]) -> bool:
    """Whether an in-place write gives the same result however often it runs in a call, as once
    per microbatch: it overwrites (``copy_``, ``fill_``, ``zero_``) with a value computed from
    no input of the call, no written parameter or buffer (itself included) and no random draw,
    e.g. a cache of a weight-derived table (``self.table.copy_(self.weight.detach() * 2)``)."""
    node = next(n for n in traced.graph.nodes if n.name == writer)
    info = traced.nodes[writer]
    if info.target.split(".")[1 if info.target.startswith("aten.") else -1] not in _OVERWRITES:
        return False
    todo, seen = [a for a in node.all_input_nodes if a is not (node.args[0] if node.args else None)], set()
    while todo:
        source = todo.pop()
        if source in seen:
            continue
        seen.add(source)
        reads = traced.nodes[source.name]
        if source.op == "placeholder" or any(name in written for name in reads.reads) \
                or draws_random(reads.target):
            return False
        todo.extend(source.all_input_nodes)
    return True


def _on_device(value: Any, device: torch.device) -> Any:
    """Point device arguments baked into the graph at the stage's device."""
    return pytree.tree_map(lambda x: device if isinstance(x, torch.device) else x, value)


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj

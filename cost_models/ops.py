"""Device-independent cost of every node of an fx graph: FLOPs, bytes moved, kernels, saved tensors.

    costs = price_graph(gm)                       # gm: nodes carry meta["val"] (fx or export capture)
    costs["linear_3"].fwd_flops, costs["linear_3"].bwd_flops, costs["linear_3"].saved

Each node is run once, forward and backward, on ``meta`` tensors of its traced shapes (no kernel
runs, no memory is touched) under two dispatch modes: ``torch.utils.flop_counter`` counts FLOPs
and a byte counter adds up what every non-view ATen op reads and writes. Autograd's
saved-tensor hooks record what the node keeps for backward. Identical nodes (the same op on the
same shapes, e.g. in 80 identical layers) are measured once.

What a stage holds is priced from the same run: whether the node's output shares storage with
what it reads (``alias``), its gradient's bytes, and its temporaries: the peak of the storages
its ATen ops allocate and free again before it returns (``fwd_workspace_bytes``,
``bwd_workspace_bytes``; a storage counts once however many views and reshapes of it live).
Meta runs no kernel, so what a device's kernels allocate inside is added per device kind:
oneDNN's reorders of a CPU convolution (``cpu_*_workspace_bytes``).

A node that runs user code is priced the same way, by running that code: a custom autograd
Function's node runs its forward and its own backward; a module called under
``torch.utils.checkpoint`` keeps only its inputs for backward (what checkpoint saves), and its
backward runs the region's forward again (up to the last tensor backward needs, where torch
stops the recomputation), so ``bwd_flops`` and ``bwd_workspace_bytes`` include the recomputation.

A node that cannot run on meta (no meta kernel, or no meta backward) is counted as free and
``OpCost.unpriced`` says which part and why, so a plan built on these costs can say so.

Fused attention is the exception: on meta, ``scaled_dot_product_attention`` decomposes into the
math path, whose L×L score matrix a fused kernel (flash / memory-efficient attention) never
writes. Its bytes are therefore the fused kernel's: read q, k, v, write the output; it saves
q, k, v, the output and the log-sum-exp; a causal mask halves the work (FlashAttention skips
masked blocks).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

logger = logging.getLogger(__name__)

OP_CLASSES = ("matmul", "conv", "attention", "norm", "softmax", "embedding", "indexing", "reduction",
              "elementwise", "view", "none")
"""Every op falls in one class; each class has its own achievable efficiency."""

_CLASS_BY_ATEN = [  # first match on the ATen op name wins, checked in this order
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("matmul", ("mm", "addmm", "bmm", "baddbmm", "linear", "matmul", "_scaled_mm", "grouped_mm")),
    ("conv", ("convolution", "conv1d", "conv2d", "conv3d", "conv_transpose")),
    ("norm", ("layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm")),
    ("softmax", ("softmax", "log_softmax")),
    ("embedding", ("embedding",)),
    ("indexing", ("index", "gather", "scatter", "take", "masked_select", "nonzero", "index_select", "slice_scatter")),
    ("reduction", ("sum", "mean", "amax", "amin", "max", "min", "var", "std", "prod", "argmax", "argmin",
                   "logsumexp", "cumsum", "norm", "all", "any")),
]


@dataclass(frozen=True)
class OpCost:
    """What one node costs, independent of the device it runs on."""

    op_class: str = "none"
    """One of :data:`OP_CLASSES`."""
    dtype: torch.dtype | None = None
    """The dtype its arithmetic runs in (selects the device's peak FLOP/s)."""
    fwd_flops: int = 0
    bwd_flops: int = 0
    fwd_bytes: int = 0
    """Bytes read and written by the forward kernels (views are free)."""
    bwd_bytes: int = 0
    fwd_kernels: int = 0
    """Kernel launches of the forward (each non-view ATen op is one)."""
    bwd_kernels: int = 0
    output_bytes: int = 0
    saved: Mapping[str, int] = field(default_factory=dict)
    """Tensors kept for backward, by key: the name of the node that produced them (an input of
    this node, or this node's own output), or ``"<name>:<i>"`` for intermediates of its own.
    A stage's activation memory is the sum over the union of its nodes' keys, so a tensor two
    consumers keep is counted once."""
    unpriced: str = ""
    """Why part of the node could not be priced (empty when all of it was), starting with
    ``forward`` or ``backward``: that part counts as free (or estimated), and plans say so."""
    reads: tuple[str, ...] = ()
    """The nodes whose values it reads, in order (weights included)."""
    alias: bool = False
    """Its output shares storage with what it reads (a view, a tuple element, an in-place
    write): it allocates nothing, and keeps what it reads alive while it lives."""
    weight: bool = False
    """The node is a weight read (``get_attr``): its bytes are the weight's, not an activation's."""
    grad_bytes: int = 0
    """Bytes of the gradient of its output that backward computes (0 when none flows to it)."""
    fwd_workspace_bytes: int = 0
    """Peak bytes the forward allocates and frees again before it returns (temporaries)."""
    bwd_workspace_bytes: int = 0
    """Likewise for its backward, on top of the gradients it produces."""
    weight_grad_bytes: int = 0
    """Bytes of the gradients of the weights it reads (made whole, then added to ``.grad``)."""
    cpu_fwd_workspace_bytes: int = 0
    """Temporaries a CPU kernel adds to ``fwd_workspace_bytes`` (meta runs no kernel): oneDNN's
    convolution reorders its weights, and its input or its output (the larger), into its
    blocked layouts."""
    cpu_bwd_workspace_bytes: int = 0
    """Likewise for backward: oneDNN's convolution backward reorders the input and the output's
    gradient (both measured with the torch profiler's memory timeline on torch 2.13)."""

    @property
    def saved_bytes(self) -> int:
        return sum(self.saved.values())


def price_graph(gm: fx.GraphModule, *, training: bool = True) -> dict[str, OpCost]:
    """Price every node of ``gm`` (whose nodes carry ``meta["val"]``); keys are node names.

    Args:
        gm: a graph from fx or export capture: every node's ``meta["val"]`` holds its value
            (tensors or fake tensors of the traced shapes).
        training: also run backward (``bwd_*`` and ``saved``); False prices inference.

    Example:
        >>> costs = price_graph(traced.graph_module)
        >>> sum(c.fwd_flops for c in costs.values())
    """
    needs_grad = needs_grad_of(gm) if training else {}
    cache: dict[Any, tuple[OpCost, tuple[tuple[str, int, int], ...]]] = {}
    costs: dict[str, OpCost] = {}
    for node in gm.graph.nodes:
        reads = tuple(a.name for a in node.all_input_nodes)
        grad = _floating_bytes(node.meta.get("val")) if needs_grad.get(node.name) else 0
        if node.op not in ("call_function", "call_method", "call_module"):
            costs[node.name] = OpCost(output_bytes=_bytes_of(node.meta.get("val")), reads=reads,
                                      weight=node.op == "get_attr", grad_bytes=0 if node.op == "get_attr" else grad)
            continue
        if _is_identity(node):
            costs[node.name] = OpCost(op_class="view", output_bytes=_bytes_of(node.meta.get("val")), reads=reads,
                                      alias=True, grad_bytes=grad)
            continue
        key = signature(node, gm, needs_grad)
        backward = training and node.meta.get("grad_enabled") is not False  # none in a no_grad region
        if key is not None and not backward:
            key += "|no backward"
        measured = cache.get(key) if key is not None else None
        if measured is None:
            measured = _measure(node, gm, needs_grad, backward)
            if key is not None:
                cache[key] = measured
        cost, saved = measured
        costs[node.name] = replace(cost, saved=_saved_names(saved, node) if saved else {}, reads=reads,
                                   grad_bytes=grad)
    logger.debug("priced %d nodes with %d distinct measurements", len(costs), len(cache))
    return costs


def _is_identity(node: fx.Node) -> bool:
    """A slice over a whole dimension (``x[:, 0:]``): nothing to compute either way. Graphs with
    symbolic sizes keep such slices, which a trace at fixed sizes folds away."""
    if node.op != "call_function" or "slice" not in str(node.target) or not node.args:
        return False
    source, value = node.args[0], node.meta.get("val")
    before = source.meta.get("val") if isinstance(source, fx.Node) else None
    return (isinstance(value, torch.Tensor) and isinstance(before, torch.Tensor)
            and tuple(value.shape) == tuple(before.shape) and tuple(value.stride()) == tuple(before.stride()))


def _saved_names(template: tuple[tuple[str, int, int], ...], node: fx.Node) -> dict[str, int]:
    """Turn positional saved-tensor keys (input i, own output, intermediate j) into names."""
    inputs = node.all_input_nodes
    names = {}
    for kind, index, nbytes in template:
        name = inputs[index].name if kind == "input" else node.name if kind == "output" else f"{node.name}:{index}"
        names[name] = names.get(name, 0) + nbytes
    return names


# --------------------------------------------------------------------------- measuring one node


class _ByteCounter(TorchDispatchMode):
    """Adds up bytes read and written and kernels launched by every non-view op, and the FLOPs
    of grouped matmuls (mixture-of-experts layers), which the FLOP counter does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.kernels = 0
        self.grouped_mm_flops = 0
        self.ops: list[str] = []
        self.live = 0
        """Bytes of the tensors its ops allocated that are still referenced."""
        self.peak = 0
        self.kept: int | None = None
        self._storages: dict[int, list[int]] = {}
        """Storage → [bytes, tensors on it still alive]."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops.append(name)
        self._allocated(func, out)
        if not _is_free(func, name):
            self.kernels += 1
            if name in _GATHERS:  # reads only the gathered rows of the table, and the indices
                indices = [t for t in pytree.tree_leaves((args, kwargs))
                           if isinstance(t, torch.Tensor) and not t.is_floating_point()]
                self.bytes += 2 * _bytes_of(out) + _bytes_of(indices)
            else:
                self.bytes += _bytes_of((args, kwargs)) + _bytes_of(out)
        if "grouped_mm" in name and isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
            # Every row of the input meets one expert's (K × N) weight: 2·rows·K·N, whatever the split.
            rows = args[0].shape[:-1].numel()
            self.grouped_mm_flops += 2 * rows * args[0].shape[-1] * out.shape[-1]
        return out


    def _allocated(self, func: Any, out: Any) -> None:
        """Count the storage of every output that is not an alias of an input once, until the
        last tensor on it (an output, or a view of one) is freed."""
        returns = func._schema.returns
        for t, r in zip(out if isinstance(out, (tuple, list)) else (out,), returns):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage()._cdata
            if key not in self._storages:
                if r.alias_info is not None:
                    continue  # a view of something this counter did not allocate
                self._storages[key] = [t.untyped_storage().nbytes(), 0]
                self.live += self._storages[key][0]
                self.peak = max(self.peak, self.live)
            self._storages[key][1] += 1
            weakref.finalize(t, self._released, key)

    def _released(self, key: int) -> None:
        entry = self._storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]

    def transient(self) -> int:
        """Peak bytes allocated under this counter less those still referenced at ``settle`` (or
        now). The memory model counts what the op keeps (its outputs, its gradients) for the whole
        op, so this is what the op adds at its peak: with the kept bytes, its real peak, even when
        a result is made after the temporaries are gone (a recomputed region's activations, then
        the weight gradients)."""
        kept = self.live if self.kept is None else self.kept
        return max(0, self.peak - kept)

    def settle(self) -> None:
        """Mark what is referenced now as the op's lasting result (its outputs, its gradients)."""
        self.kept = self.live


_GATHERS = frozenset({"embedding", "index_select", "gather", "index", "take"})
"""Ops that read rows of a table picked by indices, not the whole table."""


def _is_free(func: Any, name: str) -> bool:
    """Views, allocations and detaches move no data."""
    if name.startswith(("empty", "_assert", "sym_")) or name in ("detach", "lift_fresh", "_local_scalar_dense"):
        return True
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _measure(node: fx.Node, gm: fx.GraphModule, needs_grad: Mapping[str, bool],
             training: bool) -> tuple[OpCost, tuple[tuple[str, int, int], ...]]:
    """The node's cost, and what it saves for backward keyed by position (see _saved_names)."""
    args, kwargs, inputs = node_inputs(node, gm, needs_grad)
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    state = module_state(module) if module is not None else {}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    fwd_flops, fwd_bytes = FlopCounterMode(display=False), _ByteCounter()
    try:
        with fwd_flops, fwd_bytes, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = call_node(node, module, state, args, kwargs)
    except Exception as e:
        if any(t.requires_grad for t, _ in inputs.values()):
            # e.g. an integer result of float inputs (cumsum(dtype=int)): no gradient flows here
            logger.debug("%s (%s) cannot run under autograd (%s); priced without backward", node.name, node.target, e)
            return _measure(node, gm, {}, training)
        logger.warning("cannot price %s (%s) on meta, counting it as free: %s", node.name, node.target, e)
        return OpCost(output_bytes=_bytes_of(node.meta.get("val")),
                      unpriced=f"forward cannot run on meta: {_reason(e)}"), ()
    cost: dict[str, Any] = dict(
        op_class=_classify(fwd_bytes.ops) if fwd_bytes.kernels else "view",
        dtype=_compute_dtype(args, kwargs, out),
        fwd_flops=fwd_flops.get_total_flops() + fwd_bytes.grouped_mm_flops,
        fwd_bytes=fwd_bytes.bytes,
        fwd_kernels=fwd_bytes.kernels,
        output_bytes=_bytes_of(out),
        alias=_aliases_inputs(out, inputs, state),
        fwd_workspace_bytes=fwd_bytes.transient(),
    )
    template: tuple[tuple[str, int, int], ...] = ()
    if training:
        wrt = [t for t, _ in inputs.values() if t.requires_grad] + [p for p in state.values() if p.requires_grad]
        bwd_flops, bwd_bytes = FlopCounterMode(display=False), _ByteCounter()
        failed = _backward(out, wrt, bwd_flops, bwd_bytes)
        weights = [t for t, (kind, _) in inputs.values() if kind == "weight" and t.requires_grad] + [
            p for p in state.values() if p.requires_grad]
        cost.update(weight_grad_bytes=_floating_bytes(weights))
        cost.update(bwd_flops=bwd_flops.get_total_flops() + bwd_bytes.grouped_mm_flops, bwd_bytes=bwd_bytes.bytes,
                    bwd_kernels=bwd_bytes.kernels, bwd_workspace_bytes=bwd_bytes.transient())
        if wrt and cost["fwd_flops"] and not cost["bwd_flops"]:
            # A custom op whose autograd formula does not run here (e.g. a grouped matmul
            # fallback): its backward computes one gradient per differentiable operand, each as
            # costly as the forward.
            operands = sum(1 for t in wrt if t.requires_grad)
            cost.update(bwd_flops=operands * cost["fwd_flops"], bwd_bytes=operands * cost["fwd_bytes"],
                        bwd_kernels=operands * cost["fwd_kernels"])
        if failed and not _is_sdpa(node):  # fused attention prices its backward by formula
            how = "estimated from the forward" if cost["bwd_flops"] else "counted as free"
            cost.update(unpriced=f"backward cannot run on meta, {how}: {failed}")
        template = _saved_template(saved, inputs, out, state)
    if cost["op_class"] == "conv":
        data = next((t for t, (kind, _) in inputs.values() if kind == "input"), None)
        reorder_in, reorder_out = _bytes_of(data), _bytes_of(out)
        cost.update(cpu_fwd_workspace_bytes=max(reorder_in, reorder_out) + _bytes_of(list(state.values()) + [
                        t for t, (kind, _) in inputs.values() if kind == "weight"]),
                    cpu_bwd_workspace_bytes=reorder_in + reorder_out if training and cost["bwd_flops"] else 0)
    if _is_sdpa(node):
        fused, fused_saved = _fused_attention(args, kwargs, out, inputs, training)
        cost.update(fused, op_class="attention")
        template = fused_saved
    return OpCost(**cost), template


def call_node(node: fx.Node, module: nn.Module | None, state: dict, args: tuple, kwargs: dict) -> Any:
    """Run one node on the given inputs (a module node on the given state)."""
    if node.op == "call_module":
        return torch.func.functional_call(module, state, args, kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _backward(out: Any, wrt: list[torch.Tensor], flops: FlopCounterMode, counter: "_ByteCounter") -> str:
    """Gradients of every differentiable output with respect to ``wrt`` (the backward pass),
    counted by ``flops`` and ``counter`` (the incoming gradients are made before: they are not
    the backward's). Returns why it could not run (an op without a meta backward), or "" when it ran."""
    outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not outputs or not wrt:
        return ""
    seeds = [torch.empty_like(t) for t in outputs]
    try:
        with flops, counter:
            grads = torch.autograd.grad(outputs, wrt, seeds, allow_unused=True)
            counter.settle()  # the gradients are the backward's result, not its temporaries
            del grads
    except RuntimeError as e:  # an op without a meta backward: its backward is left unpriced
        logger.warning("no backward on meta for %s: %s", [t.shape for t in outputs], e)
        return _reason(e)
    return ""


def _aliases_inputs(out: Any, inputs: Mapping[int, Any], state: Mapping[str, torch.Tensor]) -> bool:
    """Whether every tensor of ``out`` shares storage with an input or weight (a view, a tuple
    element, an in-place write): then the node allocates nothing of its own."""
    roots = {id(_root(t)) for t, _ in inputs.values()} | {id(_root(t)) for t in state.values()}
    tensors = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return bool(tensors) and all(id(_root(t)) in roots for t in tensors)


def _root(t: torch.Tensor) -> torch.Tensor:
    while t._base is not None:
        t = t._base
    return t


def _reason(e: BaseException) -> str:
    """An exception in one short line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(e).__name__}: {first[:160]}" if first else type(e).__name__


def node_inputs(node: fx.Node, gm: fx.GraphModule, needs_grad: Mapping[str, bool], device: torch.device | str = "meta"):
    """Fresh tensors of every input's traced shape on ``device``; those whose gradient is needed
    require it. On a real device they hold random values (zeros for integers: valid indices).

    Returns the args, kwargs, and ``{id(tensor): (tensor, (kind, index))}`` for every input
    tensor, kind ``input`` (an activation from input node ``index``) or ``weight``.
    """
    device = torch.device(device)
    owners: dict[int, tuple[torch.Tensor, tuple[str, int]]] = {}
    made: dict[str, Any] = {}
    positions = {arg.name: i for i, arg in enumerate(node.all_input_nodes)}

    def fresh(arg: fx.Node) -> Any:
        if arg.name not in made:
            value = arg.meta.get("val")
            if value is None and arg.op == "get_attr":
                value = _fetch(gm, arg.target)
            kind = "weight" if arg.op == "get_attr" else "input"

            def tensor(v: Any) -> Any:
                if not isinstance(v, torch.Tensor):
                    return v
                t = _like(v, device)
                if needs_grad.get(arg.name) and t.is_floating_point():
                    t = t.requires_grad_(True).clone()  # not a leaf, so in-place ops may write it
                owners[id(t)] = (t, (kind, positions[arg.name]))
                return t

            made[arg.name] = pytree.tree_map(tensor, value)
        return made[arg.name]

    on_device = lambda v: device if isinstance(v, torch.device) else v  # noqa: E731
    args = pytree.tree_map(on_device, fx.node.map_arg(node.args, fresh))
    kwargs = pytree.tree_map(on_device, fx.node.map_arg(node.kwargs, fresh))
    return args, kwargs, owners


def module_state(module: nn.Module, device: torch.device | str = "meta") -> dict[str, torch.Tensor]:
    """Fresh parameters and buffers of ``module``'s shapes on ``device``, for functional_call."""
    device = torch.device(device)
    state = {}
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    for name, t in named:
        m = _like(t, device)
        state[name] = m.requires_grad_(True) if isinstance(t, nn.Parameter) and t.requires_grad else m
    return state


def _like(v: torch.Tensor, device: torch.device) -> torch.Tensor:
    t = torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device=device)
    if device.type == "meta":
        return t
    with torch.no_grad():
        if t.is_floating_point() or t.is_complex():
            t.normal_()
        elif t.dtype == torch.bool:
            t.copy_(torch.rand(t.shape, device=device) > 0.5)
        else:
            t.zero_()
    return t


def _saved_template(saved: list[torch.Tensor], inputs: dict[int, tuple[torch.Tensor, tuple[str, int]]],
                    out: Any, state: dict[str, torch.Tensor]) -> tuple[tuple[str, int, int], ...]:
    """Key every saved tensor by position: an input's index, the output, or an intermediate.

    A saved view counts as its base tensor (the base is what stays alive); weights are skipped,
    they are accounted as weights.
    """
    weights = {id(t) for t in state.values()} | {key for key, (_, (kind, _)) in inputs.items() if kind == "weight"}
    outputs = {id(t) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)}
    template: list[tuple[str, int, int]] = []
    seen: set[int] = set()
    for t in saved:
        base = t
        while base._base is not None:
            base = base._base
        if id(base) in weights or id(base) in seen:
            continue
        seen.add(id(base))
        if id(base) in inputs:
            template.append(("input", inputs[id(base)][1][1], _bytes_of(base)))
        elif id(base) in outputs:
            template.append(("output", 0, _bytes_of(base)))
        else:
            template.append(("intermediate", len(template), _bytes_of(base)))
    return tuple(template)


def _classify(ops: list[str]) -> str:
    """The first class of :data:`_CLASS_BY_ATEN` that any op the node ran belongs to."""
    for op_class, prefixes in _CLASS_BY_ATEN:
        if any(n.lstrip("_").removeprefix("native_").startswith(p) for n in ops for p in prefixes):
            return op_class
    return "elementwise"


def _compute_dtype(args: Any, kwargs: Any, out: Any) -> torch.dtype | None:
    tensors = [t for t in pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
    floating = [t for t in tensors if t.is_floating_point()]
    return (floating or tensors)[0].dtype if tensors else None


def _is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and "scaled_dot_product_attention" in str(
        getattr(node.target, "__name__", node.target))


def _fused_attention(args: Any, kwargs: Any, out: Any, inputs: dict, training: bool):
    """Cost and saved tensors of a fused attention kernel (see the module docstring)."""
    q, k, v = args[:3]
    causal = bool(kwargs.get("is_causal", args[5] if len(args) > 5 else False))
    fwd = sdpa_flop_count(q.shape, k.shape, v.shape)
    bwd = sdpa_backward_flop_count(out.shape, q.shape, k.shape, v.shape)
    if causal:  # the share of (query, key) pairs a causal mask keeps
        lq, lk = q.shape[-2], k.shape[-2]
        kept = (lq * (lq + 1) / 2) / (lq * lk) if lq == lk else 0.5
        fwd, bwd = int(fwd * kept), int(bwd * kept)
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    io = _bytes_of((q, k, v, mask)) + _bytes_of(out)
    lse = q.shape[:-1].numel() * 4  # fp32 log-sum-exp per query row
    cost: dict[str, Any] = dict(fwd_flops=fwd, fwd_bytes=io, fwd_kernels=1, fwd_workspace_bytes=0,
                                bwd_workspace_bytes=0)
    template: tuple[tuple[str, int, int], ...] = ()
    if training:
        cost.update(bwd_flops=bwd, bwd_bytes=2 * io + lse, bwd_kernels=1)
        kept_inputs = {id(t): t for t in (q, k, v)}.values()  # self-attention may pass one tensor twice
        template = tuple(("input", inputs[id(t)][1][1], _bytes_of(t)) if id(t) in inputs
                         else ("intermediate", i + 1, _bytes_of(t)) for i, t in enumerate(kept_inputs))
        template += (("output", 0, _bytes_of(out)), ("intermediate", 0, lse))
    return cost, template


# --------------------------------------------------------------------------- graph-level helpers


def needs_grad_of(gm: fx.GraphModule) -> dict[str, bool]:
    """Which nodes' values depend on a trainable weight (their gradient is computed): not those
    of a ``detach``, nor those made in the model's no_grad regions (``meta["grad_enabled"]``)."""
    needs: dict[str, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":  # an input needs a gradient only if it asks for one
            needs[node.name] = any(isinstance(t, torch.Tensor) and t.requires_grad
                                   for t in pytree.tree_leaves(node.meta.get("val")))
        elif node.op == "get_attr":
            t = _fetch(gm, node.target)
            needs[node.name] = isinstance(t, nn.Parameter) and t.requires_grad
        elif node.meta.get("grad_enabled") is False or node.target in ("detach", torch.ops.aten.detach.default):
            needs[node.name] = False  # run in the model's no_grad regions, or cut off from autograd
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            needs[node.name] = any(p.requires_grad for p in module.parameters()) or any(
                needs.get(a.name, False) for a in node.all_input_nodes)
        else:
            needs[node.name] = any(needs.get(a.name, False) for a in node.all_input_nodes)
    return needs


def signature(node: fx.Node, gm: fx.GraphModule, needs_grad: Mapping[str, bool]) -> str | None:
    """A stable text of everything the node's cost depends on (op, shapes, strides, dtypes,
    constants, module hyperparameters), equal for identical nodes in any process; None if a
    constant argument has no stable text."""

    def describe(value: Any) -> Any:
        if isinstance(value, fx.Node):
            v = value.meta.get("val")
            leaves = [(tuple(t.shape), tuple(t.stride()), str(t.dtype)) if isinstance(t, torch.Tensor) else repr(t)
                      for t in pytree.tree_leaves(v)]
            return ("node", tuple(leaves), needs_grad.get(value.name, False))
        if isinstance(value, (list, tuple)):
            return tuple(describe(v) for v in value)
        if isinstance(value, dict):
            return tuple(sorted((k, describe(v)) for k, v in value.items()))
        text = repr(value)
        if " at 0x" in text:  # an object without a stable text
            raise TypeError(text)
        return text

    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        target: Any = (_qualified(type(module)), module.extra_repr(), module.training,
                       tuple((n, tuple(t.shape), str(t.dtype), t.requires_grad) for n, t in module.named_parameters()),
                       tuple((n, tuple(t.shape), str(t.dtype)) for n, t in module.named_buffers()))
    elif node.op == "call_method":
        target = node.target
    else:
        target = str(node.target) if isinstance(node.target, torch._ops.OpOverload) else _qualified(node.target)
    try:
        return repr((node.op, target, describe(node.args), describe(node.kwargs)))
    except TypeError:
        return None


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', None) or ''}.{getattr(obj, '__qualname__', getattr(obj, '__name__', repr(obj)))}"


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _floating_bytes(value: Any) -> int:
    """Bytes of the floating-point (and complex) tensors of ``value``: those with a gradient."""
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(value)
               if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()))


def _bytes_of(value: Any) -> int:
    total = 0
    for t in pytree.tree_leaves(value):
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total



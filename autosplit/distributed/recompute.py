"""Activation recomputation as a plan prices it: each stage recomputes in backward exactly the
blocks the plan says, each under its own policy, with ``torch.utils.checkpoint``.

    recompute_stages(plan, chain.modules, stages)   # in build(), before the PipelineStages are made

The planner (``autosplit.solver.joint``) chooses per stage what its blocks keep for backward
(``RECOMPUTE``): ``"full"`` keeps each block's inputs only; ``"selective"`` also keeps the
outputs of its matmuls, attention and convolutions (torchtitan's op-level selective
checkpointing) and recomputes the rest. It prices that with ``recompute_costs`` on the blocks of
``OpGraph.coarsen()`` and records, per stage, each recomputing block with its policy and nodes
(:class:`autosplit.plan.RecomputedBlock`). This module reads those records, so the runtime
recomputes what was priced without grouping the graph again.

The transform, on a stage's graph module (:func:`recompute_graph`). The stage graphs keep the
traced graph's node names, and each op records the traced node it runs
(``autosplit.rewrite.TRACED_NODE``: an op fixed to the capture's mode is renamed ``in_mode_k``).
Walking the graph in order, each maximal run of consecutive ops of one recomputing block becomes
one segment: a sub-graph module called through :class:`Recompute`, which runs it under
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``. Running example, block
``transformer.h.0`` under ``"full"`` on stage 0 of a GPT-2:

    layer_norm, view_1, addmm, ..., add_7          (ops of the block, weights read by get_attr)
    → recompute = Recompute(segment, "full")(in_mode_0, ln_1.weight, ..., c_proj.bias)
      add_7 = recompute[0]

Nodes of no recomputing block between a run's ops — ``get_attr`` nodes (weights), moves of
received values (``transfer``) — stay in the stage graph, before the segment's call, and are
passed in: the parameters stay where pipelining, FSDP2 and the checkpoint code find them. What
ends a run: an op of another block, a node that reads the run (``Send``, an op of no block) or
writes anything (moving the run past a write could change what it reads), and an op of the
block that writes a tensor made before the run (recomputing a buffer update would apply it
twice: that op stays out of the segment and keeps what it saves; a batch norm with running
statistics counts as one, in either mode, since the mode can change after the build). A block cut by a stage
boundary is a run on each stage.

What each policy keeps. Non-reentrant checkpoint holds a segment's inputs while anything the
segment saved is alive (a segment that saves nothing, such as integer mask arithmetic, holds
nothing) and, through ``create_selective_checkpoint_contexts``, the outputs of the ops the
policy marks ``MUST_SAVE``; everything else the segment's ops would save is dropped and
recomputed when backward reaches the segment. ``recompute_costs`` prices exactly that (checked
byte for byte on a GPT-2 stage in ``tests/test_recompute.py``). ``"selective"`` saves the ATen ops that matmuls, attention and
convolutions dispatch to (``SAVED_BY_SELECTIVE_OPS``: on CPU ``F.linear`` is ``addmm`` or
``mm``, ``F.scaled_dot_product_attention`` is ``_scaled_dot_product_flash_attention_for_cpu``,
``conv*d`` is ``convolution``).

Tensor-parallel stages (DTensors). The transform and both policies run unchanged on DTensor
weights and activations (checked on 2 gloo ranks: outputs and gradients equal the plain graph's).
What to do with collectives is a choice: recomputing one is correct but sends its bytes again in
backward, which the planner does not price (it prices each node's collectives once forward and
once backward, ``Sharding.collectives_s``). So both policies keep collective outputs, where
the policy can see them: an explicit redistribute runs the c10d functional ops on local tensors
(``COLLECTIVE_OPS``: kept); DTensor's own redistribution inside an op's dispatch is invisible
to the policy, which sees the op on DTensors, so an op reading partial sums (a row-parallel
projection's output, reduced before the residual add) keeps its output. The price is memory:
``"full"`` keeps one such tensor per reduction in its segments (typically a hidden state or two
per layer), beyond the plan's figure. An all-gather DTensor chooses inside an op on shards runs
again in backward. A stage without DTensors keeps exactly what the plan prices.

Random ops (dropout) replay the same values: checkpoint restores the RNG state of the forward
before recomputing (``preserve_rng_state=True``, its default).
"""

from __future__ import annotations

import functools
import logging
import operator
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from autosplit.distributed.stages import _free_attribute
from autosplit.plan import Plan, RecomputedBlock
from autosplit.rewrite import TRACED_NODE

logger = logging.getLogger(__name__)

aten = torch.ops.aten


def _ops(namespace: Any, names: Sequence[str]) -> frozenset:
    """The overloads of the ops ``names`` that this build of PyTorch has."""
    found = set()
    for name in names:
        packet = getattr(namespace, name, None)
        if packet is None:
            continue
        found.update(getattr(packet, overload) for overload in packet.overloads())
    return frozenset(found)


SAVED_BY_SELECTIVE_OPS = _ops(aten, (
    "mm", "addmm", "bmm", "baddbmm", "_scaled_mm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable", "_flash_attention_forward", "_efficient_attention_forward",
    "convolution", "_convolution", "mkldnn_convolution", "cudnn_convolution", "miopen_convolution",
))
"""ATen ops whose outputs ``"selective"`` keeps: what the matmul, attention and convolution
ops of the planner's ``SAVED_BY_SELECTIVE`` classes dispatch to (``aten.linear``, ``matmul``,
``scaled_dot_product_attention`` and ``conv2d`` are composite: the checkpoint's dispatch mode
sees what they decompose into)."""

COLLECTIVE_OPS = _ops(torch.ops._c10d_functional, (
    "all_reduce", "all_reduce_coalesced", "all_gather_into_tensor", "all_gather_into_tensor_coalesced",
    "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced", "all_to_all_single", "broadcast", "wait_tensor",
))
"""The c10d functional collectives (what a DTensor redistribute runs): kept by both policies, so
backward does not send their bytes again (see the module docstring)."""


def _keep(saved: frozenset, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if op in saved or _reduces_partial(args):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _reduces_partial(args: Sequence[Any]) -> bool:
    """Whether an op reads a DTensor holding partial sums: DTensor reduces it (an all-reduce or
    a reduce-scatter) inside the op's dispatch, where the checkpoint's policy sees only the op,
    so keeping the op's output is what keeps the collective from running again."""
    return any(isinstance(a, DTensor) and any(p.is_partial() for p in a.placements)
               for a in pytree.tree_leaves(args))


KEPT_OPS = {"full": COLLECTIVE_OPS, "selective": SAVED_BY_SELECTIVE_OPS | COLLECTIVE_OPS}
"""Per policy, the ATen ops whose outputs a recomputed segment keeps."""


class Recompute(nn.Module):
    """Runs ``segment`` under non-reentrant ``torch.utils.checkpoint``, keeping in forward only
    what ``policy`` keeps (``KEPT_OPS``) and recomputing the rest in backward. Without grad
    (evaluation) it runs the segment plainly."""

    def __init__(self, segment: fx.GraphModule, policy: str, block: str):
        super().__init__()
        if policy not in KEPT_OPS:
            raise ValueError(f"block {block} recomputes under policy {policy!r}; the runtime runs "
                             f"{', '.join(map(repr, KEPT_OPS))}: plan again with this version of autosplit")
        self.segment = segment
        self.policy = policy
        self.block = block
        self._contexts = functools.partial(create_selective_checkpoint_contexts,
                                           functools.partial(_keep, KEPT_OPS[policy]))

    def forward(self, *args: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.segment(*args)
        return checkpoint(self.segment, *args, use_reentrant=False, context_fn=self._contexts)

    def extra_repr(self) -> str:
        return f"block={self.block!r}, policy={self.policy!r}"


def recompute_stages(plan: Plan, modules: Sequence[fx.GraphModule], stages: Sequence[int]) -> dict[int, int]:
    """Make each of ``stages`` (indices into ``plan.stages`` and ``modules``, the stage graph
    modules of ``autosplit.distributed.stages.stage_chain``) recompute in backward what the plan
    says (:func:`recompute_graph`), in place. Returns the segments made per stage.

    Raises:
        ValueError: a stage recomputes but the plan does not say which blocks (a plan saved
            before they were recorded), or a recorded node is not in the stage's graph.
    """
    made = {}
    for s in stages:
        stage = plan.stages[s]
        if stage.recompute == "none":
            continue
        if not stage.recompute_blocks:
            raise ValueError(f"stage {s} of the plan recomputes ({stage.recompute}) but the plan does not record which "
                             "blocks do what (Stage.recompute_blocks, in plans made by this version of autosplit): "
                             "plan again")
        made[s] = recompute_graph(modules[s], stage.recompute_blocks)
        logger.info("stage %d recomputes %d blocks (%s) in %d checkpointed segments", s, len(stage.recompute_blocks),
                    stage.recompute, made[s])
    return made


def recompute_graph(module: fx.GraphModule, blocks: Sequence[RecomputedBlock]) -> int:
    """Outline every maximal run of consecutive ops of one recomputing block of ``module`` into
    a :class:`Recompute` segment (see the module docstring), in place; returns the number of
    segments.

    Raises:
        ValueError: a node of ``blocks`` is not an op of ``module`` (the plan was made for
            another graph).
    """
    block_of: dict[str, RecomputedBlock] = {}
    for block in blocks:
        for name in block.nodes:
            block_of[name] = block
    runs: list[tuple[RecomputedBlock, list[fx.Node]]] = []
    seen: set[str] = set()
    current: tuple[RecomputedBlock, list[fx.Node]] | None = None
    inside: set[fx.Node] = set()
    for node in module.graph.nodes:
        computes = node.op in ("call_function", "call_method", "call_module")
        block = block_of.get(_traced_name(node)) if computes else None
        writes = _written(node) if computes else []
        if block is not None:
            seen.add(_traced_name(node))
            if any(w not in inside or current is None or current[0] is not block for w in writes):
                block = None  # it writes into a tensor made before the run: recomputing would write twice
        if block is None:
            # A weight, a move of a received value, an op of no recomputing block: it stays in the
            # stage graph, before the segment's call, unless it reads the run or writes anything
            # (moving the run after a write could change what the run reads): then the run ends.
            if current is not None and (node.op == "output" or writes
                                        or any(n in inside for n in node.all_input_nodes)):
                current, inside = None, set()
            continue
        if current is None or current[0] is not block:
            current, inside = (block, []), set()
            runs.append(current)
        current[1].append(node)
        inside.add(node)
    missing = sorted(set(block_of) - seen)
    if missing:
        raise ValueError(f"the plan recomputes {len(missing)} node{'s' if len(missing) > 1 else ''} that this stage "
                         f"does not run ({', '.join(missing[:5])}{', …' if len(missing) > 5 else ''}): the plan was "
                         "made for another graph or another version of autosplit; plan again")
    for block, nodes in runs:
        _outline(module, block, nodes)
    if runs:
        module.graph.lint()
        module.recompile()
    return len(runs)


def _traced_name(node: fx.Node) -> str:
    return node.meta.get(TRACED_NODE, node.name)


_WRITES_RUNNING_STATS = frozenset({aten.batch_norm.default, torch.nn.functional.batch_norm})
"""Ops that update running statistics in training though their schema does not say so."""


def _written(node: fx.Node) -> list[fx.Node]:
    """The nodes whose tensors ``node`` writes in place (an ATen op's mutable arguments, the
    first argument of an in-place method or function such as ``add_``, an ``out=``)."""
    written: list[Any] = []
    target = node.target
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(target)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            return [n for n in node.all_input_nodes]  # its running statistics, in training
        target = getattr(module, "op", None)  # an op fixed to the capture's mode (autosplit.modes.InMode)
    if target in _WRITES_RUNNING_STATS:
        return [n for n in node.all_input_nodes]
    if isinstance(target, torch._ops.OpOverload):
        for i, argument in enumerate(target._schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                written.append(node.kwargs.get(argument.name, node.args[i] if i < len(node.args) else None))
    elif node.op in ("call_method", "call_function"):
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and node.args:
            written.append(node.args[0])
        if "out" in node.kwargs:
            written.append(node.kwargs["out"])
    return [w for w in written if isinstance(w, fx.Node)]


def _outline(module: fx.GraphModule, block: RecomputedBlock, nodes: list[fx.Node]) -> None:
    """Replace ``nodes`` (consecutive but for nodes that do not read them) by a call of one
    :class:`Recompute` segment that computes them; the values used after them come back as a
    tuple."""
    members = set(nodes)
    inputs: dict[fx.Node, None] = {}
    for node in nodes:
        for used in node.all_input_nodes:
            if used not in members:
                inputs.setdefault(used)
    outputs = [n for n in nodes if any(user not in members for user in n.users)]

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for used in inputs:
        env[used] = graph.placeholder(used.name)
        env[used].meta = dict(used.meta)
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in outputs))
    segment = fx.GraphModule(module, graph, class_name="RecomputedSegment")

    name = _free_attribute(module, "recompute")
    module.add_module(name, Recompute(segment, block.policy, block.block))
    with module.graph.inserting_after(nodes[-1]):
        call = module.graph.call_module(name, tuple(inputs))
    values: Mapping[fx.Node, fx.Node] = {}
    with module.graph.inserting_after(call):
        for k, node in reversed(list(enumerate(outputs))):
            values[node] = module.graph.call_function(operator.getitem, (call, k))
            values[node].meta = dict(node.meta)
    for node in outputs:
        node.replace_all_uses_with(values[node], delete_user_cb=lambda user: user not in members)
    for node in reversed(nodes):
        module.graph.erase_node(node)

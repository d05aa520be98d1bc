"""The op graph the planner works on, and its coarsening into blocks along the module hierarchy.

    g = OpGraph.from_traced(traced)          # one node per fx node
    blocks = g.coarsen()                     # one node per transformer layer, embedding, head...
    blocks.boundary(["transformer.h.0", "transformer.h.1"]).out_bytes

Every node of an OpGraph has ``members``: the fx node names it stands for (one at op level).
Every edge has ``tensors``: ``{producer fx node: Tensor}`` for the values flowing along it, so
a tensor read by several consumers is counted once when it crosses a boundary.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Iterator

import networkx as nx

from autosplit.trace import NodeInfo, Traced, draws_random, writes_in_place  # noqa: F401 (used by solver, rewrite)

logger = logging.getLogger(__name__)

INPUT, OUTPUT, WEIGHT, COMPUTE = "input", "output", "weight", "compute"
"""Node kinds: a model input, the model output, a parameter/buffer read, anything computed."""

LAYOUT_ONLY = frozenset({"aten.contiguous.default", "contiguous"})
"""Targets that change memory layout only; the fingerprint looks through them."""

_KIND_OF_OP = {"placeholder": INPUT, "output": OUTPUT, "get_attr": WEIGHT}


@dataclass(frozen=True)
class Tensor:
    """A value flowing along an edge: who produced it, its size, and whether it is a weight."""

    producer: str
    nbytes: int
    weight: bool = False


@dataclass(frozen=True)
class Boundary:
    """The tensors crossing the boundary of a node set, each once."""

    inputs: tuple[Tensor, ...]
    """Produced outside the set, read inside."""
    outputs: tuple[Tensor, ...]
    """Produced inside the set, read outside."""

    @property
    def in_bytes(self) -> int:
        """Activation bytes received (weights excluded)."""
        return sum(t.nbytes for t in self.inputs if not t.weight)

    @property
    def out_bytes(self) -> int:
        """Activation bytes sent (weights excluded)."""
        return sum(t.nbytes for t in self.outputs if not t.weight)


class OpGraph:
    """A DAG over ops or blocks of ops, in a fixed topological order.

    Node attributes: ``kind`` (input, output, weight, compute), ``members`` (fx node names),
    ``module_path`` and ``module_type`` (the owning module), ``reads`` (parameters and buffers
    read), ``output_bytes``. Edge attribute: ``tensors`` (empty on an edge that only keeps the
    model's order of accesses to a buffer it writes in place).
    """

    def __init__(
        self,
        dag: nx.DiGraph,
        order: list[str],
        infos: dict[str, NodeInfo],
        module_types: dict[str, str],
        coarse: bool = False,
    ):
        assert len(order) == dag.number_of_nodes(), "order must list every node once"
        self.dag = dag
        self.order = order
        self.infos = infos
        """Annotations of the underlying fx nodes, by fx node name, in fx order."""
        self.module_types = module_types
        """Dotted class name of every submodule of the model, by qualified name."""
        self.coarse = coarse
        """True for a graph of blocks made by :meth:`coarsen`."""
        self._position = {n: i for i, n in enumerate(order)}
        self._fx_position = {n: i for i, n in enumerate(infos)}

    @classmethod
    def from_traced(cls, traced: Traced) -> "OpGraph":
        """One graph node per fx node; one edge per producer→consumer pair."""
        dag = nx.DiGraph()
        order = []
        for node in traced.graph.nodes:
            info = traced.nodes[node.name]
            kind = _KIND_OF_OP.get(node.op, COMPUTE)
            dag.add_node(
                node.name,
                kind=kind,
                members=(node.name,),
                module_path=info.module_path,
                module_type=info.module_type,
                reads=info.reads,
                output_bytes=info.output_bytes,
            )
            order.append(node.name)
            for arg in node.all_input_nodes:
                tensor = Tensor(arg.name, traced.nodes[arg.name].output_bytes, arg.op == "get_attr")
                dag.add_edge(arg.name, node.name, tensors={arg.name: tensor})
        _order_state_accesses(dag, traced)
        return cls(dag, order, dict(traced.nodes), dict(traced.module_types))

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        return iter(self.order)

    def __getitem__(self, name: str) -> dict:
        return self.dag.nodes[name]

    def position(self, name: str) -> int:
        """Index of ``name`` in the topological order."""
        return self._position[name]

    def compute_nodes(self) -> list[str]:
        return [n for n in self.order if self.dag.nodes[n]["kind"] == COMPUTE]

    def boundary(self, nodes: Iterable[str]) -> Boundary:
        """The tensors entering and leaving ``nodes``, each counted once however many readers it has.

        Example: for a transformer layer, ``inputs`` holds the residual stream (and the weights
        it reads from elsewhere, flagged ``weight``), ``outputs`` the stream it passes on.
        """
        inside = set(nodes)
        unknown = inside - set(self._position)
        if unknown:
            raise KeyError(f"not nodes of this graph: {sorted(unknown)[:5]}")
        inputs: dict[str, Tensor] = {}
        outputs: dict[str, Tensor] = {}
        for u, v, tensors in self.dag.edges(data="tensors"):
            if (u in inside) == (v in inside):
                continue
            target = outputs if u in inside else inputs
            for producer, tensor in tensors.items():
                target.setdefault(producer, tensor)

        def in_order(tensors: dict[str, Tensor]) -> tuple[Tensor, ...]:
            return tuple(sorted(tensors.values(), key=lambda t: self._fx_position[t.producer]))

        return Boundary(in_order(inputs), in_order(outputs))

    def is_dag(self) -> bool:
        return nx.is_directed_acyclic_graph(self.dag)

    def fingerprint(self) -> str:
        """A stable hash of ops, shapes, dtypes, owners and data flow: same model, same hash.

        A plan records it so it is never applied to a different model by mistake. Node names
        and ops that only fix memory layout (``contiguous``, which export records or skips
        depending on the strides a device's kernels produce) are left out, so a model captured
        on ``meta`` and the same model captured with real weights agree.
        """
        digest = hashlib.sha256()
        for _, record in self._records():
            digest.update(record)
        return digest.hexdigest()[:16]

    def node_digests(self) -> dict[str, str]:
        """The fingerprint's part for each node, by name (layout-only ops have none): where two
        graphs first differ, their digests first differ."""
        return {name: hashlib.sha256(record).hexdigest()[:8] for name, record in self._records()}

    def _records(self) -> list[tuple[str, bytes]]:
        """One serialized record per node (computed once: a graph does not change)."""
        if "_record_list" not in self.__dict__:
            self.__dict__["_record_list"] = list(self._make_records())
        return self.__dict__["_record_list"]

    def _make_records(self) -> Iterator[tuple[str, bytes]]:
        index: dict[str, int] = {}
        source: dict[str, str] = {}  # a skipped op stands for its input
        for name in self.order:
            attrs = self.dag.nodes[name]
            members = [self.infos[m] for m in attrs["members"]]
            preds = [source.get(p, p) for p in self.dag.predecessors(name)]
            if len(members) == 1 and members[0].target in LAYOUT_ONLY and len(preds) == 1:
                source[name] = preds[0]
                continue
            index[name] = len(index)
            record = [
                attrs["kind"],
                sorted(index[p] for p in preds),
                [[m.op, m.target, m.shapes, [str(d) for d in m.dtypes], m.module_path, m.reads]
                 for m in members if m.target not in LAYOUT_ONLY],
            ]
            yield name, json.dumps(record).encode()

    # ------------------------------------------------------------------ coarsening

    def coarsen(self, *, max_block_share: float | None = None) -> OpGraph:
        """Group ops into blocks that follow the module hierarchy; the result is still a DAG.

        A block is one submodule's work: each layer of the model's layer stack (transformer
        layers, ResNet stages), and each module beside it (embedding, final norm, head). Glue code
        between them (a residual add in a parent's forward) forms blocks of its own. A module
        reused at several places gives one block per call site. Inputs and the output stay
        single nodes; a weight joins the block of its first reader.

        Args:
            max_block_share: if set, a block holding more than this share of all compute ops
                is split into its submodules (repeatedly), e.g. 0.25 for a model whose one
                huge module would otherwise leave a planner nothing to cut.
        """
        if self.coarse:
            raise ValueError("coarsen() works on the op-level graph from OpGraph.from_traced()")
        if max_block_share is not None and not 0 < max_block_share <= 1:
            raise ValueError(f"max_block_share must be in (0, 1], e.g. 0.25; got {max_block_share}")
        atomic = _atomic_modules(self, max_block_share)
        keys = {n: self._block_key(n, atomic) for n in self.order}
        for n in self.order:
            if self.dag.nodes[n]["kind"] == WEIGHT:
                readers = sorted(self.dag.successors(n), key=self.position)
                keys[n] = keys[readers[0]] if readers else keys[n]
        block_of = self._segment(keys)
        return self._contract(block_of, keys, atomic)

    def _block_key(self, name: str, atomic: set[str]) -> str:
        """The call site of the outermost atomic module around the op, or its parent's glue."""
        attrs = self.dag.nodes[name]
        if attrs["kind"] in (INPUT, OUTPUT):
            return name
        scope = self.infos[name].scope or ((attrs["module_path"],) if attrs["module_path"] else ())
        for site in scope:
            if site.partition("@")[0] in atomic:
                return site
        return (scope[-1] if scope else "") + "[glue]"

    def _segment(self, keys: dict[str, str]) -> dict[str, str]:
        """Assign ops to blocks in topological order; start a new block of the same key whenever
        joining the current one would close a cycle.

        Running example: a parent's glue computes a mask before layer 0 and reshapes the output
        after layer 11. Both have the key ``transformer[glue]``; putting the reshape into the
        block of the mask would make layer 0 → ... → layer 11 → glue → layer 0 a cycle, so the
        reshape opens ``transformer[glue]#1``.
        """
        blocks = nx.DiGraph()
        current: dict[str, str] = {}
        count: dict[str, int] = defaultdict(int)
        block_of: dict[str, str] = {}
        for n in self.order:
            key = keys[n]
            block = current.get(key)
            preds = {block_of[p] for p in self.dag.predecessors(n)}
            if block is None or any(b != block and nx.has_path(blocks, block, b) for b in preds):
                block = key if count[key] == 0 else f"{key}#{count[key]}"
                count[key] += 1
                current[key] = block
                blocks.add_node(block)
            block_of[n] = block
            for b in preds:
                if b != block:
                    blocks.add_edge(b, block)
        return block_of

    def _contract(self, block_of: dict[str, str], keys: dict[str, str], atomic: set[str]) -> "OpGraph":
        members: dict[str, list[str]] = defaultdict(list)
        for n in self.order:
            members[block_of[n]].append(n)
        dag = nx.DiGraph()
        for block, names in members.items():
            kinds = {self.dag.nodes[n]["kind"] for n in names}
            kind = kinds.pop() if len(kinds) == 1 else COMPUTE
            module_path = keys[names[-1]].removesuffix("[glue]").partition("@")[0]
            if kind != COMPUTE:
                module_path = ""
            owner = self.module_types.get(module_path, "") if kind == COMPUTE else ""
            reads: list[str] = []
            for n in names:
                reads.extend(r for r in self.dag.nodes[n]["reads"] if r not in reads)
            dag.add_node(
                block,
                kind=kind,
                members=tuple(names),
                module_path=module_path,
                module_type=owner,
                reads=tuple(reads),
                output_bytes=sum(self.dag.nodes[n]["output_bytes"] for n in names),
                glue=keys[names[-1]].endswith("[glue]"),
            )
        for u, v, tensors in self.dag.edges(data="tensors"):
            bu, bv = block_of[u], block_of[v]
            if bu != bv:
                if dag.has_edge(bu, bv):
                    dag.edges[bu, bv]["tensors"].update(tensors)
                else:
                    dag.add_edge(bu, bv, tensors=dict(tensors))
        # Weights are read early in exported graphs; order blocks by their first real op.
        first = {
            b: min((self._position[n] for n in names if self.dag.nodes[n]["kind"] != WEIGHT),
                   default=self._position[names[0]])
            for b, names in members.items()
        }
        order = list(nx.lexicographical_topological_sort(dag, key=first.__getitem__))
        coarse = OpGraph(dag, order, self.infos, self.module_types, coarse=True)
        logger.debug("coarsened %d ops into %d blocks", len(self), len(coarse))
        return coarse


def _order_state_accesses(dag: nx.DiGraph, traced: Traced) -> None:
    """Edges without tensors (``tensors={}``) that keep the accesses of a parameter or buffer
    the model writes in place in the model's order: each write after the reads before it, each
    access after the write before it. An fx graph reads a buffer through a fresh ``get_attr``
    after ``self.ema.lerp_(...)``, with no data edge from the write: without these edges a
    topological order could run that read before the write."""
    written = set(traced.written())
    if not written:
        return
    last_write: dict[str, str] = {}
    since: dict[str, list[str]] = {}  # accesses after the last write
    for node in traced.graph.nodes:
        info = traced.nodes[node.name]
        for name in sorted(written & {*info.reads, *info.writes}):
            earlier = [last_write[name]] if name in last_write else []
            if name in info.writes:
                earlier += since.pop(name, [])
                last_write[name] = node.name
            else:
                since.setdefault(name, []).append(node.name)
            for u in earlier:
                if u != node.name and not dag.has_edge(u, node.name):
                    dag.add_edge(u, node.name, tensors={})


def _atomic_modules(graph: OpGraph, max_block_share: float | None) -> set[str]:
    """Module paths that become one block each.

    Descending from the model, a module is split into its children when it contains a layer
    stack — two or more sibling modules of one class that own ops through submodules of their
    own (GPT-2's ``h.0 … h.11``, T5's ``block.*``) — unless it is itself a member of a stack at
    least as long (a Mixtral layer is not split into its 8 experts). The model itself is always
    split, and so is a module that is the only child of a split one, so a model wrapping one
    ``nn.Sequential`` still gives one block per layer.
    """
    ops_under: dict[str, int] = defaultdict(int)
    for n in graph.compute_nodes():
        path = graph[n]["module_path"]
        parts = path.split(".") if path else []
        for depth in range(len(parts) + 1):
            ops_under[".".join(parts[:depth])] += 1
    children: dict[str, list[str]] = defaultdict(list)
    for path in ops_under:
        if path:
            children[path.rpartition(".")[0]].append(path)
    for kids in children.values():
        kids.sort(key=lambda p: [int(x) if x.isdigit() else x for x in p.split(".")])

    def stack_length(path: str) -> int:
        """How many sibling modules with ops in submodules share ``path``'s class (1: none)."""
        if not children.get(path):
            return 1
        cls = graph.module_types.get(path)
        siblings = children[path.rpartition(".")[0]]
        return sum(1 for s in siblings if children.get(s) and graph.module_types.get(s) == cls)

    def longest_stack_inside(path: str) -> int:
        return max((max(stack_length(c), longest_stack_inside(c)) for c in children.get(path, [])), default=1)

    total = max(ops_under[""], 1)
    atomic: set[str] = set()

    def visit(path: str, forced: bool) -> None:
        kids = children.get(path, [])
        split = bool(kids) and (forced or longest_stack_inside(path) > stack_length(path))
        if kids and max_block_share is not None and ops_under[path] / total > max_block_share:
            split = True
        if split:
            for child in kids:
                visit(child, forced=len(kids) == 1)  # a lone wrapper (`self.layers`) is no block
        else:
            atomic.add(path)

    visit("", forced=True)
    return atomic

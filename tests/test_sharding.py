"""Tensor-parallel layouts: DTensor's strategies, their prices, and the choice, checked against
DTensor itself run in one process on a fake 2-rank process group (``CommDebugMode`` counts the
collectives it would run)."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from autosplit import capture
from autosplit.sharding import (choose_layouts, cpu_attention_strategy, from_placement, node_layouts, price_layouts,
                               to_placement)
from autosplit.sharding.placements import validate
from autosplit.sharding.price import collective_s, transition
from autosplit.sharding.strategies import Layout, tensor_inputs
from cost_models import Cluster, price_graph

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CLUSTER = Cluster.parse("2xa100")  # fp32 matmuls slow enough against NVLink that splitting pays


@contextlib.contextmanager
def fake_mesh(world: int = 2):
    """A DeviceMesh on a fake process group in this process; the group is destroyed after."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield DeviceMesh("cpu", list(range(world)))
    finally:
        dist.destroy_process_group()


def _kind(op) -> str:
    name = str(op)
    for kind in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all"):
        if kind in name:
            return kind
    return name


def comm_counts(mode) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op, n in mode.get_comm_counts().items():
        if n:
            counts[_kind(op)] = counts.get(_kind(op), 0) + n
    return dict(sorted(counts.items()))


def as_on_cpu(counts: dict[str, int]) -> dict[str, int]:
    """Counts as a CPU process group runs them: it has no all-to-all and all-gathers instead
    ("CPU process group does not support alltoall yet, falling back with allgather + chunk")."""
    out: dict[str, int] = {}
    for kind, n in counts.items():
        kind = "all_gather" if kind == "all_to_all" else kind
        out[kind] = out.get(kind, 0) + n
    return dict(sorted(out.items()))


def dtensor(t: torch.Tensor, mesh, placement: str, requires_grad: bool = False):
    """A DTensor of the whole tensor ``t`` in ``placement`` (a partial one holds t on rank 0)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if placement.startswith("P"):
        local = t.clone()
        out = DTensor.from_local(local, mesh, [to_placement(placement)], run_check=False)
    else:
        out = distribute_tensor(t, mesh, [to_placement(placement)])
    return out.detach().requires_grad_(requires_grad) if requires_grad else out


def placements_of(value) -> tuple[str, ...]:
    from torch.distributed.tensor import DTensor

    return tuple(from_placement(t.placements[0], t.ndim) for t in pytree.tree_leaves(value) if isinstance(t, DTensor))


class Runner(fx.Interpreter):
    """Runs a captured graph on DTensors as a plan says: each weight distributed in its layout's
    placement, each input of a node redistributed (once per producer and placement) to the
    node's layout, every node's output placement checked against its layout."""

    def __init__(self, gm: fx.GraphModule, layouts: dict[str, Layout], mesh):
        super().__init__(gm)
        self.layouts, self.mesh = layouts, mesh
        self.moved: dict[tuple[str, int, str], object] = {}
        self.weights: dict[str, object] = {}
        self.mismatches: list[str] = []
        for n in gm.graph.nodes:  # distributed before the run, so counting sees only the plan's collectives
            if n.op == "get_attr":
                t = super().run_node(n)
                trainable = isinstance(t, nn.Parameter) and t.requires_grad  # buffers get no gradient
                self.weights[n.name] = dtensor(t.detach(), mesh, layouts[n.name].outputs[0], requires_grad=trainable)

    def run_node(self, n: fx.Node):
        from torch.distributed.tensor import DTensor

        layout = self.layouts[n.name]
        if n.op == "get_attr":
            return self.weights[n.name]
        if n.op == "placeholder":
            return super().run_node(n)
        if n.target is torch.ops.aten._assert_tensor_metadata.default:
            return None  # export's check of a value's dtype: no DTensor rule, nothing to run
        if n.op == "call_function" and n.target is __import__("operator").getitem:
            return super().run_node(n)
        slots = iter(zip(tensor_inputs(n), layout.inputs))

        def fetch(a):
            if not isinstance(a, fx.Node):
                return a
            value = self.env[a]
            if not isinstance(value, torch.Tensor):
                return value
            slot, placement = next(slots)
            if not isinstance(value, DTensor):
                return value
            key = (slot.producer, slot.index, placement)
            if placement.startswith("P") and placements_of(value) == ("R",):
                return value  # R -> P is DTensor's own local step (public redistribute refuses it)
            if key not in self.moved:
                self.moved[key] = value if placements_of(value) == (placement,) else value.redistribute(
                    self.mesh, [to_placement(placement)])
            return self.moved[key]

        args = pytree.tree_map_only(fx.Node, fetch, n.args, is_leaf=lambda x: isinstance(x, fx.Node))
        kwargs = pytree.tree_map_only(fx.Node, fetch, n.kwargs, is_leaf=lambda x: isinstance(x, fx.Node))
        if n.op == "output":
            return args[0]
        out = getattr(self, n.op)(n.target, args, kwargs)
        got = placements_of(out)
        if got and got != layout.outputs[:len(got)]:
            self.mismatches.append(f"{n.name} ({n.target}): planned {layout.outputs}, DTensor gave {got}")
        return out


def run_as_planned(traced, layouts, inputs, *, input_grad: bool = False):
    """Forward and backward of ``traced`` on DTensors laid out as ``layouts``; returns the
    collectives counted forward and backward, and the nodes whose output placement differed."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.experimental import implicit_replication

    with fake_mesh(2) as mesh, cpu_attention_strategy(), implicit_replication():
        args = []
        for t in inputs:
            if input_grad and t.is_floating_point():
                t = t.clone().requires_grad_(True)
            args.append(DTensor.from_local(t, mesh, [Replicate()], run_check=False))
        runner = Runner(traced.graph_module, layouts, mesh)
        with CommDebugMode() as forward:
            out = runner.run(*args)
        loss = sum(o.to_local().float().sum() for o in pytree.tree_leaves(out) if isinstance(o, DTensor))
        with CommDebugMode() as backward:
            loss.backward()
            for w in runner.weights.values():  # the optimizer adds each gradient to its weight
                if w.grad is not None and w.grad.placements != w.placements:
                    w.grad.redistribute(mesh, w.placements)
    return comm_counts(forward), comm_counts(backward), runner.mismatches


def layout_with(layouts, name: str, inputs: tuple[str, ...]) -> Layout:
    found = [l for l in layouts[name].layouts if l.inputs == inputs]
    assert found, f"{name}: no layout with inputs {inputs}; have {[l.inputs for l in layouts[name].layouts]}"
    return found[0]


def op_node(traced, target_part: str) -> fx.Node:
    return next(n for n in traced.graph.nodes if n.op == "call_function" and target_part in str(n.target))


# --------------------------------------------------------------------------- placements


def test_placement_strings_round_trip_through_dtensor_placements():
    from torch.distributed.tensor import Partial, Replicate, Shard

    for text, obj in (("R", Replicate()), ("P", Partial()), ("S(0)", Shard(0)), ("S(2)", Shard(2)),
                      ("P(max)", Partial("max"))):
        assert to_placement(text) == obj
        assert from_placement(obj) == text
    assert from_placement(Shard(-1), ndim=3) == "S(2)"
    with pytest.raises(ValueError, match="expected 'R'"):
        validate("Shard(0)")


def test_collective_of_each_transition_is_what_dtensor_redistributes():
    from torch.distributed.tensor.debug import CommDebugMode

    t = torch.randn(4, 6, 8)
    cases = [("P", "R"), ("P", "S(1)"), ("S(1)", "R"), ("S(0)", "S(2)"), ("R", "S(1)")]
    with fake_mesh(2) as mesh:
        for src, dst in cases:
            x = dtensor(t, mesh, src)
            with CommDebugMode() as mode:
                x.redistribute(mesh, [to_placement(dst)])
            expected = transition(src, dst)
            assert comm_counts(mode) == as_on_cpu({expected: 1} if expected else {}), (src, dst)
    assert not dist.is_initialized()
    assert collective_s("all_reduce", 2**20, CLUSTER, [0, 1]) > collective_s("all_gather", 2**20, CLUSTER, [0, 1]) > 0


def test_the_sharding_package_plans_only():
    """Its modules import the capture, the graph and the cost models, never a runtime."""
    import ast
    import pathlib

    import autosplit.sharding

    allowed = ("autosplit.sharding", "autosplit.trace", "autosplit.graph", "cost_models", "torch", "numpy",
               "ortools", "__future__")
    for path in pathlib.Path(autosplit.sharding.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for name in names:
                top = name.split(".")[0]
                assert name.startswith(allowed) or top not in ("autosplit", "cost_models") and \
                    top in ("contextlib", "functools", "logging", "operator", "re", "dataclasses", "typing",
                            "collections", "hashlib", "time", "math", "torch", "gc", "heapq", "weakref"), \
                    f"{path.name} imports {name}"


def test_enumerating_layouts_leaves_no_process_group():
    traced = capture(nn.Linear(8, 16), (torch.randn(2, 8),), tracer="export")
    node_layouts(traced.graph_module, 2)
    assert not dist.is_initialized()


# --------------------------------------------------------------------------- one op class at a time


class Ops(nn.Module):
    """One of each op class, on (batch 2, sequence 4, hidden 8), vocabulary 16, 2 heads."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.norm = nn.LayerNorm(8)
        self.up = nn.Linear(8, 12, bias=False)
        self.down = nn.Linear(12, 8, bias=False)
        self.head = nn.Linear(8, 16, bias=False)
        self.rms = nn.RMSNorm(8)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.norm(h)
        a = self.down(F.gelu(self.up(h)))
        h = self.rms(h + a)
        q = h.view(2, 4, 2, 4).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        scores = torch.softmax(attn, dim=-1)
        h = h + scores.transpose(1, 2).reshape(2, 4, 8)
        return self.head(h)


@pytest.fixture(scope="module")
def ops_traced():
    traced = capture(Ops(), (torch.randint(0, 16, (2, 4)),), tracer="export")
    return traced, node_layouts(traced.graph_module, 2)


OP_CASES = [  # (op in the target's name, which occurrence, input placements, expected output)
    ("embedding", 0, ("S(0)", "R"), ("P",)),          # split by vocabulary: masked lookups, summed
    ("embedding", 0, ("S(1)", "R"), ("S(2)",)),       # split by hidden
    ("layer_norm", 0, ("S(1)", "R", "R"), None),      # follows its input along the sequence
    ("linear", 0, ("R", "S(0)"), ("S(2)",)),          # column parallel
    ("linear", 1, ("S(2)", "S(1)"), ("P",)),          # row parallel
    ("gelu", 0, ("S(2)",), ("S(2)",)),                 # elementwise follows its input
    ("add", 0, ("S(1)", "S(1)"), ("S(1)",)),
    ("add", 0, ("P", "P"), ("P",)),
    ("rms_norm", 0, ("S(1)", "R"), ("S(1)",)),
    ("scaled_dot_product_attention", 0, ("S(1)", "S(1)", "S(1)"), ("S(1)",)),   # by heads
    ("scaled_dot_product_attention", 0, ("S(0)", "S(0)", "S(0)"), ("S(0)",)),   # by batch
    ("softmax", 0, ("S(1)",), ("S(1)",)),
    ("linear", 2, ("R", "S(0)"), ("S(2)",)),          # the LM head by vocabulary
]


@pytest.mark.parametrize("target,occurrence,inputs,expected", OP_CASES)
def test_op_layout_is_what_dtensor_runs(ops_traced, target, occurrence, inputs, expected):
    from torch.distributed.tensor.debug import CommDebugMode

    traced, layouts = ops_traced
    nodes = [n for n in traced.graph.nodes if n.op == "call_function" and target in str(n.target)]
    node = nodes[occurrence]
    layout = layout_with(layouts, node.name, inputs)
    if expected is not None:
        assert layout.outputs[:len(expected)] == expected
    assert layout.compute_fraction == (0.5 if any(p.startswith("S") for p in (*inputs, *layout.outputs)) else 1)
    values = {n.name: n.meta.get("val") for n in traced.graph.nodes}
    with fake_mesh(2) as mesh, cpu_attention_strategy():
        real = [torch.randn(v.shape) if v.is_floating_point() else torch.randint(0, 2, v.shape)
                for v in (values[s.producer] if not isinstance(values[s.producer], tuple) else values[s.producer][s.index]
                          for s in tensor_inputs(node))]
        args = iter(dtensor(t, mesh, p) for t, p in zip(real, inputs))
        call_args = pytree.tree_map_only(fx.Node, lambda a: next(args) if isinstance(a.meta.get("val"), torch.Tensor)
                                         else a.meta.get("val"), (node.args, node.kwargs),
                                         is_leaf=lambda x: isinstance(x, fx.Node))
        with CommDebugMode() as mode:
            out = node.target(*call_args[0], **call_args[1])
        assert comm_counts(mode) == {}, f"{node.target} redistributed its inputs"
        assert placements_of(out)[:len(layout.outputs)] == layout.outputs


class Unrunnable(nn.Module):
    """Layouts DTensor would run otherwise than priced: a partial read from a weight or a graph
    input with nothing else split, a copying reshape of a partial, a mean's partial average."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.rms = nn.RMSNorm(8)

    def forward(self, x, a, b):
        h = self.rms(self.lin(x))
        p = (a @ b).transpose(1, 2)                     # (2, 4, 2, 4): a reshape of it must copy
        return h, p.reshape(2, 2, 16), (a @ b).reshape(2, 2, 16), torch.rsqrt(h.pow(2).mean(-1))


def test_layouts_dtensor_would_run_otherwise_are_left_out():
    traced = capture(Unrunnable(), (torch.randn(2, 4, 8), torch.randn(2, 2, 4, 8), torch.randn(8, 4)),
                     tracer="export")
    layouts = node_layouts(traced.graph_module, 2)

    def inputs(target_part, occurrence=0):
        nodes = [n for n in traced.graph.nodes if n.op == "call_function" and target_part in str(n.target)]
        return [l.inputs for l in layouts[nodes[occurrence].name].layouts]

    # Whole weights and graph inputs only: DTensor handed (R, R, R) runs (R, R, R) -> R.
    assert ("R", "P", "P") not in inputs("linear") and ("P", "R", "P") not in inputs("linear")
    assert ("S(2)", "S(1)", "P") in inputs("linear")    # row parallel: the whole bias is one addend
    assert ("R", "P") not in inputs("rms_norm")
    # A copying reshape runs as clone + view, and DTensor's clone all-reduces a partial.
    assert ("P",) not in inputs("reshape", 0) and ("S(0)",) in inputs("reshape", 0)
    assert ("P",) in inputs("reshape", 1)               # a view keeps the partial
    # A mean over a split dimension would give P(avg), which cannot take a P(sum) gradient back.
    assert all(q in ("R", "P") or q.startswith("S(") for l in layouts[next(
        n.name for n in traced.graph.nodes if "mean" in str(n.target))].layouts for q in l.outputs)


class FxOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x)) + x


def test_fx_graphs_map_torch_functions_and_replicate_modules_with_a_note():
    traced = capture(FxOps(), (torch.randn(2, 8),), tracer="fx")
    layouts = node_layouts(traced.graph_module, 2)
    module_node = next(n for n in traced.graph.nodes if n.op == "call_module")
    assert [l.inputs for l in layouts[module_node.name].layouts] == [("R",)]
    assert "maps to no ATen op" in layouts[module_node.name].note
    add = next(n for n in traced.graph.nodes if n.op == "call_function" and "add" in str(n.target))
    relu = next(n for n in traced.graph.nodes if n.op == "call_function" and "relu" in str(n.target))
    assert ("S(0)", "S(0)") in [l.inputs for l in layouts[add.name].layouts]
    assert ("S(1)",) in [l.inputs for l in layouts[relu.name].layouts]


# --------------------------------------------------------------------------- whole blocks


class Mlp(nn.Module):
    def __init__(self, d: int = 512, hidden: int = 2048, swiglu: bool = False):
        super().__init__()
        self.swiglu = swiglu
        self.up = nn.Linear(d, hidden, bias=not swiglu)
        self.gate = nn.Linear(d, hidden, bias=False) if swiglu else None
        self.down = nn.Linear(hidden, d, bias=not swiglu)

    def forward(self, x):
        h = F.silu(self.gate(x)) * self.up(x) if self.swiglu else F.gelu(self.up(x))
        return self.down(h)


@pytest.mark.parametrize("swiglu", [False, True], ids=["gelu", "swiglu"])
def test_mlp_is_column_then_row_with_one_all_reduce_each_way(swiglu):
    x = torch.randn(2, 64, 512)
    traced = capture(Mlp(swiglu=swiglu), (x.clone().requires_grad_(True),), tracer="export")
    costs = price_graph(traced.graph_module)
    choice = choose_layouts(traced, costs, CLUSTER, [0, 1])
    linears = [n for n in traced.graph.nodes if "linear" in str(n.target)]
    *columns, row = linears
    for n in columns:
        assert choice.layouts[n.name].inputs[:2] == ("R", "S(0)"), n.name
    assert choice.layouts[row.name].inputs[:2] == ("S(2)", "S(1)")
    assert choice.collective_counts == {"forward": {"all_reduce": 1}, "backward": {"all_reduce": 1}}
    assert choice.status == "OPTIMAL"
    forward, backward, mismatches = run_as_planned(traced, choice.layouts, [x], input_grad=True)
    assert mismatches == []
    assert forward == as_on_cpu(choice.collective_counts["forward"])
    assert backward == as_on_cpu(choice.collective_counts["backward"])


def tiny_llama(layers: int = 1, heads: int = 4, kv_heads: int = 2, hidden: int = 256):
    import transformers

    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=512,
                                      max_position_embeddings=256, use_cache=False, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def llama_traced():
    ids = torch.randint(0, 512, (1, 128))  # one sequence: only the sequence can split the tokens
    traced = capture(tiny_llama(layers=2, hidden=1024), (ids,), tracer="export")
    return traced, price_graph(traced.graph_module), ids


def test_llama_attention_with_grouped_kv_heads_is_split_by_heads(llama_traced):
    traced, costs, ids = llama_traced
    choice = choose_layouts(traced, costs, CLUSTER, [0, 1])
    weights = {n.target: choice.layouts[n.name].outputs[0] for n in traced.graph.nodes if n.op == "get_attr"}
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert weights[f"model.layers.0.self_attn.{proj}.weight"] == "S(0)", proj
    assert weights["model.layers.0.self_attn.o_proj.weight"] == "S(1)"
    attention = [n for n in traced.graph.nodes if "scaled_dot_product" in str(n.target)]
    for n in attention:  # 4 query heads and 2 key/value heads (repeated through expand + reshape), 2 a rank
        assert choice.layouts[n.name].inputs[:3] == ("S(1)", "S(1)", "S(1)")
    forward, backward, mismatches = run_as_planned(traced, choice.layouts, [ids])
    assert mismatches == []
    assert forward == as_on_cpu(choice.collective_counts["forward"])
    assert backward == as_on_cpu(choice.collective_counts["backward"])


class Layer(nn.Module):
    def __init__(self, d: int = 256):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = Mlp(d, 4 * d)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Stack(nn.Module):
    def __init__(self, n: int, d: int = 256):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.blocks = nn.ModuleList(Layer(d) for _ in range(n))
        self.out = nn.LayerNorm(d)

    def forward(self, x):
        x = self.proj(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def _stack_choice(n: int, **options):
    traced = capture(Stack(n), (torch.randn(2, 64, 256),), tracer="export")
    return traced, choose_layouts(traced, price_graph(traced.graph_module), CLUSTER, [0, 1], **options)


def test_identical_layers_share_one_decision():
    _, two = _stack_choice(2)
    traced, eight = _stack_choice(8)
    assert two.variables == eight.variables
    by_layer: dict[str, list] = {}
    for n in traced.graph.nodes:
        path = traced.nodes[n.name].module_path
        if path.startswith("blocks."):
            by_layer.setdefault(path.split(".")[1], []).append(eight.layouts[n.name])
    first = by_layer["0"]
    assert len(by_layer) == 8 and all(layouts == first for layouts in by_layer.values())
    assert any(l.compute_fraction < 1 for l in first)  # the MLPs are split


def test_the_same_input_gives_the_same_choice():
    _, a = _stack_choice(2)
    _, b = _stack_choice(2)
    assert a.layouts == b.layouts and a.objective_s == b.objective_s
    data = json.loads(json.dumps(a.to_json()))
    assert {n: Layout.from_json(l) for n, l in data["layouts"].items()} == a.layouts


def test_cp_sat_proves_the_optimum_elimination_finds():
    _, exact = _stack_choice(2, method="eliminate")
    _, cp = _stack_choice(2, method="cp-sat")
    assert exact.status == cp.status == "OPTIMAL"
    assert cp.objective_s == pytest.approx(exact.objective_s, rel=1e-6)


def test_a_memory_weight_gives_a_leaner_choice(llama_traced):
    traced, costs, _ = llama_traced
    fast = choose_layouts(traced, costs, CLUSTER, [0, 1])
    lean = choose_layouts(traced, costs, CLUSTER, [0, 1], memory_weight_s_per_byte=1e-6)
    assert lean.memory_bytes < fast.memory_bytes
    assert sum(lean.parameter_bytes.values()) <= sum(fast.parameter_bytes.values())
    sequence_split = [n for n in traced.graph.nodes if "rsqrt" in str(n.target)
                      and lean.layouts[n.name].inputs == ("S(1)",)]
    assert sequence_split, "norms should run split along the sequence"


def test_per_graph_caches_give_the_same_choice_and_let_the_graph_go():
    """choose_layouts and node_layouts remember each graph's structure between calls; a second
    call chooses the same, and the remembered structure does not keep the graph alive."""
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    traced = capture(model, (torch.randn(4, 8),), tracer="export")
    costs = price_graph(traced.graph_module)
    first = choose_layouts(traced, costs, CLUSTER, [0, 1])
    again = choose_layouts(traced, costs, CLUSTER, [0, 1], layouts=node_layouts(traced.graph_module, 2))
    assert again.to_json() == first.to_json()
    graph = weakref.ref(traced.graph)
    del traced, first, again
    gc.collect()
    assert graph() is None


def test_plan_collectives_of_a_megatron_mlp_are_its_one_all_reduce():
    """The plan's bytes per stage: a column-then-row MLP (an input without gradient) all-reduces its
    output once, forward; a ring all-reduce on 2 ranks sends the tensor's size from each."""
    import autosplit
    from autosplit.sharding.price import bytes_sent, plan_collectives

    x = torch.randn(2, 64, 512)
    model = Mlp()
    plan = autosplit.plan(model, example_inputs=(x,), cluster=CLUSTER, tracer="export", global_batch=2,
                          tensor_parallel=2, stages=1, precision="fp32")
    traced = capture(model, (x,), tracer="export")
    [collectives] = plan_collectives(traced.graph_module, plan)
    output_bytes = 2 * 64 * 512 * 4
    assert [(c.kind, c.direction, c.nbytes) for c in collectives] == [("all_reduce", "forward", output_bytes)]
    assert bytes_sent("all_reduce", output_bytes, 2) == output_bytes
    assert bytes_sent("all_gather", output_bytes, 4) == bytes_sent("reduce_scatter", output_bytes, 4) == 0.75 * output_bytes
    assert bytes_sent("all_to_all", output_bytes, 2) == output_bytes / 4  # half of each rank's half


class ReluLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 128)

    def forward(self, x):
        return self.lin(torch.relu(x))


def test_an_input_saved_as_a_collective_made_it_is_a_tensor_of_its_own():
    """relu's output kept sharded by relu, all-gathered for the matmul that keeps it whole for its
    weight's gradient: two storages, the gathered one the matmul's own."""
    from autosplit.sharding.price import REDISTRIBUTED_SAVE

    traced = capture(ReluLinear(), (torch.randn(8, 64, requires_grad=True),), tracer="export")
    gm = traced.graph_module
    candidates = node_layouts(gm, 2)
    wanted = {"lin_weight": ((), ("S(0)",)), "lin_bias": ((), ("S(0)",)), "x": ((), ("R",)),
              "relu": (("S(0)",), ("S(0)",)), "linear": (("R", "S(0)", "S(0)"), ("S(1)",)), "output": (("R",), ())}

    def pick(name, inputs, outputs):
        return next(lay for lay in candidates[name].layouts if (lay.inputs, lay.outputs) == (inputs, outputs))

    chosen = {name: pick(name, *io) for name, io in wanted.items()}
    priced = price_layouts(gm, price_graph(gm), chosen, CLUSTER, [0, 1])
    relu_bytes = 8 * 64 * 4
    assert priced.per_rank["linear"].saved == {f"linear:{REDISTRIBUTED_SAVE}": relu_bytes}
    assert priced.per_rank["relu"].saved == {"relu": relu_bytes // 2}
    chosen["relu"] = pick("relu", ("R",), ("R",))  # read as produced: the producer's storage, once
    priced = price_layouts(gm, price_graph(gm), chosen, CLUSTER, [0, 1])
    assert priced.per_rank["linear"].saved == {"relu": relu_bytes}

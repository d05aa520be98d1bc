"""Every layout the planner offers an op runs on DTensor exactly as the unsharded op, forward and
backward, on 2 gloo ranks.

Each case is a tiny module around one op class (batch 2, sequence 8, dims <= 64), captured with
``torch.export``. For every ``call_function`` node of its graph and every candidate layout
``node_layouts`` gives it, ``TensorParallelModule`` runs the graph with that node forced to the
candidate (``forced``). Its producers are laid out to give its inputs as the candidate reads them:
a graph input enters already so (a partial one as two unequal addends), a weight is stored so, an
op takes a layout of its own with that output (a partial must be made so: the row-parallel matmuls
the cases start from make one), else the runtime slices a replicated value. Its readers follow in
the layout that reads what they get, the rest stay replicated. Each run is compared with the
module on plain tensors:

- the output and the gradient of every input and weight (``numerics.assert_same``);
- the placement DTensor gives every node's output, against its layout (the pricing assumes it);
- the forward's collectives, against the redistributions between the layouts alone: the op
  itself moves nothing (the planner keeps only layouts that are DTensor's fixed points).

All candidates run in one call of the ranks (``run_candidates``), and each is reported as its own
test named by case, node and layout, e.g. ``linear:linear:(S(2),S(1),P)->(P)``. Plans that are
known not to run as priced are strict xfails (``KNOWN_BUGS``).
"""

from __future__ import annotations

import functools
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from autosplit import capture
from autosplit.sharding import cpu_attention_strategy, from_placement, node_layouts, to_placement
from autosplit.sharding.placements import PARTIAL, REPLICATE, is_partial
from autosplit.sharding.price import transition
from autosplit.sharding.strategies import Layout, tensor_inputs
from numerics import assert_same
from test_tensor_parallel import comm_counts
from rank_pool import shared_ranks

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RANKS_TIMEOUT_S = 120.0
"""How long the ranks may take for all candidates before they are killed and the tests fail."""

GROUP_TIMEOUT_S = 60.0
"""The ranks' process-group timeout: a rank waiting for a dead or stuck peer fails by then."""

PARTIAL_SHARES = (0.25, 0.75)
"""Rank r holds ``PARTIAL_SHARES[r]`` of a partial input: unequal, so a partial read as whole fails."""


# --------------------------------------------------------------------------- one module per op class


class Linear(nn.Module):
    """Column parallel (weight S(0)) and row parallel (weight S(1), partial output), with a bias."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 64)

    def forward(self, x):
        return self.proj(x)


class HeadLoss(nn.Module):
    """An LM head split by vocabulary, then cross-entropy over the vocabulary."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 64, bias=False)

    def forward(self, h, target):
        logits = self.head(h)
        return F.cross_entropy(logits.view(-1, 64), target.view(-1))


class Matmul(nn.Module):
    def forward(self, a, b, c, d):
        return a @ b, torch.bmm(c, d)


class Attention(nn.Module):
    """Causal SDPA by heads or batch; kv heads repeated as transformers' Llama repeats them, k and v
    made by a matmul (a row-parallel one gives them partial)."""

    def forward(self, q, k_in, k_proj, v_in, v_proj):
        k, v = k_in @ k_proj, v_in @ v_proj
        b, kv_heads, t, d = k.shape
        k = k[:, :, None, :, :].expand(b, kv_heads, 2, t, d).reshape(b, kv_heads * 2, t, d)
        v = v[:, :, None, :, :].expand(b, kv_heads, 2, t, d).reshape(b, kv_heads * 2, t, d)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class MaskedAttention(nn.Module):
    """SDPA with an additive mask per batch element (it follows a split by batch)."""

    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Embedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)

    def forward(self, ids):
        return self.embed(ids)


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer_norm = nn.LayerNorm(32)
        self.rms_norm = nn.RMSNorm(32)

    def forward(self, x, y):
        return self.layer_norm(x), self.rms_norm(y)


class LlamaRMSNorm(nn.Module):
    """RMSNorm written out as transformers' Llama writes it (a cast, pow, mean, rsqrt, mul), on
    the output of a matmul (which a row-parallel split leaves partial)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(32))

    def forward(self, a, b):
        x = a @ b
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


class Elementwise(nn.Module):
    """Elementwise ops and softmax on two matmul outputs (partial where the matmul is row-parallel)."""

    def forward(self, a, b, c, d):
        x, y = a @ b, c @ d
        return x * y, x + y, F.gelu(x), F.silu(y), torch.softmax(x, dim=-1)


class Views(nn.Module):
    """Head reshapes on a matmul output: view into heads, transpose, permute back, reshape to hidden."""

    def forward(self, a, b):
        h = (a @ b).view(2, 8, 4, 8).transpose(1, 2)
        return h.permute(0, 2, 1, 3).reshape(2, 8, 32)


def _floats(*shapes):
    return tuple(torch.randn(s) for s in shapes)


CASES = {  # name -> (module class, example inputs), built from one seed on every rank
    "linear": (Linear, lambda: _floats((2, 8, 32))),
    "head_loss": (HeadLoss, lambda: (torch.randn(2, 8, 32), torch.randint(0, 64, (2, 8)))),
    "matmul": (Matmul, lambda: _floats((2, 8, 32), (32, 16), (2, 8, 32), (2, 32, 16))),
    "attention": (Attention, lambda: _floats((2, 4, 8, 16), (2, 2, 8, 8), (8, 16), (2, 2, 8, 8), (8, 16))),
    "masked_attention": (MaskedAttention, lambda: _floats((2, 4, 8, 16), (2, 4, 8, 16), (2, 4, 8, 16),
                                                          (2, 1, 8, 8))),
    "embedding": (Embedding, lambda: (torch.randint(0, 64, (2, 8)),)),
    "norms": (Norms, lambda: _floats((2, 8, 32), (2, 8, 32))),
    "llama_rms_norm": (LlamaRMSNorm, lambda: _floats((2, 8, 16), (16, 32))),
    "elementwise": (Elementwise, lambda: _floats((2, 8, 16), (16, 32), (2, 8, 16), (16, 32))),
    "views": (Views, lambda: _floats((2, 8, 16), (16, 32))),
}


def build(case: str):
    """The case's module, inputs and capture, the same on every rank (one seed)."""
    cls, inputs = CASES[case]
    torch.manual_seed(0)
    model = cls()
    args = inputs()
    return model, args, capture(model, args, tracer="export")


# --------------------------------------------------------------------------- layouts with one node forced


def forced(traced, options, name: str, layout: Layout):
    """Layouts for the whole graph with ``name`` in ``layout``, and the placement each graph input
    enters in; or why the candidate's inputs cannot be made.

    Upstream, a graph input takes the placement the node reads it in, a weight is stored in it (a
    partial weight is stored whole: the runtime leaves R -> P to the op), and an op takes a layout
    of its own giving the placement read (recursively; a partial must be made so, a shard falls
    back to the runtime slicing a replicated value). Downstream, each
    op reading a sharded or partial value takes its first layout that reads its inputs as they
    arrive, so no redistribution separates them (the rest stay replicated)."""
    nodes = {n.name: n for n in traced.graph.nodes}
    layouts = {n: o.layouts[0] for n, o in options.items()}
    assert all(p == REPLICATE for l in layouts.values() for p in (*l.inputs, *l.outputs)), "replicated first"
    fed: dict[str, str] = {}

    def provide(producer: str, placement: str) -> str | None:
        nonlocal layouts, fed
        node = nodes[producer]
        if node.op == "placeholder":
            if fed.setdefault(producer, placement) != placement:
                return f"{producer} is read in {fed[producer]} and {placement}"
            return None
        if node.op == "get_attr":
            layouts[producer] = Layout((), (REPLICATE if is_partial(placement) else placement,))
            assert layouts[producer] in options[producer].layouts, (producer, placement)
            return None
        if placement == REPLICATE:
            return None
        for made in (l for l in options[producer].layouts if l.outputs == (placement,)):
            saved = dict(layouts), dict(fed)
            if place_inputs(node, made) is None:
                layouts[producer] = made
                return None
            layouts, fed = saved
        if is_partial(placement):
            return f"no layout of {producer} gives a partial output from inputs the graph can give it"
        return None  # the runtime redistributes the producer's replicated output

    def place_inputs(node, node_layout: Layout) -> str | None:
        for slot, placement in zip(tensor_inputs(node), node_layout.inputs, strict=True):
            reason = provide(slot.producer, placement)
            if reason:
                return reason
        return None

    layouts[name] = layout
    reason = place_inputs(nodes[name], layout)
    if reason:
        return reason
    downstream = False
    for node in traced.graph.nodes:
        if node.name == name:
            downstream = True
        elif downstream and node.op == "call_function" and options[node.name].layouts[0].outputs:
            arriving = tuple(arrived(traced, layouts, fed, slot) for slot in tensor_inputs(node))
            layouts[node.name] = next((l for l in options[node.name].layouts if l.inputs == arriving),
                                      layouts[node.name])
    return layouts, fed


def arrived(traced, layouts, fed, slot) -> str:
    """The placement the value of ``slot`` has before the runtime redistributes it."""
    node = next(n for n in traced.graph.nodes if n.name == slot.producer)
    if node.op == "placeholder":
        return fed.get(node.name, REPLICATE)
    return layouts[node.name].outputs[slot.index]


def expected_collectives(traced, layouts, fed) -> dict[str, int]:
    """The forward's collectives when only the runtime's redistributions between layouts move
    data, as a gloo group runs them (all-gather where there is no all-to-all)."""
    have: dict[tuple[str, int], str] = {}
    moved: set[tuple[str, int, str]] = set()
    counts: dict[str, int] = {}
    for node in traced.graph.nodes:
        layout = layouts[node.name]
        if node.op == "placeholder":
            have[node.name, 0] = fed.get(node.name, REPLICATE)
            continue
        if node.op == "get_attr":
            have[node.name, 0] = layout.outputs[0]
            continue
        if node.op == "call_function" and not layout.outputs and not node.users:
            continue  # a check: the runtime skips it
        for slot, want in zip(tensor_inputs(node), layout.inputs, strict=True):
            src = have[slot.producer, slot.index]
            if (slot.producer, slot.index, want) in moved or (is_partial(want) and src == REPLICATE):
                continue
            moved.add((slot.producer, slot.index, want))
            kind = transition(src, want)
            if kind is not None:
                kind = "all_gather" if kind == "all_to_all" else kind
                counts[kind] = counts.get(kind, 0) + 1
        for i, placement in enumerate(layout.outputs):
            have[node.name, i] = placement
    return dict(sorted(counts.items()))


def candidate_id(case: str, name: str, layout: Layout) -> str:
    return f"{case}:{name}:({','.join(layout.inputs)})->({','.join(layout.outputs)})"


@functools.cache
def candidates():
    """Every (id, case, layouts of the graph, graph inputs' placements) to run, and the ids of the
    candidates skipped with the reason. Found when pytest collects the tests, not at import: the
    ranks import this module too, and need only the runs they are sent."""
    runs, skipped = [], []
    for case in CASES:
        _, _, traced = build(case)
        options = node_layouts(traced.graph_module, 2)
        for node in traced.graph.nodes:
            if node.op != "call_function" or not options[node.name].layouts[0].outputs:
                continue
            for layout in options[node.name].layouts:
                made = forced(traced, options, node.name, layout)
                run_id = candidate_id(case, node.name, layout)
                if isinstance(made, str):
                    skipped.append((run_id, made))
                else:
                    runs.append((run_id, case, *made))
    for run_id, (case, name, inputs, _) in KNOWN_BUGS.items():
        _, _, traced = build(case)
        options = node_layouts(traced.graph_module, 2)
        layouts = {n: o.layouts[0] for n, o in options.items()}
        layouts[name] = next(l for l in options[name].layouts if l.inputs == inputs)
        runs.append((run_id, case, layouts, {}))
    return runs, skipped


KNOWN_BUGS = {  # id -> (case, node, its layout's inputs, why it fails); every other node replicated
    "elementwise:add:(P,P)->(P) after replicated matmuls": (
        "elementwise", "add", ("P", "P"),
        "choose_layouts prices R -> P as free on every edge, leaving it to the op, but DTensor handed "
        "only replicated inputs runs the replicated layout: add gives R where the plan says P (the "
        "values are right; the priced all-reduce is not run). node_layouts drops such layouts only "
        "where the producer can never be partial; here it can, and the choice must price the edge."),
}
"""Plans the planner can make that do not run as priced, each a strict xfail until fixed."""


# --------------------------------------------------------------------------- what each rank runs


def placed(t: torch.Tensor, mesh, placement: str, rank: int):
    """``t`` as a DTensor in ``placement`` (partial: rank r holds PARTIAL_SHARES[r] of it), a leaf
    that takes a gradient when ``t`` is floating point."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if placement == PARTIAL:
        value = DTensor.from_local(t * PARTIAL_SHARES[rank], mesh, [to_placement(placement)], run_check=False)
    else:
        value = distribute_tensor(t, mesh, [to_placement(placement)])
    value = value.detach()
    return value.requires_grad_(True) if t.is_floating_point() else value


def reference(model: nn.Module, args: tuple, upstream: list[torch.Tensor]):
    """The unsharded module's outputs and the gradients of its inputs and weights for
    sum(output * upstream)."""
    inputs = [a.clone().requires_grad_(True) if a.is_floating_point() else a for a in args]
    outputs = pytree.tree_leaves(model(*inputs))
    sum((o * g).sum() for o, g in zip(outputs, upstream)).backward()
    grads = [a.grad if a.is_floating_point() else None for a in inputs]
    return outputs, grads, {n: p.grad for n, p in model.named_parameters()}


def run_one(rank, mesh, model, args, traced, layouts, fed, upstream, want) -> list[str]:
    """Run ``traced`` tensor-parallel in ``layouts`` and list every way it differs from ``want``."""
    from torch.distributed.tensor.debug import CommDebugMode

    from autosplit.distributed.tensor_parallel import TensorParallelModule

    problems = []
    tp = TensorParallelModule(traced, layouts, mesh)
    placeholders = [n.name for n in traced.graph.nodes if n.op == "placeholder"]  # weights are get_attr nodes
    inputs = [placed(a, mesh, fed.get(name, REPLICATE), rank) for name, a in zip(placeholders, args)]
    with CommDebugMode() as forward:
        out = pytree.tree_leaves(tp(*inputs))
    if tp.unplanned:
        problems.append("output placement: " + "; ".join(tp.unplanned))
    expected = expected_collectives(traced, layouts, fed)
    if comm_counts(forward) != expected:
        problems.append(f"forward collectives {comm_counts(forward)}, the layouts' redistributions alone {expected}")
    sum((o * g).sum() for o, g in zip(out, upstream)).backward()
    want_out, want_input_grads, want_weight_grads = want
    checks = [(f"output {i}", o, w) for i, (o, w) in enumerate(zip(out, want_out))]
    checks += [(f"gradient of input {name} (entered {fed.get(name, REPLICATE)})",
                x.grad.full_tensor() if x.grad is not None else None, w)
               for name, x, w in zip(placeholders, inputs, want_input_grads) if w is not None]
    checks += [(f"gradient of {name} (stored {from_placement(p.placements[0], p.ndim)})",
                p.grad.full_tensor() if p.grad is not None else None, want_weight_grads[name])
               for name, p in tp.named_parameters()]
    for what, got, w in checks:
        try:
            assert_same(got, w, name=what)
        except AssertionError as e:
            problems.append(str(e))
    return problems


def run_candidates(rank: int, runs: list) -> dict[str, list[str]]:
    """Every run of ``runs`` on this rank: each one's problems by its id (empty: it passed)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    mesh = init_device_mesh("cpu", (2,))
    problems: dict[str, list[str]] = {}
    with cpu_attention_strategy():
        for case in dict.fromkeys(case for _, case, *_ in runs):
            model, args, traced = build(case)
            torch.manual_seed(1)
            upstream = [torch.randn(o.shape) for o in pytree.tree_leaves(model(*args))]
            want = reference(model, args, upstream)
            for run_id, _, layouts, fed in (r for r in runs if r[1] == case):
                try:
                    problems[run_id] = run_one(rank, mesh, model, args, traced, layouts, fed, upstream, want)
                except Exception as e:  # reported with the candidate; the ranks fail alike
                    problems[run_id] = [f"raised {type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"]
    return problems


@pytest.fixture(scope="module")
def results():
    return shared_ranks(world=2, timeout_s=RANKS_TIMEOUT_S).run(run_candidates, candidates()[0])


# --------------------------------------------------------------------------- the tests


def pytest_generate_tests(metafunc):
    if "run_id" in metafunc.fixturenames:
        metafunc.parametrize("run_id", [
            pytest.param(r[0], marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[r[0]][3]))
            if r[0] in KNOWN_BUGS else r[0] for r in candidates()[0]])


def test_candidate_runs_as_the_unsharded_op(results, run_id):
    problems = [f"rank {rank}: {p}" for rank, by_id in enumerate(results) for p in by_id[run_id]]
    assert not problems, f"{run_id}:\n" + "\n".join(problems)


def test_every_op_class_is_covered_with_its_sharded_layouts():
    """The layouts the planner prices each op class by are among those run, and none was skipped."""
    runs, skipped = candidates()
    ran = {r[0] for r in runs}
    for wanted in ("linear:linear:(R,S(0),S(0))->(S(2))",        # column parallel
                   "linear:linear:(S(2),S(1),P)->(P)",           # row parallel, the bias one addend
                   "head_loss:linear:(R,S(0))->(S(2))",          # LM head by vocabulary
                   "head_loss:cross_entropy_loss:(R,R)->(R)",    # the only layout it is offered
                   "matmul:matmul:(R,S(1))->(S(2))", "matmul:matmul:(S(2),S(0))->(P)",
                   "matmul:bmm:(S(0),S(0))->(S(0))", "matmul:bmm:(S(2),S(1))->(P)",
                   "attention:scaled_dot_product_attention:(S(1),S(1),S(1))->(S(1))",   # by heads
                   "attention:expand:(S(1))->(S(1))", "attention:reshape:(S(1))->(S(1))",  # kv heads repeated
                   "attention:expand:(P)->(P)",
                   "masked_attention:scaled_dot_product_attention:(S(1),S(1),S(1),R)->(S(1))",
                   "masked_attention:scaled_dot_product_attention:(S(0),S(0),S(0),S(0))->(S(0))",
                   "embedding:embedding:(S(0),R)->(P)",          # by vocabulary
                   "norms:layer_norm:(S(1),R,R)->(S(1))", "norms:rms_norm:(S(1),R)->(S(1))",  # by sequence
                   "llama_rms_norm:mean:(S(1))->(S(1))", "llama_rms_norm:to:(P)->(P)",
                   "elementwise:add:(P,P)->(P)", "elementwise:mul:(P,R)->(P)", "elementwise:gelu:(S(2))->(S(2))",
                   "elementwise:silu:(S(1))->(S(1))", "elementwise:softmax:(S(1))->(S(1))",
                   "views:view:(S(2))->(S(2))", "views:transpose:(S(2))->(S(1))", "views:permute:(P)->(P)"):
        assert wanted in ran, f"{wanted} not run; have {sorted(i for i in ran if i.startswith(wanted.split(':')[0]))}"
    assert not skipped, "skipped: " + "; ".join(f"{run_id} ({reason})" for run_id, reason in skipped)

"""Tensor-parallel execution of a plan's layouts (``TensorParallelModule``) on 2 gloo ranks: the
output and every weight's gradient equal the unsharded model's, and the forward runs exactly the
collectives the plan priced.

Layouts are chosen once in the test process; each rank captures the model again from the same
seed (the node names are the same) and runs it beside a ``deepcopy`` of the model. The ranks are
spawned once for the test session (``rank_pool.shared_ranks``) and killed, failing the test,
after ``RANKS_TIMEOUT_S``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import models
from autosplit import capture
from autosplit.sharding import choose_layouts, cpu_attention_strategy, from_placement
from cost_models import Cluster, price_graph
from cost_models.devices import get_device
from numerics import assert_same
from rank_pool import shared_ranks

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RANKS_TIMEOUT_S = 180.0
"""How long a 2-rank test may run before its ranks are killed and it fails."""

GROUP_TIMEOUT_S = 60.0
"""The ranks' process-group timeout: a rank waiting for a dead or stuck peer fails by then."""

SLOWDOWN = 1e3
"""How much slower than an H100 the planner prices compute, links unchanged: at hidden size 32
splitting never pays on a real H100, and the test wants the column/row split the planner
chooses for real sizes (q, k, v by rows, o by columns)."""


# --------------------------------------------------------------------------- models, built alike on every rank


class Mlp(nn.Module):
    def __init__(self, d: int = 64, hidden: int = 256):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def mlp_case():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 64)
    model = Mlp()
    return model, (x,), capture(model, (x,), tracer="export")


def llama_case():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(models.tiny_llama_config(num_hidden_layers=1, use_cache=False,
                                                      attn_implementation="sdpa"))
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    return model, (ids,), capture(model, (ids,), tracer="export")


CASES = {"mlp": mlp_case, "llama": llama_case}


def slow_h100():
    h100 = get_device("h100")
    return dataclasses.replace(h100, peak_flops={k: v / SLOWDOWN for k, v in h100.peak_flops.items()},
                               memory_bandwidth_bytes_per_s=h100.memory_bandwidth_bytes_per_s / SLOWDOWN)


def choose(case: str):
    _, _, traced = CASES[case]()
    choice = choose_layouts(traced, price_graph(traced.graph_module), Cluster.parse("2xh100"), [0, 1],
                            device=slow_h100())
    weights = {n.target: choice.layouts[n.name].outputs[0] for n in traced.graph.nodes if n.op == "get_attr"}
    return choice, weights


def as_on_cpu(counts: dict[str, int]) -> dict[str, int]:
    """Counts as a CPU process group runs them: gloo has no all-to-all, DTensor all-gathers instead."""
    out: dict[str, int] = {}
    for kind, n in counts.items():
        kind = "all_gather" if kind == "all_to_all" else kind
        out[kind] = out.get(kind, 0) + n
    return dict(sorted(out.items()))


def comm_counts(mode) -> dict[str, int]:
    """The collectives a ``CommDebugMode`` counted, by kind (all_reduce, all_gather...)."""
    counts: dict[str, int] = {}
    for op, n in mode.get_comm_counts().items():
        if n:
            kind = next((k for k in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all") if k in str(op)),
                        str(op))
            counts[kind] = counts.get(kind, 0) + n
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- what each rank runs


def run_alongside(rank: int, case: str, layouts) -> dict:
    """Build the case's model, run it tensor-parallel and as a deepcopy, compare output, every
    gradient (whole) and one SGD step, and return the collectives counted forward and backward, and each weight's
    placement."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    from autosplit.distributed.tensor_parallel import TensorParallelModule

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    mesh = init_device_mesh("cpu", (2,))
    model, args, traced = CASES[case]()
    reference = copy.deepcopy(model)
    tp = TensorParallelModule(traced, layouts, mesh)
    wanted = dict(reference.named_parameters())
    assert sorted(n for n, _ in tp.named_parameters()) == sorted(wanted)
    with cpu_attention_strategy():
        with CommDebugMode() as forward:
            out = tp(*args)
        assert tp.unplanned == []
        want = reference(*args)
        got_t, want_t = (out.logits, want.logits) if case == "llama" else (out, want)
        assert_same(got_t, want_t, name=f"{case} output, rank {rank}")
        with CommDebugMode() as backward:
            got_t.float().square().mean().backward()
    want_t.float().square().mean().backward()
    for name, b in tp.named_buffers():
        assert_same(b.full_tensor(), reference.get_buffer(name), name=f"buffer {name}, rank {rank}")
    for name, p in tp.named_parameters():
        assert p.grad is not None, f"{name} has no gradient"
        assert p.grad.placements == p.placements, f"{name}.grad is {p.grad.placements}, the weight {p.placements}"
        assert_same(p.grad.full_tensor(), wanted[name].grad, name=f"{name}.grad, rank {rank}")

    # One SGD step on each side's own gradients: the optimizer sees the shards and moves them as
    # the whole weights move (weights compared, as train_alongside does: a step of 1e-5 on a weight
    # of 0.1 is measured only to float32's spacing there).
    before = {name: p.detach().full_tensor().clone() for name, p in tp.named_parameters()}  # R: no copy
    torch.optim.SGD(tp.parameters(), lr=0.1).step()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for name, p in tp.named_parameters():
        assert not torch.equal(p.detach().full_tensor(), before[name]), f"the step left {name} as it was"
        assert_same(p.detach().full_tensor(), wanted[name].detach(), name=f"{name} after a step, rank {rank}")
    return {"forward": comm_counts(forward), "backward": comm_counts(backward),
            "placements": {n: from_placement(t.placements[0], t.ndim)
                           for n, t in [*tp.named_parameters(), *tp.named_buffers()]}}


@pytest.fixture(scope="module")
def ranks():
    return shared_ranks(world=2, timeout_s=RANKS_TIMEOUT_S)


# --------------------------------------------------------------------------- the tests


def test_mlp_runs_column_then_row_with_one_forward_all_reduce(ranks):
    choice, weights = choose("mlp")
    assert weights == {"up.weight": "S(0)", "up.bias": "S(0)", "down.weight": "S(1)", "down.bias": "R"}
    assert choice.collective_counts["forward"] == {"all_reduce": 1}
    results = ranks.run(run_alongside, "mlp", choice.layouts)
    for result in results:
        assert result["forward"] == {"all_reduce": 1}
        assert result["backward"] == {}  # x needs no gradient: nothing to all-reduce for it
        assert result["placements"] == weights


def test_llama_runs_as_its_layouts_say_with_the_priced_collectives(ranks):
    choice, weights = choose("llama")
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert weights[f"model.layers.0.self_attn.{proj}.weight"] == "S(0)", proj
    assert weights["model.layers.0.self_attn.o_proj.weight"] == "S(1)"
    results = ranks.run(run_alongside, "llama", choice.layouts)
    for result in results:
        assert result["forward"] == as_on_cpu(choice.collective_counts["forward"])
        assert result["backward"] == as_on_cpu(choice.collective_counts["backward"])
        assert result["placements"] == weights


def test_a_mesh_or_layouts_that_do_not_fit_the_graph_are_refused():
    from torch.distributed.device_mesh import DeviceMesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from autosplit.distributed.tensor_parallel import TensorParallelModule

    choice, _ = choose("mlp")
    _, _, traced = mlp_case()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        with pytest.raises(ValueError, match="must be 1-D"):
            TensorParallelModule(traced, choice.layouts, DeviceMesh("cpu", [[0, 1], [2, 3]]))
        partial = {n: l for n, l in choice.layouts.items() if "linear" not in n}
        with pytest.raises(ValueError, match="no layout for 2 nodes"):
            TensorParallelModule(traced, partial, DeviceMesh("cpu", [0, 1]))
    finally:
        dist.destroy_process_group()

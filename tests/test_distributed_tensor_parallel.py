"""Tensor-parallel plans under the distributed runtime: pipeline stages laid out on groups of 2
gloo ranks (pp=2 × tp=2) and data-parallel replicas of tensor-parallel stages (dp=2 × tp=2)
train exactly like the model in one process, for a GPT with an embedding tied to its head and a
Llama with grouped-query attention.

Plans are made once in the test process, on a cluster priced 1,000 times slower than H100s in
compute (links unchanged), so that splitting these tiny layers pays and the planner shards them
as it would real ones. The 4 ranks are spawned once for the test session
(``rank_pool.shared_ranks``) and killed, failing the test, after ``RANKS_TIMEOUT_S``.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import pytest
import torch
import torch.nn.functional as F

import autosplit
import autosplit.distributed
import models
from checks import train_alongside
from cost_models import Cluster
from cost_models.devices import get_device
from rank_pool import shared_ranks

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

RANKS_TIMEOUT_S = 240.0
"""How long a 4-rank test may run before its ranks are killed and it fails."""

GROUP_TIMEOUT_S = 90.0
"""The ranks' process-group timeout: a rank waiting for a dead or stuck peer fails by then."""

SLOWDOWN = 1e3
"""How much slower than an H100 the plans price compute, links unchanged."""

BATCH, SEQ, VOCAB = 8, 16, 96


def lm_loss(output, target):
    return F.cross_entropy(output["logits"].flatten(0, 1), target.flatten())


def gpt():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(models.tiny_gpt2_config(n_layer=2, n_embd=64, use_cache=False))


def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(models.tiny_llama_config(hidden_size=64, intermediate_size=128,
                                                                  use_cache=False, attn_implementation="sdpa"))


MODELS = {"gpt": gpt, "llama": llama}


def batch(step):
    g = torch.Generator().manual_seed(step)
    return (torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),), {}, torch.randint(0, VOCAB, (BATCH, SEQ),
                                                                                    generator=g)


def slow_cluster(devices: int) -> Cluster:
    h100 = get_device("h100")
    slow = dataclasses.replace(h100, peak_flops={k: v / SLOWDOWN for k, v in h100.peak_flops.items()},
                               memory_bandwidth_bytes_per_s=h100.memory_bandwidth_bytes_per_s / SLOWDOWN)
    return Cluster(devices=(slow,) * devices)


@functools.cache
def make_plan(name: str, stages: int, data_parallel: int, recompute: str | None = None):
    (ids,), _, _ = batch(0)
    return autosplit.plan(MODELS[name](), example_inputs=(ids[:2],), cluster=slow_cluster(4), tracer="export",
                          global_batch=BATCH, tensor_parallel=2, data_parallel=data_parallel, stages=stages,
                          shared_weights="copies", recompute=recompute)


def whole(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# --------------------------------------------------------------------------- what each rank runs


def train_like_one_process(rank, name, plan, steps):
    """Build the plan's part of this rank, train it beside a deepcopy of the model; returns the
    placements of this rank's parameters."""
    import copy

    model = MODELS[name]()
    reference = copy.deepcopy(model)
    args, _, _ = batch(0)
    pipe = autosplit.distributed.build(model, plan, loss_fn=lm_loss, example_inputs=args, tracer="export",
                                       timeout_s=GROUP_TIMEOUT_S)
    train_alongside(pipe, reference, batch, lm_loss, steps, whole=whole, label=f"{name} rank {rank}", eps=1e-4)
    return {n: str(getattr(p, "placements", "plain")) for n, p in pipe.named_parameters()}


@pytest.fixture(scope="module")
def ranks():
    return shared_ranks(world=4, timeout_s=RANKS_TIMEOUT_S)


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_pipeline_stages_on_tensor_parallel_groups_train_like_one_process(ranks, name):
    plan = make_plan(name, stages=2, data_parallel=1)
    assert plan.mesh == {"dp": 1, "pp": 2, "tp": 2}
    placements = ranks.run(train_like_one_process, name, plan, 2)
    assert any("Shard" in p for rank in placements for p in rank.values()), placements


def test_data_parallel_replicas_of_tensor_parallel_stages_train_like_one_process(ranks):
    plan = make_plan("llama", stages=1, data_parallel=2)
    assert plan.mesh == {"dp": 2, "pp": 1, "tp": 2}
    placements = ranks.run(train_like_one_process, "llama", plan, 2)
    # FSDP2 shards each tensor-parallel weight again over the replicas: a 2-D placement
    assert any("Shard" in p and "," in p for rank in placements for p in rank.values()), placements


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_tensor_parallel_stages_that_recompute_train_like_one_process(ranks, recompute):
    plan = make_plan("llama", stages=2, data_parallel=1, recompute=recompute)
    assert {s.recompute for s in plan.stages} == {recompute} and plan.mesh["tp"] == 2
    ranks.run(train_like_one_process, "llama", plan, 2)

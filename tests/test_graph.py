"""OpGraph: structure, boundaries, coarsening into module blocks, fingerprints."""

import networkx as nx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import models
from autosplit import OpGraph, capture, spec
from autosplit.graph import COMPUTE, INPUT, OUTPUT


def op_graph(name, device="cpu"):
    model, args, kwargs = models.REGISTRY[name](device)
    return OpGraph.from_traced(capture(model, args, kwargs))


def assert_partition(coarse, fine):
    members = [m for b in coarse for m in coarse[b]["members"]]
    assert sorted(members) == sorted(fine.order), "every op in exactly one block"
    assert coarse.is_dag()
    for u, v in coarse.dag.edges:
        assert coarse.position(u) < coarse.position(v), "order is topological"


@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_op_graph_mirrors_the_fx_graph(name):
    g = op_graph(name)
    assert g.is_dag() and len(g) == len(g.infos)
    for u, v in g.dag.edges:
        assert g.position(u) < g.position(v)
    assert [g[n]["kind"] for n in g if g[n]["kind"] == OUTPUT] == [OUTPUT]
    assert_partition(g.coarsen(), g)


def test_boundary_counts_each_tensor_once():
    g = op_graph("mlp")
    b = g.boundary(["layers_0", "layers_1"])
    assert [t.producer for t in b.inputs] == ["x"] and b.in_bytes == 4 * 16 * 4
    assert [t.producer for t in b.outputs] == ["layers_1"] and b.out_bytes == 4 * 32 * 4
    # The stem output feeds stage1 and, through the concat skip, the fuse conv: it leaves once.
    cnn = op_graph("rescnn")
    stem = [n for n in cnn if cnn[n]["module_path"].startswith("stem")]
    out = cnn.boundary(stem).outputs
    assert [t.producer for t in out] == ["stem_2"] and out[0].nbytes == 2 * 8 * 12 * 12 * 4
    with pytest.raises(KeyError, match="not nodes"):
        cnn.boundary(["nope"])


def test_boundary_flags_weights_apart_from_activations():
    model, args, _ = models.tied_lm()
    g = OpGraph.from_traced(capture(model, args, tracer="export"))
    head = [n for n in g if g[n]["module_path"] == "head"]
    b = g.boundary(head)
    weights = [t for t in b.inputs if t.weight]
    assert [g.infos[t.producer].reads for t in weights] == [("embed.weight",)]
    assert b.in_bytes == 2 * 6 * 16 * 4  # the normed hidden state only


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_gpt2_coarsens_to_one_block_per_layer(device):
    g = op_graph("gpt2", device)
    blocks = g.coarsen()
    assert_partition(blocks, g)
    layers = [b for b in blocks if blocks[b]["module_path"].startswith("transformer.h.")]
    assert layers == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    assert {blocks[b]["module_type"].rsplit(".", 1)[-1] for b in layers} == {"GPT2Block"}
    for name in ("transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head"):
        assert name in blocks.order
    # Each layer passes on just the residual stream.
    for b in layers:
        assert blocks.boundary([b]).out_bytes == 2 * 16 * 32 * 4
    # Tied embedding: its weight is read by the head from the embedding's block.
    head_inputs = [t for t in blocks.boundary(["lm_head"]).inputs if t.weight]
    assert len(head_inputs) == 1 and blocks.dag.has_edge("transformer.wte", "lm_head")


def test_llama_coarsens_to_one_block_per_layer():
    g = op_graph("llama")
    blocks = g.coarsen()
    assert_partition(blocks, g)
    layers = [b for b in blocks if blocks[b]["module_path"].startswith("model.layers.")]
    assert layers == ["model.layers.0", "model.layers.1"]
    assert blocks["input_ids"]["kind"] == INPUT and blocks["output"]["kind"] == OUTPUT


def test_glue_around_the_layer_stack_is_split_to_stay_acyclic():
    blocks = op_graph("gpt2").coarsen()
    glue = [b for b in blocks if b.startswith("transformer[glue]")]
    assert len(glue) >= 2 and all(blocks[b]["glue"] for b in glue)
    first, last = blocks.position(glue[0]), blocks.position(glue[-1])
    assert first < blocks.position("transformer.h.0") < blocks.position("transformer.h.2") < last


def test_cnn_blocks_follow_its_stages_and_a_reused_block_gives_one_block_per_call():
    cnn = op_graph("rescnn").coarsen()
    assert [b for b in cnn if cnn[b]["kind"] == COMPUTE and not cnn[b]["glue"]] == [
        "stem", "stage1", "stage2", "fuse", "head"]
    shared = op_graph("shared_block").coarsen()
    assert "shared" in shared.order and "shared@1" in shared.order
    assert shared["shared"]["reads"] == shared["shared@1"]["reads"]
    assert nx.has_path(shared.dag, "shared", "shared@1")


def test_max_block_share_splits_big_blocks():
    g = op_graph("rescnn")
    fine = g.coarsen(max_block_share=0.2)
    assert_partition(fine, g)
    assert "stage1.0" in fine.order and "stage1" not in fine.order
    with pytest.raises(ValueError, match="max_block_share"):
        g.coarsen(max_block_share=0)
    with pytest.raises(ValueError, match="op-level graph"):
        g.coarsen().coarsen()


def test_fingerprint_is_stable_and_sensitive():
    a, b = op_graph("gpt2"), op_graph("gpt2")
    assert a.fingerprint() == b.fingerprint() == op_graph("gpt2", "meta").fingerprint()
    assert a.coarsen().fingerprint() == b.coarsen().fingerprint()
    model, _, _ = models.gpt2()
    wider = OpGraph.from_traced(capture(model, spec((3, 16), dtype=torch.long)))
    assert wider.fingerprint() != a.fingerprint()
    assert op_graph("llama").fingerprint() != a.fingerprint()


class RandomResNet(nn.Module):
    """Layers with skip connections from random earlier layers: a random DAG of modules."""

    def __init__(self, skips: list[int], width: int = 4):
        super().__init__()
        self.skips = skips
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in skips)

    def forward(self, x):
        outs = [x]
        for layer, skip in zip(self.layers, self.skips):
            outs.append(layer(outs[-1]) + outs[skip % len(outs)])
        return outs[-1]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=50), min_size=2, max_size=8), st.sampled_from(["fx", "export"]))
def test_coarsening_random_skip_graphs_stays_a_dag(skips, tracer):
    model = RandomResNet(skips)
    g = OpGraph.from_traced(capture(model, spec((2, 4)), tracer=tracer))
    blocks = g.coarsen()
    assert_partition(blocks, g)
    layers = [b for b in blocks if blocks[b]["module_path"].startswith("layers.")]
    assert layers == [f"layers.{i}" for i in range(len(skips))]

"""What each rank holds: a model built on meta materialized only for the rank's stage and
initialized as its own code does, the rank's memory beside the plan's figure, and checkpoints
under the model's names that load under another plan, into the unsplit model and from it.

The multi-process tests run on spawned gloo ranks kept for the test session
(``rank_pool.shared_ranks``), failing after its ``timeout_s`` if the ranks hang. Plans are made
once, in the test process.
"""

import functools

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import autosplit.distributed
import models
from autosplit import AutosplitError, OpGraph, SolverOptions, solve
from autosplit.api import capture_microbatch
from autosplit.distributed.materialize import materialize_tensors
from cost_models import Cluster, price_graph
from cost_models.devices import cpu_device
from numerics import assert_same
from rank_pool import shared_ranks

GROUP_TIMEOUT_S = 60.0
"""The ranks' process-group timeout: a rank waiting for a dead or stuck peer fails by then."""

MICROBATCHES = 2
SEED = 7


# --------------------------------------------------------------------------- models, batches, plans


def tied_llama():
    """A tiny Llama whose LM head is tied to the embedding (first and last stage), with the
    rotary ``inv_freq`` buffers that no checkpoint holds."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(models.tiny_llama_config(tie_word_embeddings=True))


def on_meta(factory):
    with torch.device("meta"):
        return factory()


def lm_loss(output, target):
    logits = output["logits"] if isinstance(output, dict) else output.logits
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def batch(vocab, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2 * MICROBATCHES, seq), generator=g)
    return ids, torch.randint(0, vocab, (2 * MICROBATCHES, seq), generator=g)


FACTORIES = {"llama": (tied_llama, 96, 8), "positional": (models.PositionalLM, 50, 6)}
"""name -> (model factory, vocabulary, sequence length)."""


@functools.cache
def make_plan(name, stages):
    factory, vocab, seq = FACTORIES[name]
    ids, _ = batch(vocab, seq)
    traced = capture_microbatch(on_meta(factory), (ids,), {}, microbatches=MICROBATCHES).traced
    # planned for the CPU ranks the tests run on (with the catalog's figures: measuring this CPU takes seconds),
    # in the precision they train in, so that memory compares
    return solve(OpGraph.from_traced(traced), Cluster((cpu_device(calibrate=False),) * stages),
                 SolverOptions(microbatches=MICROBATCHES, schedule="gpipe", precision="fp32", shared_weights="copies"),
                 costs=price_graph(traced.graph_module), parameters=traced.parameters, buffers=traced.buffers)


def positional_source():
    """The unsplit PositionalLM a checkpoint starts from: random weights, and a persistent buffer
    that no initialization would give (so a loaded value cannot pass for an initialized one)."""
    torch.manual_seed(0)
    model = models.PositionalLM()
    with torch.no_grad():
        model.gain.gain.copy_(torch.linspace(0.5, 1.5, model.gain.gain.numel()))
    return model


def state_bytes(state):
    """Each tensor's bytes, for comparing bit for bit across processes."""
    return {name: t.detach().cpu().numpy().tobytes() for name, t in state.items() if isinstance(t, torch.Tensor)}


def optimizer_bytes(model, optimizer):
    """The optimizer's state per parameter name and key, as bytes."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {f"{names[id(p)]}.{key}": value.detach().numpy().tobytes()
            for p, state in optimizer.state.items() for key, value in state.items()}


# --------------------------------------------------------------------------- what each rank runs


def materialize_and_train(rank, plan):
    """Build on a meta model with ranks seeded differently (rank 0's seed is the one used), take
    one measured AdamW step, and compare with the whole model materialized in one process."""
    torch.manual_seed(SEED + rank)
    model = on_meta(models.PositionalLM)
    ids, target = batch(50, 6)
    pipe = autosplit.distributed.build(model, plan, loss_fn=lm_loss, example_inputs=(ids,), timeout_s=GROUP_TIMEOUT_S)
    reference = autosplit.distributed.materialize(on_meta(models.PositionalLM), "cpu", seed=SEED)
    wanted = reference.state_dict(keep_vars=True) | dict(reference.named_buffers())
    real = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_meta}
    for name, t in real.items():  # the rank's tensors, bit for bit the one-process materialization's
        assert torch.equal(t, wanted[name]), name
    opt = torch.optim.AdamW(pipe.parameters(), lr=1e-2)
    with pipe.measure_memory(optimizer=opt):
        loss = pipe.step(ids, target=target)
        opt.step()
    ref_loss = lm_loss(reference(ids), target)
    ref_loss.backward()
    if pipe.is_last:
        assert_same(loss, ref_loss.detach(), name="loss")
    ref_grads = dict(reference.named_parameters())
    for name, p in pipe.named_parameters():
        assert_same(p.grad, ref_grads[name].grad, name=f"{name}.grad")
    torch.manual_seed(SEED)
    built = models.PositionalLM()  # built whole on the CPU: values set without the generator must agree
    unrandom = {n: torch.equal(t, built.get_buffer(n)) for n, t in model.named_buffers() if not t.is_meta}
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    report = pipe.memory_report(optimizer=opt)
    print(report)
    return {"real": sorted(real), "unrandom": unrandom, "report": report, "model_bytes": model_bytes,
            "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers() if not b.is_meta)}


def load_unsplit_train_and_save(rank, plan, unsplit_path, pipe_path):
    """Build from a checkpoint of the unsplit model, take an AdamW step, save with the optimizer."""
    model = on_meta(models.PositionalLM)
    ids, target = batch(50, 6)
    pipe = autosplit.distributed.build(model, plan, loss_fn=lm_loss, example_inputs=(ids,),
                                       timeout_s=GROUP_TIMEOUT_S, checkpoint=unsplit_path)
    source = positional_source()
    loaded = state_bytes(pipe.state_dict())
    assert loaded == {name: value for name, value in state_bytes(source.state_dict()).items() if name in loaded}
    pipe.load_state_dict({name: torch.zeros_like(t) for name, t in pipe.state_dict().items()})
    assert all(not t.any() for t in pipe.state_dict().values())
    pipe.load_state_dict(source.state_dict())  # the whole model's, the tied weight under both names
    assert state_bytes(pipe.state_dict()) == loaded
    table = model.positions.table
    assert table.is_meta or torch.equal(table, source.positions.table), "the non-persistent table is recomputed"
    opt = torch.optim.AdamW(pipe.parameters(), lr=1e-2)
    pipe.step(ids, target=target)
    opt.step()
    autosplit.distributed.save(pipe, pipe_path, optimizer=opt)
    return {"state": state_bytes(pipe.state_dict()), "optimizer": optimizer_bytes(model, opt),
            "shared": sorted(pipe.shared_weights)}


def load_under_another_plan(rank, plan, path):
    """Build a meta model under another plan from the pipeline's checkpoint, optimizer included."""
    model = on_meta(models.PositionalLM)
    ids, target = batch(50, 6)
    pipe = autosplit.distributed.build(model, plan, loss_fn=lm_loss, example_inputs=(ids,),
                                       timeout_s=GROUP_TIMEOUT_S, checkpoint=path)
    opt = torch.optim.AdamW(pipe.parameters(), lr=1e-2)
    autosplit.distributed.load(pipe, path, optimizer=opt)
    state, states = state_bytes(pipe.state_dict()), optimizer_bytes(model, opt)
    loss = pipe.step(ids, target=target)  # and it trains on
    return {"state": state, "optimizer": states, "trains": loss is None or bool(torch.isfinite(loss))}


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def ranks():
    return shared_ranks(world=2)


def test_a_meta_model_is_materialized_per_rank_and_trains_like_the_whole_model(ranks):
    reports = ranks.run(materialize_and_train, make_plan("positional", 2))
    reference = models.PositionalLM()
    everything = {n for n, _ in [*reference.named_parameters(), *reference.named_buffers()]}
    real = [set(r["real"]) for r in reports]
    assert real[0] | real[1] == everything
    assert real[0] - real[1] and real[1] - real[0], "each rank materializes its own stage only"
    assert "embed.weight" in real[0] & real[1], "the tied embedding, held by the first and the last stage"
    unrandom = {name: equal for r in reports for name, equal in r["unrandom"].items()}
    assert unrandom == {"positions.table": True, "gain.gain": True}, "buffers equal the model built on the CPU"
    for r in reports:
        report, planned, held = r["report"], r["report"].planned, r["report"].measured
        assert held.weights_bytes < 0.8 * r["model_bytes"], "no rank holds the whole model"
        # the plan's weights are the parameters a stage stores or copies; the buffers come on top
        assert held.weights_bytes == planned.weights_bytes + r["buffer_bytes"]
        assert held.grads_bytes == planned.grads_bytes
        assert held.optimizer_bytes == pytest.approx(2 * held.grads_bytes, rel=0.05)  # AdamW's two moments
        # the rank holding a copy of the tied weight steps it itself: planned with shared_weights="copies"
        assert held.optimizer_bytes == pytest.approx(planned.optimizer_bytes, rel=0.01)
        # the loss is not in the captured graph, and the plan does not price it: on the last stage the
        # log-softmax that cross_entropy saves for backward comes on top, for each microbatch in flight
        logits_bytes = 2 * 6 * 50 * 4  # one microbatch's (2, 6, 50) float32 logits
        loss_bytes = MICROBATCHES * logits_bytes if report.stage == 1 else 0
        assert held.activations_bytes == pytest.approx(planned.activations_bytes + loss_bytes, rel=0.05)
        assert held.weights_bytes + held.grads_bytes + held.optimizer_bytes < report.measured_peak_bytes
        assert report.measured_peak_bytes < report.planned_peak_bytes


def test_checkpoints_load_under_another_plan_into_and_from_the_unsplit_model(ranks, tmp_path):
    unsplit, saved = tmp_path / "unsplit", tmp_path / "two_stages"
    source = positional_source()
    autosplit.distributed.save(source, unsplit)
    two = ranks.run(load_unsplit_train_and_save, make_plan("positional", 2), str(unsplit), str(saved))
    assert all(r["shared"] == ["embed.weight"] for r in two)

    stored = set(dcp.FileSystemReader(str(saved)).read_metadata().state_dict_metadata)
    names = set(source.state_dict()) - {"head.weight"}  # the tied weight, once, under its first name
    assert {k for k in stored if not k.startswith("optimizer.")} == names
    state = {k: v for r in two for k, v in r["state"].items()}
    optimizer = {k: v for r in two for k, v in r["optimizer"].items()}
    assert set(state) == names

    loaded = shared_ranks(world=3).run(load_under_another_plan, make_plan("positional", 3), str(saved))
    assert all(r["trains"] for r in loaded)
    for r in loaded:
        assert r["state"] == {k: state[k] for k in r["state"]}
        assert r["optimizer"] == {k: optimizer[k] for k in r["optimizer"]}
    assert set().union(*(r["state"] for r in loaded)) == names
    assert set().union(*(r["optimizer"] for r in loaded)) == set(optimizer)

    model = autosplit.distributed.materialize(on_meta(models.PositionalLM), "cpu")  # into the unsplit model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    autosplit.distributed.load(model, saved, optimizer=opt)
    assert {k: v for k, v in state_bytes(model.state_dict()).items() if k in names} == state
    assert torch.equal(model.head.weight, model.embed.weight)
    assert optimizer_bytes(model, opt) == optimizer
    dcp_to_torch_save(saved, tmp_path / "plain.pt")  # and as a plain state_dict
    plain = torch.load(tmp_path / "plain.pt")
    assert state_bytes({k: v for k, v in plain.items() if k != "optimizer"}) == state


def test_only_the_modules_asked_for_are_materialized_with_the_values_of_the_whole_model():
    whole = autosplit.distributed.materialize(on_meta(models.PositionalLM), "cpu", seed=SEED)
    part = on_meta(models.PositionalLM)
    materialize_tensors(part, [part.head.weight, part.norm.bias], torch.device("cpu"), seed=SEED)
    real = {n for n, t in [*part.named_parameters(remove_duplicate=False), *part.named_buffers()] if not t.is_meta}
    assert real == {"embed.weight", "head.weight", "norm.weight", "norm.bias"}, "owners of the tensors, and no more"
    for name in real:
        assert torch.equal(part.get_parameter(name), whole.get_parameter(name)), name
    # the tied weight keeps the embedding's init (normal), not the head's (kaiming, much smaller)
    assert 0.7 < whole.embed.weight.std().item() < 1.3
    torch.manual_seed(SEED)
    built = models.PositionalLM()
    assert torch.equal(whole.positions.table, built.positions.table)
    assert torch.equal(whole.gain.gain, built.gain.gain)


def test_a_hugging_face_model_is_initialized_by_its_own_scheme():
    from transformers import GPT2LMHeadModel

    config = models.tiny_gpt2_config(n_layer=4, n_embd=64)
    model = autosplit.distributed.materialize(on_meta(lambda: GPT2LMHeadModel(config)), "cpu", seed=SEED)
    projection = torch.cat([model.transformer.h[i].attn.c_proj.weight.flatten() for i in range(4)])
    attention = torch.cat([model.transformer.h[i].attn.c_attn.weight.flatten() for i in range(4)])
    scaled = config.initializer_range / (2 * config.n_layer) ** 0.5  # set by the attention block, their parent
    assert projection.std().item() == pytest.approx(scaled, rel=0.05)
    assert attention.std().item() == pytest.approx(config.initializer_range, rel=0.05)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)

    llama = autosplit.distributed.materialize(on_meta(tied_llama), "cpu", seed=SEED)
    built = tied_llama()  # the rotary tables, which no checkpoint holds, equal those of the model built on the CPU
    for name in ("model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"):
        assert torch.equal(llama.get_buffer(name), built.get_buffer(name)), name
    assert llama.model.norm.weight.eq(1).all() and llama.lm_head.weight is llama.model.embed_tokens.weight


def test_a_tensor_no_initialization_sets_is_refused_with_the_fix():
    class Offset(nn.Module):
        def __init__(self):
            super().__init__()
            self.offset = nn.Parameter(torch.zeros(4))

    model = on_meta(lambda: nn.Sequential(nn.Linear(4, 4), Offset()))
    with pytest.raises(AutosplitError, match=r"1\.offset \(Offset\) were materialized from meta on cpu.*init_fn="):
        autosplit.distributed.materialize(model, "cpu")
    model = on_meta(lambda: nn.Sequential(nn.Linear(4, 4), Offset()))
    autosplit.distributed.materialize(model, "cpu", init_fn=lambda m: nn.init.zeros_(m.offset) if isinstance(m, Offset)
                                      else None)
    assert torch.equal(model[1].offset, torch.zeros(4))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process, as asked
def test_a_plain_checkpoint_of_the_model_loads_and_a_mismatch_is_refused_with_the_fix(tmp_path):
    source = positional_source()
    dcp.save(source.state_dict(), checkpoint_id=tmp_path / "plain", no_dist=True)  # both names of the tied weight
    model = autosplit.distributed.materialize(on_meta(models.PositionalLM), "cpu")
    autosplit.distributed.load(model, tmp_path / "plain")
    assert state_bytes(model.state_dict()) == state_bytes(source.state_dict())

    mismatch = r"embed.weight is \(50, 16\) torch.float32 in the checkpoint .* but \(60, 16\)"
    with pytest.raises(ValueError, match=mismatch):
        autosplit.distributed.load(autosplit.distributed.materialize(on_meta(lambda: models.PositionalLM(vocab=60))),
                                   tmp_path / "plain")
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("norm.")}
    dcp.save(partial, checkpoint_id=tmp_path / "partial", no_dist=True)
    with pytest.raises(KeyError, match="has no entry for norm.weight, norm.bias"):
        autosplit.distributed.load(model, tmp_path / "partial")
    with pytest.raises(KeyError, match="holds no optimizer state for"):
        autosplit.distributed.load(model, tmp_path / "plain", optimizer=torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="on meta, with no memory to save from or load into"):
        autosplit.distributed.save(on_meta(models.PositionalLM), tmp_path / "meta")

"""The distributed runtime: a plan's stages on 2 gloo ranks train exactly like the model in one
process, tied weights stay identical across ranks, ranks that cannot run a plan together are
refused on every rank, and a rank that fails in a step stops every rank at once with its error.

The multi-process tests run on 2 ranks spawned once for the test session
(``rank_pool.shared_ranks``) and fail, killing the ranks, if they have not finished within
``RANKS_TIMEOUT_S``. Plans are made once, in the test process, and passed to the ranks.
"""

import copy
import dataclasses
import functools
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils._pytree as pytree

import autosplit.distributed
import models
from autosplit import OpGraph, SolverOptions, solve
from autosplit.api import capture_microbatch
from autosplit.distributed import DistributedError
from autosplit import AutosplitError, InputSignatureError
from autosplit.distributed.stages import Wire, stage_chain
from cost_models import Cluster, price_graph
from checks import train_alongside
from numerics import assert_same
from rank_pool import shared_ranks

RANKS_TIMEOUT_S = 120.0
"""How long a 2-rank test may run before its ranks are killed and it fails."""

GROUP_TIMEOUT_S = 60.0
"""The ranks' process-group timeout: a rank waiting for a dead or stuck peer fails by then."""

MICROBATCHES = 4


# --------------------------------------------------------------------------- the models and their plans


def lm_loss(output, target):
    return F.cross_entropy(output["logits"].flatten(0, 1), target.flatten())


def class_loss(output, target):
    return F.cross_entropy(output, target)


def tied_lm_batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (2 * MICROBATCHES, 6), generator=g)
    return (ids,), {}, torch.randint(0, 50, (2 * MICROBATCHES, 6), generator=g)


def rescnn_batch(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * MICROBATCHES, 3, 12, 12, generator=g)
    return (x,), {}, torch.randint(0, 10, (2 * MICROBATCHES,), generator=g)


def masked_batch(seed):
    g = torch.Generator().manual_seed(seed)
    batch = 3 * MICROBATCHES  # not 8, the feature size: the batch dimension is then plain
    x, mask = torch.randn(batch, 8, generator=g), torch.rand(batch, 8, generator=g) > 0.3
    return (x,), {"mask": mask, "scale": 0.5}, torch.randn(batch, 8, generator=g)


CASES = {
    # model factory, loss, batch of step k (args, kwargs, target), train mode (ResCNN's BatchNorm is frozen:
    # batch statistics per microbatch would differ from the batch's, which the runtime refuses)
    "tied_lm": (models.tied_lm, lm_loss, tied_lm_batch, True),  # an embedding tied to the LM head
    "rescnn": (models.rescnn, class_loss, rescnn_batch, False),  # a concat skip from the stem to the head
    "masked": (models.masked, F.mse_loss, masked_batch, True),  # a keyword input (mask) read on both stages
}


def make_model(name):
    factory, _, _, training = CASES[name]
    model = factory()[0]
    return model.train(training)


@functools.cache
def make_plan(name, stages=2, microbatches=MICROBATCHES, schedule="1f1b", stages_per_device=1):
    model = make_model(name)
    args, kwargs, _ = CASES[name][2](0)
    traced = capture_microbatch(model, args, kwargs, microbatches=microbatches).traced
    return solve(OpGraph.from_traced(traced), Cluster.parse(f"{stages // stages_per_device}xh100"),
                 SolverOptions(microbatches=microbatches, schedule=schedule, stages=stages, shared_weights="copies",
                               stages_per_device=stages_per_device),
                 costs=price_graph(traced.graph_module), parameters=traced.parameters, buffers=traced.buffers)


# --------------------------------------------------------------------------- running 2 ranks


@pytest.fixture(scope="module")
def ranks():
    return shared_ranks(world=2, timeout_s=RANKS_TIMEOUT_S)


# --------------------------------------------------------------------------- what each rank runs


def train_like_one_process(rank, name, plans, steps):
    """For each plan: one step's loss and every gradient of this rank equal the model's in one
    process (a deepcopy), and after ``steps`` AdamW steps so do the weights. Returns, per plan,
    the rank's parameter names, shared weights, and each parameter's bytes after the steps."""
    _, loss_fn, batch, _ = CASES[name]
    reports = []
    for plan in plans:
        model = make_model(name)
        reference = copy.deepcopy(model)
        args, kwargs, _ = batch(0)
        pipe = autosplit.distributed.build(model, plan, loss_fn=loss_fn, example_inputs=args, example_kwargs=kwargs,
                                           timeout_s=GROUP_TIMEOUT_S)
        weights = train_alongside(pipe, reference, batch, loss_fn, steps, label=plan.schedule)
        reports.append({"names": [n for n, _ in pipe.named_parameters()], "shared": sorted(pipe.shared_weights),
                        "stages": pipe.stages,
                        "received": len(pipe._chain.received[pipe.stage]) if not pipe.is_first else 0,
                        "bytes": {n: w.numpy().tobytes() for n, w in weights.items()}})
    return reports


def build_and_report(rank, plans):
    """Build with this rank's plan; the error message every rank gets."""
    model = make_model("tied_lm")
    args, _, _ = tied_lm_batch(0)
    try:
        autosplit.distributed.build(model, plans[rank], loss_fn=lm_loss, example_inputs=args, timeout_s=GROUP_TIMEOUT_S)
    except DistributedError as e:
        return str(e)
    return None


def refuse_another_shape_then_train(rank, plan):
    """A batch of another shape is refused on every rank before anything is sent, also when only
    rank 0 is given it (rank 1 gets the target only, and would otherwise wait for rank 0's
    activations); the pipeline trains on the next, right batch."""
    model = make_model("tied_lm")
    args, _, target = tied_lm_batch(0)
    pipe = autosplit.distributed.build(model, plan, loss_fn=lm_loss, example_inputs=args, timeout_s=GROUP_TIMEOUT_S)
    with pytest.raises(InputSignatureError) as refused:
        pipe.step(args[0][:, :5], target=target[:, :5])
    with pytest.raises(InputSignatureError if rank == 0 else DistributedError) as refused_on_rank_0:
        pipe.step(args[0][:, :5], target=target) if rank == 0 else pipe.step(target=target)
    loss = pipe.step(*args, target=target)
    return str(refused.value), str(refused_on_rank_0.value), loss is not None


def buggy_lm_loss(output, target):
    """A loss with a shape error: the logits are not flattened like the target."""
    return F.cross_entropy(output["logits"], target)


def fail_in_step(rank, plan, failing_rank):
    """``failing_rank`` raises inside step(): the last rank in its loss_fn (a shape error) at step
    0, or rank 0 in its forward at step 1 (a batch with a token id past the vocabulary, given to
    rank 0 only). Returns the error this rank got, the seconds step() took to raise it, the error
    of a further step, and whether the default group still works."""
    model = make_model("tied_lm")
    args, _, target = tied_lm_batch(0)
    last = failing_rank == len(plan.stages) - 1
    pipe = autosplit.distributed.build(model, plan, loss_fn=buggy_lm_loss if last else lm_loss, example_inputs=args,
                                       timeout_s=autosplit.distributed.runtime.DEFAULT_TIMEOUT_S)
    if not last:
        pipe.step(*args, target=target)
        if rank == failing_rank:
            args = (args[0].clone().index_fill_(1, torch.tensor([3]), 50),)
    start = time.monotonic()
    with pytest.raises(DistributedError) as failed:
        pipe.step(*args, target=target)
    seconds = time.monotonic() - start
    with pytest.raises(DistributedError) as again:
        pipe.step(*args, target=target)
    dist.barrier()
    return str(failed.value), seconds, str(again.value), isinstance(failed.value.__cause__, Exception)


def disagree_then_broadcast(rank, plans):
    """Ranks with different plans are refused; the group stays usable, and a plan from rank 0
    (``plan_and_broadcast``) is the same on both ranks and trains."""
    refused = build_and_report(rank, plans)
    model = make_model("tied_lm")
    args, _, target = tied_lm_batch(0)
    plan = autosplit.distributed.plan_and_broadcast(model, example_inputs=args, microbatches=MICROBATCHES,
                                                    cluster="2xh100", timeout_s=GROUP_TIMEOUT_S)
    pipe = autosplit.distributed.build(model, plan, loss_fn=lm_loss, example_inputs=args, timeout_s=GROUP_TIMEOUT_S)
    loss = pipe.step(*args, target=target)
    return refused, autosplit.distributed.plan_digest(plan), loss is not None


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_ranks_train_exactly_like_one_process_with_gpipe_and_1f1b(ranks, name):
    plans = [make_plan(name, schedule=schedule) for schedule in ("gpipe", "1f1b")]
    reports = ranks.run(train_like_one_process, name, plans, 3)
    reference = make_model(name)
    for i, plan in enumerate(plans):
        held = [set(report[i]["names"]) for report in reports]
        assert held[0] | held[1] == {n for n, _ in reference.named_parameters()}, "every parameter on some rank"
        assert held[0] - held[1] and held[1] - held[0], "each rank holds its own stage's parameters only"
        shared = held[0] & held[1]
        assert shared == set(reports[0][i]["shared"]) == set(reports[1][i]["shared"])
        for pname in shared:  # the copies of a shared weight are bit-identical after the optimizer steps
            assert reports[0][i]["bytes"][pname] == reports[1][i]["bytes"][pname], pname
    if name == "tied_lm":  # the embedding is read again by the LM head on the other stage
        assert all(report[i]["shared"] == ["embed.weight"] for report in reports for i in range(len(plans)))
    else:  # the stem's output (or the mask) crosses to stage 1 next to the main path
        assert all(report[i]["shared"] == [] for report in reports for i in range(len(plans)))
        assert reports[1][0]["received"] >= 2


def test_two_ranks_run_four_interleaved_stages_exactly_like_one_process(ranks):
    """Interleaved 1F1B: rank r runs stages r and r + 2 (two PipelineStages under
    ScheduleInterleaved1F1B); the loss and every gradient of a step, and the weights after two
    AdamW steps, equal the model's in one process. The tied embedding (stage 0, rank 0) and LM
    head (stage 3, rank 1) stay identical."""
    plan = make_plan("tied_lm", stages=4, schedule="interleaved-1f1b", stages_per_device=2)
    assert plan.device_stages() == {0: (0, 2), 1: (1, 3)}
    [first], [second] = ranks.run(train_like_one_process, "tied_lm", [plan], 2)
    assert first["stages"] == (0, 2) and second["stages"] == (1, 3)
    reference = make_model("tied_lm")
    assert set(first["names"]) | set(second["names"]) == {n for n, _ in reference.named_parameters()}
    assert first["shared"] == second["shared"] == ["embed.weight"]
    assert first["bytes"]["embed.weight"] == second["bytes"]["embed.weight"]


@pytest.mark.parametrize("name, relayed", [("rescnn", "stem_2"), ("masked", "to")])
def test_three_stages_relay_what_later_stages_read_stage_by_stage(name, relayed):
    """Stages chained in one process, as the ranks pass tensors: a value made on stage 0 and read
    on stage 2 (the stem's output; the gate made from the keyword input ``mask``) goes through
    stage 1, and outputs and gradients equal the model's."""
    model = make_model(name)
    reference = copy.deepcopy(model)
    plan = make_plan(name, stages=3)
    args, kwargs, target = CASES[name][2](0)
    captured = capture_microbatch(model, args, kwargs, microbatches=MICROBATCHES)
    chain = stage_chain(model, captured, plan, torch.device("cpu"))
    sends = [[wire.name for wire in module.get_submodule("send").wires] for module in chain.modules[:-1]]
    assert relayed in sends[0] and relayed in sends[1], sends
    assert [len(r) for r in chain.received[1:]] == [len(s) for s in chain.sent[:-1]]
    flat = chain.flat_inputs(*args, **kwargs)
    microbatches = [pytree.tree_map(lambda t: t.chunk(MICROBATCHES)[i], [flat[k] for k in chain.first_inputs])
                    for i in range(MICROBATCHES)]
    for i, inputs in enumerate(microbatches):
        values = chain.modules[0](*inputs)
        for module in chain.modules[1:]:
            values = module(*values)
        loss_fn = CASES[name][1]
        (loss_fn(chain.output.decode(values), target.chunk(MICROBATCHES)[i]) / MICROBATCHES).backward()
    CASES[name][1](reference(*args, **kwargs), target).backward()
    for (pname, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert_same(p.grad, q.grad, name=f"{pname}.grad")


def test_a_batch_of_another_shape_is_refused_on_every_rank(ranks):
    reports = ranks.run(refuse_another_shape_then_train, make_plan("tied_lm"))
    for message, on_rank_0, _ in reports:
        assert "input 'ids' is shape (8, 5)" in message and "built for shape (8, 6)" in message
        assert "4 microbatches of (2, 6)" in message
        assert "input 'ids' is shape (8, 5)" in on_rank_0
    assert reports[1][1].startswith("no rank ran step 1: rank 0 refused it: InputSignatureError")
    assert [last for _, _, last in reports] == [False, True]


@pytest.mark.parametrize("failing_rank, error", [(1, "RuntimeError: Expected target size"),
                                                 (0, "IndexError: index out of range")])
def test_a_rank_failing_in_a_step_stops_every_rank_at_once_with_its_error(ranks, failing_rank, error):
    """The pipeline's groups wait up to 600 s here: every rank ends in seconds all the same, with
    the failing rank's error; the pipeline refuses further steps, and the default group works."""
    reports = ranks.run(fail_in_step, make_plan("tied_lm"), failing_rank)
    step = 0 if failing_rank == 1 else 1
    for rank, (message, seconds, again, chained) in enumerate(reports):
        assert message.startswith(f"rank {failing_rank} (stage {failing_rank} of 2) failed in step {step}: {error}")
        assert seconds < 30, f"rank {rank} took {seconds:.1f} s to stop"
        assert "this pipeline stopped when rank" in again and chained == (rank == failing_rank)
    assert f"rank {1 - failing_rank} (stage {1 - failing_rank}) stopped its step {step} with it" in \
        reports[1 - failing_rank][0]


def test_a_failure_on_the_last_of_three_ranks_reaches_the_first_through_the_second():
    """Rank 0 waits on rank 1, not on the failing rank 2: it stops when rank 1 does."""
    reports = shared_ranks(world=3).run(fail_in_step, make_plan("tied_lm", stages=3), 2)
    for rank, (message, seconds, _, _) in enumerate(reports):
        assert message.startswith("rank 2 (stage 2 of 3) failed in step 0: RuntimeError: Expected target size")
        assert seconds < 30, f"rank {rank} took {seconds:.1f} s to stop"


def test_values_that_are_not_tensors_cross_as_tensors_or_fixed_at_capture():
    value = (torch.arange(6.0).view(2, 3).t(), 7, 2.5, True, torch.Size([4, 5]), torch.float16, None)
    wire = Wire.of("pair", value, needs_grad=False)
    sent = wire.encode(value, torch.device("cpu"))
    assert [(t.shape, t.dtype) for t in sent] == [(m.shape, m.dtype) for m in wire.metas]
    assert len(sent) == 5 and all(t.is_contiguous() for t in sent)  # the dtype and None are not sent
    back = wire.decode(sent)
    assert torch.equal(back[0], value[0]) and back[1:] == value[1:] and type(back[4]) is torch.Size
    with pytest.raises(AutosplitError, match="pair crosses a stage boundary and holds a object"):
        Wire.of("pair", (torch.ones(1), object()), needs_grad=False)


def test_a_world_size_other_than_the_stage_count_is_refused_on_every_rank(ranks):
    plan = make_plan("tied_lm", stages=3)
    messages = ranks.run(build_and_report, [plan, plan])
    for message in messages:
        assert message is not None and "the plan has 3 stages" in message and "but 2 ranks run" in message
        assert "--nproc-per-node=3" in message and "2 stages × 1 replica" in message


def test_ranks_with_different_plans_are_refused_and_a_broadcast_plan_is_shared(ranks):
    plans = [make_plan("tied_lm", microbatches=m) for m in (4, 2)]
    reports = ranks.run(disagree_then_broadcast, plans)
    for refused, _, _ in reports:
        assert refused is not None and "hold different plans" in refused and "plan_and_broadcast" in refused
    assert reports[0][1] == reports[1][1], "both ranks got rank 0's plan"
    assert [last for _, _, last in reports] == [False, True]


def test_a_plan_that_sends_shared_weights_is_refused_before_any_process_group_starts():
    """A plan priced for one process (a tied weight sent from the stage storing it) would misprice
    the copies every reading rank trains here: build() says how to plan for this runtime."""
    model = make_model("tied_lm")
    args, kwargs, _ = CASES["tied_lm"][2](0)
    plan = make_plan("tied_lm")
    sent = dataclasses.replace(plan, options={**plan.options, "shared_weights": "sent"})
    with pytest.raises(ValueError, match=r"shared_weights='copies' \(plan_and_broadcast does"):
        autosplit.distributed.build(model, sent, loss_fn=lm_loss, example_inputs=args, example_kwargs=kwargs)
    assert not dist.is_initialized()

"""autosplit.autosplit and autosplit.plan: one call to split, an unchanged training loop."""

import copy
import dataclasses

import pytest
import torch

import autosplit
import models
from autosplit import Plan, spec
from numerics import assert_same


def test_one_line_makes_a_training_loop_multi_device():
    model, args, _ = models.tied_lm()
    reference = copy.deepcopy(model)
    sm = autosplit.autosplit(model, devices=2, example_inputs=args)
    assert isinstance(sm, autosplit.SplitModule) and len(sm.plan.stages) == 2
    assert sm.output_device == torch.device("cpu")  # no accelerator here: CPU devices
    (x,) = args
    opt, ref_opt = torch.optim.AdamW(sm.parameters(), lr=1e-2), torch.optim.AdamW(reference.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in reference.parameters()]
    for _ in range(3):
        for module, optimizer in ((sm, opt), (reference, ref_opt)):
            loss = module(x)["logits"].square().mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
    # the three steps taken, not the weights: steps of ~lr are lost in weights of ~1 at 1e-5 of their size
    for (name, p), q, p0 in zip(sm.named_parameters(), reference.parameters(), before, strict=True):
        assert_same(p.detach() - p0, q.detach() - p0, name=f"{name} update")


@pytest.mark.parametrize("microbatches", [1, 2])
def test_without_example_inputs_the_first_batch_plans_the_split(microbatches):
    model, args, _ = models.mlp()
    reference = copy.deepcopy(model)
    sm = autosplit.autosplit(model, devices=3, microbatches=microbatches)
    assert sm.plan is None
    assert_same(sm(*args), reference(*args))
    assert len(sm.plan.stages) == 3 and sm.plan.microbatches == microbatches


def test_plan_touches_no_device_and_a_saved_plan_rebuilds_the_same_split(tmp_path):
    model, args, _ = models.gpt2("meta")
    plan = autosplit.plan(model, cluster="4xh100", example_inputs=(spec((2, 16), dtype=torch.long),))
    assert all(p.is_meta for p in model.parameters()) and len(plan.stages) == 4
    real, real_args, _ = models.gpt2()
    first = autosplit.autosplit(real, devices=2, example_inputs=real_args)
    again = autosplit.autosplit(real, devices=2, example_inputs=real_args,
                                plan=Plan.load(first.plan.save(tmp_path / "p.json")))
    assert again.plan == first.plan
    assert [s.nodes for s in again.plan.stages] == [s.nodes for s in first.plan.stages]


def test_bad_arguments_get_one_clear_error():
    model, args, _ = models.mlp()
    with pytest.raises(TypeError, match="unknown option.*schedule"):
        autosplit.autosplit(model, devices=2, example_inputs=args, shedule="1f1b")
    with pytest.raises(ValueError, match="devices must be at least 1"):
        autosplit.autosplit(model, devices=0)
    with pytest.raises(ValueError, match="plan\\(\\) needs example inputs"):
        autosplit.plan(model, devices=2)
    with pytest.raises(ValueError, match="needs real example tensors"):
        autosplit.autosplit(model, devices=2, example_inputs=(spec((4, 16)),))
    with pytest.raises(ValueError, match="microbatches must be a positive int"):
        autosplit.autosplit(model, devices=2, example_inputs=args, microbatches=0)
    with pytest.raises(ValueError, match="GPipe wavefront"):
        autosplit.autosplit(model, devices=2, example_inputs=args, microbatches=2, schedule="1f1b")
    with pytest.raises(ValueError, match="batch of 4 cannot be cut into 3 equal microbatches"):
        autosplit.autosplit(model, devices=2, example_inputs=args, microbatches=3)


class _Optional(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x, mask=None, scale=1.0):
        h = self.a(x)
        if mask is not None:
            h = h * mask
        return self.b(h) * scale


def test_a_call_the_split_cannot_follow_names_the_argument_and_the_fix():
    model, x = _Optional(), torch.randn(3, 4)
    split = autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=(x,))
    assert_same(split(x), model(x))
    assert_same(split(x, scale=1.0), model(x))  # the value it was captured with
    with pytest.raises(autosplit.InputSignatureError, match=r"'mask' was None when this split was captured.*"
                                                            r"example_kwargs=\{'mask': \.\.\.\}"):
        split(x, mask=torch.ones(3, 4))
    with pytest.raises(autosplit.InputSignatureError, match=r"'scale' was fixed to 1.0 .* not 2.0.*"
                                                            r"example_kwargs=\{'scale': 2.0\}"):
        split(x, scale=2.0)
    with pytest.raises(autosplit.InputSignatureError, match=r"'x' has shape \(3, 5\), but this split was captured "
                                                            r"with \(3, 4\); the first layer that reads it, a \(Linear\)"):
        split(torch.randn(3, 5))
    masked = autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=(x,),
                                 example_kwargs={"mask": torch.ones(3, 4)})
    with pytest.raises(autosplit.InputSignatureError, match="'mask' was given when this split was captured"):
        masked(x)


def test_a_plain_function_is_refused_with_how_to_wrap_it():
    def double(x):
        return 2 * x

    x = torch.randn(2, 3)
    for call in (lambda: autosplit.autosplit(double, devices=["cpu", "cpu"], example_inputs=(x,)),
                 lambda: autosplit.plan(double, devices=2, example_inputs=(x,)),
                 lambda: autosplit.capture(double, (x,))):
        with pytest.raises(TypeError, match=r"splits an nn.Module, and 'double' is a plain function: wrap it"):
            call()
    with pytest.raises(TypeError, match="splits an nn.Module; got int"):
        autosplit.plan(3, devices=2, example_inputs=(x,))


def test_a_model_without_weights_is_planned_not_split():
    model, args, _ = models.mlp("meta")
    with pytest.raises(ValueError, match="layers.0.weight is on meta.*only plan with autosplit.plan"):
        autosplit.autosplit(model, devices=2, example_inputs=(torch.randn(4, 16),))
    assert all(p.is_meta for p in model.parameters())


def test_stages_run_on_the_devices_the_plan_chose_and_other_kinds_are_refused():
    from numerics import assert_same

    model, args, _ = models.tied_lm()
    reference = copy.deepcopy(model)
    devices = [torch.device("cpu", i) for i in range(3)]  # three distinct device objects
    sm = autosplit.autosplit(model, devices=devices, cluster="rtx4090+rtx3090+cpu", example_inputs=args)
    ranks = sm.plan.device_ranks()
    assert ranks != sorted(ranks), "the solver put the faster GPU first: not the listed order"
    assert sm.devices == [devices[r] for r in ranks]
    moved_to = {n.args[1] for n in sm.graph_module.graph.nodes if n.target is autosplit.rewrite.transfer}
    assert moved_to == {devices[r] for r in ranks[1:]}  # each later stage receives on its own device
    out, want = sm(*args), reference(*args)
    assert_same(out["logits"], want["logits"])
    out["logits"].square().mean().backward()
    want["logits"].square().mean().backward()
    for (name, p), q in zip(sm.named_parameters(), reference.parameters(), strict=True):
        assert_same(p.grad, q.grad, name=name)

    other, other_args, _ = models.tied_lm()
    before = {name: p.detach().clone() for name, p in other.named_parameters()}
    with pytest.raises(ValueError, match=r"made for rtx4090\+rtx3090\+cpu .*but the devices given are 3xcpu"):
        autosplit.autosplit(other, devices=3, example_inputs=other_args, plan=sm.plan)
    for name, p in other.named_parameters():
        assert torch.equal(p, before[name]) and p.device.type == "cpu", name


def test_a_plan_made_for_1f1b_is_checked_again_for_the_wavefront_this_runner_runs():
    from autosplit.errors import InfeasibleError

    model, args, _ = models.mlp()
    x = torch.cat([args[0]] * 4)  # 4 microbatches of the traced size
    made = autosplit.plan(model, devices=2, example_inputs=args, microbatches=4, schedule="1f1b")
    assert made.schedule == "1f1b"
    sm = autosplit.autosplit(model, devices=2, example_inputs=(x,), microbatches=4, plan=made, batch_dims={"x": 0})
    assert sm.plan.schedule == "gpipe" and sm.plan.microbatches == 4
    act = [s.memory.activations_bytes for s in sm.plan.stages]
    assert act[0] == pytest.approx(made.stages[0].memory.activations_bytes * 4 / 2)  # 2 in flight → all 4
    tight = dataclasses.replace(made, stages=tuple(dataclasses.replace(s, memory_capacity_bytes=s.memory_bytes)
                                                   for s in made.stages))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(InfeasibleError, match="stage 0"):
        autosplit.autosplit(model, devices=2, example_inputs=(x,), microbatches=4, plan=tight, batch_dims={"x": 0})
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_model_that_caches_by_default_is_captured_without_and_says_so(caplog):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(models.tiny_gpt2_config(n_layer=2)).eval()
    assert model.config.use_cache
    x = torch.randint(0, model.config.vocab_size, (2, 8))
    with caplog.at_level("WARNING"):
        split = autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=(x,), mode="infer")
        out = split(x)
    assert sum("use_cache=False" in r.getMessage() for r in caplog.records) == 1  # said once
    assert any("use_cache=False" in note and "model.config.use_cache = False" in note for note in split.plan.solver.notes)
    assert out.past_key_values is None
    assert_same(out.logits, model(x, use_cache=False).logits)
    with pytest.raises(autosplit.InputSignatureError, match="'use_cache' was fixed to False"):
        split(x, use_cache=True)
    quiet = autosplit.plan(model, devices=2, example_inputs=(x,), example_kwargs={"use_cache": False}, mode="infer")
    assert not any("use_cache" in note for note in quiet.solver.notes)


def test_an_encoder_decoder_that_caches_by_default_splits_exactly_without_its_cache():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                num_heads=4, decoder_start_token_id=0)).eval()
    assert model.config.use_cache
    ids, decoder_ids = torch.randint(1, 64, (2, 8)), torch.randint(1, 64, (2, 6))
    split = autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=(ids,),
                                example_kwargs={"decoder_input_ids": decoder_ids}, mode="infer")
    out = split(ids, decoder_input_ids=decoder_ids)
    assert out.past_key_values is None and any("use_cache=False" in note for note in split.plan.solver.notes)
    assert_same(out.logits, model(ids, decoder_input_ids=decoder_ids, use_cache=False).logits)

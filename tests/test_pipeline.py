"""Microbatch pipelining in one process, and train/eval behaviour fixed at capture made to follow
the module's mode."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autosplit
import models
from autosplit import MicrobatchError
from autosplit.modes import InMode
from autosplit.pipeline import cut_microbatches, resolve_batch_dims
from autosplit.rewrite import split_module
from cost_models import Cluster, price_graph
from numerics import assert_same


def test_the_stages_run_in_a_wavefront_and_the_loop_is_unchanged():
    model, (x,), _ = models.mlp()
    x = torch.cat([x, -x])  # 8 samples, 4 microbatches of 2
    reference = copy.deepcopy(model)
    sm = autosplit.autosplit(model, devices=3, example_inputs=(x,), microbatches=4)
    assert sm.microbatches == 4 and sm.plan.microbatches == 4 and sm.plan.schedule == "gpipe"
    order = []
    for s, stage in enumerate(sm.graph_module.pipeline.stages):
        stage.register_forward_pre_hook(lambda mod, args, s=s: order.append(s))
    opt, ref_opt = torch.optim.SGD(sm.parameters(), lr=0.1), torch.optim.SGD(reference.parameters(), lr=0.1)
    before = [p.detach().clone() for p in reference.parameters()]
    for _ in range(2):
        for module, optimizer in ((sm, opt), (reference, ref_opt)):
            loss = F.mse_loss(module(x), torch.ones(8, 8))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    # clock ticks 0..5: stage s runs microbatch t - s, so stage 0 starts microbatch 1 before stage 1 ends 0
    assert order[:12] == [0, 0, 1, 0, 1, 2, 0, 1, 2, 1, 2, 2]
    for (name, p), q, p0 in zip(sm.named_parameters(), reference.parameters(), before, strict=True):
        assert_same(p.detach() - p0, q.detach() - p0, name=f"{name} update")  # the steps, not the weights


def test_batch_norm_in_training_mode_is_refused_and_frozen_batch_norm_runs():
    model, (x,), _ = models.rescnn()
    x = torch.cat([x, x.flip(0)])
    reference = copy.deepcopy(model).eval()
    sm = autosplit.autosplit(model, devices=2, example_inputs=(x,), microbatches=2)
    with pytest.raises(MicrobatchError, match="stem.1 \\(BatchNorm2d and 8 more\\).*microbatches=2.*eval mode"):
        sm(x)
    sm.eval()
    assert_same(sm(x), reference(x))


def test_outputs_that_cannot_be_joined_and_batches_that_cannot_be_cut_get_clear_errors():
    class LossInside(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x)).square().mean()

    class NotBatchFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x)).sum(0)

    x = torch.randn(6, 4)
    # refused when the split is built, before any weight moves: the capture shows the outputs' shapes
    with pytest.raises(MicrobatchError, match=r"model's output is a scalar .*compute the loss outside"):
        autosplit.autosplit(LossInside(), devices=2, example_inputs=(x,), microbatches=2)
    model = NotBatchFirst()
    before = copy.deepcopy(model)
    with pytest.raises(MicrobatchError, match=r"model's output has shape \(4,\) whatever the batch size"):
        autosplit.autosplit(model, devices=2, example_inputs=(x,), microbatches=2)
    for (name, got), want in zip(model.state_dict().items(), before.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    # without an example the refusal comes at the first call, which captures
    with pytest.raises(MicrobatchError, match=r"model's output is a scalar"):
        autosplit.autosplit(LossInside(), devices=2, microbatches=2)(x)
    with pytest.raises(MicrobatchError, match="batch of 3 cannot be cut into 2"):
        cut_microbatches([torch.randn(3, 4)], 2)
    with pytest.raises(MicrobatchError, match="needs a tensor input with a batch dimension"):
        cut_microbatches([1.0, torch.tensor(2.0)], 2)
    flag, mask = 0.5, torch.ones(1, 3)  # not batched: every microbatch gets them whole
    assert [chunk[1:] for chunk in cut_microbatches([torch.zeros(4, 2), flag, mask], 2)] == [[flag, mask]] * 2


class SeqState(nn.Module):
    """An LSTM that returns its final state: ``h`` and ``c`` are (layers, batch, hidden)."""

    def __init__(self, layers: int = 2):
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.rnn = nn.LSTM(6, 6, num_layers=layers, batch_first=True)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        out, (h, c) = self.rnn(self.inp(x))
        return self.head(out), (h, c)


@pytest.mark.parametrize("layers", [2, 3])
def test_outputs_join_along_the_batch_dimension_the_capture_found(layers):
    # 2 layers = the microbatch of 2 too: h and c, (layers, batch, hidden), would pass a dim-0 join
    model = SeqState(layers)
    reference = copy.deepcopy(model)
    x = torch.randn(4, 7, 3)
    x = torch.cat([x, x.flip(0)])[:4]
    split = autosplit.autosplit(model, devices=2, example_inputs=(x,), microbatches=2)
    assert sorted(split.graph_module.pipeline.join_dims.values()) == [(0,), (1,), (1,)]
    (out, (h, c)), (want, (want_h, want_c)) = split(x), reference(x)
    for got, expected, name in [(out, want, "output"), (h, want_h, "h"), (c, want_c, "c")]:
        assert_same(got, expected, name=name)
    (out.sum() + h.square().sum() + c.square().sum()).backward()
    (want.sum() + want_h.square().sum() + want_c.square().sum()).backward()
    for (name, p1), p2 in zip(split.named_parameters(), reference.parameters(), strict=True):
        assert_same(p1.grad, p2.grad, name=f"{name}.grad")


def test_outputs_with_the_batch_mixed_into_a_dimension_are_refused():
    class Flattened(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return {"tokens": self.b(self.a(x)).flatten(0, 1)}

    with pytest.raises(MicrobatchError, match=r"model's output\['tokens'\] has shape \(9, 4\) for a batch of 3 and "
                                              r"\(18, 4\) for 6: no one dimension of it is the batch"):
        autosplit.autosplit(Flattened(), devices=2, example_inputs=(torch.randn(6, 3, 4),), microbatches=2)


def test_without_the_capture_outputs_join_along_dimension_0_only_where_unambiguous():
    from autosplit.pipeline import _join

    parts = [torch.randn(2, 5), torch.randn(2, 5)]
    assert_same(_join("output", parts, 2), torch.cat(parts))
    assert_same(_join("output", [p.T for p in parts], 2, dims=(1,)), torch.cat([p.T for p in parts], dim=1))
    with pytest.raises(MicrobatchError, match=r"output\[1\] has shape \(2, 2, 6\) per microbatch of 2: its "
                                              r"dimensions \[0, 1\] all have the microbatch's size"):
        _join("output[1]", [torch.randn(2, 2, 6)] * 2, 2)


def test_keyword_inputs_and_hugging_face_outputs_are_cut_and_joined():
    model, (ids,), _ = models.gpt2()
    ids = torch.cat([ids, ids.flip(0)])
    mask = torch.ones_like(ids)
    model.eval()
    reference = copy.deepcopy(model)
    sm = autosplit.autosplit(model, devices=2, example_inputs=(ids,), example_kwargs={"attention_mask": mask},
                             microbatches=2)
    out = sm(ids, attention_mask=mask)
    want = reference(ids, attention_mask=mask, use_cache=False)
    assert type(out) is type(want)
    assert_same(out.logits, want.logits)


def test_dropout_captured_in_training_follows_train_and_eval():
    model, (ids,), _ = models.gpt2()  # the registry's GPT-2 has no dropout; this one has it everywhere
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(models.tiny_gpt2_config(resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2)).eval()
    reference = copy.deepcopy(model)
    sm = autosplit.autosplit(model, devices=2, example_inputs=(ids,))
    assert not sm.training and not model.training  # captured in training mode, the user's mode given back
    assert_same(sm(ids).logits, reference(ids, use_cache=False).logits)

    sm.train()
    reference.train()
    torch.manual_seed(3)
    dropped = sm(ids).logits
    torch.manual_seed(3)  # same ops in the same order: the same dropout masks
    assert_same(dropped, reference(ids, use_cache=False).logits)
    sm.eval()
    assert not torch.allclose(dropped, sm(ids).logits)


def test_batch_norm_fixed_by_export_follows_train_and_eval():
    class Gated(nn.Module):  # the branch on a shape makes symbolic_trace fail: export captures it
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

        def forward(self, x):
            if x.dim() == 4:
                x = F.relu(self.bn(self.conv(x)))
            return self.head(F.dropout(x.mean((2, 3)), 0.3, self.training))

    torch.manual_seed(0)
    model, x = Gated(), torch.randn(4, 3, 8, 8)
    reference = copy.deepcopy(model)
    sm = autosplit.autosplit(model, devices=2, example_inputs=(x,))
    assert sm.graph_module.in_mode_0 is not None  # the captured flags were replaced
    for mode in (True, False, True):
        sm.train(mode)
        reference.train(mode)
        torch.manual_seed(5)
        out = sm(x)
        torch.manual_seed(5)
        assert_same(out, reference(x))
        for (name, b), r in zip(sm.named_buffers(), reference.buffers(), strict=True):
            assert_same(b, r, name=name)  # running statistics updated in training only


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA device")
def test_on_cuda_each_device_gets_a_stream_and_results_equal_one_microbatch():
    devices = ["cuda:0", "cuda:1"] if torch.cuda.device_count() > 1 else ["cuda:0", "cuda:0"]
    model, (ids,), _ = models.tied_lm("cuda:0")
    ids = torch.cat([ids] * 4)
    reference = copy.deepcopy(model)
    sm = autosplit.autosplit(model, devices=devices, example_inputs=(ids,), microbatches=4)
    out = sm(ids)["logits"]
    out.square().mean().backward()
    want = reference(ids)["logits"]
    want.square().mean().backward()
    assert_same(out, want.to(out.device))
    assert set(sm.graph_module.pipeline._streams) == {torch.device(d) for d in devices}
    for (name, p), q in zip(sm.named_parameters(), reference.parameters(), strict=True):
        assert_same(p.grad, q.grad.to(p.device), name=f"{name}.grad")


@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("name", ["tied_lm", "gpt2"])
def test_autocast_reaches_every_stage(name, microbatches):
    model, (ids,), _ = models.REGISTRY[name]()
    ids = torch.cat([ids, ids.flip(0)])
    model.eval()
    reference = copy.deepcopy(model)
    sm = autosplit.autosplit(model, devices=2, example_inputs=(ids,), microbatches=microbatches)
    kwargs = {"use_cache": False} if name == "gpt2" else {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = sm(ids), reference(ids, **kwargs)
    logits, expected = out["logits"], want["logits"]
    assert logits.dtype == expected.dtype == torch.bfloat16
    assert_same(logits, expected)
    logits.float().square().mean().backward()
    expected.float().square().mean().backward()
    # float32 gradients held to float32's tolerance: each stage runs the reference's bf16 ops on the
    # same values, so they agree to ~2e-7 of their size, and a stage left outside autocast is caught
    for (n, p), q in zip(sm.named_parameters(), reference.parameters(), strict=True):
        assert_same(p.grad, q.grad, name=f"{n}.grad")


@pytest.mark.parametrize("microbatches", [1, 2])
def test_an_exported_split_refuses_other_shapes_with_a_clear_error(microbatches):
    model, (ids,), _ = models.gpt2()
    ids = torch.cat([ids, ids.flip(0)])
    sm = autosplit.autosplit(model.eval(), devices=2, example_inputs=(ids,), microbatches=microbatches)
    sm(ids)
    shape = "\\(4, 8\\)" if microbatches == 1 else "\\(2, 8\\) per microbatch \\(of 2\\)"
    with pytest.raises(autosplit.InputSignatureError, match=f"'input_ids' has shape {shape}.*torch.export"):
        sm(ids[:, :8])


@pytest.mark.parametrize("export", [False, True])
def test_a_dropout_written_always_on_stays_on_in_eval_mode(export):
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            if export and x.dim() == 2:  # a branch on a shape: symbolic_trace fails, export captures it
                x = x * 1.0
            x = F.dropout(self.a(x), 0.5)  # training defaults to True: drops in eval mode too
            return self.b(F.dropout(x, 0.5, training=self.training))

    torch.manual_seed(0)
    model, x = Mixed(), torch.randn(4, 8)
    reference = copy.deepcopy(model)
    sm = autosplit.autosplit(model, devices=2, example_inputs=(x,))
    assert sum(isinstance(m, InMode) for m in sm.graph_module.modules()) == 1  # only the second follows the mode
    for mode in (True, False):
        sm.train(mode)
        reference.train(mode)
        torch.manual_seed(5)
        out = sm(x)
        torch.manual_seed(5)
        assert_same(out, reference(x))


def _same_training(sm, reference, *inputs, **kwargs):
    """One forward and backward of each: outputs and every gradient equal."""
    out = sm(*inputs, **kwargs)
    want = reference(*inputs, **kwargs)
    assert_same(out, want, name="output")
    out.square().mean().backward()
    want.square().mean().backward()
    for (name, p), q in zip(sm.named_parameters(), reference.parameters(), strict=True):
        assert_same(p.grad, q.grad, name=name)


@pytest.mark.parametrize("export", [False, True])
def test_a_sequence_first_input_is_cut_along_its_declared_batch_dimension(export):
    torch.manual_seed(0)
    model = models.SeqFirst(branch=export)
    x, bias = torch.randn(4, 4, 8), torch.randn(4, 8)  # (seq, batch, hidden) with seq = batch; (seq, hidden)
    reference = copy.deepcopy(model)
    sm = autosplit.autosplit(model, devices=2, example_inputs=(x, bias), microbatches=2,
                             batch_dims={"x": 1, "bias": None})
    assert sm.graph_module.pipeline.batch_dims == {"x": 1, "bias": None}
    _same_training(sm, reference, x, bias)
    x_grad = x.clone().requires_grad_()
    sm(x_grad, bias).sum().backward()
    x_want = x.clone().requires_grad_()
    reference(x_want, bias).sum().backward()
    assert_same(x_grad.grad, x_want.grad, name="x.grad")


def test_an_input_that_may_hold_the_batch_elsewhere_is_refused_before_anything_moves():
    torch.manual_seed(0)
    model = models.SeqFirst()
    x, bias = torch.randn(4, 4, 8), torch.randn(4, 8)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    fix = "batch_dims=\\{'x': 1\\}.*batch_dims=\\{'x': None\\}"
    with pytest.raises(MicrobatchError, match=f"input 'x' has shape \\(4, 4, 8\\).*{fix}"):
        autosplit.autosplit(model, devices=2, example_inputs=(x, bias), microbatches=2)
    sm = autosplit.autosplit(model, devices=2, microbatches=2)  # planned at the first call: refused there
    for _ in range(2):  # and again, not "no plan": the refused batch left the split to be built
        with pytest.raises(MicrobatchError, match=f"input 'x' has shape \\(4, 4, 8\\).*{fix}"):
            sm(x, bias)
    assert sm.graph_module is None
    for name, t in model.state_dict().items():
        assert t.device.type == "cpu" and torch.equal(t, before[name]), name


def test_a_square_input_is_refused_unless_declared():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(4, 4)  # (batch, features) with features = batch
    with pytest.raises(MicrobatchError, match="input 'input' has shape \\(4, 4\\).*batch_dims=\\{'input': 1\\}"):
        autosplit.autosplit(copy.deepcopy(model), devices=2, example_inputs=(x,), microbatches=2)
    reference = copy.deepcopy(model)
    sm = autosplit.autosplit(model, devices=2, example_inputs=(x,), microbatches=2, batch_dims={"input": 0})
    _same_training(sm, reference, x)


def test_batch_first_inputs_with_a_mask_need_no_declaration():
    model, (x,), kwargs = models.masked()
    x, mask = torch.cat([x, -x]), torch.cat([kwargs["mask"], kwargs["mask"].flip(1)])
    reference = copy.deepcopy(model)
    sm = autosplit.autosplit(model, devices=2, example_inputs=(x,), example_kwargs={"mask": mask, "scale": 0.5},
                             microbatches=2)
    assert sm.graph_module.pipeline.batch_dims == {"x": 0, "mask": 0, "scale": None}
    _same_training(sm, reference, x, mask=mask, scale=0.5)


def test_bad_batch_dims_are_refused_with_the_inputs_and_the_fix():
    model = models.SeqFirst()
    x, bias = torch.randn(4, 4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="batch_dims names \\['y'\\].*its inputs are x, bias"):
        autosplit.autosplit(model, devices=2, microbatches=2, batch_dims={"y": 1})
    with pytest.raises(TypeError, match="batch_dims\\['x'\\] must be the int dimension.*got '1'"):
        autosplit.autosplit(model, devices=2, microbatches=2, batch_dims={"x": "1"})
    with pytest.raises(TypeError, match="batch_dims must map forward-argument names"):
        autosplit.autosplit(model, devices=2, microbatches=2, batch_dims=[1])
    with pytest.raises(ValueError, match="batch_dims=\\{'x': 3\\} is out of range for 'x' of shape \\(4, 4, 8\\)"):
        autosplit.autosplit(model, devices=2, example_inputs=(x, bias), microbatches=2,
                            batch_dims={"x": 3, "bias": None})
    with pytest.raises(MicrobatchError, match="input 'bias' has shape \\(4, 8\\): 8 along its batch dimension 1, "
                                              "but the batch is 2"):
        autosplit.autosplit(model, devices=2, example_inputs=(x[:, :2], bias), microbatches=2,
                            batch_dims={"x": 1, "bias": 1})


def test_a_capture_from_specs_that_name_the_batch_declares_its_dimension():
    torch.manual_seed(0)
    model = models.SeqFirst()
    reference = copy.deepcopy(model)
    one = (autosplit.spec((4, 2, 8), dims=("seq", "batch", None)), autosplit.spec((4, 8)))  # one microbatch
    traced = autosplit.capture(model, one)
    plan = autosplit.solve(autosplit.OpGraph.from_traced(traced), Cluster.parse("2xh100"),
                           autosplit.SolverOptions(microbatches=2), costs=price_graph(traced.graph_module),
                           parameters=traced.parameters)
    sm = split_module(model, traced, plan, ["cpu", "cpu"], microbatches=2, batch_dims={"bias": None})
    x, bias = torch.randn(4, 4, 8), torch.randn(4, 8)
    _same_training(sm, reference, x, bias)
    assert sm.graph_module.pipeline.batch_dims == {"x": 1, "bias": None}


def test_every_tensor_of_a_container_input_is_cut_along_its_one_batch_dimension():
    x, pair = torch.randn(4, 2), (torch.randn(4, 3), torch.randn(4, 5))
    assert resolve_batch_dims({"x": x, "pair": pair}, microbatches=2) == {"x": 0, "pair": 0}
    assert [tuple(t.shape) for t in cut_microbatches([x, pair], 2, [0, 0])[1][1]] == [(2, 3), (2, 5)]
    mixed = (torch.randn(4, 3), torch.randn(3))
    with pytest.raises(MicrobatchError, match="'pair' holds tensors with and without the batch.*'pair': None"):
        resolve_batch_dims({"x": x, "pair": mixed}, microbatches=2)
    assert resolve_batch_dims({"x": x, "pair": mixed}, {"pair": None}, microbatches=2) == {"x": 0, "pair": None}


def test_a_microbatch_error_names_the_output_by_its_place_in_the_model_output():
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.b(self.a(x))
            return h, {"loss": h.square().mean(), "h": h}

    x = torch.randn(6, 5, 4)
    with pytest.raises(MicrobatchError, match=r"^the model's output\[1\]\['loss'\] is a scalar "):
        autosplit.autosplit(Nested(), devices=["cpu", "cpu"], example_inputs=(x,), microbatches=2)


class _DefaultShift(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, shift=torch.arange(4.0).unsqueeze(1).expand(4, 8)):
        return self.b(self.a(x) + shift)


def test_a_default_tensor_argument_is_part_of_the_split_and_refused_where_microbatches_would_cut_it():
    model, x = _DefaultShift(), torch.randn(4, 8)
    reference = copy.deepcopy(model)
    split = autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=(x,))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference)]
    out, want = split(x), reference(x)
    assert_same(out, want)
    out.square().sum().backward()
    want.square().sum().backward()
    for (name, got), expected in zip(model.named_parameters(), reference.parameters()):
        assert_same(got.grad, expected.grad, name=f"{name}.grad")
    for optimizer in optimizers:
        optimizer.step()
    for (name, got), expected in zip(model.named_parameters(), reference.parameters()):
        assert_same(got, expected, name=name)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(MicrobatchError, match=r"default for 'shift' is a tensor of shape \(4, 8\), with the batch's "
                                              r"size \(4\).*Pass it at every call"):
        autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=(x,), microbatches=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    shift = torch.arange(4.0).unsqueeze(1).expand(4, 8)
    passed = autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=(x,), example_kwargs={"shift": shift},
                                 microbatches=2)
    assert_same(passed(x, shift=shift), model(x))  # the model, after the step both took

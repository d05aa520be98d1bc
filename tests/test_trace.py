"""Capture and annotation: every registry model, with real weights and on meta."""

import contextlib
import copy
import dataclasses
import io

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import autosplit
import models
from autosplit import InputSignatureError, TraceError, capture, spec
from autosplit.trace import CACHE_OFF
from numerics import assert_same

HF = {"gpt2", "llama", "mixtral"}


def assert_same_outputs(got, want):
    """Same structure (types included) and bit-identical tensors."""
    assert type(got) is type(want)
    if dataclasses.is_dataclass(want) and type(want) not in pytree.SUPPORTED_NODES:
        fields = [f.name for f in dataclasses.fields(want)]
        got, want = [getattr(got, f) for f in fields], [getattr(want, f) for f in fields]
    got_leaves, got_spec = pytree.tree_flatten(got)
    want_leaves, want_spec = pytree.tree_flatten(want)
    assert got_spec == want_spec
    for g, w in zip(got_leaves, want_leaves):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_captured_graph_computes_what_the_model_computes(name):
    model, args, kwargs = models.REGISTRY[name]()
    model.eval()
    traced = capture(model, args, kwargs)
    assert traced.tracer == ("export" if name in HF else "fx")
    # A model that caches by default is captured with use_cache=False, an input of its graph.
    off = {"use_cache": False} if name in HF else {}
    assert traced.example_kwargs.get("use_cache", False) is False and (CACHE_OFF in traced.notes) == bool(off)
    with torch.no_grad():
        got = traced.graph_module(*args, **kwargs, **off)
        want = model(*args, **kwargs, **off)
    assert_same_outputs(got, want)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_every_node_is_annotated(name, device):
    model, args, kwargs = models.REGISTRY[name](device)
    traced = capture(model, args, kwargs)
    modules = dict(model.named_modules(remove_duplicate=False))
    state = set(traced.parameters) | set(traced.buffers)
    assert list(traced.nodes) == [n.name for n in traced.graph.nodes]
    for node in traced.graph.nodes:
        info = traced.nodes[node.name]
        assert node.meta["autosplit"] is info
        assert info.op == node.op
        assert info.module_path in modules, info
        assert info.module_type == f"{type(modules[info.module_path]).__module__}.{type(modules[info.module_path]).__qualname__}"
        assert set(info.reads) <= state, info
        assert len(info.shapes) == len(info.dtypes)
        itemsizes = [torch.empty((), dtype=d).element_size() for d in info.dtypes]
        assert info.output_bytes == sum(torch.Size(s).numel() * b for s, b in zip(info.shapes, itemsizes))
    placeholders = [traced.nodes[n.name] for n in traced.graph.nodes if n.op == "placeholder"]
    given = [x for x in list(args) + list(kwargs.values()) if isinstance(x, torch.Tensor)]
    assert [p.shape for p in placeholders if p.single_tensor] == [tuple(x.shape) for x in given]
    compute = [i for i in traced.nodes.values() if i.op.startswith("call_")]
    assert compute and all(i.module_path or not i.scope for i in compute)
    assert sum(i.output_bytes for i in compute) > 0


def test_meta_capture_allocates_no_weights_and_takes_specs():
    model, _, _ = models.gpt2("meta")
    traced = capture(model, (spec((4, 24), dtype=torch.long),))
    assert all(p.is_meta for p in traced.graph_module.parameters())
    assert traced.device.type == "meta"
    assert traced.example_args == (spec((4, 24), dtype=torch.long),)
    embedding = next(i for i in traced.nodes.values() if i.target == "aten.embedding.default")
    assert embedding.shape == (4, 24, 32) and embedding.dtype == torch.float32
    assert traced.parameter_count() == sum(p.numel() for p in model.parameters())


def test_linear_annotations():
    model = models.MLP()
    traced = capture(model, spec((5, 16)))
    info = traced.nodes["layers_0"]
    assert (info.op, info.target) == ("call_module", "layers.0")
    assert info.shape == (5, 32) and info.dtype == torch.float32 and info.output_bytes == 5 * 32 * 4
    assert info.module_path == "layers.0" and info.module_type == "torch.nn.modules.linear.Linear"
    assert info.reads == ("layers.0.weight", "layers.0.bias")
    assert info.scope == ("layers", "layers.0")


def test_exported_linear_annotations():
    model = models.MLP()
    traced = capture(model, spec((5, 16)), tracer="export")
    first = next(i for i in traced.nodes.values() if i.target == "aten.linear.default")
    assert first.module_path == "layers.0" and first.shape == (5, 32)
    assert first.reads == ("layers.0.weight", "layers.0.bias")
    weight = next(i for i in traced.nodes.values() if i.op == "get_attr")
    assert weight.reads == ("layers.0.weight",) and weight.shape == (32, 16) and weight.module_path == "layers.0"


def test_batchnorm_buffers_are_read_and_capture_changes_nothing():
    model, args, _ = models.rescnn()
    model.train()
    before = copy.deepcopy(model.state_dict())
    traced = capture(model, args)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"capture changed {key}"
    bn = traced.nodes["stage1_0_bn1"]
    assert "stage1.0.bn1.running_mean" in bn.reads and "stage1.0.bn1.num_batches_tracked" in bn.reads
    cat = next(i for i in traced.nodes.values() if i.target == "torch.cat")
    assert cat.shape == (2, 16, 12, 12) and cat.module_path == ""
    # The graph, run in training mode, updates the model's running statistics like the model does.
    reference = copy.deepcopy(model)
    traced.graph_module(*args).sum().backward()
    reference(*args).sum().backward()
    for (name, got), want in zip(model.named_buffers(), reference.buffers()):
        assert_same(got, want, name=name)


class _KeepsHidden(nn.Module):
    """Keeps its hidden activation on itself in forward, as pipelining's MLPModuleWithDw does."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.hidden = "not yet run"

    def forward(self, x):
        self.hidden = torch.relu(self.a(x))
        self.calls = getattr(self, "calls", 0) + 1
        return self.b(self.hidden)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_attributes_a_forward_sets_keep_no_tracer_values(tracer):
    """A traced forward runs on stand-ins (an fx Proxy, a FakeTensor); what it stores on its
    module must not stay there: the model must still save, and hold what it held."""
    model = _KeepsHidden()
    # export tells the user such a tensor should be a buffer; fx says nothing
    told = pytest.warns(UserWarning, match="self.hidden was assigned during export") if tracer == "export" \
        else contextlib.nullcontext()
    with told:
        traced = capture(model, (torch.randn(3, 4),), tracer=tracer)
    assert model.hidden == "not yet run" and not hasattr(model, "calls")
    torch.save(model, io.BytesIO())
    x = torch.randn(3, 4)
    assert_same(traced.graph_module(x), model(x))


def test_tied_weights_are_one_parameter_with_an_alias():
    model, args, _ = models.tied_lm()
    traced = capture(model, args)
    assert traced.aliases == {"head.weight": "embed.weight"}
    assert "head.weight" not in traced.parameters and traced.canonical("head.weight") == "embed.weight"
    assert traced.nodes["head"].reads == ("embed.weight",)
    assert traced.nodes["embed"].reads == ("embed.weight",)


def test_a_module_called_twice_keeps_both_call_sites():
    model, args, _ = models.shared_block()
    traced = capture(model, args)
    calls = [i for i in traced.nodes.values() if i.target == "shared.0"]
    assert [c.scope for c in calls] == [("shared", "shared.0"), ("shared@1", "shared.0@1")]
    assert calls[0].reads == calls[1].reads == ("shared.0.weight", "shared.0.bias")


def test_keyword_inputs_and_flags():
    model, args, kwargs = models.masked()
    traced = capture(model, args, kwargs)
    placeholders = [n.target for n in traced.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x", "mask", "scale"]
    x, mask = args[0], kwargs["mask"]
    assert_same(traced.graph_module(x, mask=mask, scale=0.5), model(x, mask=mask, scale=0.5))
    # Without a mask the other branch is captured.
    unmasked = capture(model, args)
    assert_same(unmasked.graph_module(x), model(x))


def test_dataclass_outputs_with_both_tracers():
    model, args, _ = models.dataclass_out()
    for tracer in ("fx", "export"):
        traced = capture(model, args, tracer=tracer)
        assert_same_outputs(traced.graph_module(*args), model(*args))


@pytest.mark.parametrize("name", sorted(HF))
def test_hugging_face_models_train_through_the_graph(name):
    model, args, kwargs = models.REGISTRY[name]()
    model.train()
    assert model.config.use_cache is True
    reference = copy.deepcopy(model)
    traced = capture(model, args, kwargs)
    assert model.config.use_cache is True and model.training
    assert traced.training
    traced.graph_module(*args, use_cache=False, **kwargs).logits.square().mean().backward()
    reference(*args, use_cache=False, **kwargs).logits.square().mean().backward()
    for (name_, got), want in zip(model.named_parameters(), reference.parameters()):
        assert_same(got.grad, want.grad, name=f"{name_}.grad")


def test_export_can_be_forced_and_fx_refuses_hugging_face():
    model, args, _ = models.mlp()
    traced = capture(model, args, tracer="export")
    assert traced.tracer == "export"
    assert_same(traced.graph_module(*args), model(*args))
    gpt2, ids, _ = models.gpt2("meta")
    with pytest.raises(TraceError, match="torch.fx.symbolic_trace"):
        capture(gpt2, ids, tracer="fx")


def test_leaf_modules_by_class_and_by_name():
    model, args, _ = models.rescnn()
    by_class = capture(model, args, leaf_modules=[models.ResidualBlock])
    by_name = capture(model, args, leaf_modules=["stage1.0", "stage1.1", "stage2.0", "stage2.1"])
    for traced in (by_class, by_name):
        targets = [i.target for i in traced.nodes.values() if i.op == "call_module"]
        assert "stage1.0" in targets and "stage1.0.conv1" not in targets
        assert traced.nodes["stage1_0"].reads[0] == "stage1.0.conv1.weight"
        assert_same(traced.graph_module(*args), model(*args))


def test_untraceable_model_names_the_module_the_line_and_the_fixes():
    model = models.GatedNet()
    with pytest.raises(TraceError) as error:
        capture(model, (torch.randn(2, 8),))
    message = str(error.value)
    assert "module 'gate' (DataDependentGate)" in message
    assert "models.py:" in message and "if x.sum() > 0" in message
    assert "torch.fx.symbolic_trace" in message and "torch.export" in message
    assert "leaf_modules=[DataDependentGate]" in message
    assert "def forward" not in message  # one message, not a graph dump


def test_marking_the_data_dependent_module_a_leaf_makes_it_capturable():
    model = models.GatedNet()
    x = torch.randn(2, 8)
    traced = capture(model, (x,), leaf_modules=[models.DataDependentGate])
    assert_same(traced.graph_module(x), model(x))
    # the advice works with the function the user called
    with pytest.raises(TraceError, match=r"leaf_modules=\[DataDependentGate\]"):
        autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=(x,))
    split = autosplit.autosplit(model, devices=["cpu", "cpu"], example_inputs=(x,),
                                leaf_modules=[models.DataDependentGate])
    assert_same(split(x), model(x))
    assert autosplit.plan(model, devices=2, example_inputs=(x,), leaf_modules=["gate"]).stages


@pytest.mark.parametrize(
    "args, kwargs, fragment",
    [
        ((torch.randn(2, 8),) * 4, {}, "too many positional arguments"),
        ((), {}, "missing a required argument: 'x'"),
        ((torch.randn(2, 8),), {"maks": torch.ones(2, 8)}, "unexpected keyword argument 'maks'"),
    ],
)
def test_inputs_that_do_not_fit_the_signature(args, kwargs, fragment):
    with pytest.raises(InputSignatureError) as error:
        capture(models.MaskedModel(), args, kwargs)
    assert isinstance(error.value, TypeError)
    message = str(error.value)
    assert fragment in message and "MaskedModel.forward(x: " in message and "mask:" in message


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        capture(lambda x: x, (torch.randn(2),))
    with pytest.raises(ValueError, match="tracer must be one of"):
        capture(models.MLP(), spec((2, 16)), tracer="dynamo")
    with pytest.raises(TypeError, match="wrap a single input"):
        capture(models.MLP(), {"x": torch.randn(2, 16)})
    with pytest.raises(TypeError, match="leaf_modules"):
        capture(models.MLP(), spec((2, 16)), leaf_modules=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="non-negative ints"):
        spec((2, -1))
    with pytest.raises(TypeError, match="torch.dtype"):
        spec((2, 3), dtype="float32")


def test_public_surface():
    assert set(autosplit.__all__) >= {"capture", "spec", "Traced", "OpGraph", "TraceError", "InputSignatureError"}


def test_real_propagation_fallback_leaves_buffers_alone():
    # The gate's branch cannot run on meta, so shapes are found with the real weights; the
    # BatchNorm statistics must not move.
    model = nn.Sequential(nn.BatchNorm1d(8), models.DataDependentGate())
    model.train()
    before = copy.deepcopy(model.state_dict())
    traced = capture(model, (torch.randn(4, 8) + 1,), leaf_modules=[models.DataDependentGate])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert traced.nodes["_1"].shape == (4, 8)


def test_dynamic_capture_keeps_named_dimensions_symbolic():
    model, _, _ = models.llama("meta")
    ids = spec((2, 16), dtype=torch.long, dims=("batch", "seq"))
    traced = capture(model, (ids,), {"attention_mask": ids}, dynamic=True)
    assert traced.tracer == "export" and set(traced.symbols) == {"batch", "seq"}
    placeholder = next(n for n in traced.graph.nodes if n.op == "placeholder")
    assert [str(d) for d in placeholder.meta["val"].shape] == [str(traced.symbols["batch"]), str(traced.symbols["seq"])]
    # Annotations hold the traced sizes, and reading them did not specialize the symbols.
    assert traced.nodes[placeholder.name].shape == (2, 16)
    assert str(placeholder.meta["val"].shape[0]) == str(traced.symbols["batch"])
    with pytest.raises(ValueError, match="named dims"):
        capture(model, (spec((2, 16), dtype=torch.long),), dynamic=True)
    with pytest.raises(ValueError, match='tracer="export"'):
        capture(model, (ids,), dynamic=True, tracer="fx")
    with pytest.raises(ValueError, match="identifier or None"):
        spec((2, 16), dims=("batch",))


def test_example_inputs_a_layer_cannot_take_name_the_layer_and_the_shape():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(TraceError, match=r"reach layer '0' \(Linear\) with inputs of shape \(3, 5\)") as caught:
        capture(model, (torch.randn(3, 5),))
    assert "data-dependent" not in str(caught.value)

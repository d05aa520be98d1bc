"""Per-op prices, roofline times, profiling and calibration, memory accounting, symbolic costs."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from autosplit import capture, presets, spec
from cost_models.analytic import AnalyticCostModel, Efficiency, Sample
from cost_models.devices import cpu_device, get_device
from cost_models.memory import (
    activation_bytes,
    device_peak_terms,
    in_flight_profile,
    interleaved_1f1b_order,
    kv_cache_bytes,
    max_fitting,
    microbatches_in_flight,
    peak_terms,
    stage_memory,
    training_state_bytes,
    weight_bytes,
)
from cost_models.ops import OpCost, price_graph
from cost_models.profiled import ProfiledCostModel
from cost_models.symbolic import symbolic_costs


def priced(module, *inputs, tracer="auto", **kwargs):
    traced = capture(module, inputs, tracer=tracer, **kwargs)
    return traced, price_graph(traced.graph_module)


def only(costs, op_class):
    found = [c for c in costs.values() if c.op_class == op_class]
    assert len(found) == 1, [c.op_class for c in costs.values()]
    return found[0]


# --------------------------------------------------------------------------- FLOPs and bytes


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_linear_flops_bytes_and_saved_tensors(tracer):
    b, d_in, d_out = 8, 64, 32
    _, costs = priced(nn.Linear(d_in, d_out), spec((b, d_in)), tracer=tracer)
    linear = only(costs, "matmul")
    assert linear.fwd_flops == 2 * b * d_in * d_out
    # Backward: gradient of the weight only (the input needs no gradient).
    assert linear.bwd_flops == 2 * b * d_in * d_out
    assert linear.fwd_bytes == 4 * (b * d_in + d_in * d_out + d_out + b * d_out)
    assert linear.output_bytes == 4 * b * d_out
    assert linear.saved_bytes == 4 * b * d_in  # the input, for the weight's gradient


def test_backward_flops_double_when_the_input_needs_a_gradient():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    _, costs = priced(model, spec((4, 16)))
    first, second = costs["_0"], costs["_1"]
    assert first.bwd_flops == first.fwd_flops  # weight gradient only
    assert second.bwd_flops == 2 * second.fwd_flops  # weight and input gradients


def test_conv_flops_equal_the_closed_form():
    b, c_in, c_out, h, w, k = 2, 3, 8, 10, 10, 3
    _, costs = priced(nn.Conv2d(c_in, c_out, k, padding=1), spec((b, c_in, h, w)))
    conv = only(costs, "conv")
    assert conv.fwd_flops == 2 * b * c_out * h * w * c_in * k * k


class Attention(nn.Module):
    def __init__(self, causal):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_flops_bytes_and_saved_tensors_are_the_fused_kernels(causal):
    b, h, l, d = 2, 4, 32, 16
    q = spec((b, h, l, d))
    traced, costs = priced(Attention(causal), q, q, q)
    attention = only(costs, "attention")
    pairs = l * (l + 1) // 2 if causal else l * l
    assert attention.fwd_flops == 4 * b * h * pairs * d
    tensor_bytes = 4 * b * h * l * d
    assert attention.fwd_bytes == 4 * tensor_bytes  # read q, k, v; write the output
    assert attention.fwd_kernels == 1


def test_elementwise_ops_cost_bytes_and_views_are_free():
    class Net(nn.Module):
        def forward(self, x):
            return (x.view(8, 8).t() * 2).relu()

    _, costs = priced(Net(), spec((64,)))
    assert costs["view"].op_class == "view" and costs["view"].fwd_bytes == 0 and costs["view"].fwd_kernels == 0
    assert costs["mul"].op_class == "elementwise" and costs["mul"].fwd_bytes == 2 * 64 * 4


def test_identical_layers_are_measured_once_and_keep_their_own_saved_keys():
    traced, costs = priced(models.MLP(depth=4), spec((4, 16)))
    first, second = costs["layers_2"], costs["layers_4"]  # two identical 32→32 linears
    assert first.fwd_flops == second.fwd_flops
    assert set(first.saved) == {"layers_1"} and set(second.saved) == {"layers_3"}


def test_activation_bytes_count_a_shared_tensor_once():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            h = x * 2
            return self.a(h) + self.b(h)

    x = torch.randn(4, 8, requires_grad=True)
    traced, costs = priced(Fork(), x)
    kept = activation_bytes(costs, ["a", "b"])
    assert costs["a"].saved == {"mul": 4 * 4 * 8} == costs["b"].saved
    assert kept == 4 * 4 * 8


def test_mixture_of_experts_grouped_matmuls_are_priced():
    model, args, _ = models.mixtral("meta")
    traced, costs = priced(model, *args)
    cfg = model.config
    routed = [c for n, c in costs.items() if "grouped_mm" in traced.nodes[n].target]
    assert routed and all(c.op_class == "matmul" for c in routed)
    tokens = args[0].numel() * cfg.num_experts_per_tok  # every token visits top-k experts
    per_layer = 2 * tokens * cfg.hidden_size * 3 * cfg.intermediate_size  # gate, up and down
    assert sum(c.fwd_flops for c in routed) == cfg.num_hidden_layers * per_layer
    assert all(c.bwd_flops == 2 * c.fwd_flops for c in routed)  # input and expert weight gradients


def test_gpt2_forward_flops_match_the_textbook_formula():
    model, inputs = presets.build("gpt2", batch=1, seq=256)
    traced, costs = priced(model, *inputs)
    cfg, tokens = model.config, 256
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if ".h." in n)
    expected = 2 * tokens * (non_embedding + cfg.n_embd * cfg.vocab_size)  # layers and LM head
    expected += cfg.n_layer * 4 * tokens * tokens * cfg.n_embd  # attention scores and weighted sum
    total = sum(c.fwd_flops for c in costs.values())
    assert abs(total - expected) / expected < 0.05


class _HostBackward(torch.autograd.Function):
    """Doubles its input; the backward reads the gradient on the host, which meta tensors cannot."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return torch.from_numpy(grad.cpu().numpy() * 2)


@torch.fx.wrap  # one node for the traced graph, not the ops of its forward
def _host_double(x):
    return _HostBackward.apply(x)


class _HostBackwardNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return _host_double(self.lin(x))


def test_ops_that_cannot_run_on_meta_say_why_they_count_as_free():
    model, args, _ = models.no_meta_kernel()
    _, costs = priced(model, *args)
    assert costs["unique"].unpriced.startswith("forward cannot run on meta: NotImplementedError: aten::_unique2")
    assert costs["unique"].fwd_flops == costs["unique"].fwd_bytes == 0
    assert "\n" not in costs["unique"].unpriced and len(costs["unique"].unpriced) < 250
    assert all(not c.unpriced for name, c in costs.items() if name != "unique")
    _, costs = priced(_HostBackwardNet(), torch.randn(4, 8), tracer="fx")
    host = costs["_host_double"]
    assert host.unpriced.startswith("backward cannot run on meta, counted as free: NotImplementedError")
    assert host.fwd_bytes > 0 and host.bwd_bytes == host.bwd_kernels == 0
    assert not costs["lin"].unpriced


# --------------------------------------------------------------------------- roofline time


def test_roofline_picks_the_bound_and_adds_kernel_overhead():
    h100 = get_device("h100")
    model = AnalyticCostModel()
    matmul = OpCost(op_class="matmul", dtype=torch.bfloat16, fwd_flops=int(2.95e12), fwd_bytes=int(0.99e9), fwd_kernels=1)
    t = model.time(matmul, h100)
    expected = 2.95e12 / (h100.flops_for(torch.bfloat16) * 0.75) + h100.kernel_overhead_s
    assert t.fwd_s == pytest.approx(expected) and t.bwd_s == 0
    add = OpCost(op_class="elementwise", dtype=torch.bfloat16, fwd_bytes=int(3e9), fwd_kernels=1)
    assert model.time(add, h100).fwd_s == pytest.approx(3e9 / (h100.memory_bandwidth_bytes_per_s * 0.8)
                                                       + h100.kernel_overhead_s)
    # fp32 matmuls get the tf32 peak only when allowed.
    fp32 = OpCost(op_class="matmul", dtype=torch.float32, fwd_flops=int(1e12), fwd_kernels=1)
    assert AnalyticCostModel(allow_tf32=True).time(fp32, h100).fwd_s < model.time(fp32, h100).fwd_s


def test_efficiency_validation():
    with pytest.raises(ValueError, match="unknown op class"):
        Efficiency(compute={"gemm": 0.7})
    with pytest.raises(ValueError, match="must be positive"):
        Efficiency(memory={"matmul": 0})
    assert Efficiency(compute={"matmul": 0.9}).compute["conv"] == 0.6


def test_calibration_recovers_a_known_model_from_profiled_linear_ops(tmp_path):
    """Calibration fits the times it is given: samples made by a model with other efficiencies and
    overheads (on the costs of real linear layers, profiled here for their structure) are fitted
    back within 2%. How close the fit comes to this CPU's measured times is a benchmark figure
    (benchmarks/bench_costs.py), not a unit test: this machine's speed varies with its load."""
    from cost_models.analytic import Efficiency

    cpu = cpu_device()
    profiler = ProfiledCostModel("cpu", repeats=2, cache_dir=str(tmp_path), progress=False)
    truth = AnalyticCostModel(efficiency=Efficiency(compute={**Efficiency().compute, "matmul": 0.31},
                                                    kernel_overhead_s=7e-6, backward_kernel_overhead_s=11e-6))
    samples = []
    for d in (128, 256, 512, 1024, 2048):
        traced = capture(nn.Linear(d, d), (torch.randn(128, d, requires_grad=True),))
        costs = price_graph(traced.graph_module)
        measured = profiler.measure(traced.graph_module)
        assert all(t.fwd_s > 0 and t.bwd_s > 0 for n, t in measured.items() if costs[n].fwd_flops)
        for n in measured:
            known = truth.time(costs[n], cpu)
            samples.append(Sample(costs[n], cpu, known.fwd_s, known.bwd_s))
    assert all(s.cost.bwd_flops == 2 * s.cost.fwd_flops for s in samples)  # input and weight grads
    calibrated = AnalyticCostModel().calibrate(samples)
    for s in samples:
        fitted = calibrated.time(s.cost, cpu)
        assert fitted.fwd_s == pytest.approx(s.fwd_s, rel=0.02) and fitted.bwd_s == pytest.approx(s.bwd_s, rel=0.02)


def test_profiles_are_cached_on_disk(tmp_path, monkeypatch):
    traced = capture(models.MLP(), (torch.randn(4, 16),))
    first = ProfiledCostModel("cpu", cache_dir=str(tmp_path), repeats=2, progress=False).measure(traced.graph_module)
    assert all(t.fwd_s > 0 for n, t in first.items() if n.startswith("layers"))
    assert list(tmp_path.iterdir())
    again = ProfiledCostModel("cpu", cache_dir=str(tmp_path), repeats=2, progress=False)
    monkeypatch.setattr(again, "_measure_node", lambda *a, **k: pytest.fail("measured twice"))
    assert again.measure(traced.graph_module) == first


def test_profiler_rejects_what_it_cannot_use():
    with pytest.raises(ValueError, match="repeats"):
        ProfiledCostModel("cpu", repeats=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            ProfiledCostModel("cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_profiles_on_cuda_with_events(tmp_path):
    traced = capture(nn.Linear(256, 256), (torch.randn(32, 256),))
    times = ProfiledCostModel("cuda:0", cache_dir=str(tmp_path), progress=False).measure(traced.graph_module)
    assert all(t.fwd_s > 0 and t.bwd_s > 0 for t in times.values())


# --------------------------------------------------------------------------- memory


def test_bf16_adamw_training_of_a_7b_model_costs_16_bytes_per_parameter_plus_activations():
    model, inputs = presets.build("llama-7b", batch=1, seq=64)
    model = model.to(torch.bfloat16)
    traced, costs = priced(model, *inputs)
    n = traced.parameter_count()
    assert 6.5e9 < n < 7e9
    assert training_state_bytes(n).total_bytes == 16 * n
    memory = stage_memory(n, costs, costs.keys(), precision="bf16-mixed", optimizer="adamw", device_kind="cpu")
    assert memory.weights_bytes + memory.grads_bytes + memory.optimizer_bytes == 16 * n
    assert memory.activations_bytes == activation_bytes(costs, costs.keys()) > 0
    # Per layer and token, a bf16 Llama-7B layer keeps tens of hidden-size vectors for backward.
    per_token_layer = memory.activations_bytes / (64 * 32 * model.config.hidden_size * 2)
    assert 5 < per_token_layer < 40
    assert memory.total_bytes > 16 * n


def test_training_states_per_precision_and_optimizer():
    assert training_state_bytes(1, precision="fp32", optimizer="sgd").total_bytes == 8
    assert training_state_bytes(1, precision="fp32", optimizer="sgd-momentum").total_bytes == 12
    assert training_state_bytes(1, precision="fp32", optimizer="adam").total_bytes == 16
    assert training_state_bytes(1, precision="bf16", optimizer="adamw").total_bytes == 8
    with pytest.raises(ValueError, match="unknown precision 'fp12'"):
        training_state_bytes(1, precision="fp12")
    with pytest.raises(ValueError, match="unknown optimizer 'lion'.*adamw"):
        training_state_bytes(1, optimizer="lion")


def test_inference_weights_quantization_and_kv_cache():
    assert weight_bytes(1000, torch.bfloat16) == 2000
    assert weight_bytes(1024, "int4") == pytest.approx(1024 * (0.5 + 2.5 / 128))
    assert weight_bytes(1024, "nf4") == pytest.approx(1024 * (0.5 + 4 / 64))
    assert weight_bytes(1000, "int8") > 1000
    # Llama-2-7B, 4096 tokens: 2 × 32 layers × 4096 × 4096 × 2 bytes = 2 GiB.
    assert kv_cache_bytes(batch=1, seq=4096, layers=32, kv_heads=32, head_dim=128) == 2 * 2**30
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        weight_bytes(1, "int3")
    with pytest.raises(ValueError, match="batch must be a non-negative int"):
        kv_cache_bytes(batch=-1, seq=1, layers=1, kv_heads=1, head_dim=1)


def test_microbatches_in_flight_per_schedule():
    assert microbatches_in_flight("gpipe", num_stages=4, stage=3, microbatches=8) == 8
    assert [microbatches_in_flight("1f1b", num_stages=4, stage=s, microbatches=8) for s in range(4)] == [4, 3, 2, 1]
    assert microbatches_in_flight("1f1b", num_stages=4, stage=0, microbatches=2) == 2
    with pytest.raises(ValueError, match="schedule must be one of"):
        microbatches_in_flight("zb", num_stages=2, stage=0, microbatches=2)
    with pytest.raises(ValueError, match=r"stage must be in \[0, 2\)"):
        microbatches_in_flight("1f1b", num_stages=2, stage=2, microbatches=2)


def test_interleaved_in_flight_follows_the_order_pytorch_runs():
    """The order of work priced for interleaved 1F1B is ScheduleInterleaved1F1B's own (built here
    with stand-ins for its stages: it only reads their ranks and counts), for every device of
    2-4 devices, 1-3 stages each and 1-12 microbatches; counts it refuses are refused too."""
    from types import SimpleNamespace

    from torch.distributed.pipelining import ScheduleInterleaved1F1B
    from torch.distributed.pipelining.schedules import _ComputationType

    for D, v, m in itertools.product(range(2, 5), range(1, 4), range(1, 13)):
        for r in range(D):
            stages = [SimpleNamespace(group_size=D, group_rank=r, num_stages=D * v, stage_index=r + k * D,
                                      is_last=False) for k in range(v)]
            try:
                actions = ScheduleInterleaved1F1B(stages, m).pipeline_order[r]
            except ValueError:
                with pytest.raises(ValueError, match="not a multiple of"):
                    interleaved_1f1b_order(r, devices=D, stages_per_device=v, microbatches=m)
                break
            theirs = [("F" if a.computation_type == _ComputationType.FORWARD else "B", (a.stage_index - r) // D,
                       a.microbatch_index) for a in actions if a is not None]
            assert interleaved_1f1b_order(r, devices=D, stages_per_device=v, microbatches=m) == theirs, (D, v, m, r)
    in_flight = [microbatches_in_flight("interleaved-1f1b", num_stages=8, stage=s, microbatches=8,
                                        stages_per_device=2) for s in range(8)]
    assert in_flight == [8, 8, 7, 5, 4, 4, 3, 1]
    # device 0 of 2, stages 0 and 2, 4 microbatches: F0 F0 F2 F2, then F0 B2, F0 B2, F2 B0, F2 B0, then B2 B2 B0 B0
    profile = in_flight_profile("interleaved-1f1b", num_stages=4, stages_per_device=2, device=0, microbatches=4)
    assert profile.tolist() == [[1, 0], [2, 0], [2, 1], [2, 2], [3, 2], [4, 1], [4, 1], [3, 2]]
    with pytest.raises(ValueError, match="runs one stage per device"):
        microbatches_in_flight("1f1b", num_stages=4, stage=0, microbatches=4, stages_per_device=2)


def test_a_device_of_one_stage_holds_what_the_stage_holds():
    quantities = dict(params=1e6, copies=2e5, activations=3e7, transient=5e7)
    for mode, gpu in itertools.product(("train", "infer"), (False, True)):
        alone = peak_terms(**quantities, in_flight=3, gpu=gpu, mode=mode)
        device = device_peak_terms([quantities], profile=np.array([[1], [3], [2]]), gpu=gpu, mode=mode)
        assert device == pytest.approx({k: float(v) for k, v in alone.items()}), (mode, gpu)


def test_inference_memory_has_no_gradients_or_optimizer_state():
    traced, costs = priced(models.MLP(), spec((4, 16)))
    memory = stage_memory(1000, costs, costs.keys(), mode="infer", weight_dtype="int4", device_kind="gpu")
    assert memory.grads_bytes == memory.optimizer_bytes == 0
    assert memory.weights_bytes == weight_bytes(1000, "int4")
    assert memory.workspace_bytes >= 512 * 2**20  # the CUDA context
    with pytest.raises(ValueError, match="mode must be one of"):
        stage_memory(1, costs, [], mode="serve")


# --------------------------------------------------------------------------- symbolic


def test_symbolic_costs_at_a_new_size_equal_a_fresh_trace():
    model, inputs = presets.build("gpt2", batch=2, seq=32)
    model.config.n_layer = 2
    model.transformer.h = model.transformer.h[:2]
    traced = capture(model, inputs, dynamic=True)
    symbolic = symbolic_costs(traced.graph_module, traced.symbols)
    batch, seq = symbolic.symbols["batch"], symbolic.symbols["seq"]
    linear = next(name for name, c in symbolic.items() if c.base.op_class == "matmul")
    assert symbolic[linear].fwd_flops.free_symbols == {batch, seq}
    # The attention term grows with seq squared.
    assert symbolic.total("fwd_flops").as_poly(batch, seq).degree(seq) == 2
    for size in (dict(batch=5, seq=32), dict(batch=3, seq=48)):
        fresh_model, fresh_inputs = presets.build("gpt2", batch=size["batch"], seq=size["seq"])
        fresh_model.transformer.h = fresh_model.transformer.h[:2]
        fresh = price_graph(capture(fresh_model, fresh_inputs).graph_module)
        at = symbolic.at(**size)
        total = lambda costs, field: sum(getattr(c, field) for c in costs.values())  # noqa: E731
        for field in ("fwd_flops", "bwd_flops", "fwd_bytes", "bwd_bytes", "saved_bytes"):
            assert total(at, field) == total(fresh, field), (size, field)
    with pytest.raises(ValueError, match="missing \\['seq'\\]"):
        symbolic.at(batch=4)


def test_the_largest_batch_that_fits_is_solved_from_the_symbolic_memory():
    model, inputs = presets.build("gpt2", batch=2, seq=32)
    model.transformer.h = model.transformer.h[:2]
    traced = capture(model, inputs, dynamic=True)
    symbolic = symbolic_costs(traced.graph_module, traced.symbols)
    batch, seq = symbolic.symbols["batch"], symbolic.symbols["seq"]
    activations = symbolic.activation_bytes()
    n = traced.parameter_count()
    capacity = 4 * 2**30

    def memory_at(b):
        costs = symbolic.at(batch=b, seq=1024)
        return stage_memory(n, costs, costs.keys(), precision="fp32", device_kind="cpu").total_bytes

    best = max_fitting(memory_at, capacity)
    assert memory_at(best) <= capacity < memory_at(best + 1)
    assert activations.subs({batch: best, seq: 1024}) > 0


def test_cost_models_never_imports_autosplit():
    import subprocess
    import sys

    code = "import sys, cost_models; assert not [m for m in sys.modules if m.startswith('autosplit')]"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_an_embedding_reads_the_rows_it_gathers_not_the_table():
    _, costs = priced(nn.Embedding(50_000, 64), spec((4, 8), dtype=torch.long))
    lookup = only(costs, "embedding")
    assert lookup.fwd_bytes == 2 * 4 * 8 * 64 * 4 + 4 * 8 * 8  # rows read and written, indices
    assert lookup.bwd_bytes >= 50_000 * 64 * 4  # the weight's gradient is written whole


def _stage_by_hand(tensors, wsf, wsb, a, j, n):
    """Saved bytes and transient peak of ops [a, j) run as a training stage, step by step, as
    ``OpsMemory`` describes it (a reference written out plainly)."""
    made = lambda t: a <= t.producer < j  # noqa: E731
    last = lambda t: max(t.readers, default=t.producer)  # noqa: E731
    received = sum(t.nbytes for t in tensors if t.producer < a <= last(t))
    forward = []
    for step in range(a, j):
        alive = sum(t.nbytes for t in tensors
                    if made(t) and t.producer <= step and (t.savers or last(t) >= step))
        forward.append(received + alive + wsf[step])
    backward = []
    for step in range(a, j):
        held = sum(t.nbytes for t in tensors if any(a <= k <= step for k in t.savers))
        grads = sum(t.grad_bytes for t in tensors if t.readers and t.producer <= step <= last(t))
        backward.append(held + grads + wsb[step])
    sent = [t for t in tensors if made(t) and t.grad_bytes and t.readers and last(t) >= j]
    early = [x for step, x in zip(range(a, j), backward) if sent and step < max(t.producer for t in sent)]
    peak = max(forward + backward + ([max(early) + sum(t.grad_bytes for t in sent)] if early else []))
    saved = sum(t.nbytes for t in tensors if any(a <= k < j for k in t.savers))
    return saved, peak


def test_ops_memory_runs_tables_and_assignments_agree_with_a_step_by_step_stage():
    from cost_models.memory import OpsMemory, Storage

    rng = np.random.default_rng(0)
    n = 14
    tensors = []
    for _ in range(24):  # activations read nearby or far (a skip connection), some returned
        p = int(rng.integers(-1, n))
        readers = sorted(set(int(r) for r in rng.integers(max(p + 1, 0), n + 1, size=rng.integers(0, 4))))
        savers = tuple(r for r in readers if r < n and rng.random() < 0.5)
        tensors.append(Storage(float(rng.integers(1, 60)), p, tuple(readers), savers,
                               float(rng.integers(0, 60)) if p >= 0 else 0.0))
    wsf, wsb = rng.integers(0, 30, n).astype(float), rng.integers(0, 30, n).astype(float)
    params = rng.integers(0, 5, n).astype(float)
    reads = [{"w": 7.0} if k in (2, 9) else {} for k in range(n)]  # a tied weight read at ops 2 and 9
    memory = OpsMemory(n, params, tensors, fwd_workspace=wsf, bwd_workspace=wsb, weight_reads=reads)
    for j in range(1, n + 1):
        for a in range(j):
            saved, peak = _stage_by_hand(tensors, wsf, wsb, a, j, n)
            q = memory.quantities(a, j)
            assert (q["activations"], q["transient"]) == pytest.approx((saved, peak)), (a, j)
            assert q["copies"] == (7.0 if a <= 9 < j and a > 2 else 0.0)
            assignment = [0] * a + [1] * (j - a) + [2] * (n - j)
            assert memory.quantities_of(assignment, 1) == pytest.approx(q), (a, j)
    cuts = [0, 3, 5, 8, 11, n]
    by_run = {j: memory.total_bytes(np.array(cuts[:k]), j, in_flight=2, gpu=False, mode="train", precision="fp32")
              for k, j in enumerate(cuts) if k}
    memory.prepare(cuts)  # the same figures from the table the DP reads
    for k, j in enumerate(cuts):
        if k:
            tabled = memory.total_bytes(np.array(cuts[:k]), j, in_flight=2, gpu=False, mode="train", precision="fp32")
            assert tabled == pytest.approx(by_run[j])


def test_a_cpu_convolution_adds_the_temporaries_of_its_kernels():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1))
    traced, costs = priced(model, spec((4, 8, 12, 12)))
    conv = only(costs, "conv")
    activation, output = 4 * 8 * 12 * 12 * 4, 4 * 16 * 12 * 12 * 4
    assert conv.cpu_fwd_workspace_bytes == max(activation, output) + (16 * 8 * 9 + 16) * 4
    assert conv.cpu_bwd_workspace_bytes == activation + output
    nodes = list(costs)
    from cost_models.memory import OpsMemory

    memory = OpsMemory.from_costs(nodes, costs, [0.0] * len(nodes))
    gpu, cpu = memory.quantities(0, len(nodes)), memory.quantities(0, len(nodes), cpu=True)
    assert cpu["transient"] > gpu["transient"] and cpu["activations"] == gpu["activations"]


def test_an_op_that_reshapes_its_own_result_allocates_it_once():
    # A linear over a 3-D input is a matmul whose 2-D result is reshaped in place (an
    # ``_unsafe_view``): one storage, no temporaries, forward or backward.
    traced, costs = priced(nn.Linear(64, 256, bias=False), spec((4, 8, 64)))
    linear = only(costs, "matmul")
    assert linear.fwd_workspace_bytes == 0 and linear.bwd_workspace_bytes == 0
    assert linear.output_bytes == linear.grad_bytes == 4 * 8 * 256 * 4
    assert linear.weight_grad_bytes == 64 * 256 * 4
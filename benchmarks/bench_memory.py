"""Peak memory of every stage of a split model, measured on this CPU against the plan's figure.

A small GPT (GPT-2 shape, random init) and a ResNet-like CNN with BatchNorm are planned into 3
stages over CPU devices (no fragmentation allowance, no CUDA context), fp32 AdamW training and
fp32 inference. Each stage is then run alone, as the runtime builds it (``split_module``: values
relayed stage by stage, a tied weight sent once per call), on fresh activations of the shapes the
earlier stages send it (made by an op, as a copy from the stage before is, not autograd leaves):

* training: the stage's own 1F1B order over 4 microbatches (warm-up forwards, one forward and
  one backward in turn, the last backwards), a gradient of ones for each output, then AdamW over
  the parameters stored on the stage; measured on the second step, when gradients and optimizer
  states exist. An output sent on lives on the next device in a real pipeline: its storage here
  is freed once sent, unless the stage's own backward reads it; the gradient of a value relayed
  through the stage is held through the backward it passes.
* inference: the forward of one microbatch under ``torch.no_grad``.

Measured: the peak of live CPU tensor bytes in the torch profiler's memory timeline
(``profile_memory=True``, ``MemoryProfileTimeline``), parameters, gradients and optimizer state
included. Planned: ``Stage.memory`` (``cost_models.memory.OpsMemory``). Target: within 5% per stage.

    python benchmarks/bench_memory.py        # prints and records into benchmarks/RESULTS.md
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from _results import machine, record  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from autosplit import OpGraph, capture  # noqa: E402
from autosplit.rewrite import split_module  # noqa: E402
from autosplit.solver import SolverOptions, solve  # noqa: E402
from cost_models import Cluster, get_device, price_graph  # noqa: E402

STAGES = 3
MICROBATCHES = 4
TARGET = 0.05


def _gpt():
    from transformers import GPT2LMHeadModel

    import models

    torch.manual_seed(0)
    config = models.tiny_gpt2_config(n_layer=6, n_embd=256, n_head=4, vocab_size=4096, n_positions=128)
    return "GPT-2 shape, 6 layers, d=256, vocab 4096, microbatch 4×128", GPT2LMHeadModel(config), \
        (torch.randint(0, config.vocab_size, (4, 128)),)


def _cnn():
    import models

    torch.manual_seed(0)
    model, args, _ = models.rescnn()
    return "ResCNN (conv + BatchNorm residual blocks), microbatch 32", model, (torch.randn(32, *args[0].shape[1:]),)


def _cpu_cluster() -> Cluster:
    # Only the memory model matters here: a CPU device kind (no fragmentation, no CUDA context).
    spec = dataclasses.replace(get_device("h100"), name="cpu-plan", kind="cpu", aliases=(), vendor_name="",
                               memory_bytes=24 * 2**30)
    return Cluster.from_specs([spec] * STAGES)


def _peak_bytes(run) -> float:
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return float(max(sum(s) for s in sizes))


def measure(label: str, model: torch.nn.Module, args: tuple, mode: str) -> list[str]:
    train = mode == "train"
    model.train(train)
    kwargs = {"use_cache": False} if hasattr(model, "config") else {}
    traced = capture(model, args, kwargs or None)
    gm = traced.graph_module
    costs = price_graph(gm, training=train)
    options = SolverOptions(stages=STAGES, mode=mode, microbatches=MICROBATCHES, precision="fp32", optimizer="adamw",
                            weight_dtype="fp32")
    plan = solve(OpGraph.from_traced(traced), _cpu_cluster(), options, costs=costs, parameters=traced.parameters)
    # The stages as the runtime builds them: values relayed stage by stage, shared weights sent
    # once per call by the pipeline's prologue.
    pipe = split_module(model, traced, plan, ["cpu"] * STAGES, microbatches=MICROBATCHES).graph_module.pipeline
    # The values each stage receives: every earlier stage's outputs on the example microbatch.
    env = dict(zip(pipe.placeholders, [*args, *kwargs.values()]))
    with torch.no_grad():
        env.update(zip(pipe.shared, pipe.prologue() if pipe.prologue is not None else ()))
        for s, stage in enumerate(pipe.stages):
            env.update(zip(pipe.outputs[s], stage(*[env[n] for n in pipe.inputs[s]])))
    rows = []
    for s, stage in enumerate(pipe.stages):
        planned = plan.stages[s]
        in_flight = round(planned.memory.activations_bytes / planned.saved_bytes_per_microbatch) \
            if train and planned.saved_bytes_per_microbatch else 1
        shared = set(pipe.shared)  # weights sent once per call: the same tensors for every microbatch
        inputs = [env[n] if n in shared or not isinstance(env[n], torch.Tensor) else env[n].detach().clone()
                  for n in pipe.inputs[s]]
        kept_outputs = {key for node in planned.nodes if node in costs for key in costs[node].saved}
        # The optimizer of a stage updates the parameters stored there; one read here but stored on
        # another stage (a tied weight) is a copy whose gradient goes home.
        stored = {id(t) for name, t in model.named_parameters(remove_duplicate=False) if name in planned.weights}
        params = [p for p in stage.parameters() if id(p) in stored and p.requires_grad]
        optimizer = torch.optim.AdamW(params) if train and params else None

        warmup = min(len(pipe.stages) - s - 1, MICROBATCHES)
        order = ["F"] * warmup + ["F", "B"] * (MICROBATCHES - warmup) + ["B"] * warmup  # 1F1B on stage s
        floating = [isinstance(x, torch.Tensor) and x.is_floating_point() and n not in shared
                    for n, x in zip(pipe.inputs[s], inputs)]
        shapes = [(x.shape, x.dtype) if f else None for x, f in zip(inputs, floating)]
        kept_inputs = [None if f else x for x, f in zip(inputs, floating)]  # ids, masks, weights: reused
        del inputs

        anchor = torch.zeros((), requires_grad=train)

        def arrival(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
            """A fresh activation as the runtime receives it: made by an op of the autograd graph
            (a copy from the stage before), not a leaf that the graph would keep alive."""
            value = anchor.to(dtype).expand(shape).clone()
            with torch.no_grad():
                return value.normal_()

        def received():
            """A new microbatch of what the stage receives: activations arrive fresh each time."""
            return [arrival(*shape) if shape else x for shape, x in zip(shapes, kept_inputs)]

        def step():
            if not train:
                with torch.no_grad():
                    stage(*received())
                return
            in_flight_now = []
            for phase in order:
                if phase == "F":
                    arrived = received()
                    values = stage(*arrived)
                    # A relayed value is the received tensor itself on one CPU: it passes on, and so does
                    # its gradient, which is held through the backward (``passing``).
                    relayed = {id(x) for x in arrived if isinstance(x, torch.Tensor)}
                    passing = [(v.shape, v.dtype) for v in values if id(v) in relayed and v.requires_grad]
                    pending = [v for v in values if isinstance(v, torch.Tensor) and v.requires_grad
                               and id(v) not in relayed]
                    # Sent on: it lives on the next device from here, but a value some op here keeps.
                    for name, v in zip(pipe.outputs[s], values):
                        if isinstance(v, torch.Tensor) and v.requires_grad and name not in kept_outputs \
                                and id(v) not in relayed:
                            v.untyped_storage().resize_(0)
                    in_flight_now.append((pending, passing))
                    del arrived, values, pending
                else:
                    tensors, passing = in_flight_now.pop(0)
                    through = [torch.ones(shape, dtype=dtype) for shape, dtype in passing]  # held while it runs
                    torch.autograd.backward(tensors, [torch.ones(v.shape, dtype=v.dtype) for v in tensors])
                    through.clear()
                    del tensors
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        step()  # optimizer states exist from here on
        measured = _peak_bytes(step)
        ratio = planned.memory_bytes / measured
        mib = 2**20
        m = planned.memory
        rows.append(f"| {label} | {mode} | {s} | {in_flight} | {measured / mib:.1f} | {planned.memory_bytes / mib:.1f} "
                    f"(w {m.weights_bytes / mib:.1f}, g {m.grads_bytes / mib:.1f}, opt {m.optimizer_bytes / mib:.1f}, "
                    f"act {m.activations_bytes / mib:.1f}, ws {m.workspace_bytes / mib:.1f}) | "
                    f"**{ratio:.3f}** | {'yes' if abs(ratio - 1) <= TARGET else 'NO'} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    rows = []
    for build in (_gpt, _cnn):
        for mode in ("train", "infer"):
            label, model, args = build()
            rows += measure(label, model, args, mode)
    body = "\n".join([
        "## Stage memory (`benchmarks/bench_memory.py`)",
        "",
        f"Machine: {machine()}.",
        "",
        f"Each model planned into {STAGES} stages on CPU devices ({MICROBATCHES} microbatches, schedule 1f1b, fp32",
        "AdamW for training, fp32 weights for inference); each stage built as the runtime builds it",
        "(`split_module`) and run alone on fresh activations of the shapes it receives: training its own",
        "1F1B order of forwards and backwards, then the AdamW step over the parameters stored on it (second",
        "step measured); inference one forward under no_grad. Measured: peak live CPU tensor bytes in the torch",
        "profiler's memory timeline (parameters, gradients, optimizer state included). Planned: `Stage.memory`",
        "(`OpsMemory`: when each tensor is made and last read, gradients, per-op temporaries measured on meta,",
        "oneDNN's convolution reorders on a CPU; `in flight` microbatches of saved tensors).",
        f"Target: planned ÷ measured within {TARGET:.0%} per stage.",
        "",
        "| model | mode | stage | in flight | measured MiB | planned MiB (by kind) | planned ÷ measured | within 5% |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    record("memory", body)


if __name__ == "__main__":
    main()

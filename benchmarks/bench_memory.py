"""Peak memory of every stage of a split model, measured on this CPU against the plan's figure.

A small GPT (GPT-2 shape, random init) and a ResNet-like CNN with BatchNorm are planned into 3
stages over CPU devices (no fragmentation allowance, no CUDA context), fp32 AdamW training and
inference. Each stage is then run alone, as the runtime builds it (``Pipeline.from_graph``), on
the activations the earlier stages send it:

* training: the forward of the microbatches the schedule keeps in flight on that stage, then
  their backward (a gradient for each output), then the AdamW step; measured on the second step,
  when gradients and optimizer states exist. An output sent on to the next stage lives on the
  next device in a real pipeline: its storage here is freed once sent (as
  ``torch.distributed.pipelining`` does), unless the stage's own backward reads it.
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
from autosplit.pipeline import Pipeline  # noqa: E402
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
    traced = capture(model, args, {"use_cache": False} if hasattr(model, "config") else None)
    gm = traced.graph_module
    costs = price_graph(gm, training=train)
    options = SolverOptions(stages=STAGES, mode=mode, microbatches=MICROBATCHES, precision="fp32", optimizer="adamw")
    plan = solve(OpGraph.from_traced(traced), _cpu_cluster(), options, costs=costs, parameters=traced.parameters)
    stage_of_name = plan.stage_of()
    stage_of = {n: stage_of_name[n.name] for n in gm.graph.nodes
                if n.op in ("call_function", "call_method", "call_module")}
    pipe = Pipeline.from_graph(gm, stage_of, [torch.device("cpu")] * STAGES, 1)
    # The values each stage receives: every earlier stage's outputs on the example microbatch.
    env = dict(zip(pipe.placeholders, args))
    with torch.no_grad():
        for s, stage in enumerate(pipe.stages):
            env.update(zip(pipe.outputs[s], stage(*[env[n] for n in pipe.inputs[s]])))
    rows = []
    for s, stage in enumerate(pipe.stages):
        planned = plan.stages[s]
        in_flight = round(planned.memory.activations_bytes / planned.saved_bytes_per_microbatch) \
            if train and planned.saved_bytes_per_microbatch else 1
        inputs = [env[n].detach().clone() if isinstance(env[n], torch.Tensor) else env[n] for n in pipe.inputs[s]]
        kept_outputs = {key for node in planned.nodes if node in costs for key in costs[node].saved}
        params = [p for p in stage.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params) if train and params else None

        def step():
            if not train:
                with torch.no_grad():
                    stage(*inputs)
                return
            outs = []
            for _ in range(in_flight):
                received = [x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
                            for x in inputs]
                values = stage(*received)
                pending = [(v, torch.ones_like(v)) for v in values
                           if isinstance(v, torch.Tensor) and v.requires_grad]
                for name, v in zip(pipe.outputs[s], values):  # sent on: lives on the next device
                    if isinstance(v, torch.Tensor) and v.requires_grad and name not in kept_outputs:
                        v.untyped_storage().resize_(0)
                outs.append(pending)
                del received, values
            for pending in outs:
                tensors = [v for v, _ in pending]
                grads = [g for _, g in pending]
                del pending
                torch.autograd.backward(tensors, grads)
                del tensors, grads
            outs.clear()
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
        "AdamW for training); each stage run alone on the activations it receives: training the forward of",
        "the microbatches it keeps in flight, their backward, the AdamW step (second step measured);",
        "inference one forward under no_grad. Measured: peak live CPU tensor bytes in the torch profiler's",
        "memory timeline (parameters, gradients, optimizer state included). Planned: `Stage.memory`.",
        f"Target: planned ÷ measured within {TARGET:.0%} per stage.",
        "",
        "| model | mode | stage | in flight | measured MiB | planned MiB (by kind) | planned ÷ measured | within 5% |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    record("memory", body)


if __name__ == "__main__":
    main()

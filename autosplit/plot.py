"""Draw a Plan: per-stage time and memory, and the pipeline schedule it implies.

    autosplit plan gpt2 --devices 4 --gpu h100 --plot plan.png
"""

from __future__ import annotations

from autosplit.plan import Plan
from cost_models.memory import INTERLEAVED, interleaved_1f1b_order


def schedule(plan: Plan) -> list[tuple[int, int, str, float, float]]:
    """(stage, microbatch, "F" or "B", start s, end s) of every forward and backward, for the
    plan's schedule, each taking its stage's share of the stage time (forward one third and
    backward two thirds of it when training, as their FLOPs go).

    GPipe runs every forward, then every backward. 1F1B lets stage s run S − s forwards, then
    alternates one backward and one forward. Interleaved 1F1B runs each device's stages in the
    order PyTorch does (``cost_models.memory.interleaved_1f1b_order``), one at a time. Each step
    waits for its input from the neighbouring stage.
    """
    S, m = len(plan.stages), plan.microbatches
    train = plan.mode == "train"
    fwd = [st.time_s / 3 if train else st.time_s for st in plan.stages]
    bwd = [2 * st.time_s / 3 if train else 0.0 for st in plan.stages]
    orders: list[list[tuple[str, int, int]]] = []  # per device: (kind, stage, microbatch)
    if plan.schedule == INTERLEAVED and train:
        D = len(plan.device_stages())
        for d in range(D):
            orders.append([(kind, local * D + d, i) for kind, local, i in interleaved_1f1b_order(
                d, devices=D, stages_per_device=plan.stages_per_device, microbatches=m)])
    for s in range(S if not orders else 0):
        if not train:
            orders.append([("F", s, i) for i in range(m)])
        elif plan.schedule == "gpipe":
            orders.append([("F", s, i) for i in range(m)] + [("B", s, i) for i in reversed(range(m))])
        else:
            warm = min(S - s, m)
            order = [("F", s, i) for i in range(warm)]
            for i in range(m):
                order.append(("B", s, i))
                if warm + i < m:
                    order.append(("F", s, warm + i))
            orders.append(order)
    done: dict[tuple[int, str, int], float] = {}
    free = [0.0] * len(orders)
    pending = [list(order) for order in orders]
    events = []
    while any(pending):
        progressed = False
        for d in range(len(orders)):
            if not pending[d]:
                continue
            kind, s, i = pending[d][0]
            if kind == "F":
                ready = done.get((s - 1, "F", i), 0.0) if s > 0 else 0.0
                waiting = s > 0 and (s - 1, "F", i) not in done
            else:
                ready = done.get((s + 1, "B", i), done.get((s, "F", i), 0.0)) if s < S - 1 else done.get((s, "F", i), 0.0)
                waiting = (s < S - 1 and (s + 1, "B", i) not in done) or (s, "F", i) not in done
            if waiting:
                continue
            start = max(free[d], ready)
            end = start + (fwd[s] if kind == "F" else bwd[s])
            done[(s, kind, i)] = free[d] = end
            events.append((s, i, kind, start, end))
            pending[d].pop(0)
            progressed = True
        if not progressed:
            raise AssertionError("schedule deadlocked")
    return events


def plot(plan: Plan, path: str) -> str:
    """Write a PNG with the stages' time and memory and the schedule timeline; returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError('--plot needs matplotlib: pip install "autosplit[plot]"') from e
    S = len(plan.stages)
    figure, (times, memory, timeline) = plt.subplots(3, 1, figsize=(10, 9), gridspec_kw={"height_ratios": [2, 2, 3]})
    stages = range(S)
    ms = lambda values: [v * 1e3 for v in values]  # noqa: E731
    compute = ms(st.compute_s for st in plan.stages)
    comm_in = ms(st.comm_in_s for st in plan.stages)
    comm_out = ms(st.comm_out_s for st in plan.stages)
    times.bar(stages, compute, label="compute")
    times.bar(stages, comm_in, bottom=compute, label="receive")
    times.bar(stages, comm_out, bottom=[a + b for a, b in zip(compute, comm_in)], label="send")
    times.axhline(plan.lower_bound_s * 1e3, color="black", linestyle="--", label="lower bound")
    times.set_ylabel("ms per microbatch")
    times.set_title(f"{S}-stage {plan.mode} plan on {plan.cluster}: bottleneck "
                    f"{plan.bottleneck_s / plan.lower_bound_s:.3f} × the lower bound")
    times.legend(loc="lower right", fontsize=8)
    gib = 2**30
    kinds = [("weights", "weights_bytes"), ("gradients", "grads_bytes"), ("optimizer", "optimizer_bytes"),
             ("activations", "activations_bytes"), ("workspace", "workspace_bytes")]
    bottom = [0.0] * S
    for label, field in kinds:
        values = [getattr(st.memory, field) / gib for st in plan.stages]
        memory.bar(stages, values, bottom=bottom, label=label)
        bottom = [a + b for a, b in zip(bottom, values)]
    memory.plot(stages, [st.memory_capacity_bytes / gib for st in plan.stages], "k_", markersize=30, label="capacity")
    memory.set_ylabel("GiB")
    memory.legend(loc="lower right", fontsize=8)
    for ax in (times, memory):
        ax.set_xticks(list(stages), [st.devices[0] for st in plan.stages], fontsize=8)
    for s, i, kind, start, end in schedule(plan):
        timeline.barh(s, (end - start) * 1e3, left=start * 1e3, color="tab:blue" if kind == "F" else "tab:orange",
                      edgecolor="white")
        if plan.microbatches <= 16:
            timeline.text((start + end) / 2 * 1e3, s, str(i), ha="center", va="center", fontsize=7, color="white")
    timeline.set_yticks(list(stages), [f"stage {s}" for s in stages])
    timeline.invert_yaxis()
    timeline.set_xlabel("ms")
    timeline.set_title(f"{plan.schedule} schedule, {plan.microbatches} microbatches (blue forward, orange backward); "
                       f"bubble {plan.bubble_fraction:.0%}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

"""The command line: the README's main job, factories, and one-line errors."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

from autosplit.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_trace_a_preset_prints_one_row_per_block(capsys):
    assert main(["trace", "gpt2", "--seq", "32", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    for i in range(12):
        assert f"transformer.h.{i} " in out
    assert "GPT2Block" in out and "lm_head" in out and "transformer[glue]" in out
    assert "GPT2LMHeadModel: 124M parameters (475 MiB) on meta" in out
    assert re.search(r"\d+ ops in 23 blocks, captured by export in", out)


def _factory_file(tmp_path):
    """A file whose ``build`` returns a small model and its example inputs."""
    path = tmp_path / "my_model.py"
    path.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
            return model, (torch.randn(3, 8),)
    """))
    return path


def test_trace_a_file_factory(tmp_path, capsys):
    path = _factory_file(tmp_path)
    assert main(["trace", f"{path}:build"]) == 0
    out = capsys.readouterr().out
    assert "Linear" in out and "5 ops in 5 blocks, captured by fx" in out and "Sequential: 212 parameters" in out


def test_plan_takes_the_tracer_and_a_forced_one_is_what_captures(tmp_path, capsys):
    path = _factory_file(tmp_path)
    assert main(["plan", f"{path}:build", "--cluster", "2xh100", "--tracer", "export", "--mode", "infer"]) == 0
    assert "2-stage infer plan" in capsys.readouterr().out
    assert main(["trace", f"{path}:build", "--tracer", "export"]) == 0
    assert "captured by export" in capsys.readouterr().out


@pytest.mark.parametrize("argv, fragment", [
    (["trace", "lama-7b"], "unknown preset 'lama-7b'; known presets: gpt2"),
    (["trace", "missing.py:build"], "no such file: missing.py"),
    (["trace", "json:nothing"], "json has no callable 'nothing'"),
    (["trace", "gpt2", "--seq", "5000"], "gpt2 takes sequences up to 1024 tokens"),
])
def test_errors_are_one_line_and_exit_1(argv, fragment, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("autosplit: error: ") and fragment in err and err.count("\n") == 1


def test_python_dash_m_runs_the_same_command():
    done = subprocess.run([sys.executable, "-m", "autosplit", "trace", "nope"], capture_output=True, text=True)
    assert done.returncode == 1 and "unknown preset 'nope'" in done.stderr and "Traceback" not in done.stderr


def test_ci_runs_exactly_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    assert ci.rstrip().splitlines()[-1] == test_command


def test_example_capture_on_meta_runs():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "capture_on_meta.py"), "gpt2", "--seq", "64"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "gpt2: 0.1B parameters" in done.stdout and "12 layers of" in done.stdout
    assert "passes on 0.2 MiB of activations" in done.stdout


def test_plan_a_preset_prints_the_stages_and_writes_json(tmp_path, capsys):
    import json

    path = tmp_path / "plan.json"
    assert main(["plan", "gpt2", "--devices", "4", "--gpu", "h100", "--seq", "128", "--batch", "4",
                 "--microbatches", "8", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "4-stage train plan on 4xh100-sxm" in out and "× the lower bound" in out and "tokens/s" in out
    for rank in range(4):
        assert f"h100-sxm:{rank}" in out
    data = json.loads(path.read_text())
    stage = data["stages"][0]
    assert {"devices", "modules", "compute_s", "memory_bytes"} <= set(stage)
    assert data["bottleneck_s"] >= data["lower_bound_s"] > 0
    assert data["solver"]["status"] in ("OPTIMAL", "FEASIBLE") and data["solver"]["wall_s"] > 0


def test_plan_errors_are_one_line():
    done = subprocess.run([sys.executable, "-m", "autosplit", "plan", "gpt2-xl", "--devices", "1", "--gpu", "rtx3090",
                           "--seq", "1024"], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "does not fit" in done.stderr and "Would fit:" in done.stderr and "at least 2 × rtx3090" in done.stderr
    bad = subprocess.run([sys.executable, "-m", "autosplit", "plan", "gpt2", "--gpu", "h1000"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "h1000" in bad.stderr and "Traceback" not in bad.stderr


def _factory(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return f"{path}:build"


def test_a_request_the_model_cannot_meet_or_a_broken_factory_is_an_input_error(tmp_path, capsys):
    one_op = _factory(tmp_path, "one_op", """
        import torch
        from torch import nn

        def build():
            return nn.Linear(8, 8), (torch.randn(2, 8),)
    """)
    assert main(["plan", one_op, "--devices", "3", "--gpu", "h100"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("autosplit: error: 3 stages need at least 3 ops") and err.count("\n") == 1
    broken = _factory(tmp_path, "broken", """
        def build():
            raise RuntimeError("no weights here")
    """)
    assert main(["plan", broken, "--devices", "2", "--gpu", "h100"]) == 1
    err = capsys.readouterr().err
    assert err == "autosplit: error: building the model failed: RuntimeError: no weights here\n"
    assert main(["plan", one_op, "--devices", "2", "--gpu", "h100", "--microbatches", "0"]) == 1
    assert "microbatches must be a positive int" in capsys.readouterr().err
    assert main(["plan", one_op, "--devices", "2", "--gpu", "h100", "--optimizer", "lion"]) == 1
    assert "optimizer must be one of" in capsys.readouterr().err


def test_a_failure_inside_autosplit_is_reported_as_a_bug(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ValueError("cut positions out of order")

    monkeypatch.setattr("autosplit.solver.orders.chain_dp", broken)  # the first DP of every solve
    model = _factory(tmp_path, "mlp", """
        import torch
        from torch import nn

        def build():
            return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), (torch.randn(2, 8),)
    """)
    argv = ["plan", model, "--devices", "2", "--gpu", "h100"]
    assert main(argv) == 70
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error while solving for 2xh100-sxm" in err
    assert "ValueError: cut positions out of order" in err and "bug in autosplit" in err and "--debug" in err
    with pytest.raises(ValueError, match="cut positions out of order"):  # --debug: the traceback
        main(argv + ["--debug"])


def test_plan_prints_and_saves_its_notes(tmp_path, capsys):
    import json

    from autosplit import Plan

    model = _factory(tmp_path, "no_meta", """
        import models

        def build():
            model, args, _ = models.no_meta_kernel()
            return model, args
    """)
    path = tmp_path / "plan.json"
    # fp32: the example input is fp32 (fx captures it; export cannot size torch.unique's output)
    assert main(["plan", model, "--devices", "2", "--gpu", "h100", "--dtype", "fp32", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "note         1 op priced as free: cannot run on meta (unique)" in out
    notes = json.loads(path.read_text())["solver"]["notes"]
    assert notes[0] == "1 op priced as free: cannot run on meta (unique)"
    assert Plan.load(path).solver.notes == tuple(notes)


@pytest.mark.parametrize("microbatches", [1, 4])
def test_example_train_loop_prints_equal_losses(microbatches):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_loop.py"), "--devices", "2",
                           "--steps", "3", "--microbatches", str(microbatches)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # the example asserts the losses are equal
    lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 3 and "2-stage train plan" in done.stdout


def test_example_torchrun_training_prints_the_loss_of_each_step():
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           os.path.join(ROOT, "examples", "torchrun_train.py"), "--steps", "2", "--batch", "8",
                           "--seq", "16", "--microbatches", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert re.findall(r"^step (\d): loss \d+\.\d+$", done.stdout, re.M) == ["0", "1"], done.stdout
    assert "2-stage train plan" in done.stdout and "shared with other ranks: wte.weight" in done.stdout


def test_example_plan_from_a_laptop_runs(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "plan_70b_from_laptop.py"),
                           "--preset", "llama-7b", "--seq", "512", "--cluster", "4xh100",
                           "--json", str(tmp_path / "p.json")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "4-stage infer plan on 4xh100-sxm" in done.stdout and (tmp_path / "p.json").exists()


def test_plan_a_hugging_face_config_file(tmp_path, capsys):
    import models

    path = tmp_path / "config.json"
    models.tiny_llama_config(num_hidden_layers=4).to_json_file(str(path))
    assert main(["plan", str(path), "--devices", "2", "--gpu", "a100", "--seq", "32"]) == 0
    out = capsys.readouterr().out
    assert "2-stage train plan on 2xa100-80gb" in out and "model.layers" in out


def test_plan_plot_draws_a_png_and_the_schedule_respects_its_rules(tmp_path, capsys):
    from autosplit import Plan
    from autosplit.plot import schedule

    png, data = tmp_path / "plan.png", tmp_path / "plan.json"
    assert main(["plan", "gpt2", "--devices", "4", "--gpu", "h100", "--seq", "128", "--microbatches", "6",
                 "--json", str(data), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = Plan.load(data)
    events = schedule(plan)
    S, m = len(plan.stages), plan.microbatches
    assert len(events) == 2 * S * m
    for s in range(S):  # 1F1B: a stage never holds more than S - s microbatches' activations
        held, peak = 0, 0
        for _, _, kind, _, _ in sorted((e for e in events if e[0] == s), key=lambda e: e[3]):
            held += 1 if kind == "F" else -1
            peak = max(peak, held)
        assert peak <= S - s
    for stage, i, kind, start, _ in events:  # forwards wait for the stage before
        if kind == "F" and stage > 0:
            before = next(e for e in events if e[:3] == (stage - 1, i, "F"))
            assert start >= before[4] - 1e-12


def test_plan_interleaved_shows_each_stage_with_its_device_and_draws_the_schedule(tmp_path, capsys):
    from autosplit import Plan
    from autosplit.plot import schedule
    from cost_models.memory import microbatches_in_flight

    model = _factory(tmp_path, "deep", """
        import torch
        from torch import nn

        def build():
            return nn.Sequential(*[nn.Linear(32, 32) for _ in range(8)]), (torch.randn(4, 32),)
    """)
    data, png = tmp_path / "plan.json", tmp_path / "plan.png"
    assert main(["plan", model, "--cluster", "2xh100", "--schedule", "interleaved-1f1b", "--stages-per-device", "2",
                 "--microbatches", "4", "--json", str(data), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "4-stage train plan on 2xh100-sxm (2 stages per device, interleaved-1f1b)" in out
    assert re.search(r"│\s+2 │ h100-sxm:0 ", out) and re.search(r"│\s+3 │ h100-sxm:1 ", out)
    assert "device       h100-sxm:0: stages 0, 2" in out and "device       h100-sxm:1: stages 1, 3" in out
    plan = Plan.load(data)
    events = schedule(plan)
    assert len(events) == 2 * 4 * 4
    for device in ((0, 2), (1, 3)):  # a device runs one stage at a time
        spans = sorted((start, end) for s, _, _, start, end in events if s in device)
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(spans, spans[1:]))
    for s in range(4):  # each stage holds what the schedule's order leaves in flight
        held, peak = 0, 0
        for _, _, kind, _, _ in sorted((e for e in events if e[0] == s), key=lambda e: (e[3], e[2] == "F")):
            held += 1 if kind == "F" else -1
            peak = max(peak, held)
        assert peak == microbatches_in_flight("interleaved-1f1b", num_stages=4, stage=s, microbatches=4,
                                              stages_per_device=2)
    assert main(["plan", model, "--cluster", "2xh100", "--stages-per-device", "2"]) == 1
    assert "needs schedule='interleaved-1f1b'" in capsys.readouterr().err


def test_plan_a_global_batch_prints_the_mesh_and_the_layouts(tmp_path, capsys):
    import models

    from autosplit.plan import Plan

    path = tmp_path / "config.json"
    models.tiny_llama_config(num_hidden_layers=4, hidden_size=2048, intermediate_size=4096, num_attention_heads=16,
                             num_key_value_heads=4, max_position_embeddings=1024).to_json_file(str(path))
    saved = tmp_path / "plan.json"
    assert main(["plan", str(path), "--cluster", "2x2xh100", "--seq", "1024", "--global-batch", "16",
                 "--tensor-parallel", "2", "--layouts", "--json", str(saved)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"mesh +dp=\d × pp=\d × tp=2; global batch 16 = ", out)
    assert "h100-sxm:0, h100-sxm:1" in out and "tensor layouts on groups of 2" in out
    assert "self_attn.q_proj" in out and "S(0)" in out
    plan = Plan.load(saved)
    assert plan.tensor_parallel == 2 and plan.global_batch == 16
    assert main(["plan", str(path), "--devices", "2", "--gpu", "h100", "--seq", "32", "--tensor-parallel", "2"]) == 1
    assert "global_batch" in capsys.readouterr().err

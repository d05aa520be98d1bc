"""The ``autosplit`` command line.

    autosplit trace gpt2-xl --batch 8 --seq 1024     # capture a preset on meta, print its blocks
    autosplit trace my_models.py:build               # a factory returning a model or (model, inputs)

Flags mirror the API's options one to one. Errors print one line; ``--debug`` shows the traceback
instead. Exit status: 0 done; 1 the input cannot be used (a flag, the cluster, the options, the
model, or a request the model cannot meet: autosplit's own error classes); 2 a malformed command
line (argparse); 70 (``EX_SOFTWARE``) anything else, which is a bug in autosplit, and the line
says so and what was being done.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import math
import os
import sys
import time
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from autosplit import presets
from autosplit.errors import AutosplitError
from autosplit.graph import COMPUTE, OpGraph
from autosplit.plan import human_count
from autosplit.trace import TRACERS, TensorSpec, Traced, capture, spec
from cost_models.memory import SCHEDULES

logger = logging.getLogger(__name__)

EXIT_INPUT = 1
"""The input cannot be used: the message says what to change."""
EXIT_BUG = 70
"""An unexpected failure inside autosplit (``EX_SOFTWARE`` of sysexits.h)."""


class _InputError(AutosplitError):
    """A flag, the cluster, the options or the model given on the command line cannot be used."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose or os.environ.get("AUTOSPLIT_DEBUG") else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    args.step = "starting"
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, AutosplitError):
            print(f"autosplit: error: {str(e).strip()}", file=sys.stderr)
            return EXIT_INPUT
        print(f"autosplit: internal error while {args.step}: {_one_line(e)} -- this is a bug in autosplit: "
              f"rerun with --debug for the traceback and report it with the command line", file=sys.stderr)
        return EXIT_BUG


@contextlib.contextmanager
def _user_input(*kinds: type[BaseException], what: str = "") -> Iterator[None]:
    """Exceptions of ``kinds`` raised inside come from what the user gave: report them as input
    errors (one line, exit 1), naming ``what`` failed when the exception is not a plain
    ValueError, TypeError, ImportError or OSError."""
    try:
        yield
    except AutosplitError:
        raise
    except kinds as e:
        plain = isinstance(e, (ValueError, TypeError, ImportError, OSError))
        raise _InputError(" ".join(str(e).split()) if plain else f"{what} failed: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    message = " ".join(str(e).split())
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def _step(console: Any, args: argparse.Namespace, text: str) -> Any:
    """Record the step for an internal error's message; a spinner on a terminal."""
    args.step = text
    return console.status(text, spinner="dots") if console.is_terminal else _nothing()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autosplit", description="Split a PyTorch model over several devices.")
    commands = parser.add_subparsers(dest="command", required=True)
    trace = commands.add_parser("trace", help="capture a model and print its graph, block by block")
    plan = commands.add_parser("plan", help="plan the split of a model over devices and print it")
    for command in (trace, plan):
        command.add_argument("model", help=f"a preset ({', '.join(presets.PRESETS)}), package.module:factory, "
                                           "path/to/file.py:factory, or a Hugging Face config.json")
        command.add_argument("--batch", type=int, default=1, help="batch size of one microbatch (presets)")
        command.add_argument("--seq", type=int, default=None,
                             help="sequence length (presets; default: the model's longest)")
        command.add_argument("--verbose", action="store_true", help="log progress and details")
        command.add_argument("--debug", action="store_true", help="show the traceback of an error")
        command.add_argument("--tracer", choices=TRACERS, default="auto",
                             help="which tracer captures the model (auto: fx, or export where fx cannot)")
    trace.set_defaults(run=_run_trace)
    plan.add_argument("--devices", type=int, default=None, help="number of devices (of --gpu, or local)")
    where = plan.add_mutually_exclusive_group()
    where.add_argument("--gpu", help="device kind for --devices, e.g. h100, a100-80gb, rtx4090")
    where.add_argument("--cluster", help='the whole cluster, e.g. "2x8xh100" or "rtx4090+rtx3090"')
    plan.add_argument("--mode", choices=("train", "infer"), default="train")
    plan.add_argument("--dtype", default="bf16", help="dtype the model computes in: fp32, bf16, fp16")
    plan.add_argument("--optimizer", default="adamw", help="sgd, sgd-momentum, adam, adamw (training)")
    plan.add_argument("--precision", default=None, help="training state per parameter (default: from --dtype)")
    plan.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    plan.add_argument("--stages-per-device", type=int, default=1,
                      help="stages each device runs (interleaved-1f1b): device d runs stages d, d + D, ...")
    plan.add_argument("--microbatches", type=int, default=1,
                      help="microbatches per step (with --global-batch: fixes the count the solver would choose)")
    plan.add_argument("--global-batch", type=int, default=None,
                      help="samples per step over all replicas: the mesh (dp x pp x tp), the microbatch size and count, "
                           "every node's tensor layout and the recomputation are chosen for it (--batch is then the "
                           "traced size)")
    plan.add_argument("--tensor-parallel", type=int, default=None,
                      help="devices per stage, fixed (needs --global-batch; default: chosen)")
    plan.add_argument("--data-parallel", type=int, default=1,
                      help="replicas of the pipeline, each on its own devices (with --global-batch: fixed; else 1)")
    plan.add_argument("--recompute", choices=("none", "selective", "full"), default=None,
                      help="what every stage recomputes in backward (needs --global-batch; default: chosen per stage)")
    plan.add_argument("--layouts", action="store_true",
                      help="also print every module's tensor layout (placements on its stage's devices)")
    plan.add_argument("--shared-weights", choices=("sent", "copies"), default="sent",
                      help="weights read on several stages (tied embedding and head): sent from one stage "
                           "(autosplit() in one process) or a trained copy on each (autosplit.distributed)")
    plan.add_argument("--json", metavar="FILE", help="write the plan as JSON")
    plan.add_argument("--plot", metavar="FILE.png", help="draw stage times, memory and the schedule")
    plan.set_defaults(run=_run_plan)
    return parser


def load_model(target: str, *, batch: int, seq: int | None) -> tuple[nn.Module, tuple[Any, ...]]:
    """A preset name, ``package.module:factory`` or ``file.py:factory`` → (model, example inputs).

    A factory returns a model (fed token ids of ``batch`` × ``seq``) or ``(model, example_inputs)``.
    """
    if target.endswith(".json"):
        return _from_config_file(target, batch=batch, seq=seq)
    if ":" not in target:
        return presets.build(target, batch=batch, seq=seq)
    location, _, name = target.rpartition(":")
    if location.endswith(".py"):
        if not os.path.isfile(location):
            raise FileNotFoundError(f"no such file: {location}")
        module_spec = importlib.util.spec_from_file_location(os.path.basename(location)[:-3], location)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(location)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"{location} has no callable {name!r}: MODEL is file.py:factory or package.module:factory")
    made = factory()
    if isinstance(made, nn.Module):
        return made, (spec((batch, seq or 128), dtype=torch.long),)
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        inputs = made[1] if isinstance(made[1], tuple) else (made[1],)
        return made[0], inputs
    raise TypeError(f"{target} returned {type(made).__name__}; a factory returns a model or (model, example_inputs)")


def _from_config_file(path: str, *, batch: int, seq: int | None) -> tuple[nn.Module, tuple[Any, ...]]:
    """A Hugging Face ``config.json`` → its causal LM built on meta (no weights) and token ids."""
    import json

    try:
        import transformers
    except ImportError as e:
        raise ImportError('a config.json model needs transformers: pip install "autosplit[hf]"') from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path) as f:
        values = json.load(f)
    if "model_type" not in values:
        raise ValueError(f"{path} has no 'model_type': it is not a Hugging Face model config")
    values["use_cache"] = False
    config = transformers.AutoConfig.for_model(**values)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    longest = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    seq = seq or min(longest, 4096)
    return model, (spec((batch, seq), dtype=torch.long, dims=("batch", "seq")),)


def _run_trace(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    start = time.perf_counter()
    with _step(console, args, "building the model"), _user_input(Exception, what="building the model"):
        model, inputs = load_model(args.model, batch=args.batch, seq=args.seq)
    with _step(console, args, "capturing the graph"):
        traced = capture(model, inputs, tracer=args.tracer)
        graph = OpGraph.from_traced(traced)
        blocks = graph.coarsen()
    args.step = "printing the blocks"
    console.print(block_table(traced, blocks))
    elapsed_s = time.perf_counter() - start
    summary = [
        f"model        {traced.model_type.rsplit('.', 1)[-1]}: {human_count(traced.parameter_count())} parameters "
        f"({_size(traced.parameter_bytes())}) on {traced.device}",
        f"graph        {len(graph)} ops in {len(blocks)} blocks, captured by {traced.tracer} in {elapsed_s:.1f} s",
        f"fingerprint  {graph.fingerprint()}",
    ]
    for line in summary:
        console.print(line, soft_wrap=True, highlight=False)
    return 0


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def _run_plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from autosplit.api import solve_traced, with_capture_notes
    from autosplit.solver import SolverOptions
    from cost_models import Cluster, get_device, price_graph

    args.step = "reading the options"
    with _user_input(ValueError, TypeError, KeyError):
        if args.dtype not in _DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(_DTYPES)}, e.g. bf16; got {args.dtype!r}")
        if args.cluster:
            cluster = Cluster.parse(args.cluster)
        elif args.gpu:
            cluster = Cluster.parse(f"{args.devices or 1}x{get_device(args.gpu).name}")
        else:
            cluster = Cluster.local(args.devices)
    dtype = _DTYPES[args.dtype]
    precision = args.precision or ("fp32" if dtype == torch.float32 else "bf16-mixed")
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a file or a pipe: room for the whole table
    start = time.perf_counter()
    with _step(console, args, "building the model"), _user_input(Exception, what="building the model"):
        model, inputs = load_model(args.model, batch=args.batch, seq=args.seq)
        model = model.to(dtype)
    seq = next((x.shape[1] for x in inputs if isinstance(x, TensorSpec) and len(x.shape) == 2), None)
    args.step = "reading the options"
    with _user_input(ValueError, TypeError):
        options = SolverOptions(mode=args.mode, schedule=args.schedule, stages_per_device=args.stages_per_device,
                                microbatches=args.microbatches, shared_weights=args.shared_weights,
                                precision=precision, optimizer=args.optimizer, weight_dtype=args.dtype,
                                samples_per_microbatch=args.batch, tokens_per_sample=seq,
                                global_batch=args.global_batch, tensor_parallel=args.tensor_parallel,
                                data_parallel=args.data_parallel, recompute=args.recompute)
    with _step(console, args, "capturing and pricing"):
        traced = capture(model, inputs, tracer=args.tracer)
        costs = price_graph(traced.graph_module, training=args.mode == "train")
    with _step(console, args, f"solving for {cluster}"):
        plan = with_capture_notes(solve_traced(traced, cluster, options, costs), traced)
    args.step = "printing the plan"
    console.print(plan.table())
    for line in plan.summary():
        console.print(line, soft_wrap=True, highlight=False)
    if args.layouts:
        console.print(plan.layout_table())
    console.print(f"planned in {time.perf_counter() - start:.1f} s", highlight=False)
    if args.json:
        args.step = f"writing {args.json}"
        with _user_input(OSError):
            plan.save(args.json)
        console.print(f"plan written to {args.json}", highlight=False)
    if args.plot:
        args.step = f"drawing {args.plot}"
        with _user_input(ImportError, OSError):
            from autosplit.plot import plot

            console.print(f"plot written to {plot(plan, args.plot)}", highlight=False)
    return 0


def block_table(traced: Traced, blocks: OpGraph):
    """A rich table: one row per block with its module, op count, parameters and output size."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{traced.model_type.rsplit('.', 1)[-1]} blocks", show_lines=False)
    for column, justify in [("#", "right"), ("block", "left"), ("class", "left"), ("ops", "right"),
                            ("params", "right"), ("output", "right")]:
        table.add_column(column, justify=justify)
    seen: set[str] = set()
    for i, name in enumerate(b for b in blocks if blocks[b]["kind"] == COMPUTE):
        attrs = blocks[name]
        new = [r for r in attrs["reads"] if r in traced.parameters and r not in seen]
        seen.update(new)
        params = sum(math.prod(traced.parameters[r].shape) for r in new)
        ops = sum(1 for m in attrs["members"] if blocks.infos[m].op.startswith("call_"))
        table.add_row(str(i), escape(name), attrs["module_type"].rsplit(".", 1)[-1], str(ops), human_count(params),
                      _size(blocks.boundary([name]).out_bytes))
    return table


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B" if n else "-"


class _nothing:  # a stand-in for a spinner when the output is not a terminal
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None

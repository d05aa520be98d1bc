"""The ``autosplit`` command line.

    autosplit trace gpt2-xl --batch 8 --seq 1024     # capture a preset on meta, print its blocks
    autosplit trace my_models.py:build               # a factory returning a model or (model, inputs)

Flags mirror the API's options one to one. Errors print one line and exit non-zero; ``--debug``
adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import math
import os
import sys
import time
from typing import Any, Sequence

import torch
from torch import nn

from autosplit import presets
from autosplit.errors import AutosplitError
from autosplit.graph import COMPUTE, OpGraph
from autosplit.plan import human_count
from autosplit.trace import TRACERS, Traced, capture, spec

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose or os.environ.get("AUTOSPLIT_DEBUG") else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except (AutosplitError, ValueError, TypeError, ImportError, FileNotFoundError) as e:
        if args.debug:
            raise
        message = str(e).strip().replace("\n", " ") if not isinstance(e, AutosplitError) else str(e).strip()
        print(f"autosplit: error: {message}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autosplit", description="Split a PyTorch model over several devices.")
    commands = parser.add_subparsers(dest="command", required=True)
    trace = commands.add_parser("trace", help="capture a model and print its graph, block by block")
    trace.add_argument("model", help=f"a preset ({', '.join(presets.PRESETS)}), package.module:factory, "
                                     "or path/to/file.py:factory")
    trace.add_argument("--batch", type=int, default=1, help="batch size of the token-id input (presets)")
    trace.add_argument("--seq", type=int, default=None, help="sequence length (presets; default: the model's longest)")
    trace.add_argument("--tracer", choices=TRACERS, default="auto", help="which tracer to use")
    trace.add_argument("--verbose", action="store_true", help="log progress and details")
    trace.add_argument("--debug", action="store_true", help="show the traceback of an error")
    trace.set_defaults(run=_run_trace)
    return parser


def load_model(target: str, *, batch: int, seq: int | None) -> tuple[nn.Module, tuple[Any, ...]]:
    """A preset name, ``package.module:factory`` or ``file.py:factory`` → (model, example inputs).

    A factory returns a model (fed token ids of ``batch`` × ``seq``) or ``(model, example_inputs)``.
    """
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


def _run_trace(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    start = time.perf_counter()
    with console.status("building the model", spinner="dots") if console.is_terminal else _nothing():
        model, inputs = load_model(args.model, batch=args.batch, seq=args.seq)
    with console.status("capturing the graph", spinner="dots") if console.is_terminal else _nothing():
        traced = capture(model, inputs, tracer=args.tracer)
        graph = OpGraph.from_traced(traced)
        blocks = graph.coarsen()
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

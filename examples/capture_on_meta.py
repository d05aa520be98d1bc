"""Capture a 70B-parameter model on a laptop: no weights, no GPU, well under 1 GB of memory.

    python examples/capture_on_meta.py                  # Llama-70B shape, batch 1 × 4096 tokens
    python examples/capture_on_meta.py gpt2-xl --seq 1024
"""

import argparse

import torch

import autosplit
from autosplit import presets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", nargs="?", default="llama-70b", choices=sorted(presets.PRESETS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    args = parser.parse_args()

    model, inputs = presets.build(args.preset, batch=args.batch, seq=args.seq)  # every weight on meta
    traced = autosplit.capture(model, inputs)
    blocks = autosplit.OpGraph.from_traced(traced).coarsen()

    layers = [b for b in blocks if blocks[b]["module_path"] and blocks[b]["module_path"].split(".")[-1].isdigit()]
    first = layers[0]
    weights = sum(traced.parameters[r].nbytes for r in blocks[first]["reads"] if r in traced.parameters)
    sent = blocks.boundary([first]).out_bytes
    print(f"{args.preset}: {traced.parameter_count() / 1e9:.1f}B parameters, {len(traced.nodes)} ops, "
          f"{len(layers)} layers of {len(blocks[first]['members'])} ops")
    print(f"one layer holds {weights / 2**30:.2f} GiB of fp32 weights and passes on "
          f"{sent / 2**20:.1f} MiB of activations per step")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert isinstance(inputs[0], autosplit.TensorSpec) and inputs[0].dtype == torch.long


if __name__ == "__main__":
    main()

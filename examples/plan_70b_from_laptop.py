"""Plan a 70B model for 8 × H100 on a machine without GPUs: no weights, no download.

    python examples/plan_70b_from_laptop.py                 # Llama-70B shape, inference, 8 × H100
    python examples/plan_70b_from_laptop.py --cluster 2x8xh100 --mode train --seq 1024
"""

import argparse

import torch

import autosplit
from autosplit import presets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-70b", choices=sorted(presets.PRESETS))
    parser.add_argument("--cluster", default="8xh100")
    parser.add_argument("--mode", default="infer", choices=("train", "infer"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--json", help="also write the plan here")
    args = parser.parse_args()

    model, inputs = presets.build(args.preset, batch=args.batch, seq=args.seq)  # on meta
    model = model.to(torch.bfloat16)
    plan = autosplit.plan(model, cluster=args.cluster, example_inputs=inputs, mode=args.mode,
                          microbatches=args.microbatches, samples_per_microbatch=args.batch,
                          tokens_per_sample=args.seq)
    print(plan)
    if args.json:
        print("written to", plan.save(args.json))
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated


if __name__ == "__main__":
    main()

"""An ordinary training loop made multi-device by one line; prints the same losses as the
single-device run (on a machine without GPUs the devices are CPU devices).

    python examples/train_loop.py --devices 2
    python examples/train_loop.py --devices 3 --microbatches 4    # stages pipelined over microbatches
"""

import argparse
import copy

import torch
from torch import nn

import autosplit


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(1000, 128),
        *[nn.Sequential(nn.LayerNorm(128), nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 128)) for _ in range(4)],
        nn.LayerNorm(128),
        nn.Linear(128, 1000),
    )


def train(model: nn.Module, batches, device: torch.device) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for ids, target in batches:
        logits = model(ids)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), target.to(device).flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--microbatches", type=int, default=1, help="cut each batch of 8 into this many")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 1000, (8, 32), generator=generator),
                torch.randint(0, 1000, (8, 32), generator=generator)) for _ in range(args.steps)]

    single = make_model()
    split = autosplit.autosplit(copy.deepcopy(single), devices=args.devices, example_inputs=(batches[0][0],),
                                microbatches=args.microbatches)
    reference = train(single, batches, torch.device("cpu"))
    losses = train(split, batches, split.output_device)
    print(split.plan)
    for step, (a, b) in enumerate(zip(reference, losses)):
        print(f"step {step}: single device {a:.6f}   split over {args.devices} {b:.6f}"
              f"{f' in {args.microbatches} microbatches' if args.microbatches > 1 else ''}")
    assert all(abs(a - b) <= 1e-5 * max(1.0, abs(a)) for a, b in zip(reference, losses)), "losses differ"


if __name__ == "__main__":
    main()

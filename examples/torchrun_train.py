"""A GPT-style model trained over several processes, one pipeline stage per process.

    torchrun --nproc-per-node 4 examples/torchrun_train.py
    torchrun --nproc-per-node 2 examples/torchrun_train.py --steps 20 --microbatches 4

Every process runs this same script. Rank 0 plans one stage per process and sends the plan to
the others; each process then builds its own stage of the model and trains it. The last process
computes the loss and prints it. On CPUs the processes talk over gloo; on a machine with GPUs
each process takes the GPU of its LOCAL_RANK and they talk over NCCL, with no change here.

The model is small and starts from random weights (no download); the data is synthetic: each
sequence counts up from a random token by a random stride, which the model learns to continue.
The losses printed match, to rounding, those of the same model trained in one process (pipelining
changes where the model runs, not what it computes).
"""

import argparse
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import autosplit.distributed


@dataclass
class GPTConfig:
    vocab_size: int = 512
    block_size: int = 64
    """The longest sequence the position embedding covers."""
    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 128


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token and position embeddings, ``n_layer`` blocks, and an LM head that shares the token
    embedding's weight (read by the first stage and the last: each holds a copy)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():  # GPT-2's initialization
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                scaled = name.endswith("proj.weight") or name.endswith("mlp.2.weight")  # into the residual
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer) if scaled else 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def counting_batch(config: GPTConfig, batch: int, seq: int, generator: torch.Generator):
    """Sequences that count up from a random token by a random stride (1 to 4), mod the vocabulary:
    the next token follows from the two before it. Returns (ids, targets): targets are ids shifted
    by one."""
    start = torch.randint(0, config.vocab_size, (batch, 1), generator=generator)
    stride = torch.randint(1, 5, (batch, 1), generator=generator)
    tokens = (start + stride * torch.arange(seq + 1)) % config.vocab_size
    return tokens[:, :-1], tokens[:, 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=8, help="cut each batch into this many")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # the processes share the machine's cores

    config = GPTConfig(block_size=args.seq)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = GPT(config)
    generator = torch.Generator().manual_seed(1)  # the same batches on every rank
    ids, targets = counting_batch(config, args.batch, args.seq, generator)

    # Rank 0 plans one stage per process and sends the plan to the others (every rank must run
    # the same plan; or save it once, plan.save(path), and Plan.load(path) on every rank).
    plan = autosplit.distributed.plan_and_broadcast(model, example_inputs=(ids,), microbatches=args.microbatches)
    pipe = autosplit.distributed.build(model, plan, loss_fn=lm_loss, example_inputs=(ids,))
    rank = dist.get_rank()
    if rank == 0:
        print(plan, flush=True)
    print(f"rank {rank}: stage {pipe.stage} of {len(plan.stages)}, {len(list(pipe.parameters()))} parameter "
          f"tensors ({sum(p.numel() for p in pipe.parameters()):,} values)"
          + (f", shared with other ranks: {', '.join(sorted(pipe.shared_weights))}" if pipe.shared_weights else ""),
          flush=True)

    optimizer = torch.optim.AdamW(pipe.parameters(), lr=3e-3)  # this rank's parameters only
    for step in range(args.steps):
        loss = pipe.step(ids, target=targets)  # forward and backward of all microbatches
        optimizer.step()
        optimizer.zero_grad()
        if loss is not None:  # the last stage's rank holds the loss
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
        ids, targets = counting_batch(config, args.batch, args.seq, generator)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The test model registry: small models of every shape autosplit must handle.

Each entry builds ``(model, args, kwargs)`` with random weights on the requested device;
Hugging Face models come from config objects, never from a download.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

Built = tuple[nn.Module, tuple[Any, ...], dict[str, Any]]


class MLP(nn.Module):
    def __init__(self, d_in: int = 16, d_hidden: int = 32, d_out: int = 8, depth: int = 4):
        super().__init__()
        dims = [d_in] + [d_hidden] * (depth - 1) + [d_out]
        self.layers = nn.Sequential()
        for i in range(depth):
            self.layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < depth - 1:
                self.layers.append(nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class ResCNN(nn.Module):
    """Residual stages with BatchNorm buffers, and a concat skip from the stem to the head."""

    def __init__(self, channels: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.stage1 = nn.Sequential(ResidualBlock(channels), ResidualBlock(channels))
        self.stage2 = nn.Sequential(ResidualBlock(channels), ResidualBlock(channels))
        self.fuse = nn.Conv2d(2 * channels, channels, 1)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.stem(x)
        y = self.stage2(self.stage1(stem))
        y = self.fuse(torch.cat([y, stem], dim=1))
        return self.head(y.mean(dim=(2, 3)))


class TiedLM(nn.Module):
    """An embedding reused as the output head (tied weights), returning a dict."""

    def __init__(self, vocab: int = 50, d: int = 16, depth: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return {"logits": self.head(self.norm(h)), "hidden": h}


class SharedBlockNet(nn.Module):
    """One block called at two depths: its weights are shared between the two call sites."""

    def __init__(self, d: int = 12):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.shared = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        self.middle = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.shared(self.inp(x))
        b = self.shared(self.middle(a))
        return self.out(b), a


class MaskedModel(nn.Module):
    """Optional keyword inputs and a non-tensor flag; a gate computed from the mask alone that
    two layers read."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.mid = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        gate = mask.to(x.dtype) if mask is not None else None
        y = self.proj(x) * scale
        if gate is not None:
            y = y * gate
        y = torch.relu(self.mid(y))
        if gate is not None:
            y = y * gate
        return self.out(y)


class SeqFirst(nn.Module):
    """Reads a (seq, batch, hidden) input, as ``nn.RNN`` does by default, and a (seq, hidden)
    bias shared by the batch; mixes along the sequence and returns batch first. With
    ``branch`` the forward branches on a shape, so fx cannot trace it and torch.export does."""

    def __init__(self, d: int = 8, branch: bool = False):
        super().__init__()
        self.inp, self.mix, self.out = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.branch = branch

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if self.branch and x.dim() == 3:
            x = x * 1.0
        h = torch.tanh(self.inp(x)) + bias.unsqueeze(1)
        h = self.mix(h.cumsum(0))  # each step sees the steps before it: cutting the sequence changes it
        return self.out(h).transpose(0, 1)


@dataclasses.dataclass
class Prediction:
    value: torch.Tensor
    aux: torch.Tensor


class DataclassOut(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.body = nn.Linear(d, d)
        self.aux_head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> Prediction:
        h = torch.relu(self.body(x))
        return Prediction(value=h, aux=self.aux_head(h))


class DataDependentGate(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # the branch depends on the data: no tracer can capture it
            return self.a(x)
        return self.b(x)


class GatedNet(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.pre = nn.Linear(d, d)
        self.gate = DataDependentGate(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.pre(x))


class NoMetaKernel(nn.Module):
    """Calls an op with no meta kernel (``torch.unique``): it cannot be priced on meta."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h) + torch.unique(h).sum()


class StepCounter(nn.Module):
    """Counts its calls in a buffer: ``self.n += 1``, which fx runs at trace time and drops."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n += 1
        return self.b(torch.relu(self.a(x))) * (1 + 0.1 * self.n)


class EMAModel(nn.Module):
    """Keeps an exponential moving average of its hidden mean, updated by a chain of in-place ops
    (``mul_`` then ``add_`` on its result), and subtracts it."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)
        self.register_buffer("ema", torch.full((d,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        self.ema.mul_(0.9).add_(0.1 * h.mean(0).detach())
        return self.b(h - self.ema)


class RunningNorm(nn.Module):
    """A custom norm with BatchNorm-like running statistics, updated in training."""

    def __init__(self, d: int, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(d))
        self.register_buffer("running_var", torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) / (var + 1e-5).sqrt()


class NoGradStats(nn.Module):
    """Code under ``torch.no_grad()``: a running mean updated there and read after the update
    (no data edge links the write to the read in an fx graph), and a frozen target branch whose
    layer must get no gradient and pass none back."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.a, self.target, self.b = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.register_buffer("running_mean", torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        with torch.no_grad():
            self.running_mean.lerp_(h.mean(0), 0.1)
            goal = torch.sigmoid(self.target(h))
        return self.b(h - self.running_mean) * goal


class RunningNormNet(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(d, d), RunningNorm(d), nn.Linear(d, d)
        self.c = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(self.norm(self.a(x)))))


class RoundSTE(torch.autograd.Function):
    """Rounds in forward; backward passes the gradient straight through (a straight-through
    estimator). Differentiating the forward instead gives zero: round's derivative."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class QuantizedNet(nn.Module):
    """Activations quantized by :class:`RoundSTE` between linear layers."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(d, 2 * d), nn.Linear(2 * d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = RoundSTE.apply(4 * torch.tanh(self.inp(x)))
        return self.out(RoundSTE.apply(torch.relu(self.mid(h))))


class FrozenWeightMatmul(torch.autograd.Function):
    """``x @ w.T`` whose backward deliberately gives ``w`` no gradient (only ``x`` one)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad @ w, None


class FrozenProjectionNet(nn.Module):
    """A weight that only a custom Function reads, and whose gradient that Function withholds."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.inp, self.out = nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(torch.relu(FrozenWeightMatmul.apply(h, self.proj)))


class CheckpointedNet(nn.Module):
    """A block run under ``torch.utils.checkpoint``: its activations are recomputed in backward
    (with ``checkpoint=False`` the same block runs plainly)."""

    def __init__(self, d: int = 8, checkpoint: bool = True):
        super().__init__()
        self.inp, self.out = nn.Linear(d, d), nn.Linear(d, d)
        self.block = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        if self.checkpoint:
            return self.out(h + torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=False))
        return self.out(h + self.block(h))


class SinusoidalPositions(nn.Module):
    """Adds sine/cosine position codes from a table computed from the sizes alone and kept in a
    non-persistent buffer, as rotary ``inv_freq`` tables are: no checkpoint holds it, and
    ``reset_parameters`` (which the constructor runs) computes it."""

    def __init__(self, d: int, max_len: int):
        super().__init__()
        self.register_buffer("table", torch.empty(max_len, d), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        max_len, d = self.table.shape
        position = torch.arange(max_len, dtype=torch.float32, device=self.table.device)[:, None]
        rate = torch.exp(torch.arange(0, d, 2, dtype=torch.float32, device=self.table.device) * (-math.log(1e4) / d))
        with torch.no_grad():
            self.table[:, 0::2] = torch.sin(position * rate)
            self.table[:, 1::2] = torch.cos(position * rate)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.table[: h.shape[1]]


class FeatureGain(nn.Module):
    """Multiplies by a fixed per-feature gain kept in a persistent buffer: trained by nothing, set
    by ``reset_parameters`` (ones) or by a checkpoint."""

    def __init__(self, d: int):
        super().__init__()
        self.register_buffer("gain", torch.empty(d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.gain.fill_(1.0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.gain


class PositionalLM(TiedLM):
    """TiedLM with position codes in a non-persistent buffer and a persistent buffer before the
    final norm: a tied weight and both kinds of buffers, for materialization and checkpoints."""

    def __init__(self, vocab: int = 50, d: int = 16, depth: int = 2, max_len: int = 16):
        super().__init__(vocab, d, depth)
        self.positions = SinusoidalPositions(d, max_len)
        self.gain = FeatureGain(d)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.positions(self.embed(ids))
        for block in self.blocks:
            h = h + block(h)
        return {"logits": self.head(self.norm(self.gain(h))), "hidden": h}


def tiny_gpt2_config(**overrides: Any):
    from transformers import GPT2Config

    values = dict(n_layer=3, n_embd=32, n_head=4, vocab_size=96, n_positions=32,
                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    values.update(overrides)
    return GPT2Config(**values)


def tiny_llama_config(**overrides: Any):
    from transformers import LlamaConfig

    values = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_mixtral_config(**overrides: Any):
    from transformers import MixtralConfig

    values = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=96,
                  max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    values.update(overrides)
    return MixtralConfig(**values)


def _ids(batch: int, seq: int, vocab: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


def _build(factory: Callable[[], nn.Module], device: str) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        return factory()


def mlp(device: str = "cpu") -> Built:
    return _build(MLP, device), (torch.randn(4, 16, device=device),), {}


def rescnn(device: str = "cpu") -> Built:
    return _build(ResCNN, device), (torch.randn(2, 3, 12, 12, device=device),), {}


def tied_lm(device: str = "cpu") -> Built:
    return _build(TiedLM, device), (_ids(2, 6, 50, torch.device(device)),), {}


def positional_lm(device: str = "cpu") -> Built:
    return _build(PositionalLM, device), (_ids(2, 6, 50, torch.device(device)),), {}


def shared_block(device: str = "cpu") -> Built:
    return _build(SharedBlockNet, device), (torch.randn(3, 12, device=device),), {}


def masked(device: str = "cpu") -> Built:
    mask = torch.ones(2, 8, dtype=torch.bool, device=device)
    mask[:, ::3] = False
    return _build(MaskedModel, device), (torch.randn(2, 8, device=device),), {"mask": mask, "scale": 0.5}


def dataclass_out(device: str = "cpu") -> Built:
    return _build(DataclassOut, device), (torch.randn(3, 8, device=device),), {}


def no_meta_kernel(device: str = "cpu") -> Built:
    return _build(NoMetaKernel, device), (torch.randn(4, 8, device=device),), {}


def quantized(device: str = "cpu", batch: int = 4) -> Built:
    return _build(QuantizedNet, device), (torch.randn(batch, 8, device=device),), {}


def frozen_projection(device: str = "cpu", batch: int = 4) -> Built:
    return _build(FrozenProjectionNet, device), (torch.randn(batch, 8, device=device),), {}


def checkpointed(device: str = "cpu", batch: int = 4) -> Built:
    return _build(CheckpointedNet, device), (torch.randn(batch, 8, device=device),), {}


def gpt2(device: str = "cpu") -> Built:
    from transformers import GPT2LMHeadModel

    model = _build(lambda: GPT2LMHeadModel(tiny_gpt2_config()), device)
    return model, (_ids(2, 16, 96, torch.device(device)),), {}


def llama(device: str = "cpu") -> Built:
    from transformers import LlamaForCausalLM

    model = _build(lambda: LlamaForCausalLM(tiny_llama_config()), device)
    ids = _ids(2, 16, 96, torch.device(device))
    return model, (ids,), {"attention_mask": torch.ones_like(ids)}


def mixtral(device: str = "cpu") -> Built:
    from transformers import MixtralForCausalLM

    model = _build(lambda: MixtralForCausalLM(tiny_mixtral_config()), device)
    return model, (_ids(2, 16, 96, torch.device(device)),), {}


REGISTRY: dict[str, Callable[..., Built]] = {
    "mlp": mlp,
    "rescnn": rescnn,
    "tied_lm": tied_lm,
    "shared_block": shared_block,
    "masked": masked,
    "dataclass_out": dataclass_out,
    "gpt2": gpt2,
    "llama": llama,
    "mixtral": mixtral,
}
"""Every model the suite runs each execution path on."""


def step_counter(device: str = "cpu") -> Built:
    return _build(StepCounter, device), (torch.randn(4, 8, device=device),), {}


def ema(device: str = "cpu") -> Built:
    return _build(EMAModel, device), (torch.randn(4, 8, device=device),), {}


def running_norm(device: str = "cpu") -> Built:
    return _build(RunningNormNet, device), (torch.randn(4, 8, device=device),), {}


def no_grad_stats(device: str = "cpu") -> Built:
    return _build(NoGradStats, device), (torch.randn(4, 8, device=device),), {}


STATEFUL: dict[str, Callable[..., Built]] = {
    "step_counter": step_counter,
    "ema": ema,
    "running_norm": running_norm,
    "no_grad_stats": no_grad_stats,
}
"""Models whose forward writes their own buffers; the split must make the same writes."""


# --------------------------------------------------------------------------- the zoo
# Models of each family a user brings: Hugging Face transformers of every shape (tiny configs,
# dropout off, so training mode is deterministic), PyTorch's own pipelining test models
# (test/distributed/pipelining/model_registry.py) written again here, recurrent networks, and
# outputs of every structure. tests/test_zoo.py splits each through the public API.

ZOO_D = 16
"""Width of the pipelining models."""


class PipeExample(nn.Module):
    """pipelining's ``ExampleCode``: raw matmul weights, and a buffer's clone (a value that needs no
    gradient) added several layers later, so it crosses cuts as a skip connection."""

    def __init__(self, d: int = ZOO_D, layers: int = 3):
        super().__init__()
        self.mm_param0 = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.mm_param1 = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.register_buffer("cval", torch.randn(d))
        self.lin0 = nn.Linear(d, d)
        self.lins = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(torch.mm(x, self.mm_param0))
        a_constant = self.cval.clone()
        x = self.lin0(x)
        x = torch.relu(x) + a_constant
        x = torch.mm(x, self.mm_param1)
        for lin in self.lins:
            x = torch.relu(lin(x))
        return x


ZOO_DEFAULT_BATCH = 8
"""The batch the default ``y`` of :class:`PipeKwargs` is made for."""


class PipeKwargs(nn.Module):
    """pipelining's ``ModelWithKwargs``: a second input ``y`` whose default is a tensor of the
    batch's size, made once at definition."""

    def __init__(self, d: int = ZOO_D, layers: int = 3):
        super().__init__()
        self.mm_param0 = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.mm_param1 = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.lin0 = nn.Linear(d, d)
        self.lins = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))

    def forward(self, x: torch.Tensor, y: torch.Tensor = torch.zeros(ZOO_DEFAULT_BATCH, ZOO_D)) -> torch.Tensor:
        x = torch.mm(x, self.mm_param0) + y
        x = torch.relu(self.lin0(x))
        x = torch.mm(x, self.mm_param1)
        for lin in self.lins:
            x = torch.relu(lin(x))
        return x


class PipeParamAlias(nn.Module):
    """pipelining's ``ModelWithParamAlias``: one parameter under two names and one module under
    two names, each used at both ends of the model."""

    def __init__(self, d: int = ZOO_D):
        super().__init__()
        self.mm_param1 = self.mm_param0 = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.lin1 = self.lin0 = nn.Linear(d, d)
        self.mid = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = torch.mm(x, self.mm_param0) + y
        x = torch.relu(self.lin0(x))
        x = self.mid(x)
        x = torch.mm(x, self.mm_param1)
        return torch.relu(self.lin1(x))


class PipeMLPBlock(nn.Module):
    """pipelining's ``MLPModule``; ``unused`` is its ``MLPKWargModule``'s ignored keyword."""

    def __init__(self, d: int = ZOO_D):
        super().__init__()
        self.net1, self.relu, self.net2 = nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, unused: torch.Tensor = torch.zeros(1)) -> torch.Tensor:
        return self.net2(self.relu(self.net1(x)))


class PipeMultiMLP(nn.Module):
    """pipelining's ``MultiMLP`` and ``MultiMLPKwargs``: MLP blocks in a ModuleList, and a keyword
    input with a small tensor default that no layer reads."""

    def __init__(self, d: int = ZOO_D, layers: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(PipeMLPBlock(d) for _ in range(layers))

    def forward(self, x: torch.Tensor, unused: torch.Tensor = torch.zeros(1)) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class LinearDxDw(torch.autograd.Function):
    """pipelining's ``CustomLinearDxDw``: a linear layer whose backward writes all three gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return x.mm(weight.t()) + bias

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return grad.mm(weight), grad.t().mm(x), grad.sum(0)


class PipeMLPWithDw(nn.Module):
    """pipelining's ``MLPModuleWithDw``: raw weights through :class:`LinearDxDw`, and the hidden
    activation kept on the module as an attribute, as the original does."""

    def __init__(self, d: int = ZOO_D):
        super().__init__()
        self.fc1_weight = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.fc1_bias = nn.Parameter(torch.randn(d) / d)
        self.fc2_weight = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.fc2_bias = nn.Parameter(torch.randn(d) / d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.hidden = F.relu(LinearDxDw.apply(x, self.fc1_weight, self.fc1_bias))
        return LinearDxDw.apply(self.hidden, self.fc2_weight, self.fc2_bias)


class PipeMultiMLPWithDw(nn.Module):
    """pipelining's ``MultiMLPWithDw``."""

    def __init__(self, d: int = ZOO_D, layers: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(PipeMLPWithDw(d) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class LSTMTagger(nn.Module):
    """Embeds tokens, runs a two-layer batch-first LSTM and tags each step; returns the tags and
    the final state ``(h, c)``, each (layers, batch, hidden) as ``nn.LSTM`` makes them."""

    def __init__(self, vocab: int = 40, d: int = 12, hidden: int = 10, layers: int = 2, tags: int = 7):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, tags)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        out, (h, c) = self.rnn(self.embed(ids))
        return self.head(out), (h, c)


class GRUEncoder(nn.Module):
    """A bidirectional batch-first GRU between two linear layers; returns the projected steps and
    the final state h, (2 directions, batch, hidden)."""

    def __init__(self, d_in: int = 4, hidden: int = 10, d_out: int = 5):
        super().__init__()
        self.inp = nn.Linear(d_in, hidden)
        self.rnn = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, d_out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, h = self.rnn(torch.tanh(self.inp(x)))
        return self.out(out), h


class NestedOutputs(nn.Module):
    """Returns a tuple holding a tensor, None, a fixed int and a dict with a tensor, a tuple of
    two and another None: every container a forward commonly returns."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> tuple[Any, ...]:
        h = torch.relu(self.a(x))
        g = torch.tanh(self.b(h))
        return g, None, 3, {"score": self.c(g), "pair": (h, g * 2), "state": None}


def pipe_example(device: str = "cpu") -> Built:
    return _build(PipeExample, device), (torch.randn(4, ZOO_D, device=device),), {}


def pipe_kwargs(device: str = "cpu") -> Built:
    model = _build(PipeKwargs, device)  # seeds the draws below too
    return model, (torch.randn(4, ZOO_D, device=device),), {"y": torch.randn(4, ZOO_D, device=device)}


def pipe_default_y(device: str = "cpu") -> Built:
    """PipeKwargs called without ``y``: its default is part of the graph."""
    return _build(PipeKwargs, device), (torch.randn(ZOO_DEFAULT_BATCH, ZOO_D, device=device),), {}


def pipe_param_alias(device: str = "cpu") -> Built:
    model = _build(PipeParamAlias, device)
    return model, (torch.randn(4, ZOO_D, device=device), torch.randn(4, ZOO_D, device=device)), {}


def pipe_multi_mlp(device: str = "cpu") -> Built:
    return _build(PipeMultiMLP, device), (torch.randn(4, ZOO_D, device=device),), {}


def pipe_multi_mlp_kwargs(device: str = "cpu") -> Built:
    model = _build(PipeMultiMLP, device)
    return model, (torch.randn(4, ZOO_D, device=device),), {"unused": torch.randn(3, device=device)}


def pipe_multi_mlp_dw(device: str = "cpu") -> Built:
    return _build(PipeMultiMLPWithDw, device), (torch.randn(4, ZOO_D, device=device),), {}


def lstm(device: str = "cpu") -> Built:
    return _build(LSTMTagger, device), (_ids(3, 5, 40, torch.device(device)),), {}


def gru(device: str = "cpu") -> Built:
    return _build(GRUEncoder, device), (torch.randn(3, 5, 4, device=device),), {}


def nested_outputs(device: str = "cpu") -> Built:
    return _build(NestedOutputs, device), (torch.randn(3, 8, device=device),), {}


_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def qwen2(device: str = "cpu") -> Built:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**_TINY, num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return _build(lambda: Qwen2ForCausalLM(config), device), (_ids(2, 12, 96, torch.device(device)),), {}


def qwen2_moe(device: str = "cpu") -> Built:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(**_TINY, num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
                            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                            shared_expert_intermediate_size=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return _build(lambda: Qwen2MoeForCausalLM(config), device), (_ids(2, 12, 96, torch.device(device)),), {}


def bert(device: str = "cpu") -> Built:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(**_TINY, vocab_size=96, max_position_embeddings=64, num_labels=3, pad_token_id=0,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids = _ids(2, 12, 96, torch.device(device))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # the second sequence is padded
    return _build(lambda: BertForSequenceClassification(config), device), (ids,), {"attention_mask": mask}


def t5(device: str = "cpu") -> Built:
    from transformers import T5Config, T5ForConditionalGeneration

    # one layer each way: the encoder, the decoder's self- and cross-attention and the relative
    # position bias are all there, and the op-level solve at 3 stages takes half the time of two
    config = T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                      num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    ids, labels = _ids(2, 10, 96, torch.device(device)), _ids(2, 6, 96, torch.device(device)).flip(1)
    return (_build(lambda: T5ForConditionalGeneration(config), device), (ids,),
            {"decoder_input_ids": labels})


def vit(device: str = "cpu") -> Built:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(**_TINY, image_size=16, patch_size=8, num_channels=3, num_labels=5,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _build(lambda: ViTForImageClassification(config), device), (torch.randn(2, 3, 16, 16, device=device),), {}


def wav2vec2(device: str = "cpu") -> Built:
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    config = Wav2Vec2Config(**_TINY, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                            num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, num_labels=3,
                            classifier_proj_size=16, hidden_dropout=0.0, attention_dropout=0.0,
                            activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0,
                            mask_time_prob=0.0)
    return _build(lambda: Wav2Vec2ForSequenceClassification(config), device), (torch.randn(2, 400, device=device),), {}


ZOO: dict[str, Callable[..., Built]] = {
    "gpt2": gpt2,
    "llama": llama,
    "qwen2": qwen2,
    "mixtral": mixtral,
    "qwen2_moe": qwen2_moe,
    "bert": bert,
    "t5": t5,
    "vit": vit,
    "wav2vec2": wav2vec2,
    "pipe_example": pipe_example,
    "pipe_kwargs": pipe_kwargs,
    "pipe_default_y": pipe_default_y,
    "pipe_param_alias": pipe_param_alias,
    "pipe_multi_mlp": pipe_multi_mlp,
    "pipe_multi_mlp_kwargs": pipe_multi_mlp_kwargs,
    "pipe_multi_mlp_dw": pipe_multi_mlp_dw,
    "rescnn": rescnn,
    "lstm": lstm,
    "gru": gru,
    # a batch of 3: doubled for microbatches it is 6, no feature's size (8), so it is plainly the batch
    "quantized": functools.partial(quantized, batch=3),
    "frozen_projection": functools.partial(frozen_projection, batch=3),
    "checkpointed": functools.partial(checkpointed, batch=3),
    "tied_lm": tied_lm,
    "shared_block": shared_block,
    "dataclass_out": dataclass_out,
    "nested_outputs": nested_outputs,
    **STATEFUL,
}
"""Every model tests/test_zoo.py splits through ``autosplit.autosplit``, by family."""

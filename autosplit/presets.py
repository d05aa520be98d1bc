"""Built-in models, shaped like well-known checkpoints, built from config numbers on ``meta``.

No weights are downloaded or allocated: a preset is for planning. Each needs ``transformers``
(``pip install "autosplit[hf]"``).

    model, inputs = presets.build("llama-70b", batch=1, seq=4096)
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from autosplit.trace import TensorSpec, spec

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class Preset:
    """A model family member given by its published architecture numbers."""

    name: str
    description: str
    family: str
    """``gpt2``, ``llama`` or ``mixtral``: which transformers config/model class builds it."""
    config: dict[str, Any]
    """Keyword arguments of the transformers config class."""
    max_seq: int
    """Longest sequence its position embedding allows."""


# Architecture numbers as published with each model's configuration (Hugging Face config.json
# of openai-community/gpt2, gpt2-xl, meta-llama/Llama-2-7b-hf, Llama-2-70b-hf,
# mistralai/Mixtral-8x7B-v0.1).
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("gpt2", "GPT-2 small, 124M parameters", "gpt2",
               dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024), 1024),
        Preset("gpt2-xl", "GPT-2 XL, 1.56B parameters", "gpt2",
               dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=1024), 1024),
        Preset("llama-7b", "Llama-2 7B", "llama",
               dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096), 4096),
        Preset("llama-70b", "Llama-2 70B, grouped-query attention", "llama",
               dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                    num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096), 4096),
        Preset("mixtral-8x7b", "Mixtral 8x7B, 8 experts, top-2 routing", "mixtral",
               dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                    max_position_embeddings=32768), 32768),
    ]
}


def _families() -> dict[str, tuple[Callable[..., Any], Callable[[Any], nn.Module]]]:
    try:
        import transformers
    except ImportError as e:
        raise ImportError('presets need transformers: pip install "autosplit[hf]"') from e
    return {
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    }


def get(name: str) -> Preset:
    """The preset called ``name``; an unknown name lists the known ones."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        close = difflib.get_close_matches(name.lower(), PRESETS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}.{hint}") from None


def build(name: str, *, batch: int = 1, seq: int | None = None,
          device: str | torch.device = "meta") -> tuple[nn.Module, tuple[TensorSpec]]:
    """Build preset ``name`` on ``device`` (no weight memory on meta) and its token-id input spec.

    Example:
        >>> model, inputs = build("gpt2-xl", batch=8, seq=1024)
        >>> traced = autosplit.capture(model, inputs)
    """
    preset = get(name)
    seq = preset.max_seq if seq is None else seq
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be at least 1, e.g. batch=8, seq=1024; got batch={batch}, seq={seq}")
    if seq > preset.max_seq:
        raise ValueError(f"{name} takes sequences up to {preset.max_seq} tokens; got seq={seq}")
    config_cls, model_cls = _families()[preset.family]
    config = config_cls(**preset.config, use_cache=False)
    with torch.device(device):
        model = model_cls(config)
    model.tie_weights()
    return model, (spec((batch, seq), dtype=torch.long, dims=("batch", "seq")),)

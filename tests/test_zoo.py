"""The model zoo through the public API: every model of models.ZOO, split by
``autosplit.autosplit`` over 2 and 3 CPU devices and with 2 microbatches, either trains exactly
like a copy of itself (outputs and their structure, every gradient, every buffer after the call,
the update of one optimizer step) or is refused with the documented error, the model untouched.

Models are compared in training mode: their dropout is off, so training mode is deterministic.
"""

import copy

import pytest
import torch
import torch.utils._pytree as pytree

import autosplit
import models
from autosplit import MicrobatchError
from checks import assert_trains_like, assert_unchanged

SPLITS = [(2, 1), (3, 1), (3, 2)]
"""(devices, microbatches) each model is split with."""

HF_SPLITS = [(2, 1), (3, 2)]
"""The Hugging Face models' splits: each takes seconds (two captures by torch.export, and an
op-level solve on graphs of a few hundred nodes), so 2 and 3 devices and microbatches are
covered in two splits, not three."""

HF = {"gpt2", "llama", "qwen2", "mixtral", "qwen2_moe", "bert", "t5", "vit", "wav2vec2"}

REFUSED_MICROBATCHED = {
    # BatchNorm in training normalizes with the statistics of the batch it sees; the mode can
    # change after the split, so it is refused at the call
    "rescnn": ("call", r"stem\.1 \(BatchNorm2d and 8 more\) computes batch statistics in training mode"),
    # buffer writes would run once per microbatch
    "step_counter": ("split", r"updates n in forward .* would run 2 times per call"),
    "ema": ("split", r"updates ema in forward \(aten\.mul_\.Tensor in the model\), .* would run 2 times per call"),
    "running_norm": ("split", r"updates norm\.running_mean \(and 1 more\) in forward \(.* in norm\)"),
    "no_grad_stats": ("split", r"updates running_mean in forward \(.*\), .* would run 2 times per call"),
    # a default tensor of the batch's size would meet microbatches of half that size
    "pipe_default_y": ("split", r"PipeKwargs\.forward's default for 'y' is a tensor of shape \(8, 16\)"),
}
"""The models whose microbatched split is refused: where (by ``autosplit()`` or at the call) and
what the message must say."""


VANISHING = {"bert": ("attention.self.key.bias",), "vit": ("attention.k_proj.bias",),
             "wav2vec2": ("attention.k_proj.bias",)}
"""Key-projection biases: softmax ignores what they add to each query's scores, so their gradient
is zero in exact arithmetic and the computed one is roundoff (1e-16 to 1e-11 here) that differs
once microbatches change the summation order. (Qwen2's is not: rotary embeddings turn the bias
differently at each position, so its gradient is real and compared.)"""


def cases():
    for name in models.ZOO:
        for devices, microbatches in HF_SPLITS if name in HF else SPLITS:
            if microbatches > 1 and name in REFUSED_MICROBATCHED:
                continue
            yield pytest.param(name, devices, microbatches, id=f"{name}-{devices}dev-{microbatches}mb")


def two_halves(args, kwargs):
    """The batch followed by itself reversed: every microbatch of 2 differs from the other."""
    return pytree.tree_map(lambda t: torch.cat([t, t.flip(0)]) if isinstance(t, torch.Tensor) and t.dim() else t,
                           (args, kwargs))


@pytest.mark.parametrize("name, devices, microbatches", cases())
def test_the_split_trains_exactly_like_the_model(name, devices, microbatches):
    """Split on ``devices`` stages, the split computes what a copy of the model computes: the same
    outputs in the same structure, every gradient, every buffer after the call, and the same
    update from one optimizer step."""
    model, args, kwargs = models.ZOO[name]()
    if microbatches > 1:
        args, kwargs = two_halves(args, kwargs)
    model.train()
    reference = copy.deepcopy(model)
    split = autosplit.autosplit(model, devices=["cpu"] * devices, example_inputs=args, example_kwargs=kwargs,
                                microbatches=microbatches)
    assert len(split.plan.stages) == devices and split.microbatches == microbatches
    # a model that caches keys and values by default is captured without its cache: the split
    # returns past_key_values=None, as the model does with use_cache=False
    caches = getattr(getattr(model, "config", None), "use_cache", False)
    assert_trains_like(split, reference, args, kwargs, reference_kwargs={**kwargs, "use_cache": False} if caches
                       else kwargs, vanishing=VANISHING.get(name, ()))


@pytest.mark.parametrize("name", sorted(REFUSED_MICROBATCHED))
def test_microbatches_that_would_change_the_result_are_refused_and_the_model_is_untouched(name):
    """Where microbatches would compute something else than the batch, the split (or its call)
    raises MicrobatchError naming the module, buffer or argument at fault and the fix, and every
    parameter and buffer of the model is bit-identical to a copy made before, on its device."""
    model, args, kwargs = models.ZOO[name]()
    model.train()
    before = copy.deepcopy(model)
    when, message = REFUSED_MICROBATCHED[name]
    refused = pytest.raises(MicrobatchError, match=f"(?s){message}.*microbatches=1")
    split = lambda: autosplit.autosplit(model, devices=["cpu"] * 2, example_inputs=args,  # noqa: E731
                                        example_kwargs=kwargs, microbatches=2)
    if when == "split":
        with refused:
            split()
    else:
        built = split()
        with refused:
            built(*args, **kwargs)
    assert_unchanged(model, before)

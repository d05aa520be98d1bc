"""Real tensors for the part of a ``meta`` model that one rank runs, initialized by the model's own code.

    with torch.device("meta"):
        model = GPT(config)                      # no weight memory anywhere
    pipe = autosplit.distributed.build(model, plan, loss_fn=..., example_inputs=(x,))
    # this rank's stage has real, initialized weights; the rest of the model is still on meta

What is materialized. A rank holds the tensors its stage reads and those the plan stores on it.
Every module that owns one of them, under any of its names, gets all its own tensors (not its
children's) allocated on the rank's device; every other module stays on ``meta``. The tensors keep
their Python objects (their implementations are swapped, as ``torch.utils.swap_tensors`` does),
because the stage's graph and the tied modules refer to those very objects.

How it is initialized. As the model's own code does it, module by module, children before their
parent (the order of Hugging Face's ``initialize_weights``):

1. ``module.reset_parameters()`` (or ``_reset_parameters()``) where the module has one: what a
   ``torch.nn`` layer's constructor ran (BatchNorm's also resets its running statistics);
2. inside a Hugging Face model, ``_init_weights(module)`` of the nearest enclosing
   ``PreTrainedModel``: the model's own scheme (GPT-2's scaled residual projections, Mixtral's
   experts), which also recomputes the rotary ``inv_freq`` buffers that no checkpoint holds;
3. the caller's ``init_fn(module)``, for modules neither of the above covers; a model-level
   per-module initializer such as nanoGPT's ``model._init_weights`` can be passed as it is.

These run on every module that owns a materialized tensor and on all its ancestors, since a
parent may set its children's tensors (GPT-2's attention block sets ``c_proj.weight``).

Running example: TiedLM (``embed`` tied to ``head``) on two stages, rank 1 running the last
block, ``norm`` and ``head``. ``head.weight`` is ``embed.weight``, so rank 1 materializes
``embed`` too. ``head.reset_parameters()`` would draw that tensor again from the head's
(kaiming) distribution; in the model built on the CPU the tie was made after construction, so
the embedding's init stands. Likewise here: a tensor keeps what the init of its canonical owner
(the module of its first ``state_dict`` name) and that owner's ancestors wrote; another
module's write to it is undone.

Determinism. Each module's init draws from the random generator seeded with (seed, the module's
name): a tensor gets the same value on whichever rank materializes it, under any plan, and in a
one-process :func:`materialize` of the whole model with that seed, so the copies of a tied
weight on two ranks start equal. (A model built on the CPU after ``torch.manual_seed(seed)``
draws every module from one stream instead: same distributions, other values. Values written
without the generator, such as LayerNorm's ones or an ``inv_freq`` table, are the same.) An
ancestor's init that draws for several children gives each child the values of that shared
draw, which then depend on which of the children are materialized: deterministic for a plan,
not across plans.

Nothing is left unset silently: a materialized tensor that no init wrote (its version counter did
not move) is an error naming it, unless it is persistent and a checkpoint will be loaded into it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import sys
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from autosplit.errors import AutosplitError

logger = logging.getLogger(__name__)

InitFn = Callable[[nn.Module], None]
"""Sets a module's own tensors in place (``init_fn(module)``), called under ``torch.no_grad()``."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One name of a tensor: the module that holds it and the attribute it is held under."""

    module_name: str
    module: nn.Module
    attribute: str
    tensor: torch.Tensor
    persistent: bool
    """Saved by ``state_dict`` (parameters, and buffers not registered with ``persistent=False``)."""

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.attribute}" if self.module_name else self.attribute


def materialize(model: nn.Module, device: torch.device | str = "cpu", *, seed: int | None = None,
                init_fn: InitFn | None = None) -> nn.Module:
    """Give every ``meta`` tensor of ``model`` a value on ``device``, in place, initialized as
    :func:`materialize_tensors` does for one rank; returns the model.

    With the same seed, the values equal those the ranks of a pipeline get for their parts
    (``autosplit.distributed.build`` seeds with rank 0's ``torch.initial_seed()``).

    Args:
        seed: default ``torch.initial_seed()``.
        init_fn: sets the tensors of modules that have neither ``reset_parameters()`` nor a
            Hugging Face ``_init_weights``.

    Example:
        >>> torch.manual_seed(0)
        >>> with torch.device("meta"):
        ...     model = GPT(config)
        >>> autosplit.distributed.materialize(model, "cpu", seed=0)
    """
    tensors = [t for t in _unique(e.tensor for e in _entries(model)) if t.is_meta]
    materialize_tensors(model, tensors, torch.device(device), seed=torch.initial_seed() if seed is None else seed,
                        init_fn=init_fn)
    return model


def materialize_tensors(model: nn.Module, tensors: Iterable[torch.Tensor], device: torch.device, *, seed: int,
                        init_fn: InitFn | None = None, checkpoint_follows: bool = False) -> list[torch.Tensor]:
    """Allocate the modules that own any of ``tensors`` (those on ``meta``) on ``device`` and
    initialize them (see the module docstring); returns every tensor allocated.

    Args:
        checkpoint_follows: a checkpoint will be loaded into the persistent tensors: only the
            modules that hold non-persistent buffers (which no checkpoint holds) are initialized.

    Raises:
        AutosplitError: a meta tensor that is no parameter or buffer of the model, an allocated
            tensor that no init wrote (non-persistent buffers always; persistent tensors unless
            ``checkpoint_follows``), or an init that replaced a tensor by one of another shape.
    """
    tensors = [t for t in tensors if t.is_meta]
    entries = list(_entries(model))
    canonical: dict[int, _Entry] = {}
    for entry in entries:
        canonical.setdefault(id(entry.tensor), entry)
    orphan = next((t for t in tensors if id(t) not in canonical), None)
    if orphan is not None:
        raise AutosplitError(
            f"a {tuple(orphan.shape)} {orphan.dtype} tensor on meta is read by the stage but is no parameter or buffer "
            "of the model (a tensor attribute the capture kept as a constant), so no initialization can give it a "
            "value: register it as a buffer (self.register_buffer(name, tensor, persistent=False)) whose module's "
            "reset_parameters() computes it, or build the model with real tensors")
    owners = _owning_modules(entries, {id(t) for t in tensors})
    if not owners:
        return []
    allocated: dict[int, torch.Tensor] = {}
    for module in owners.values():
        for tensor in _own_tensors(module):
            if tensor.is_meta and id(tensor) not in allocated:
                _allocate(tensor, device)
                allocated[id(tensor)] = tensor
    wanted = {i for i, t in allocated.items() if not checkpoint_follows or not canonical[i].persistent}
    initialized = _initialize(model, canonical, allocated, wanted, device, seed, init_fn)
    unset = [canonical[i] for i in wanted if i not in initialized]
    if unset:
        raise AutosplitError(_unset_message(unset, device))
    logger.info("materialized %d tensors (%.1f MiB) of %d modules on %s, %s", len(allocated),
                sum(t.numel() * t.element_size() for t in allocated.values()) / 2**20, len(owners), device,
                "initialized the non-persistent buffers for a checkpoint" if checkpoint_follows else "initialized")
    return list(allocated.values())


def _entries(model: nn.Module) -> Iterator[_Entry]:
    """Every name of every parameter and buffer, in ``state_dict`` order (module by module, first
    the module's own parameters, then its buffers): the first name of a tensor is its canonical
    one, as in ``named_parameters()``."""
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attribute, tensor in module._parameters.items():
            if tensor is not None:
                yield _Entry(module_name, module, attribute, tensor, True)
        for attribute, tensor in module._buffers.items():
            if tensor is not None:
                yield _Entry(module_name, module, attribute, tensor,
                             attribute not in module._non_persistent_buffers_set)


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return list({id(t): t for t in tensors}.values())


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in [*module._parameters.values(), *module._buffers.values()] if t is not None]


def _owning_modules(entries: list[_Entry], wanted: set[int]) -> dict[int, nn.Module]:
    """The modules that own a wanted meta tensor under any name, closed over sharing: a module's
    other meta tensors are allocated with it, so their owners are allocated (and initialized) too."""
    owners: dict[int, nn.Module] = {}
    grown = True
    while grown:
        grown = False
        for entry in entries:
            if id(entry.tensor) in wanted and id(entry.module) not in owners:
                owners[id(entry.module)] = entry.module
                wanted |= {id(t) for t in _own_tensors(entry.module) if t.is_meta}
                grown = True
    return owners


def _allocate(tensor: torch.Tensor, device: torch.device) -> None:
    """Give a meta tensor uninitialized memory on ``device``, keeping its Python object (its class
    and attributes, but for Hugging Face's ``_is_hf_initialized`` flag: its values are new).

    The tensor implementations are swapped as ``torch.utils.swap_tensors`` swaps them, without
    its refusal of tensors that have weak references: torch.export's fake-tensor converter keys
    its memo by a weak reference to every weight it saw, and that memo outlives the capture. Its
    entry maps the old meta tensor to a fake one and is not consulted again.
    """
    if tensor._use_count() > 2:  # one for the object itself, one for an AccumulateGrad node
        raise AutosplitError(f"cannot give a {tuple(tensor.shape)} meta tensor memory on {device} in place: other "
                             "tensors share its implementation (an autograd graph run on the meta model?); build the "
                             "pipeline from a model that has run no forward pass")
    empty = torch.empty_like(tensor, device=device).requires_grad_(tensor.requires_grad)
    torch._C._swap_tensor_impl(tensor, empty)
    tensor.__dict__.pop("_is_hf_initialized", None)


def _initialize(model: nn.Module, canonical: dict[int, _Entry], allocated: dict[int, torch.Tensor],
                wanted: set[int], device: torch.device, seed: int, init_fn: InitFn | None) -> set[int]:
    """Run the inits of the owners of the ``wanted`` tensors and of their ancestors, children
    first; returns the ids of the allocated tensors an init wrote and kept."""
    targets = set()
    for i in wanted:
        parts = canonical[i].module_name.split(".") if canonical[i].module_name else []
        targets |= {".".join(parts[:k]) for k in range(len(parts) + 1)}
    modules = dict(model.named_modules())
    initialized: set[int] = set()
    for name, module in _children_first(model):
        if name not in targets:
            continue
        inside = (lambda owner, name=name: not name or owner == name or owner.startswith(name + "."))
        reachable = [t for t in _unique([*module.parameters(), *module.buffers()]) if id(t) in allocated]
        foreign = {id(t): t.detach().clone() for t in reachable if not inside(canonical[id(t)].module_name)}
        held = {(id(sub), attribute): t for sub in module.modules()
                for attribute, t in [*sub._parameters.items(), *sub._buffers.items()]
                if t is not None and id(t) in allocated}
        versions = {id(t): t._version for t in reachable}
        with _seeded(seed, name, device), torch.no_grad():
            _run_inits(module, _pretrained_owner(name, modules), init_fn)
        replaced = _put_back(module, held)
        for t in reachable:
            if id(t) not in foreign and (t._version != versions[id(t)] or id(t) in replaced):
                initialized.add(id(t))
        with torch.no_grad():
            for i, value in foreign.items():
                allocated[i].copy_(value)
    return initialized


def _children_first(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module once (under its first name), each after all of its children."""
    order: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def visit(name: str, module: nn.Module) -> None:
        seen.add(id(module))
        for child_name, child in module.named_children():
            if id(child) not in seen:
                visit(f"{name}.{child_name}" if name else child_name, child)
        order.append((name, module))

    visit("", model)
    return order


def _pretrained_owner(name: str, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The nearest Hugging Face ``PreTrainedModel`` that contains the module ``name`` (itself
    included), whose ``_init_weights`` initializes it; None outside such models."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return None
    parts = name.split(".") if name else []
    for k in range(len(parts), -1, -1):
        candidate = modules.get(".".join(parts[:k]))
        if isinstance(candidate, transformers.PreTrainedModel):
            return candidate
    return None


def _run_inits(module: nn.Module, pretrained: nn.Module | None, init_fn: InitFn | None) -> None:
    # nn.MultiheadAttention and nn.Transformer name theirs _reset_parameters
    reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
    if callable(reset):
        reset()
    if pretrained is not None:
        with _hf_init_guard():
            pretrained._init_weights(module)
    if init_fn is not None:
        init_fn(module)


def _hf_init_guard() -> contextlib.AbstractContextManager:
    """Hugging Face's guard around ``_init_weights`` (its ``initialize_weights`` runs under it)."""
    try:
        from transformers.initialization import guard_torch_init_functions
    except ImportError:
        return contextlib.nullcontext()
    return guard_torch_init_functions()


@contextlib.contextmanager
def _seeded(seed: int, name: str, device: torch.device) -> Iterator[None]:
    """The CPU generator (and the rank's CUDA device's) seeded from ``seed`` and ``name``, and
    restored afterwards: materializing leaves the caller's random stream as it was."""
    derived = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(derived)
        if cuda:
            torch.cuda.default_generators[cuda[0]].manual_seed(derived)
        yield


def _put_back(module: nn.Module, held: dict[tuple[int, str], torch.Tensor]) -> set[int]:
    """Where an init replaced an allocated tensor by a new object (``self.inv_freq = ...``), copy
    the new value into the original object and put that back: the stage's graph refers to it.
    Returns the ids of the tensors so set."""
    replaced = set()
    for sub in module.modules():
        for slots in (sub._parameters, sub._buffers):
            for attribute, now in list(slots.items()):
                was = held.get((id(sub), attribute))
                if was is None or now is was:
                    continue
                if now is None or tuple(now.shape) != tuple(was.shape):
                    got = "None" if now is None else f"shape {tuple(now.shape)}"
                    raise AutosplitError(
                        f"initializing {type(sub).__name__} set its {attribute!r} to {got}, where the model built on "
                        f"meta has shape {tuple(was.shape)}: build the model on meta with its final shapes")
                with torch.no_grad():
                    was.copy_(now)
                slots[attribute] = was
                replaced.add(id(was))
    return replaced


def _unset_message(unset: list[_Entry], device: torch.device) -> str:
    names = ", ".join(f"{e.name} ({type(e.module).__name__})" for e in unset[:5])
    more = f" and {len(unset) - 5} more" if len(unset) > 5 else ""
    if all(not e.persistent for e in unset):
        why, load = "non-persistent buffers, which no checkpoint holds: only an initialization computes them", ""
    else:
        why = "tensors that no initialization wrote"
        load = ", or load them from a checkpoint (build(..., checkpoint=path))"
    return (f"{names}{more} were materialized from meta on {device}, but are {why}; their modules have no "
            "reset_parameters() and no Hugging Face _init_weights sets them. Pass init_fn=fn to build() (or "
            f"materialize()), where fn(module) sets a module's own tensors in place{load}")

"""Checkpoints under the model's own names, written and read by every rank for its own stage.

    autosplit.distributed.save(pipe, "ckpt/step_1000", optimizer=opt)   # every rank, its tensors
    pipe = autosplit.distributed.build(meta_model, other_plan, ..., checkpoint="ckpt/step_1000")
    autosplit.distributed.load(pipe, "ckpt/step_1000", optimizer=opt)   # the optimizer's state too
    autosplit.distributed.load(model, "ckpt/step_1000")                 # into the unsplit model

The format is torch.distributed.checkpoint's (a directory of ``.distcp`` files and a
``.metadata`` file), with the keys of the unsplit model's ``state_dict()``: each parameter and
persistent buffer under its canonical name (the first of its names, as ``named_parameters()``
gives it: a weight tied between the embedding and the LM head is saved once, as the embedding's).
Each rank writes the tensors of its stage; a weight that several ranks hold a copy of is written
by one of them (DCP keeps one copy of a tensor several ranks save under one key). Nothing in it
depends on the plan, so a checkpoint written under one plan loads under any other plan of the
model, with another number of stages, and into or from the unsplit model: a checkpoint the
unsplit model wrote with :func:`save` (or with ``dcp.save(model.state_dict(), ...)``, whose
extra names for tied weights are read as aliases) loads into a pipeline.
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` turns one into a plain
``torch.save`` file.

Sharded weights are saved as the DTensors they are: a tensor-parallel stage's (``Shard(d)`` or
``Replicate()`` on the stage's ``tp`` group, in the plan's layout) and FSDP2's (``Shard(0)`` on
a stage's ``dp`` replicas). Each rank writes its shard with its offset in the whole tensor, DCP
keeps one copy of a shard several ranks hold (a replicated weight, each replica's, each
stage's copy of a tied weight: the copies are sharded alike), and the checkpoint holds every
tensor whole, under its name, as if the unsplit model had written it. Reading cuts each
target's own slice from it, so a checkpoint of a pp=2 × tp=2 pipeline loads into a pipeline of
4 stages without tensor parallelism, into the unsplit model, or into another tensor-parallel
layout, and the other way round.

Optimizer state, when given, sits under the key ``optimizer`` in the form of
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` with
``flatten_optimizer_state_dict=True``: one entry per parameter (``optimizer.state.<name>.exp_avg``,
``optimizer.param_groups.<name>.lr``), so it too loads under another plan. The moments of a
sharded weight are DTensors sharded as their weight, and are saved and read as the weights are.

Non-persistent buffers (rotary ``inv_freq``) are not saved, as ``state_dict()`` leaves them out:
the model's initialization computes them (:mod:`autosplit.distributed.materialize`).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Iterator, Mapping

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, distribute_tensor

from autosplit.distributed.runtime import DistributedPipeline, raise_on_every_rank

OPTIMIZER_KEY = "optimizer"
"""The key of the optimizer's state in a checkpoint, beside the model's tensors."""

_OPTIMIZER_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def state_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name ``model.state_dict()`` gives each parameter and persistent buffer, by tensor
    id, in ``state_dict`` order: the first is the canonical name."""
    names: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if isinstance(tensor, torch.Tensor):
            names.setdefault(id(tensor), []).append(name)
    return names


def pipeline_state_dict(pipe: DistributedPipeline) -> dict[str, torch.Tensor]:
    """This rank's parameters and persistent buffers under their canonical names (detached,
    sharing memory with the model's), as :meth:`DistributedPipeline.state_dict` gives them: a
    sharded weight as its DTensor (``full_tensor()`` gathers it whole over its group)."""
    return {names[0]: tensor.detach() for names, tensor in _rank_tensors(pipe)}


def load_pipeline_state_dict(pipe: DistributedPipeline, state_dict: Mapping[str, torch.Tensor],
                             strict: bool = True) -> None:
    """Copy into this rank's tensors their values in ``state_dict`` (a whole model's, or a
    rank's), found under any of their names. Entries for other ranks' tensors are skipped. A
    sharded weight (a DTensor) takes its own slice of a whole tensor, or a DTensor's value on
    its own mesh.

    Raises:
        KeyError: with ``strict``, a tensor of this rank has no entry, or an entry names no
            tensor of the model.
        ValueError: an entry's shape differs from the tensor's.
    """
    rank_tensors = _rank_tensors(pipe)
    missing = [names[0] for names, _ in rank_tensors if not any(n in state_dict for n in names)]
    known = {name for names in state_names(pipe._model).values() for name in names}
    unknown = [key for key in state_dict if key not in known]
    if strict and (missing or unknown):
        raise KeyError(_key_message(missing, unknown, "the state_dict") + ", or pass strict=False to skip them")
    pairs = [(key, state_dict[key], tensor) for names, tensor in rank_tensors
             if (key := next((n for n in names if n in state_dict), None)) is not None]
    for key, value, tensor in pairs:  # all checked before any is copied
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f"{key} is {tuple(value.shape)} in the state_dict but {tuple(tensor.shape)} in the "
                             "model: load a state_dict of this model's configuration")
    with torch.no_grad():
        for _, value, tensor in pairs:
            _copy_whole(tensor, value)


def save(target: DistributedPipeline | nn.Module, path: str | os.PathLike, *,
         optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write a checkpoint of a pipeline (called on every rank, each writing its stage) or of an
    unsplit model (called in one process), in the format the module docstring describes.

    Args:
        target: a :class:`DistributedPipeline`, or a plain ``nn.Module`` with real tensors.
        path: a directory; created if needed, files of the same names replaced.
        optimizer: also save its state (for a pipeline: this rank's optimizer).

    Raises:
        ValueError: the model has tensors on ``meta``, or a state key that collides with
            ``"optimizer"`` while an optimizer is saved.
        DistributedError: another rank could not prepare its part (raised on every rank).

    Example:
        >>> autosplit.distributed.save(pipe, f"ckpt/{step}", optimizer=opt)
    """
    pipeline = isinstance(target, DistributedPipeline)
    error, state = None, {}
    try:
        model, named = _target_tensors(target)
        state = {names[0]: tensor.detach() for names, tensor in named}
        if optimizer is not None:
            _refuse_optimizer_key_collision(state)
            state[OPTIMIZER_KEY] = get_optimizer_state_dict(model, optimizer, options=_OPTIMIZER_OPTIONS)
    except Exception as e:  # the other ranks would wait in dcp.save for this one
        if not pipeline:
            raise
        error = e
    if pipeline:
        raise_on_every_rank(error, "prepare its part of the checkpoint")
    os.makedirs(path, exist_ok=True)
    with _quiet_single_process(not pipeline):
        dcp.save(state, checkpoint_id=path, no_dist=not pipeline)


def load(target: DistributedPipeline | nn.Module, path: str | os.PathLike, *,
         optimizer: torch.optim.Optimizer | None = None) -> None:
    """Read a checkpoint into a pipeline (called on every rank, each reading its stage's tensors)
    or into an unsplit model (in one process), whatever plan or model wrote it.

    Each tensor is read under its canonical name, or else under another of its names (a
    checkpoint of ``model.state_dict()`` names a tied weight twice). Values are copied exactly.

    Args:
        target: a :class:`DistributedPipeline`, or a plain ``nn.Module`` with real tensors
            (build it on meta and ``materialize()`` it, or ``to_empty()`` it, first).
        optimizer: also load its state; it must hold the target's parameters (for a pipeline:
            ``pipe.parameters()``).

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        KeyError: a tensor of the target (or its optimizer state) is not in the checkpoint.
        ValueError: a tensor's shape or dtype differs from the checkpoint's, or the target
            has tensors on ``meta``.
        DistributedError: another rank could not prepare its part (raised on every rank).

    Example:
        >>> opt = torch.optim.AdamW(pipe.parameters())
        >>> autosplit.distributed.load(pipe, "ckpt/1000", optimizer=opt)
    """
    pipeline = isinstance(target, DistributedPipeline)
    error, state, model = None, {}, None
    try:
        model, named = _target_tensors(target)
        stored = _stored_keys(path)
        state = _read_template(named, stored, path)
        if optimizer is not None:
            _refuse_optimizer_key_collision(state)
            state[OPTIMIZER_KEY] = get_optimizer_state_dict(model, optimizer, options=_OPTIMIZER_OPTIONS)
            missing = [f"{OPTIMIZER_KEY}.{key}" for key in state[OPTIMIZER_KEY]
                       if f"{OPTIMIZER_KEY}.{key}" not in stored]
            if missing:
                raise KeyError(f"the checkpoint at {path} holds no optimizer state for {', '.join(missing[:3])}"
                               f"{' ...' if len(missing) > 3 else ''}: it was saved without optimizer=, or with "
                               "another optimizer; load it without optimizer= and start the optimizer afresh")
    except Exception as e:
        if not pipeline:
            raise
        error = e
    if pipeline:
        raise_on_every_rank(error, "prepare to load the checkpoint")
    with _quiet_single_process(not pipeline):
        dcp.load(state, checkpoint_id=path, no_dist=not pipeline)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state[OPTIMIZER_KEY], options=_OPTIMIZER_OPTIONS)


def _copy_whole(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` into ``tensor``; into a DTensor (a tensor-parallel or FSDP2 shard), the
    slice of a whole ``value`` that this rank holds, cut locally (no rank waits for another)."""
    if isinstance(tensor, DTensor) and not isinstance(value, DTensor):
        value = distribute_tensor(value.to(tensor.device), tensor.device_mesh, tensor.placements, src_data_rank=None)
    tensor.copy_(value)


@contextlib.contextmanager
def _quiet_single_process(single: bool) -> Iterator[None]:
    """Without DCP's warning that it assumes a single process: for an unsplit model that is
    what was asked for."""
    with warnings.catch_warnings():
        if single:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rank_tensors(pipe: DistributedPipeline) -> list[tuple[list[str], torch.Tensor]]:
    """This rank's parameters and persistent buffers with all their names."""
    names = state_names(pipe._model)
    tensors = {id(t): t for t in [*pipe._model.parameters(), *pipe._model.buffers()]}
    return [(names[i], tensors[i]) for i in names if i in pipe._held]


def _target_tensors(target: DistributedPipeline | nn.Module) -> tuple[nn.Module, list[tuple[list[str], torch.Tensor]]]:
    """The model and the tensors a checkpoint of ``target`` holds, with their names."""
    if isinstance(target, DistributedPipeline):
        return target._model, _rank_tensors(target)
    if not isinstance(target, nn.Module):
        raise TypeError(f"save() and load() take a DistributedPipeline or an nn.Module; got {type(target).__name__}")
    names = state_names(target)
    tensors = {id(t): t for t in [*target.parameters(), *target.buffers()]}
    named = [(names[i], tensors[i]) for i in names]
    on_meta = [n[0] for n, t in named if t.is_meta]
    if on_meta:
        raise ValueError(f"{on_meta[0]} and {len(on_meta) - 1} more tensors are on meta, with no memory to save from "
                         "or load into: autosplit.distributed.materialize(model, device) (or model.to_empty(device="
                         "...)) first, or build a pipeline, which materializes its own stage")
    return target, named


def _stored_keys(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's keys with their metadata (shape and dtype for tensors)."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"no torch.distributed.checkpoint checkpoint at {path} (no .metadata file there): "
                                "pass the directory that autosplit.distributed.save() or dcp.save() wrote")
    return dict(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)


def _read_template(named: list[tuple[list[str], torch.Tensor]], stored: dict[str, Any],
                   path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors to read in place, each under the name the checkpoint holds it by."""
    template, missing = {}, []
    for names, tensor in named:
        key = next((n for n in names if n in stored), None)
        if key is None:
            missing.append(names[0])
            continue
        meta = stored[key]
        if not isinstance(meta, TensorStorageMetadata):
            raise ValueError(f"the checkpoint at {path} holds {key} as an object, not a tensor")
        if tuple(meta.size) != tuple(tensor.shape) or meta.properties.dtype != tensor.dtype:
            raise ValueError(f"{key} is {tuple(meta.size)} {meta.properties.dtype} in the checkpoint at {path} but "
                             f"{tuple(tensor.shape)} {tensor.dtype} in the model: load a checkpoint of this model's "
                             "configuration, in its dtype")
        template[key] = tensor.detach()
    if missing:
        raise KeyError(_key_message(missing, [], f"the checkpoint at {path}"))
    return template


def _refuse_optimizer_key_collision(state: Mapping[str, Any]) -> None:
    clash = next((k for k in state if k == OPTIMIZER_KEY or k.startswith(OPTIMIZER_KEY + ".")), None)
    if clash is not None:
        raise ValueError(f"the model has a tensor named {clash!r}, where a checkpoint keeps the optimizer's state: "
                         "save the optimizer separately (torch.distributed.checkpoint.state_dict."
                         "get_optimizer_state_dict) or rename the module")


def _key_message(missing: list[str], unknown: list[str], where: str) -> str:
    parts = []
    if missing:
        parts.append(f"{where} has no entry for {', '.join(missing[:5])}"
                     f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''} (under any of their names)")
    if unknown:
        parts.append(f"{where} has entries that name no tensor of the model: {', '.join(unknown[:5])}")
    return "; ".join(parts) + ": load a checkpoint of this model (written under any plan of it, or unsplit)"

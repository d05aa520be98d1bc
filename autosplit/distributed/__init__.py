"""Multi-process execution of a Plan: one pipeline stage per rank, on torch.distributed.pipelining.

    plan = autosplit.distributed.plan_and_broadcast(model, example_inputs=(x,), microbatches=8)
    pipe = autosplit.distributed.build(model, plan, loss_fn=loss_fn, example_inputs=(x,))
    opt = torch.optim.AdamW(pipe.parameters())
    loss = pipe.step(x, target=y); opt.step(); opt.zero_grad()

Run the same script on every rank (``torchrun --nproc-per-node=<stages> train.py``). Every rank
must apply the same plan: rank 0 plans and broadcasts it (:func:`plan_and_broadcast`), or every
rank loads one plan file; :func:`build` refuses ranks that disagree.

``stages.py`` builds the stages of a plan as graph modules that pass tensors along a chain;
``recompute.py`` makes a stage recompute in backward the blocks the plan says, each under its
policy, with ``torch.utils.checkpoint``;
``runtime.py`` sets up the process groups, checks that the ranks agree, and runs the schedule;
``materialize.py`` gives a model built on ``meta`` memory for one rank's stage and initializes it;
``checkpoint.py`` saves and loads per rank under the model's own names (any plan, or unsplit);
``memory.py`` reports a rank's memory beside the plan's figure for its stage;
``tensor_parallel.py`` runs a captured graph on a tensor-parallel mesh as
``autosplit.sharding.choose_layouts`` laid it out (:class:`TensorParallelModule`).
"""

from autosplit.distributed.checkpoint import load, save
from autosplit.distributed.materialize import materialize
from autosplit.distributed.memory import MemoryReport
from autosplit.distributed.runtime import (DistributedPipeline, build, init_process_group, plan_and_broadcast,
                                           plan_digest)
from autosplit.distributed.tensor_parallel import TensorParallelModule
from autosplit.errors import DistributedError

__all__ = ["DistributedError", "DistributedPipeline", "MemoryReport", "TensorParallelModule", "build",
           "init_process_group", "load", "materialize", "plan_and_broadcast", "plan_digest", "save"]

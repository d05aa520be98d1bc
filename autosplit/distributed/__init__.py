"""Multi-process execution of a Plan: one pipeline stage per rank, on torch.distributed.pipelining.

    plan = autosplit.distributed.plan_and_broadcast(model, example_inputs=(x,), microbatches=8)
    pipe = autosplit.distributed.build(model, plan, loss_fn=loss_fn, example_inputs=(x,))
    opt = torch.optim.AdamW(pipe.parameters())
    loss = pipe.step(x, target=y); opt.step(); opt.zero_grad()

Run the same script on every rank (``torchrun --nproc-per-node=<stages> train.py``). Every rank
must apply the same plan: rank 0 plans and broadcasts it (:func:`plan_and_broadcast`), or every
rank loads one plan file; :func:`build` refuses ranks that disagree.

``stages.py`` builds the stages of a plan as graph modules that pass tensors along a chain;
``runtime.py`` sets up the process groups, checks that the ranks agree, and runs the schedule.
"""

from autosplit.distributed.runtime import (DistributedPipeline, build, init_process_group, plan_and_broadcast,
                                           plan_digest)
from autosplit.errors import DistributedError

__all__ = ["DistributedError", "DistributedPipeline", "build", "init_process_group", "plan_and_broadcast",
           "plan_digest"]

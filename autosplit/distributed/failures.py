"""What the ranks of a pipeline do when one of them fails in a step, so that none waits for it.

The problem. The ranks of a pipeline wait on each other: if the last stage raises in the user's
``loss_fn``, the stage before it is left in a receive of gradients that never come, and gloo ends
that receive only at the group's timeout (600 s by default), with a message that names neither
the failing rank nor its error. Telling the others through a collective after the step cannot
work: a rank stuck in a receive never reaches it.

What does not end a waiting receive, checked on torch 2.13 with 2 gloo ranks on localhost:
``ProcessGroup.abort()`` and ``shutdown()`` called from a second thread of the waiting rank;
and the peer calling ``destroy_process_group(group)`` while anything still refers to the group
(the pipeline's stage does). Only the peer's connections closing ends it, which happens when the
peer's process exits or when the last reference to its group goes. So a waiting rank cannot be
woken reliably from outside: it must not be the thread that waits.

The mechanism. Each step runs in a thread of its own (:meth:`FailureChannel.run`), while the
calling thread watches the store every ``POLL_S``:

1. A rank whose step raises posts a report under the pipeline's key in the store, "rank 1
   (stage 1 of 2) failed in step 3: ValueError: ...": the first report posted wins
   (``compare_set``). It raises :class:`DistributedError` with the report, chained to its error.
2. Every other rank sees the report at its next look, within ``POLL_S``, wherever its step is
   (a receive, a collective, its own compute), and raises :class:`DistributedError` with it. Its
   step's thread is left where it waits: it ends when the group times out or the process exits,
   and nothing it does afterwards reaches the caller.
3. The failing rank waits up to ``REPORT_WAIT_S`` for the others to read the report before it
   raises, since the store may be served by its process (rank 0's, when the group was started from
   ``MASTER_ADDR``; torchrun serves it from its agent) and the process may end right after.

So every rank that is in :meth:`DistributedPipeline.step` when a rank fails raises within about
``POLL_S`` plus a store round trip, whatever the backend; the pipeline then refuses further
steps. Its process groups are left as they are (a waiting step still uses them), and the default
group stays usable. With NCCL the waiting kernels keep the GPU until the group is aborted, which
is done at once (``ProcessGroup.abort()``; not run on several GPUs here).

The step's thread runs with the caller's grad mode, autocast, CUDA device and stream, context
variables (as ``torch.nn.parallel.parallel_apply`` runs its threads) and saved-tensor hooks.

Refusals. A batch that a rank refuses before anything is sent (a shape the pipeline was not built
for) must not leave the other ranks in the schedule, waiting for it. Before each step the ranks
therefore agree, with one small all-reduce, whether any of them refused; if one did, every rank
raises and none enters the schedule, so the pipeline stays usable for the next batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from autosplit.errors import DistributedError

logger = logging.getLogger(__name__)

T = TypeVar("T")

POLL_S = 0.1
"""How often a rank looks in the store for another rank's failure report during a step."""

REPORT_WAIT_S = 5.0
"""How long a failing rank waits for the other ranks to read its report before it raises: the
store may be served by its process, which may end right after."""


class FailureChannel:
    """A pipeline's process groups and the store key through which its ranks report a failure.

    :meth:`create` makes one on every rank, in the same order (making groups is collective).

    Args:
        store: the store every rank reaches (the default group's).
        key: the key under which this pipeline's failure is reported; unique to the pipeline.
        stage: this rank's stage, and ``stages`` how many there are (for the report).
        group: the group the stages send and receive on.
        control: the gloo group on which the ranks agree before each step (``group`` on gloo).
    """

    def __init__(self, store: Any, key: str, stage: int, stages: int, group: Any, control: Any):
        self.store = store
        self.key = key
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.stage = stage
        self.stages = stages
        self.group = group
        self.control = control
        self.aborts: list[Any] = [] if dist.get_backend(group) == "gloo" else [group]
        """Groups to abort when the pipeline stops: NCCL ones, whose kernels would keep waiting."""
        self.report: str | None = None
        """The failure that stopped the pipeline, once one has."""
        self.inline = False
        """Run steps in the calling thread (set while a step's memory is measured on the CPU,
        whose profiler records the allocations of the thread it runs in): a failure of another
        rank then reaches this one when its wait ends, at the group's timeout at worst."""

    @classmethod
    def create(cls, stage: int, stages: int, timeout_s: float, group: Any = None) -> "FailureChannel":
        """Make the pipeline's group over all ranks (or take ``group``, e.g. a replica's ranks of
        a data-parallel mesh, for the stages' sends and receives), and a gloo group over all
        ranks for the agreement before each step where that group is not one (a CPU collective,
        no device sync)."""
        timeout = timedelta(seconds=timeout_s)
        ranks = list(range(dist.get_world_size()))
        everyone = dist.new_group(ranks, timeout=timeout)
        group = group if group is not None else everyone
        control = everyone if dist.get_backend(everyone) == "gloo" else dist.new_group(ranks, timeout=timeout,
                                                                                         backend="gloo")
        # new_group is collective and names groups alike on every rank: the name keys the pipeline.
        # The default group's store is the one store every rank reaches (torch has no public accessor).
        return cls(dist.distributed_c10d._get_default_store(), f"autosplit/{everyone.group_name}/failure", stage,
                   stages, group, control)

    def add_group(self, group: Any) -> None:
        """Count ``group`` (shared weights' gradients) among the pipeline's."""
        if dist.get_backend(group) != "gloo":
            self.aborts.append(group)

    def require_usable(self) -> None:
        if self.report is not None:
            raise DistributedError(f"this pipeline stopped when {self.report}: start the processes again and build a "
                                   "new pipeline")

    def run(self, step: int, refusal: BaseException | None, work: Callable[[], T]) -> T:
        """Agree with the other ranks that none refused step ``step``'s batch, then run ``work()``
        (the schedule), in a thread of its own while this one watches for another rank's report.

        Raises:
            DistributedError: a rank refused the batch (nothing ran; this rank's own refusal is
                raised as it is), or a rank failed in the step (every rank raises its report).
        """
        state = _CallerState()
        result: dict[str, Any] = {}
        done = threading.Event()

        def target() -> None:
            try:
                refusals = self._refusals(refusal)
                result["refusals"] = refusals
                if not refusals:
                    result["value"] = state.run(work)
            except BaseException as e:  # handed to the caller's thread
                result["error"] = e
            finally:
                done.set()

        if self.inline:  # measured: the profiler sees this thread's allocations only
            target()
        else:
            threading.Thread(target=target, name=f"autosplit-step-{step}", daemon=True).start()
        while not done.wait(POLL_S):
            report = self._read_report()
            if report is not None and not done.is_set():
                raise self._stopped_by(report, step)
        if "error" in result:
            raise self.failed(result["error"], step) from result["error"]
        if result["refusals"]:
            if refusal is not None:
                raise refusal
            refused = "; ".join(f"rank {r} refused it: {m}" for r, m in sorted(result["refusals"].items()))
            raise DistributedError(f"no rank ran step {step}: {refused}. The pipeline is usable for the next batch")
        return result["value"]

    def failed(self, error: BaseException, step: int) -> DistributedError:
        """Post this rank's failure in step ``step`` (unless another rank posted first), stop the
        pipeline, and return the error to raise (``raise channel.failed(e, step) from e``)."""
        mine = f"rank {self.rank} (stage {self.stage} of {self.stages}) failed in step {step}: {describe(error)}"
        try:
            first = self.store.compare_set(self.key, "", mine).decode()
        except Exception as e:  # the store's host has ended
            logger.warning("could not post the pipeline's failure report in the store: %s", e)
            first = mine
        if first != mine:
            return self._stopped_by(first, step, own=error)
        self._stop(first)
        self._wait_for_readers()
        return DistributedError(f"{first}. Every rank of the pipeline stops with this report: fix the cause and start "
                                "the processes again")

    def _refusals(self, refusal: BaseException | None) -> dict[int, str]:
        """Every rank's refusal of this step's batch, by rank (empty if none refused)."""
        flag = torch.tensor([int(refusal is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        if not flag.item():
            return {}
        messages: list[Any] = [None] * self.world
        dist.all_gather_object(messages, None if refusal is None else f"{type(refusal).__name__}: {refusal}",
                               group=self.control)
        return {rank: message for rank, message in enumerate(messages) if message is not None}

    def _read_report(self) -> str | None:
        try:
            if self.store.check([self.key]):
                return self.store.get(self.key).decode()
        except Exception as e:  # the store's host has ended: the run is over
            return f"a rank failed and the store that would hold its report is gone ({type(e).__name__}: {e})"
        return None

    def _stopped_by(self, report: str, step: int, own: BaseException | None = None) -> DistributedError:
        self._stop(report)
        with contextlib.suppress(Exception):
            self.store.add(self.key + "/read", 1)
        also = f" ({describe(own)})" if own is not None else ""
        return DistributedError(f"{report}; rank {self.rank} (stage {self.stage}) stopped its step {step} with "
                                f"it{also}. Fix the cause and start the processes again")

    def _stop(self, report: str) -> None:
        self.report = report
        for group in self.aborts:
            try:
                group.abort()
            except Exception as e:
                logger.debug("aborting a pipeline group: %s", e)

    def _wait_for_readers(self) -> None:
        deadline = time.monotonic() + REPORT_WAIT_S
        try:
            while self.store.add(self.key + "/read", 0) < self.world - 1 and time.monotonic() < deadline:
                time.sleep(0.01)
        except Exception as e:
            logger.debug("waiting for the other ranks to read the failure report: %s", e)


def describe(error: BaseException) -> str:
    """``"IndexError: index out of range in self ([Stage 0] failed to run forward)"``: the error
    that started a chain (pipelining wraps errors in a stage's forward and backward in a
    RuntimeError), on one line, with the first line of each wrapper after it."""
    wrappers = []
    while error.__cause__ is not None:
        first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        wrappers.append(first_line.rstrip(":"))
        error = error.__cause__
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" + "".join(f" ({w})" for w in wrappers if w)


class _CallerState:
    """The calling thread's state that a thread running its step must share: grad mode,
    autocast, the CUDA device and stream, context variables, and the innermost saved-tensor
    hooks (``torch.autograd.graph.save_on_cpu()``, a memory probe), which are per thread."""

    def __init__(self) -> None:
        self.grad = torch.is_grad_enabled()
        self.hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self.autocast = [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in ("cpu", "cuda")
                         if t == "cpu" or torch.cuda.is_available()]
        self.cuda = (torch.cuda.current_device(), torch.cuda.current_stream()) if torch.cuda.is_initialized() else None
        self.context = contextvars.copy_context()

    def run(self, work: Callable[[], T]) -> T:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.set_grad_enabled(self.grad))
            if self.hooks is not None:
                stack.enter_context(torch.autograd.graph.saved_tensors_hooks(*self.hooks))
            for device_type, enabled, dtype in self.autocast:
                if enabled:
                    stack.enter_context(torch.autocast(device_type, dtype=dtype))
            if self.cuda is not None:
                torch.cuda.set_device(self.cuda[0])
                stack.enter_context(torch.cuda.stream(self.cuda[1]))
            return self.context.run(work)

"""Run groups as Ray tasks (``pip install robustbench-lite[ray]``).

Each task is one (data, model, defense) group: it trains or loads the model once, through the
model cache under the shared workdir, evaluates the group's pending cells with
:func:`~robustbench_lite.harness.run.run_group`, and returns the rows.  Only the driver writes the SQLite
store, so a killed driver loses at most the groups still in flight and a rerun recomputes no
finished cell.  A task asks for one GPU when the cluster has GPUs, else one CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from .kinds import Sink
from .rows import OnRow, Row
from .run import GroupTask, RunContext, error_rows, run_group

log = logging.getLogger(__name__)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ValueError("--executor ray needs Ray: pip install 'robustbench-lite[ray]' (or pip install ray)") from exc
    return ray


def _group_task(task: GroupTask, ctx: RunContext) -> list[Row]:
    """What a Ray worker runs (a plain function, so Ray pickles it by reference); it resumes from
    the stages a killed local run stored, but stores none itself (rows arrive per group)."""
    return run_group(task.cells, ctx, task.done, stages=task.stages)


class RayExecutor:
    """Groups as Ray tasks on the cluster at ``address`` (``None``: start a local Ray instance
    with ``num_cpus`` CPUs, shut down after the run; ``"auto"``: the cluster this machine is in)."""

    parallel = True  # the driver claims every pending group, then submits them together

    def __init__(self, address: str | None = None, num_cpus: int = 2, gpus_per_task: float = 1.0) -> None:
        if address is None and num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1 for a local Ray instance, got {num_cpus}")
        self.address = address
        self.num_cpus = num_cpus
        self.gpus_per_task = gpus_per_task

    def resources(self, cluster: dict[str, float]) -> dict[str, float]:
        """A task's needs: ``num_gpus`` when the cluster has GPUs, else one CPU."""
        if cluster.get("GPU", 0) > 0:
            return {"num_gpus": self.gpus_per_task, "num_cpus": 1}
        return {"num_cpus": 1}

    def run(
        self, tasks: Sequence[GroupTask], ctx: RunContext, on_row: OnRow | None = None, sink: Sink | None = None,
        progress: Any = None,
    ) -> Iterator[tuple[GroupTask, list[Row]]]:
        """Submit every group, then yield each one's rows as it finishes (``on_row``, ``sink`` and
        ``progress`` are not used: rows arrive per group, and the driver counts their cells)."""
        if not tasks:
            return
        ray = _import_ray()
        started = not ray.is_initialized()
        if started:
            if self.address is None:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=self.address, log_to_driver=False)
        ctx = replace(ctx, progress=False)  # workers' progress bars would interleave on the driver's terminal
        remote = ray.remote(_group_task).options(max_retries=0, **self.resources(ray.cluster_resources()))
        ctx_ref = ray.put(ctx)
        pending = {remote.remote(task, ctx_ref): task for task in tasks}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    task = pending.pop(ref)
                    try:
                        rows = ray.get(ref)
                    except Exception as exc:  # a crashed worker: the group's cells record why
                        log.error("group %s/%s failed on Ray: %s", task.cells[0].model.name, task.cells[0].defense.name, exc)
                        rows = error_rows(task, f"ray task failed: {type(exc).__name__}: {exc}")
                    yield task, rows
        finally:
            for ref in pending:  # the driver stopped early: do not leave work running
                ray.cancel(ref, force=True)
            if started:
                ray.shutdown()

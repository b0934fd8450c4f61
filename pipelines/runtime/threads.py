"""torch's thread pools sized to the CPUs a Ray worker reserved.

torch sizes its intra-op pool from the machine's cores (or ``OMP_NUM_THREADS`` when set), not
from what Ray reserved for the worker: four replicas that each reserve one CPU on a 16-core node
then run 16 threads each and slow each other down. Each Serve replica and Ray Data encode actor
calls :func:`configure_torch_threads` with its reservation before its first torch call.
Inter-op threads are set to 1: these models run one graph at a time, so a second pool only adds
idle threads.
"""

from __future__ import annotations

import logging
import math

logger = logging.getLogger(__name__)


def threads_for(num_cpus: float) -> int:
    """torch intra-op threads for a reservation of ``num_cpus`` CPUs: ``max(1, int(num_cpus))``
    (a fractional reservation such as Serve's 0.5 still needs one thread)."""
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)):
        raise TypeError(f"num_cpus must be a number of CPUs, got {num_cpus!r}")
    if math.isnan(num_cpus) or num_cpus < 0 or math.isinf(num_cpus):
        raise ValueError(f"num_cpus must be a finite number >= 0, got {num_cpus!r}")
    return max(1, int(num_cpus))


def configure_torch_threads(num_cpus: float) -> int:
    """Set torch's intra-op threads to :func:`threads_for` ``(num_cpus)`` and its inter-op
    threads to 1; returns the intra-op count.

    Call it in the worker (the replica's or actor's ``__init__``), before the model runs: torch
    fixes its inter-op pool at the first parallel call, after which that part is skipped with a
    log line (the intra-op count still applies).
    """
    import torch

    threads = threads_for(num_cpus)
    torch.set_num_threads(threads)
    _set_interop_threads(torch, 1)
    logger.info(
        "torch threads: %d intra-op, %d inter-op (for %s reserved CPUs)",
        torch.get_num_threads(), torch.get_num_interop_threads(), num_cpus,
    )  # fmt: skip
    return threads


def ray_reserved_cpus(default: float = 1.0) -> float:
    """The CPUs Ray reserved for the calling worker (task, actor or Serve replica); ``default``
    outside a Ray worker or where the worker reserved none."""
    try:
        import ray
    except ImportError:
        return default
    if not ray.is_initialized():
        return default
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:  # the driver: Ray reserved nothing for it
        return default
    cpus = context.get_assigned_resources().get("CPU")
    return float(cpus) if cpus else default


def _set_interop_threads(torch, threads: int) -> None:
    if torch.get_num_interop_threads() == threads:
        return
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError as err:  # already started, or set once before in this process
        logger.info(
            "torch inter-op threads stay %d (wanted %d): %s",
            torch.get_num_interop_threads(), threads, err,
        )  # fmt: skip

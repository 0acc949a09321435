"""How many intra-op threads the engine's forward passes use on the CPU.

On the CPU the engine thread's GEMMs fan out to torch's OpenMP team, and every member of
the team must reach each barrier: when another busy thread (the HTTP event loop, a
tokenizer, another process) takes one of the team's cores, the whole GEMM waits for it.
Measured on an idle 2-core machine (docs/benchmarks.md) the event loop is light enough
(about 2% of a core at 16 streams) that a team on every core still wins: 1.5-1.6x the
serving throughput of one thread at concurrency 1 and 16, fp32 and bf16. So by default the
engine uses every usable core (or ``OMP_NUM_THREADS`` where the environment sets it); on a
machine shared with other busy processes fewer threads (``EngineConfig.cpu_threads``,
``--cpu-threads``) avoid the barrier stalls.
"""

from __future__ import annotations

import os

import torch


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_cpu_threads(cores: int | None = None) -> int:
    """``OMP_NUM_THREADS`` when the environment sets it to a positive count (Ray workers,
    the deploy manifests, container runtimes), else all usable cores (at least one)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, cores if cores is not None else usable_cores())


def configure_cpu_threads(requested: int | None) -> int:
    """Set torch's intra-op thread count for CPU passes (``requested``, or the default);
    call it on the thread that runs the engine. Returns the count in force."""
    n = requested if requested is not None else default_cpu_threads()
    if n < 1:
        raise ValueError(f"cpu_threads must be >= 1, got {n}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n

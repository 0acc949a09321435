"""How many intra-op threads the engine's forward passes use on the CPU.

On the CPU the engine thread's GEMMs fan out to torch's OpenMP team, and every member of
the team must reach each barrier: when another busy thread (the HTTP event loop, a
tokenizer, another process) takes one of the team's cores, the whole GEMM waits for it.
By default the engine therefore keeps one core free for everything else and uses the
rest (at least one thread); ``EngineConfig.cpu_threads`` overrides that.
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
    """All usable cores but one (the HTTP layer's), and at least one."""
    return max(1, (cores if cores is not None else usable_cores()) - 1)


def configure_cpu_threads(requested: int | None) -> int:
    """Set torch's intra-op thread count for CPU passes (``requested``, or the default);
    call it on the thread that runs the engine. Returns the count in force."""
    n = requested if requested is not None else default_cpu_threads()
    if n < 1:
        raise ValueError(f"cpu_threads must be >= 1, got {n}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n

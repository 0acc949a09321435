"""A tiny launch-config tuner for the CUDA path of the Triton kernels.

Why not ``triton.autotune``: its key must be kernel arguments (a dummy query-length-bucket
argument would have to be threaded through the kernels); the tuned meta-parameters can no
longer be passed explicitly (the tests and the fixed interpreter path pass ``BLOCK_N`` /
``num_warps``); its default benchmarker spends ~125 ms per config and allocates a 256 MB L2
flush buffer; its pruning hook's signature has changed between releases; it cannot notice a
CUDA-graph capture (benchmarking inside one would fail the capture); and it does not check that
a config computes the right thing. This tuner does the same job in a few dozen lines:

* ``tune(key, first_round, refine, launch, output)``: launches every candidate once (which
  compiles it; a candidate that fails to compile or launch is skipped), checks its output
  against the first candidate's (the default config; a config whose output differs beyond a
  loose, dtype-dependent tolerance is rejected), times it, and keeps the fastest. Then
  ``refine(best)`` may propose variants of the winner (e.g. other ``num_stages``); a variant
  that compiles to the same PTX as the winner is not timed (it is the same kernel).
* Timing (CUDA): a ``torch.cuda._sleep`` on the stream first, so the host queues the timed
  launches while the device is busy and the events measure device time, not launch overhead;
  the best of 3 rounds of 10 launches, on the current stream.
* The first call per key tunes (device syncs, compiles: eager calls only); later calls are a
  dict lookup, so the launch path stays sync-free and can be captured in a CUDA graph. The
  caller must not tune while a CUDA graph is being captured (``capturing()``); it launches its
  default config instead and tunes on the next eager call.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import torch

__all__ = ["LaunchTuner", "TuneRecord", "capturing"]

logger = logging.getLogger(__name__)

_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def capturing() -> bool:
    """True while the current CUDA stream is capturing a graph (a host query, no sync)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def time_launch(launch: Callable[[], Any], device: torch.device, reps: int = 10,
                rounds: int = 3) -> float:
    """Seconds per launch: best of ``rounds`` rounds of ``reps`` back-to-back launches."""
    launch()  # warm: first-launch costs (module load) stay out of the timing
    best = float("inf")
    for _ in range(rounds):
        if device.type == "cuda":
            if hasattr(torch.cuda, "_sleep"):
                torch.cuda._sleep(2_000_000)  # ~1 ms: the host gets ahead of the device
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                launch()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3 / reps)
        else:
            t = time.perf_counter()
            for _ in range(reps):
                launch()
            best = min(best, (time.perf_counter() - t) / reps)
    return best


def _fingerprint(compiled: Any) -> str | None:
    """Hash of a compiled Triton kernel's PTX, or None when not available (interpreter)."""
    try:
        return hashlib.md5(compiled.asm["ptx"].encode()).hexdigest()
    except Exception:  # noqa: BLE001 - best effort across Triton versions
        return None


@dataclass
class TuneRecord:
    """What tuning one key found (for logs and benchmarks/gpu_check.py)."""

    key: Hashable
    best: Any
    seconds: float
    default: Any = None  # the reference config (first candidate)
    timings: dict[Any, float] = field(default_factory=dict)  # config -> s per launch
    rejected: dict[Any, str] = field(default_factory=dict)  # config -> why

    def as_dict(self) -> dict[str, Any]:
        return {"key": [str(k) for k in self.key] if isinstance(self.key, tuple) else str(self.key),
                "best": str(self.best), "default": str(self.default),
                "tune_seconds": round(self.seconds, 3),
                "timings_us": {str(c): round(t * 1e6, 2) for c, t in self.timings.items()},
                "rejected": {str(c): why for c, why in self.rejected.items()}}


class LaunchTuner:
    """Per-key cache of the fastest launch config; see the module docstring."""

    def __init__(self, name: str,
                 timer: Callable[[Callable[[], Any], torch.device], float] = time_launch) -> None:
        self.name = name
        self.timer = timer
        self.best: dict[Hashable, Any] = {}
        self.records: dict[Hashable, TuneRecord] = {}
        self._lock = threading.Lock()

    def lookup(self, key: Hashable) -> Any | None:
        return self.best.get(key)

    def clear(self) -> None:
        with self._lock:
            self.best.clear()
            self.records.clear()

    def tune(
        self,
        key: Hashable,
        first_round: Sequence[Any],
        refine: Callable[[Any], Sequence[Any]] | None,
        launch: Callable[[Any], Any],
        output: Callable[[], torch.Tensor],
        device: torch.device,
    ) -> Any:
        """Tune ``key`` (see the module docstring) and return the best config.

        ``launch(cfg)`` runs the kernel(s) with ``cfg`` writing the buffer that ``output()``
        returns, and may return the compiled kernel (used to spot identical binaries).
        ``first_round[0]`` is the reference config for the output check.
        """
        with self._lock:
            if key in self.best:
                return self.best[key]
            t0 = time.perf_counter()
            record = TuneRecord(key, None, 0.0, default=first_round[0] if first_round else None)
            reference: list[torch.Tensor] = []
            fingerprints: dict[Any, str | None] = {}
            first_error: list[BaseException] = []

            def trial(cfg: Any) -> None:
                if cfg in record.timings or cfg in record.rejected:
                    return
                try:
                    fingerprints[cfg] = _fingerprint(launch(cfg))
                    result = output()
                    if reference:
                        tol = _TOLERANCE.get(result.dtype, 1e-2)
                        if not torch.allclose(result, reference[0], atol=tol, rtol=tol,
                                              equal_nan=True):
                            err = (result.float() - reference[0].float()).abs().nan_to_num(
                                float("inf")).max().item()
                            record.rejected[cfg] = f"output differs from the default (max {err:.3g})"
                            return
                    else:
                        reference.append(result.clone())
                    record.timings[cfg] = self.timer(lambda: launch(cfg), device)
                except Exception as exc:  # noqa: BLE001 - compile/launch failure: skip it
                    first_error.append(exc)
                    record.rejected[cfg] = f"{type(exc).__name__}: {str(exc)[:160]}"

            for cfg in first_round:
                trial(cfg)
            if not record.timings:
                raise first_error[0]
            best = min(record.timings, key=record.timings.__getitem__)
            if refine is not None:
                for cfg in refine(best):
                    if cfg in record.timings or cfg in record.rejected:
                        continue
                    trial(cfg)
                    same = fingerprints.get(cfg) is not None and fingerprints.get(cfg) == fingerprints.get(best)
                    if same and cfg in record.timings:  # same binary: timing it again is noise
                        del record.timings[cfg]
                        record.rejected[cfg] = f"same PTX as {best}"
                best = min(record.timings, key=record.timings.__getitem__)
            record.best = best
            record.seconds = time.perf_counter() - t0
            self.best[key] = best
            self.records[key] = record
            logger.info("%s: tuned %s -> %s in %.1fs (%d timed, %d rejected)", self.name, key, best,
                        record.seconds, len(record.timings), len(record.rejected))
            return best

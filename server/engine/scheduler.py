"""Continuous batching: which requests run in the next forward pass, and with what work.

Policy: first come, first served. Each step spends a token budget, running requests first
(in arrival order), then admits waiting ones while there is room (a cap on running
sequences, the budget, free pages). Causal passes over committed tokens (prefill, and the
diffusion commit, which is the same operation) are chunked to fit the budget; decode,
denoise, draft and verify passes are atomic. When pages run out, the newest running request is preempted by recompute:
its pages are freed and it goes back to the waiting queue with its emitted tokens kept,
to be prefilled again later. Nothing is ever dropped.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from typing import Callable

from server.engine.client import QueueFullError
from server.engine.kv_cache import KVCacheManager
from server.engine.modes import DecodeMode, get_mode
from server.engine.outputs import FinishReason
from server.engine.request import Request, Status
from server.engine.work import Work


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.max_waiting < 1:
            raise ValueError("scheduler limits must be >= 1")


class Scheduler:
    """Decides each step's batch (see the module docstring).

    Invariants: ``running`` and ``waiting`` are disjoint and each sorted by arrival order; a
    running request's pages hold ``mode.kv_tokens_needed`` tokens for the work it was given;
    a waiting request holds pages only while it is being admitted (a failed admission frees
    them and resets its mode state); a batch never exceeds ``max_num_batched_tokens`` tokens
    nor ``max_num_seqs`` running requests."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished_early: list[Request] = []  # finished while being scheduled (e.g. a stop seed)
        self.num_preemptions = 0
        self.on_preempt: Callable[[Request], None] = lambda req: None

    @staticmethod
    def mode_of(req: Request) -> DecodeMode:
        return get_mode(req.params.decode.mode)

    # --------------------------------------------------------------- queue
    def add(self, req: Request) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting} requests)")
        req.status = Status.WAITING
        self.waiting.append(req)

    def abort(self, request_id: str, reason: FinishReason = "abort") -> Request | None:
        """Remove a request wherever it is, free its pages and finish it with ``reason``.
        Returns it, or None if unknown."""
        for queue in (self.running, self.waiting):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self.kv.free(req.table)
                    req.finish(reason)
                    return req
        return None

    def finish(self, req: Request) -> None:
        """Drop a finished request and free its pages."""
        if req in self.running:
            self.running.remove(req)
        self.kv.free(req.table)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------ schedule
    def schedule(self) -> list[tuple[Request, Work]]:
        budget = self.config.max_num_batched_tokens
        batch: list[tuple[Request, Work]] = []
        i = 0
        while i < len(self.running):
            req = self.running[i]
            work = self.mode_of(req).next_work(req, budget)
            if req.is_finished:
                self.running.pop(i)
                self.kv.free(req.table)
                self.finished_early.append(req)
                continue
            if work is None:
                i += 1
                continue
            if not self._reserve(req, work):
                continue  # req itself was preempted (it was the newest)
            batch.append((req, work))
            budget -= len(work)
            i += 1
        while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            req = self.waiting[0]
            if not req.table.pages and req.num_computed == 0:
                hit = self.kv.match_prefix(req.table, req.cache_keys)
                req.num_computed = hit
                if req.stats.preemptions == 0:
                    req.stats.cached_prompt_tokens = min(hit, req.num_prompt)
            work = self.mode_of(req).next_work(req, budget)
            mode = self.mode_of(req)
            if work is None or not self.kv.allocate(req.table, mode.kv_tokens_needed(req, work)):
                self.kv.free(req.table)
                req.num_computed = 0
                mode.reset(req)
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self._insert_running(req)
            batch.append((req, work))
            budget -= len(work)
        return batch

    def _insert_running(self, req: Request) -> None:
        keys = [r.arrival_order for r in self.running]
        self.running.insert(bisect.bisect(keys, req.arrival_order), req)

    def _reserve(self, req: Request, work: Work) -> bool:
        """Make sure ``req`` has pages for ``work``, preempting the newest running requests
        if needed. Returns False if ``req`` itself had to be preempted."""
        need = self.mode_of(req).kv_tokens_needed(req, work)
        while not self.kv.allocate(req.table, need):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is req:
                return False
        return True

    def preempt(self, req: Request) -> None:
        """Free a running request's pages and queue it again (it will recompute its prefix)."""
        self.running.remove(req)
        self.kv.free(req.table)
        req.num_computed = 0
        self.mode_of(req).reset(req)
        req.status = Status.WAITING
        req.stats.preemptions += 1
        self.num_preemptions += 1
        self.on_preempt(req)
        keys = [r.arrival_order for r in self.waiting]
        self.waiting.insert(bisect.bisect(keys, req.arrival_order), req)

    def check_integrity(self) -> None:
        """The KV pool's integrity check over every live request's page table."""
        tables = [r.table for r in self.running] + [r.table for r in self.waiting]
        self.kv.check_integrity(tables)

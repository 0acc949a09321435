"""What ``mode: "auto"`` decides with: the time of a forward pass as a function of its token
count on this device (measured online), the load of the batch, and per-request acceptance.

``PassTimeModel.time(n)`` interpolates (piecewise linear in n) an exponentially weighted
average kept per power-of-two bucket of the pass's token count; buckets never measured fall
back to a prior line ``a + b * n`` fitted from the measured ones (or the default prior).
The engine calls ``observe`` after every step (its whole duration: scheduling, the pass,
sampling and bookkeeping) and ``set_load`` before scheduling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from server.engine.request import Request
from server.engine.work import PREFILL, Work


def recurring_tokens(req: Request, work: Work) -> int:
    """The tokens ``req`` will put in the next pass if its plan does not change, after
    ``work`` ran: a prefill that completed the prompt is followed by one-token steps (1); a
    prefill chunk, a decode step or a cycle's pass repeats its length. (The load a plan adds
    to is the next pass's: a batch's prompts finishing together made a large pass that does
    not recur, and counting it made drafting look nearly free.)"""
    if work.kind is PREFILL and req.num_computed >= req.num_prompt:
        return 1
    return len(work)


@dataclass
class PassTimeModel:
    """Seconds of one forward pass of ``n`` tokens, refreshed online."""

    prior_fixed_s: float = 0.02  # per-pass overhead before any measurement
    prior_per_token_s: float = 0.0005
    decay: float = 0.2  # weight of a new measurement in its bucket's average
    buckets: dict[int, float] = field(default_factory=dict)  # bucket's token count -> seconds
    load_tokens: int = 0  # tokens the last batch's staying requests put in the next pass (recurring_tokens)
    load_requests: int = 0  # those requests
    emitted_per_request: float = 1.0  # average (EWMA) of the tokens a request emitted per step
    # the buckets, sorted and capped as ``time`` reads them; rebuilt after ``observe`` (the only
    # writer of ``buckets``), not on each of the many ``time`` calls a step's choices make
    _curve: list[tuple[int, float]] | None = field(default=None, repr=False, compare=False)

    @staticmethod
    def bucket(n: int) -> int:
        return 1 << max(0, math.ceil(math.log2(max(1, n))))

    def observe(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or seconds <= 0:
            return
        b = self.bucket(num_tokens)
        # scale the measurement to the bucket's token count along the current slope
        est = seconds + self._slope() * (b - num_tokens)
        old = self.buckets.get(b)
        self.buckets[b] = est if old is None else (1 - self.decay) * old + self.decay * est
        self._curve = None

    def set_load(self, num_tokens: int, num_requests: int, emitted: int | None = None,
                 emitters: int | None = None) -> None:
        """The next step's expected load: ``num_tokens`` from ``num_requests`` requests; and
        (when given) the tokens the last step's ``emitters`` requests (default
        ``num_requests``) emitted, folded into ``emitted_per_request``."""
        self.load_tokens, self.load_requests = num_tokens, num_requests
        emitters = num_requests if emitters is None else emitters
        if emitted is not None and emitters > 0:
            rate = emitted / emitters
            self.emitted_per_request = (1 - self.decay) * self.emitted_per_request + self.decay * rate

    def _slope(self) -> float:
        pts = sorted(self.buckets.items())
        if len(pts) >= 2:
            (n0, t0), (n1, t1) = pts[0], pts[-1]
            return max(0.0, (t1 - t0) / (n1 - n0))
        return self.prior_per_token_s

    def time(self, n: int) -> float:
        """Estimated seconds of a pass of ``n`` tokens (non-decreasing in n). A bucket never
        counts as slower than a larger measured one: a rarely used bucket can keep a sample
        from a slow spell of the machine (43 ms for 16 tokens next to 14 ms for 32, seen on a
        shared VM), and a pass of fewer tokens does not really take longer."""
        if self._curve is None:
            pts = sorted(self.buckets.items())
            for i in range(len(pts) - 2, -1, -1):
                pts[i] = (pts[i][0], min(pts[i][1], pts[i + 1][1]))
            self._curve = pts
        pts = self._curve
        if not pts:
            return self.prior_fixed_s + self.prior_per_token_s * n
        if n <= pts[0][0]:
            return pts[0][1]
        for (n0, t0), (n1, t1) in zip(pts, pts[1:]):
            if n <= n1:
                return max(t0, t0 + (t1 - t0) * (n - n0) / (n1 - n0))
        n_last, t_last = pts[-1]
        return t_last + self._slope() * (n - n_last)


@dataclass
class AcceptanceEstimate:
    """Per-draft-token acceptance rate of one decoder, a Beta-like running estimate: each
    cycle with ``d`` drafts of which ``a`` were accepted adds ``a`` successes and one failure
    unless every draft was accepted. ``prior`` counts pseudo-observations of ``prior_rate``."""

    prior_rate: float = 0.5
    prior: float = 4.0
    accepted: float = 0.0
    rejected: float = 0.0

    def observe(self, drafts: int, accepted: int) -> None:
        self.accepted += accepted
        self.rejected += 1 if accepted < drafts else 0

    @property
    def rate(self) -> float:
        a = self.accepted + self.prior * self.prior_rate
        return a / (a + self.rejected + self.prior * (1 - self.prior_rate))

    def expected_tokens(self, drafts: int) -> float:
        """Expected tokens a cycle of ``drafts`` drafts emits (accepted prefix + bonus)."""
        r = min(self.rate, 1 - 1e-9)
        return (1 - r ** (drafts + 1)) / (1 - r)


@dataclass
class CostModel:
    """One engine's cost model: pass times on its device, and the acceptance rate of each
    self_spec variant over every request so far (the prior of a new request's estimate)."""

    pass_time: PassTimeModel = field(default_factory=PassTimeModel)
    acceptance: dict[str, AcceptanceEstimate] = field(default_factory=dict)

    def global_acceptance(self, variant: str) -> AcceptanceEstimate:
        return self.acceptance.setdefault(variant, AcceptanceEstimate())

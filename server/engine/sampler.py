"""Batched token selection over logits rows, with counter-based randomness.

Random numbers come from a hash of (request seed, absolute position, purpose, vocab index),
so a request's samples do not depend on what else is in the batch, on the batch order, or
on the device. Sampling uses the exponential race: argmax(p / E) with E ~ Exp(1), which
draws exactly from p.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF

# Purposes: which random stream a draw belongs to.
SALT_SAMPLE = 1  # a causal (AR) sample
SALT_DENOISE = 2  # diffusion reveal candidates (plus the step number)
SALT_DRAFT = 3  # self-spec draft tokens
SALT_ACCEPT = 4  # self-spec acceptance test
SALT_RESIDUAL = 5  # self-spec resample from the residual distribution
SALT_LOOKAHEAD = 6  # diffusion: a block's candidates proposed by the commit pass before it


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche finaliser on int64 tensors holding values in [0, 2**32)."""
    x = x & MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    return (x >> 16) ^ x


def row_keys(seeds: list[int], positions: list[int], salts: list[int], device: torch.device) -> torch.Tensor:
    """One 32-bit key per row from (seed, position, salt)."""
    s = torch.tensor([v & 0xFFFFFFFFFFFF for v in seeds], dtype=torch.int64, device=device)
    p = torch.tensor(positions, dtype=torch.int64, device=device)
    k = torch.tensor(salts, dtype=torch.int64, device=device)
    key = _mix32(s & MASK32)
    key = _mix32(key ^ (s >> 32))
    key = _mix32(key ^ p)
    return _mix32(key ^ (k * 0x9E3779B1 & MASK32))


def uniforms(keys: torch.Tensor, width: int) -> torch.Tensor:
    """[R, width] uniforms in (0, 1) derived from per-row keys."""
    idx = torch.arange(width, dtype=torch.int64, device=keys.device)
    x = _mix32(_mix32(keys[:, None] ^ (idx[None, :] * 0x27D4EB2F & MASK32)) + 0x165667B1)
    return (x.double() + 0.5) / 4294967296.0


def filtered_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    use_top_k: bool = True,
    use_top_p: bool = True,
) -> torch.Tensor:
    """Tempered, top-k and top-p filtered distributions; rows [R, V]. temperature > 0 per row.
    ``use_top_k``/``use_top_p`` (host flags) skip filters no row needs, without a device sync."""
    scaled = logits / temperature[:, None]
    if use_top_k:
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, logits.shape[-1])).clamp(max=logits.shape[-1])
        kth = torch.sort(scaled, dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if use_top_p:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        drop_sorted = before >= top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def race(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Draw one index per row from ``probs`` (exponential race with keyed uniforms)."""
    u = uniforms(keys, probs.shape[-1])
    return torch.argmax(probs.double() / -torch.log(u), dim=-1)


@dataclass
class RowSpec:
    """How one logits row is turned into a token."""

    temperature: float
    top_k: int
    top_p: float
    seed: int
    position: int  # absolute position of the token being chosen
    salt: int
    logprobs: int | None = None  # top-n logprobs wanted (None = none)
    margin: bool = False  # also report the chosen token's lead over the runner-up (RowResult.margin)


@dataclass
class RowResult:
    token: int
    confidence: float  # softmax(raw logits)[token], mask id included in the denominator
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    # with RowSpec.margin: confidence minus the probability (same softmax) of the most likely
    # other id, the mask id excluded; <= 0 when a sampled token is not the argmax
    margin: float | None = None


@functools.lru_cache(maxsize=8)
def _index(token_id: int, device: torch.device) -> torch.Tensor:
    """A one-element index tensor (the mask id's), made once per device."""
    return torch.tensor([token_id], device=device)


def select_tokens(logits: torch.Tensor, specs: list[RowSpec], mask_token_id: int | None) -> list[RowResult]:
    """Choose one token per row (greedy when temperature is 0), never the mask id.
    One device-to-host copy for the whole batch."""
    if not specs:
        return []
    assert logits.shape[0] == len(specs)
    device = logits.device
    raw = logits.float()
    allowed = raw if mask_token_id is None else raw.index_fill(1, _index(mask_token_id, device), float("-inf"))
    tokens = torch.argmax(allowed, dim=-1)
    sampled_rows = [i for i, s in enumerate(specs) if s.temperature > 0]
    if sampled_rows:
        idx = torch.tensor(sampled_rows, device=device)
        sub = [specs[i] for i in sampled_rows]
        probs = filtered_probs(
            allowed[idx],
            torch.tensor([s.temperature for s in sub], device=device, dtype=torch.float32),
            torch.tensor([s.top_k for s in sub], device=device),
            torch.tensor([s.top_p for s in sub], device=device, dtype=torch.float32),
            use_top_k=any(s.top_k > 0 for s in sub),
            use_top_p=any(s.top_p < 1 for s in sub),
        )
        keys = row_keys([s.seed for s in sub], [s.position for s in sub], [s.salt for s in sub], device)
        tokens = tokens.index_copy(0, idx, race(probs, keys))
    log_probs = torch.log_softmax(raw, dim=-1)
    chosen_lp = log_probs.gather(1, tokens[:, None])[:, 0]
    want_top = max((s.logprobs or 0) for s in specs)
    top = torch.topk(log_probs, want_top, dim=-1) if want_top > 0 else None
    # one device-to-host transfer for everything the caller needs
    packed = [tokens.double(), chosen_lp.double()]
    margin_col = len(packed)  # the runner-up's log-probability, when some row wants a margin
    if any(s.margin for s in specs):
        others = log_probs.scatter(1, tokens[:, None], float("-inf"))
        if mask_token_id is not None:
            others[:, mask_token_id] = float("-inf")
        packed.append(others.max(dim=-1).values.double())
    first_top = len(packed)
    if top is not None:
        packed += [top.indices.double().T, top.values.double().T]
    if device.type == "cpu" and len(packed) == 2:  # no transfer to save: two lists cost less than packing
        host = [list(row) for row in zip(tokens.tolist(), chosen_lp.tolist())]
    else:
        host = torch.cat([t.reshape(-1, len(specs)) for t in packed]).T.tolist()
    tokens_l = [int(row[0]) for row in host]
    lp_l = [row[1] for row in host]
    top_i = [[int(v) for v in row[first_top : first_top + want_top]] for row in host] if top is not None else None
    top_v = [row[first_top + want_top :] for row in host] if top is not None else None
    results = []
    for i, spec in enumerate(specs):
        res = RowResult(token=tokens_l[i], confidence=math.exp(lp_l[i]))
        if spec.margin:
            res.margin = res.confidence - math.exp(host[i][margin_col])
        if spec.logprobs is not None:
            res.logprob = lp_l[i]
            n = spec.logprobs
            res.top_logprobs = list(zip(top_i[i][:n], top_v[i][:n])) if top_i is not None and n else []
        results.append(res)
    return results

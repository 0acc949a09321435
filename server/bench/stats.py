"""Aggregation of request results: latency percentiles, throughput, TPF, AR agreement."""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from server.bench.client import RequestResult

PERCENTILES: tuple[int, ...] = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution_ms(values_s: Iterable[float]) -> dict[str, float | None]:
    xs = [v * 1000.0 for v in values_s]
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "n": 0}
    out: dict[str, float | None] = {"mean": sum(xs) / len(xs)}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(xs, q)
    out["n"] = len(xs)
    return out


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _forward_passes(usage: dict[str, Any]) -> float | None:
    fp = usage.get("forward_passes")
    if isinstance(fp, dict):
        vals = [_num(v) for v in fp.values()]
        return sum(v for v in vals if v is not None)
    return _num(fp)


def tpf_from_usage(results: Sequence[RequestResult]) -> dict[str, Any] | None:
    """TPF from the usage extension (``usage.tokens_per_forward``, ``forward_passes``,
    ``mean_acceptance_length``); None when no request reported it."""
    per_req: list[float] = []
    tokens = 0.0
    passes = 0.0
    acc: list[float] = []
    by_decoder: dict[str, float] = {}  # mode=auto: passes per decoder it chose
    for r in results:
        if not r.ok or not r.usage:
            continue
        u = r.usage
        for decoder, kinds in (u.get("forward_passes_by_decoder") or {}).items():
            if isinstance(kinds, dict):
                by_decoder[decoder] = by_decoder.get(decoder, 0.0) + sum(_num(v) or 0.0 for v in kinds.values())
        tpf = _num(u.get("tokens_per_forward"))
        fp = _forward_passes(u)
        if tpf is None and fp:
            tpf = r.output_tokens / fp
        if tpf is not None and r.output_tokens >= 1:
            per_req.append(tpf)
        if fp:
            tokens += r.output_tokens
            passes += fp
        a = _num(u.get("mean_acceptance_length"))
        if a is not None and a > 0:
            acc.append(a)
    if not per_req and not passes:
        return None
    return {
        "source": "usage",
        "tpf_mean": sum(per_req) / len(per_req) if per_req else None,  # mean of per-request TPF
        "tpf_weighted": tokens / passes if passes else None,  # all tokens / all forward passes
        "mean_acceptance_length": sum(acc) / len(acc) if acc else None,
        "passes_by_decoder": by_decoder or None,
    }


def _sum_samples(samples: dict[tuple, float], name: str, mode: str | None) -> float:
    tot = 0.0
    for (n, labels), v in samples.items():
        if n != name:
            continue
        if mode is not None and dict(labels).get("mode") != mode:
            continue
        tot += v
    return tot


def metrics_delta(before: dict[tuple, float] | None, after: dict[tuple, float] | None) -> dict[tuple, float] | None:
    if after is None:
        return None
    before = before or {}
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def vision_from_metrics(delta: dict[tuple, float] | None) -> dict[str, Any] | None:
    """Images the server's vision encoder processed over the run, and its time (our server)."""
    if not delta:
        return None
    images = _sum_samples(delta, "nld_vision_images_processed_total", None)
    seconds = _sum_samples(delta, "nld_vision_encoder_seconds_total", None)
    if images <= 0:
        return None
    return {"images_encoded": int(images), "encoder_seconds": seconds, "ms_per_image": 1000 * seconds / images}


def tpf_from_metrics(delta: dict[tuple, float] | None, mode: str | None) -> dict[str, Any] | None:
    """TPF from the change in the server's ``nld_*`` counters over the run (our server only)."""
    if not delta:
        return None
    tokens = _sum_samples(delta, "nld_generation_tokens_total", mode)
    passes = _sum_samples(delta, "nld_forward_passes_total", mode)
    if passes <= 0:
        return None
    tpf_sum = _sum_samples(delta, "nld_request_tokens_per_forward_sum", mode)
    tpf_cnt = _sum_samples(delta, "nld_request_tokens_per_forward_count", mode)
    acc_sum = _sum_samples(delta, "nld_spec_decode_acceptance_length_sum", mode)
    acc_cnt = _sum_samples(delta, "nld_spec_decode_acceptance_length_count", mode)
    return {
        "source": "metrics",
        "tpf_mean": tpf_sum / tpf_cnt if tpf_cnt > 0 else None,
        "tpf_weighted": tokens / passes,
        "mean_acceptance_length": acc_sum / acc_cnt if acc_cnt > 0 else None,
    }


def _word_agreement(out: str, ref: str) -> float:
    a, b = out.split(), ref.split()
    if not a and not b:
        return 1.0
    same = sum(1 for x, y in zip(a, b) if x == y)
    return same / max(len(a), len(b))


def _prefix_agreement(out: str, ref: str) -> float:
    if not out and not ref:
        return 1.0
    n = 0
    for x, y in zip(out, ref):
        if x != y:
            break
        n += 1
    return n / max(len(out), len(ref))


def agreement(results: Sequence[RequestResult], references: dict[int, str] | None) -> dict[str, Any] | None:
    """Agreement with the temperature-0 AR output of the same prompt.

    exact_match: fraction of requests whose text equals the reference; token_agreement:
    position-wise equal whitespace-separated tokens / the longer length, averaged;
    prefix_agreement: common character prefix / the longer length, averaged."""
    if not references:
        return None
    pairs = [(r.text, references[r.prompt_id]) for r in results if r.ok and r.prompt_id in references]
    if not pairs:
        return None
    n = len(pairs)
    return {
        "n": n,
        "exact_match": sum(1 for o, ref in pairs if o == ref) / n,
        "token_agreement": sum(_word_agreement(o, ref) for o, ref in pairs) / n,
        "prefix_agreement": sum(_prefix_agreement(o, ref) for o, ref in pairs) / n,
    }


def summarize(results: Sequence[RequestResult], duration_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    itls = [x for r in ok for x in r.itls]
    errors: list[str] = []
    for r in failed:
        if r.error and r.error not in errors:
            errors.append(r.error)
    return {
        "completed": len(ok),
        "failed": len(failed),
        "duration_s": duration_s,
        "total_output_tokens": out_tokens,
        "total_input_tokens": sum(prompt_tokens) if prompt_tokens else None,
        "output_tokens_from_usage": all(r.output_tokens_from_usage for r in ok) if ok else False,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else None,
        "output_throughput": out_tokens / duration_s if duration_s > 0 else None,
        "ttft_ms": distribution_ms(r.ttft for r in ok if r.ttft is not None),
        "tpot_ms": distribution_ms(t for t in (r.tpot for r in ok) if t is not None),
        "itl_ms": distribution_ms(itls),
        "e2el_ms": distribution_ms(r.e2e for r in ok),
        "mean_chunks_per_request": sum(r.chunks for r in ok) / len(ok) if ok else None,
        "errors": errors[:10],
    }

"""Usage accounting: OpenAI's token counts plus forward-pass statistics (our extension)."""

from __future__ import annotations

from typing import Iterable

from server.api.protocol import UsageInfo
from server.engine.outputs import RequestStats


def build_usage(
    prompt_tokens: int, completion_tokens: Iterable[int], stats: Iterable[RequestStats | None], mode: str
) -> UsageInfo:
    """Usage of a whole response: sums over its choices.

    ``prompt_tokens`` counts each distinct prompt once (OpenAI counts the prompt once for
    ``n`` choices). ``tokens_per_forward`` = completion tokens / forward passes, over the
    choices that reported statistics; ``mean_acceptance_length`` is given in self_spec mode.
    """
    completions = list(completion_tokens)
    reported = [s for s in stats if s is not None]
    total_completion = sum(completions)
    usage = UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=total_completion,
        total_tokens=prompt_tokens + total_completion,
    )
    if not reported:
        return usage
    by_kind: dict[str, int] = {}
    for s in reported:
        for kind, count in s.forward_passes.items():
            by_kind[kind] = by_kind.get(kind, 0) + int(count)
    passes = sum(by_kind.values())
    usage.forward_passes = passes
    usage.forward_passes_by_kind = by_kind
    usage.tokens_per_forward = total_completion / passes if passes else 0.0
    if mode == "self_spec":
        lengths = [a for s in reported for a in s.acceptance_lengths]
        usage.mean_acceptance_length = sum(lengths) / len(lengths) if lengths else 0.0
    return usage

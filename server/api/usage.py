"""Usage accounting: OpenAI's token counts plus forward-pass statistics (our extension)."""

from __future__ import annotations

from typing import Iterable

from server.api.protocol import UsageInfo
from server.engine.modes import get_mode
from server.engine.outputs import RequestStats


def build_usage(
    prompt_tokens: int, completion_tokens: Iterable[int], stats: Iterable[RequestStats | None], mode: str
) -> UsageInfo:
    """Usage of a whole response: sums over its choices.

    ``prompt_tokens`` counts each distinct prompt once (OpenAI counts the prompt once for
    ``n`` choices). ``tokens_per_forward`` = completion tokens / forward passes, over the
    choices that reported statistics; the mode adds its own fields (``usage_extras``).
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
    by_decoder: dict[str, dict[str, int]] = {}
    for s in reported:
        for decoder, kinds in s.passes_by_decoder.items():
            row = by_decoder.setdefault(decoder, {})
            for kind, count in kinds.items():
                row[kind] = row.get(kind, 0) + int(count)
    usage.forward_passes_by_decoder = by_decoder
    usage.tokens_per_forward = total_completion / passes if passes else 0.0
    for name, value in get_mode(mode).usage_extras(reported).items():
        setattr(usage, name, value)
    return usage

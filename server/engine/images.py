"""Where a request's images sit in its prompt, and what that means for caching and chunking.

Invariants:
- an image's features replace the embeddings of its pad tokens, in order; ``positions`` lists
  those prompt positions (row-break / end tokens between rows are ordinary tokens);
- prefix-cache keys: the token list with each image's first pad replaced by
  ``(pad id, image digest)``, so two prompts that differ only in their pixels never share a page
  (page hashes are chained, so every page after that position differs too);
- a causal chunk never ends strictly inside an image's span (``clamp_chunk``), so each image's
  features are needed by one chunk only (it may start inside a span after a prefix-cache hit).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Hashable

from server.model.image_processing import PreparedImage


@dataclass(frozen=True, eq=False)
class ImageSpan:
    image: PreparedImage
    positions: tuple[int, ...]  # prompt positions of the image's pad tokens, in feature order

    @property
    def start(self) -> int:
        return self.positions[0]

    @property
    def end(self) -> int:
        """One past the last pad token."""
        return self.positions[-1] + 1

    def feature_rows(self, start: int, end: int) -> tuple[list[int], int]:
        """The positions in ``[start, end)`` that take features, and the index of the first
        one's feature (they are consecutive features)."""
        lo = bisect.bisect_left(self.positions, start)
        hi = bisect.bisect_left(self.positions, end)
        return list(self.positions[lo:hi]), lo


def locate_images(prompt_ids: list[int], images: list[PreparedImage], pad_id: int) -> list[ImageSpan]:
    """Assign the prompt's pad tokens to ``images`` in order. Raises ValueError when the number
    of pad tokens differs from the images' feature count."""
    pads = [i for i, t in enumerate(prompt_ids) if t == pad_id]
    need = sum(im.num_features for im in images)
    if len(pads) != need:
        raise ValueError(
            f"the prompt has {len(pads)} image placeholder tokens (id {pad_id}) but its {len(images)} "
            f"image(s) need {need}"
        )
    spans, k = [], 0
    for im in images:
        spans.append(ImageSpan(im, tuple(pads[k : k + im.num_features])))
        k += im.num_features
    return spans


def cache_keys(token_ids: list[int], spans: list[ImageSpan]) -> list[Hashable]:
    """Prefix-cache keys of ``token_ids`` (see the module docstring)."""
    if not spans:
        return token_ids  # type: ignore[return-value]
    keys: list[Hashable] = list(token_ids)
    for span in spans:
        keys[span.start] = (token_ids[span.start], span.image.digest)
    return keys


def clamp_chunk(spans: list[ImageSpan], start: int, n: int) -> int:
    """The longest chunk ``[start, start + m)``, m <= n, that does not end strictly inside an
    image span (0 when the chunk would have to split the image it starts in)."""
    end = start + n
    for span in spans:
        if span.start < end < span.end:
            return max(0, span.start - start)
    return n

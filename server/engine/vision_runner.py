"""Vision encoding as part of a forward pass: which rows of a batch take image features, and
the features themselves.

Each step, the images whose pad tokens fall in the batch's chunks are encoded together in
one ``VisionEncoder`` call (batched across requests; an image appearing twice is encoded
once). Features are kept in a small LRU keyed by the image digest, so a chunk that starts
inside an image (after a prefix-cache hit) or a recomputed request does not encode again. An
image whose pad tokens all sit in cached pages is never encoded at all.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import torch

from server.engine.request import Request
from server.engine.work import Work
from server.model.image_processing import PreparedImage
from server.model.model import ImageFeatures
from server.model.vision import VisionEncoder


class VisionRunner:
    def __init__(self, encoder: VisionEncoder, device: torch.device, max_cached_images: int = 8) -> None:
        self.encoder = encoder
        self.device = device
        self.max_cached_images = max_cached_images
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.images_encoded = 0  # counters read by the engine's metrics
        self.encode_seconds = 0.0

    def _encode(self, images: dict[str, PreparedImage]) -> None:
        """Encode the (digest -> image) not in the cache, in one call."""
        todo = [(d, im) for d, im in images.items() if d not in self.cache]
        if not todo:
            return
        t0 = time.perf_counter()
        dtype = next(self.encoder.parameters()).dtype
        feats = self.encoder([im.pixel_values.to(self.device, dtype) for _, im in todo])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.encode_seconds += time.perf_counter() - t0
        self.images_encoded += len(todo)
        for (digest, _), f in zip(todo, feats):
            self.cache[digest] = f

    def features_for(self, batch: list[tuple[Request, Work]]) -> ImageFeatures | None:
        """The image features of the batch's flat rows (None when no row takes one)."""
        needed: list[tuple[int, list[int], int, str]] = []  # (flat offset, positions, first feature, digest)
        images: dict[str, PreparedImage] = {}
        offset = 0
        for req, work in batch:
            start, end = req.num_computed, req.num_computed + len(work)
            for span in req.images:
                if span.end <= start or span.start >= end:
                    continue
                positions, first = span.feature_rows(start, end)
                if positions:
                    needed.append((offset - start, positions, first, span.image.digest))
                    images[span.image.digest] = span.image
            offset += len(work)
        if not needed:
            return None
        for digest in images:
            if digest in self.cache:
                self.cache.move_to_end(digest)
        self._encode(images)
        rows, feats = [], []
        for base, positions, first, digest in needed:
            rows.extend(base + p for p in positions)
            feats.append(self.cache[digest][first : first + len(positions)])
        while len(self.cache) > max(self.max_cached_images, len(images)):
            self.cache.popitem(last=False)
        return ImageFeatures(torch.tensor(rows, dtype=torch.int64, device=self.device), torch.cat(feats))

"""The per-segment inputs of paged attention, shared by the reference, the Triton launcher,
``kernels.ops`` and the engine (see docs/design.md, "The attention contract")."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Segment ``s`` is rows ``query_start_loc[s]:query_start_loc[s + 1]`` of the batch, at
    positions ``context_lens[s]..``; its prefix is read through ``block_tables[s]``; ``causal[s]``
    says whether its rows see only earlier segment keys. ``max_query_len`` (a host int, the
    longest segment) sizes the Triton grid; None makes ``kernels.ops`` compute it (a device
    sync on the GPU)."""

    block_tables: torch.Tensor  # [S, max_pages] int32
    context_lens: torch.Tensor  # [S] int32
    query_start_loc: torch.Tensor  # [S + 1] int32
    causal: torch.Tensor  # [S] bool
    max_query_len: int | None = None
    # [S] int32 or None: mask_block[s] = W > 0 gives segment s the quadratic self-speculation
    # mask (sub-blocks of W rows, row 0 of each a head) instead of its causal flag
    mask_block: torch.Tensor | None = None

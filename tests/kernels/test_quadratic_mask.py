"""The quadratic self-speculation mask as a mask mode of paged attention.

A quadratic segment is D+1 sub-blocks ``[head_j, MASK x K]`` (rows ``j*(K+1) .. j*(K+1)+K``).
The dense boolean mask below is built from that description alone (lists of head rows and
sub-block row ranges), then a float64 dense attention with it is compared with the PyTorch
reference and the Triton kernel (interpreter on the CPU), in mixed batches where quadratic
segments sit next to causal and bidirectional ones.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kernels import ops
from kernels.block_attention import block_attention
from kernels.reference import paged_attention_reference
from tests.kernels.test_block_attention import TOLERANCE, assert_close, make_batch

# (context_len, query_len, causal, sub_block width W; 0 = plain causal/bidirectional)
SPECS = [
    (19, 6, True, 3),     # block 2: 2 heads x [head, M, M]
    (0, 7, True, 0),      # causal prefill chunk
    (33, 20, True, 5),    # block 4: 4 heads x [head, M x 4]
    (21, 6, False, 0),    # bidirectional draft
    (40, 3, True, 1),     # W = 1: heads only (a causal verify)
    (5, 72, True, 9),     # block 8, several query tiles
    (37, 1, True, 0),     # decode
]


def dense_quadratic_mask(num_heads: int, width: int) -> torch.Tensor:
    """Row r sees key c: built from the layout (head rows; sub-block row sets)."""
    n = num_heads * width
    heads = [j * width for j in range(num_heads)]
    blocks = [set(range(j * width, (j + 1) * width)) for j in range(num_heads)]
    mask = torch.zeros(n, n, dtype=torch.bool)
    for j, block in enumerate(blocks):
        for r in block:
            for h in heads[: j + 1]:  # every head up to and including its own sub-block's
                mask[r, h] = True
            if r != heads[j]:  # a non-head row: its whole sub-block, both directions
                for c in block:
                    mask[r, c] = True
    return mask


def naive_masked_attention(b, specs) -> torch.Tensor:
    out = torch.zeros(b.q.shape, dtype=torch.float64)
    group = b.q.shape[1] // b.k.shape[1]
    page_size = b.k_cache.shape[1]
    starts = b.query_start_loc.tolist()
    for s, (ctx, q_len, causal, width) in enumerate(specs):
        start, end = starts[s], starts[s + 1]
        keys = [b.k_cache[int(b.block_tables[s, p // page_size]), p % page_size] for p in range(ctx)]
        values = [b.v_cache[int(b.block_tables[s, p // page_size]), p % page_size] for p in range(ctx)]
        keys += [b.k[t] for t in range(start, end)]
        values += [b.v[t] for t in range(start, end)]
        K, V = torch.stack(keys).double().cpu(), torch.stack(values).double().cpu()
        if width:
            own = dense_quadratic_mask(q_len // width, width)
        elif causal:
            own = torch.tril(torch.ones(q_len, q_len, dtype=torch.bool))
        else:
            own = torch.ones(q_len, q_len, dtype=torch.bool)
        mask = torch.cat([torch.ones(q_len, ctx, dtype=torch.bool), own], dim=1)
        for h in range(b.q.shape[1]):
            scores = b.q[start:end, h].double().cpu() @ K[:, h // group].T * b.scale
            scores = scores.masked_fill(~mask, float("-inf"))
            out[start:end, h] = torch.softmax(scores, -1) @ V[:, h // group]
    return out


def quad_batch(specs, dtype, device, group=2, page_size=16):
    """The batch and its attention arguments with ``mask_block`` set."""
    b = make_batch([(c, n, causal) for c, n, causal, _ in specs], num_kv_heads=2, group=group,
                   head_dim=16, page_size=page_size, dtype=dtype, device=device)
    mask_block = torch.tensor([w for *_, w in specs], dtype=torch.int32, device=device)
    return b, (b.q, b.k, b.v, b.k_cache, b.v_cache, replace(b.meta, mask_block=mask_block), b.scale)


def test_dense_mask_matches_the_documented_rules():
    """Spot checks of the test's own mask against the issue's wording (B = 2, K = 2)."""
    m = dense_quadratic_mask(2, 3)  # rows: h0 M M h1 M M
    assert m[0].tolist() == [True, False, False, False, False, False]  # head 0: itself
    assert m[3].tolist() == [True, False, False, True, False, False]   # head 1: heads 0..1
    assert m[1].tolist() == [True, True, True, False, False, False]    # mask of sub-block 0
    assert m[5].tolist() == [True, False, False, True, True, True]     # mask of sub-block 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_quadratic_matches_dense(dtype):
    b, args = quad_batch(SPECS, dtype, torch.device("cpu"))
    out = paged_attention_reference(*args)
    assert_close(out, naive_masked_attention(b, SPECS), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_uniform_path_quadratic(dtype):
    """Equal-length segments take the batched reference path: same answer."""
    specs = [(19, 12, True, 4), (3, 12, True, 3), (50, 12, True, 0), (8, 12, False, 0)]
    b, args = quad_batch(specs, dtype, torch.device("cpu"))
    out = paged_attention_reference(*args)
    assert_close(out, naive_masked_attention(b, specs), dtype)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_quadratic_matches_dense(dtype, num_splits, device):
    b, args = quad_batch(SPECS, dtype, device)
    out = block_attention(*args, num_splits=num_splits, block_m=16, block_n=16)
    assert_close(out, naive_masked_attention(b, SPECS), dtype)


def test_ops_dispatch_and_check(device, force_triton):
    b, args = quad_batch(SPECS[:3], torch.float32, device)
    out = ops.paged_attention(*args)
    assert_close(out, naive_masked_attention(b, SPECS[:3]), torch.float32)
    meta = args[5]
    for bad in (meta.mask_block.long(), meta.mask_block[:2]):
        with pytest.raises(ValueError, match="mask_block"):
            ops.paged_attention(*args[:5], replace(meta, mask_block=bad), b.scale)

"""Triton paged attention over a ragged batch that mixes causal and bidirectional segments.

Contract (``docs/design.md``, "The attention contract"):

* ``q`` ``[T, Hq, D]``, fresh ``k``/``v`` ``[T, Hkv, D]``; segment ``s`` is rows
  ``query_start_loc[s]:query_start_loc[s+1]`` and sits at positions ``context_lens[s]..``.
* Its prefix (``context_lens[s]`` tokens) is read from ``k_cache``/``v_cache``
  ``[num_pages, page_size, Hkv, D]`` through ``block_tables[s]``; its own keys are read from
  ``k``/``v``, never from the cache.
* ``causal[s]``: query ``i`` sees the prefix and segment keys ``0..i``; otherwise the prefix
  and the whole segment. ``mask_block[s] = W > 0`` (optional) replaces that rule with the
  quadratic mask: sub-blocks of ``W`` rows, row 0 of each a head; heads see the heads up to
  their own, other rows those heads plus their whole sub-block (computed from indices).

Kernel layout:

* Grid ``(S, cdiv(max_query_len, BLOCK_Q), Hkv)`` is sized from host ints only, so launching
  never syncs with the device; programs whose query block lies past their segment's end exit.
* GQA packing: one program owns ``BLOCK_Q`` query tokens x ``GROUP = Hq // Hkv`` query heads of
  one KV head (``BLOCK_M = BLOCK_Q * GROUP`` rows, row ``r`` = token ``r // GROUP``, head
  ``r % GROUP``), so each K/V tile is loaded once for all query heads that share it.
* Keys are visited in tiles of ``BLOCK_N``; each key position looks up its own page, so a tile
  may cross page boundaries and any page size works.
* Online softmax in the log2 domain with fp32 running max / sum / accumulator. fp32 dots use
  ``input_precision="ieee"`` (no tf32). Half inputs are fed to ``tl.dot`` as is (fp32
  accumulation); the probabilities are rounded to the value dtype for the P @ V product.
* Split-KV (flash-decoding): for small batches with long prefixes the prefix is cut into
  ``num_splits`` chunks handled by separate programs; each writes a normalised partial output
  and its log2-sum-exp, and a reduce kernel merges them. The last split also covers the
  segment's own keys.

Launch configs: on CUDA the tile config (``BLOCK_N``, warps, stages) is autotuned per key by
``ATTENTION_TUNER`` on the first eager call (see ``block_attention``); under the interpreter,
and with ``NLD_ATTN_AUTOTUNE=0``, the fixed ``default_tile_config`` is used.

Every row of ``q`` must belong to a segment (``query_start_loc[S] == T``); rows outside every
segment are left unwritten.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from kernels.attention_metadata import AttentionMetadata
from kernels.tuner import LaunchTuner, capturing

__all__ = [
    "block_attention", "choose_num_splits", "choose_block_sizes", "plan_launch", "LaunchPlan",
    "TileConfig", "default_tile_config", "tile_candidates", "stage_variants", "query_len_bucket",
    "ATTENTION_TUNER", "autotune_enabled",
]

_LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_step(acc, l_i, m_i, q, k_tile, v_tile, visible, qk_scale,
                         DOT_PRECISION: tl.constexpr):
    """Fold one key tile into the running (acc, l, m); ``visible`` is [BLOCK_M, BLOCK_N]."""
    s = tl.dot(q, k_tile, input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet keeps m = -inf; shift by 0 so exp2 gives 0, not nan.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attend_prefix(acc, l_i, m_i, q, lo, hi, bt_row_ptr, k_cache_ptr, v_cache_ptr, kv_head,
                   stride_kcp, stride_kco, stride_kch, stride_vcp, stride_vco, stride_vch,
                   qk_scale, page_size, offs_d, mask_d,
                   BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Cached prefix keys at positions [lo, hi): every one is visible to every query row."""
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        in_range = pos < hi
        page = tl.load(bt_row_ptr + pos // page_size, mask=in_range, other=0).to(tl.int64)
        slot_in_page = (pos % page_size).to(tl.int64)
        k_off = page * stride_kcp + slot_in_page * stride_kco + kv_head * stride_kch
        v_off = page * stride_vcp + slot_in_page * stride_vco + kv_head * stride_vch
        kv_mask = in_range[:, None] & mask_d[None, :]
        # K is loaded transposed ([BLOCK_D, BLOCK_N]) for the Q @ K^T product.
        k_tile = tl.load(k_cache_ptr + k_off[None, :] + offs_d[:, None],
                         mask=in_range[None, :] & mask_d[:, None], other=0.0)
        v_tile = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k_tile = k_tile.to(tl.float32)
            v_tile = v_tile.to(tl.float32)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k_tile, v_tile,
                                             in_range[None, :], qk_scale, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _quadratic_visible(q_local, key, sub_block):
    """[rows, keys] visibility of the quadratic mask: the segment is sub-blocks of
    ``sub_block`` rows, row 0 of each a head. A key that is head j is seen by every row of
    sub-blocks >= j; a non-head row also sees every row of its own sub-block."""
    width = tl.maximum(sub_block, 1)
    q_sub = q_local // width
    k_sub = key // width
    key_is_head = (key % width) == 0
    row_is_head = (q_local % width) == 0
    return ((key_is_head[None, :] & (k_sub[None, :] <= q_sub[:, None]))
            | ((~row_is_head[:, None]) & (k_sub[None, :] == q_sub[:, None])))


@triton.jit
def _attend_segment(acc, l_i, m_i, q, q_start, q_len, q_local, q_block, is_causal, sub_block,
                    k_ptr, v_ptr, kv_head, stride_kt, stride_kh, stride_vt, stride_vh,
                    qk_scale, offs_d, mask_d, BLOCK_Q: tl.constexpr,
                    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    QUADRATIC: tl.constexpr):
    """The segment's own fresh keys read from k/v (the mask rule applied here: causal /
    bidirectional, or the quadratic mask when ``sub_block`` > 0). The loop stops after the
    last key any row of this query block can see (causal: its own position; quadratic: the
    end of its last row's sub-block)."""
    rows_hi = tl.minimum(q_len, (q_block + 1) * BLOCK_Q)
    seg_hi = tl.where(is_causal != 0, rows_hi, q_len)
    if QUADRATIC:
        width = tl.maximum(sub_block, 1)
        seg_hi = tl.where(sub_block > 0, tl.minimum(q_len, tl.cdiv(rows_hi, width) * width), seg_hi)
    for start in range(0, seg_hi, BLOCK_N):
        key = start + tl.arange(0, BLOCK_N)
        in_range = key < q_len
        tok = (q_start + key).to(tl.int64)
        k_tile = tl.load(k_ptr + tok[None, :] * stride_kt + kv_head * stride_kh + offs_d[:, None],
                         mask=in_range[None, :] & mask_d[:, None], other=0.0)
        v_tile = tl.load(v_ptr + tok[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                         mask=in_range[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            k_tile = k_tile.to(tl.float32)
            v_tile = v_tile.to(tl.float32)
        visible = in_range[None, :] & ((key[None, :] <= q_local[:, None]) | (is_causal == 0))
        if QUADRATIC:
            visible = tl.where(sub_block > 0,
                               in_range[None, :] & _quadratic_visible(q_local, key, sub_block),
                               visible)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k_tile, v_tile, visible,
                                             qk_scale, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _open_query_tile(q_ptr, query_start_loc_ptr, context_lens_ptr, causal_ptr, sub_block_ptr,
                     stride_qt, stride_qh, num_splits,
                     HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_Q: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                     QUADRATIC: tl.constexpr):
    """The common start of both attention kernels. This program's (sequence, query block, KV
    head, prefix split) come from the grid ``(S, q_blocks, Hkv * num_splits)``; then the
    segment's bounds, prefix length, causal flag and quadratic sub-block width (0 without
    ``QUADRATIC``); the rows of the GQA-packed query tile
    (local token index, query head, validity, flat token, q values); and empty online-softmax
    state (acc, l, m). A program whose query block lies past the segment has no valid row
    (every load is masked); the caller exits on ``q_block * BLOCK_Q >= q_len``."""
    seq = tl.program_id(0)
    q_block = tl.program_id(1)
    kv_head = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    ctx_len = tl.load(context_lens_ptr + seq)
    is_causal = tl.load(causal_ptr + seq).to(tl.int32)
    if QUADRATIC:
        sub_block = tl.load(sub_block_ptr + seq)
    else:
        sub_block = is_causal * 0  # a tensor like the loaded one; never read without QUADRATIC
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    rows = tl.arange(0, BLOCK_M)
    q_local = q_block * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = ((rows // GROUP) < BLOCK_Q) & (q_local < q_len)
    tok = (q_start + q_local).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_valid[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    return (seq, q_block, kv_head, split, q_start, q_len, ctx_len, is_causal, sub_block,
            offs_d, mask_d, q_local, head, row_valid, tok, q, acc, l_i, m_i)


@triton.jit
def _paged_attention_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr,
    block_tables_ptr, context_lens_ptr, query_start_loc_ptr, causal_ptr, sub_block_ptr,
    qk_scale, page_size,
    stride_ot, stride_oh, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcp, stride_kco, stride_kch, stride_vcp, stride_vco, stride_vch, stride_bt,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, QUADRATIC: tl.constexpr,
):
    (seq, q_block, kv_head, _, q_start, q_len, ctx_len, is_causal, sub_block, offs_d, mask_d,
     q_local, head, row_valid, tok, q, acc, l_i, m_i) = _open_query_tile(
        q_ptr, query_start_loc_ptr, context_lens_ptr, causal_ptr, sub_block_ptr, stride_qt,
        stride_qh, 1, HEAD_DIM, GROUP, BLOCK_Q, BLOCK_M, BLOCK_D, UPCAST, QUADRATIC)
    if q_block * BLOCK_Q >= q_len:
        return

    acc, l_i, m_i = _attend_prefix(
        acc, l_i, m_i, q, 0, ctx_len, block_tables_ptr + seq.to(tl.int64) * stride_bt,
        k_cache_ptr, v_cache_ptr, kv_head,
        stride_kcp, stride_kco, stride_kch, stride_vcp, stride_vco, stride_vch,
        qk_scale, page_size, offs_d, mask_d, BLOCK_N, UPCAST, DOT_PRECISION)

    acc, l_i, m_i = _attend_segment(
        acc, l_i, m_i, q, q_start, q_len, q_local, q_block, is_causal, sub_block,
        k_ptr, v_ptr, kv_head, stride_kt, stride_kh, stride_vt, stride_vh,
        qk_scale, offs_d, mask_d, BLOCK_Q, BLOCK_N, UPCAST, DOT_PRECISION, QUADRATIC)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    result = acc / l_safe[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             result.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & mask_d[None, :])


@triton.jit
def _paged_attention_split_kernel(
    part_out_ptr, part_lse_ptr, q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr,
    block_tables_ptr, context_lens_ptr, query_start_loc_ptr, causal_ptr, sub_block_ptr,
    qk_scale, page_size, num_splits,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcp, stride_kco, stride_kch, stride_vcp, stride_vco, stride_vch, stride_bt,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, QUADRATIC: tl.constexpr,
):
    """Like ``_paged_attention_kernel``, for one of ``num_splits`` chunks of the prefix."""
    (seq, q_block, kv_head, split, q_start, q_len, ctx_len, is_causal, sub_block, offs_d, mask_d,
     q_local, head, row_valid, tok, q, acc, l_i, m_i) = _open_query_tile(
        q_ptr, query_start_loc_ptr, context_lens_ptr, causal_ptr, sub_block_ptr, stride_qt,
        stride_qh, num_splits, HEAD_DIM, GROUP, BLOCK_Q, BLOCK_M, BLOCK_D, UPCAST, QUADRATIC)
    if q_block * BLOCK_Q >= q_len:
        return

    # Chunks are whole key tiles so no tile straddles two splits.
    chunk = tl.cdiv(tl.cdiv(ctx_len, num_splits), BLOCK_N) * BLOCK_N
    lo = tl.minimum(split * chunk, ctx_len)
    hi = tl.minimum(lo + chunk, ctx_len)
    acc, l_i, m_i = _attend_prefix(
        acc, l_i, m_i, q, lo, hi, block_tables_ptr + seq.to(tl.int64) * stride_bt,
        k_cache_ptr, v_cache_ptr, kv_head,
        stride_kcp, stride_kco, stride_kch, stride_vcp, stride_vco, stride_vch,
        qk_scale, page_size, offs_d, mask_d, BLOCK_N, UPCAST, DOT_PRECISION)

    if split == num_splits - 1:
        acc, l_i, m_i = _attend_segment(
            acc, l_i, m_i, q, q_start, q_len, q_local, q_block, is_causal, sub_block,
            k_ptr, v_ptr, kv_head, stride_kt, stride_kh, stride_vt, stride_vh,
            qk_scale, offs_d, mask_d, BLOCK_Q, BLOCK_N, UPCAST, DOT_PRECISION, QUADRATIC)

    has_keys = l_i > 0.0
    result = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    tl.store(part_out_ptr + split * stride_ps + tok[:, None] * stride_pt
             + head[:, None] * stride_ph + offs_d[None, :],
             result, mask=row_valid[:, None] & mask_d[None, :])
    tl.store(part_lse_ptr + split * stride_ls + tok * stride_lt + head, lse, mask=row_valid)


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, num_splits,
    stride_ot, stride_oh, stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[t, h] = sum_s 2^(lse_s - max) * o_s / sum_s 2^(lse_s - max)."""
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    lse = tl.load(part_lse_ptr + offs_s * stride_ls + tok * stride_lt + head, mask=mask_s,
                  other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weight = tl.math.exp2(lse - lse_max)  # 0 for empty splits
    total = tl.sum(weight, 0)
    part = tl.load(part_out_ptr + offs_s[:, None] * stride_ps + tok * stride_pt
                   + head * stride_ph + offs_d[None, :],
                   mask=(mask_s & (weight > 0.0))[:, None] & mask_d[None, :], other=0.0)
    merged = tl.sum(weight[:, None] * part, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + tok * stride_ot + head * stride_oh + offs_d,
             merged.to(out_ptr.dtype.element_ty), mask=mask_d)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

_MAX_SPLITS = 16
_MIN_KEYS_PER_SPLIT = 256

# Autotuning grid (CUDA only). num_stages is tried on the winner of BLOCK_N x num_warps only.
TUNE_BLOCK_N = (32, 64, 128)
TUNE_NUM_WARPS = (2, 4, 8)
TUNE_NUM_STAGES = (1, 2, 3)
# A config whose K and V tiles (2 x BLOCK_N x BLOCK_D) exceed this many elements per thread
# spills registers (and takes ~10x longer to compile): pruned.
_MAX_KV_ELEMENTS_PER_THREAD = 128

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileConfig:
    """The launch parameters the tuner chooses between."""

    block_n: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"BLOCK_N={self.block_n}/warps={self.num_warps}/stages={self.num_stages}"


def default_tile_config(head_dim: int) -> TileConfig:
    """The fixed choice (interpreter, untuned launches, reference config of the tuner): 64 keys
    per tile (32 for head dims above 128: register pressure), 4 warps, 3 stages (Triton's
    default on CUDA)."""
    return TileConfig(64 if head_dim <= 128 else 32, 4, 3)


def query_len_bucket(max_query_len: int) -> str:
    """Tuning bucket of a launch's longest query segment: decode, short, block-sized, long."""
    if max_query_len <= 1:
        return "1"
    if max_query_len <= 8:
        return "<=8"
    if max_query_len <= 32:
        return "<=32"
    return ">32"


def tile_candidates(head_dim: int) -> list[TileConfig]:
    """First tuning round: the default config, then every ``BLOCK_N x num_warps`` of the grid
    valid for ``head_dim`` (at the default ``num_stages``). Pruned: 128-key tiles above head
    dim 128, and tiles whose K/V need more than ``_MAX_KV_ELEMENTS_PER_THREAD`` registers per
    thread (for D=128: 64 keys need >= 4 warps, 128 keys 8)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    default = default_tile_config(head_dim)
    out = [default]
    for block_n in TUNE_BLOCK_N:
        for warps in TUNE_NUM_WARPS:
            if block_n > 64 and block_d > 128:
                continue
            if 2 * block_n * block_d > _MAX_KV_ELEMENTS_PER_THREAD * 32 * warps:
                continue
            cfg = TileConfig(block_n, warps, default.num_stages)
            if cfg not in out:
                out.append(cfg)
    return out


def stage_variants(cfg: TileConfig) -> list[TileConfig]:
    """Second tuning round: the winner at the other ``num_stages`` values."""
    return [TileConfig(cfg.block_n, cfg.num_warps, s) for s in TUNE_NUM_STAGES if s != cfg.num_stages]


ATTENTION_TUNER = LaunchTuner("paged_attention")


def autotune_enabled(device: torch.device) -> bool:
    """Tuning applies to compiled CUDA launches only (never under the interpreter, where it
    would take minutes); ``NLD_ATTN_AUTOTUNE=0`` switches it off (fixed default config)."""
    return (device.type == "cuda" and not _interpreting()
            and os.environ.get("NLD_ATTN_AUTOTUNE", "1") != "0")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # interpreter: any small number keeps the heuristic exercised


def choose_block_sizes(max_query_len: int, group: int, head_dim: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_Q, BLOCK_N)`` for a launch; ``BLOCK_N`` is the untuned default.

    ``BLOCK_M`` (rows = tokens x packed heads) grows with the query length from 16 to 64 and is
    at least the GQA group; ``BLOCK_Q = BLOCK_M // group``; ``BLOCK_N`` is 64 keys, 32 for head
    dims above 128 (register pressure). On an H200, 64/64 with 4 warps was as fast as any of
    128/64/8, 128/128/8, 128/32/4 and 64/32/4 for causal prefill (~300 TFLOP/s at 2 x 4096
    tokens, D=128, bf16; torch's SDPA flash reached ~550).
    """
    rows = max(1, max_query_len) * group
    block_m = max(16, triton.next_power_of_2(group), min(64, triton.next_power_of_2(rows)))
    return block_m, block_m // group, default_tile_config(head_dim).block_n


def choose_num_splits(num_seqs: int, q_blocks: int, num_kv_heads: int, max_prefix_len: int,
                      device: torch.device) -> int:
    """How many programs share one prefix; 1 unless the grid leaves most of the device idle.

    Split-KV costs a second launch and an fp32 round trip through memory, so it is used only
    when the plain grid has fewer programs than the device has SMs and the prefix bound is at
    least ``2 * _MIN_KEYS_PER_SPLIT``; then it aims at ~2 programs per SM. (On an H200, 132
    SMs: a 32-token block pass at batch 8 over 4096 cached tokens, 128 programs, took 0.25 ms
    unsplit and 0.20 ms with 2 to 8 splits; decode at batch 32, 256 programs, was fastest
    unsplit; docs/gpu-results.md, run 3.) ``max_prefix_len`` is a host-side upper bound
    (``block_tables.shape[1] * page_size``), so choosing needs no sync.
    """
    programs = num_seqs * q_blocks * num_kv_heads
    sms = _num_sms(device)
    if programs >= sms or max_prefix_len < 2 * _MIN_KEYS_PER_SPLIT:
        return 1
    splits = min(-(-2 * sms // programs), max_prefix_len // _MIN_KEYS_PER_SPLIT, _MAX_SPLITS)
    return max(1, splits)


@dataclass(frozen=True)
class LaunchPlan:
    """Everything a launch decides from host-side ints (no device sync)."""

    kernel: str  # "main" or "split"
    num_splits: int
    block_m: int
    block_q: int
    block_d: int
    q_blocks: int
    config: TileConfig  # tuned (if cached), explicit override, or the default
    tune_key: tuple | None  # None: this launch is not tuned
    tuned: bool  # config came from the tuner's cache

    def as_dict(self) -> dict:
        return {"kernel": self.kernel, "num_splits": self.num_splits, "block_m": self.block_m,
                "block_n": self.config.block_n, "num_warps": self.config.num_warps,
                "num_stages": self.config.num_stages, "tuned": self.tuned,
                "tune_key": list(self.tune_key) if self.tune_key else None}


def plan_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    k_cache: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    *,
    num_splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    autotune: bool | None = None,
) -> LaunchPlan:
    """The launch ``block_attention`` makes for these arguments (see its docstring); ``config``
    is the tuner's cached pick when there is one, else the default (tuned on the first call)."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    num_seqs = block_tables.shape[0]
    auto_m, _, _ = choose_block_sizes(max_query_len, group, head_dim)
    block_m = block_m or auto_m
    default = default_tile_config(head_dim)
    override = block_n is not None or num_warps is not None or num_stages is not None
    config = TileConfig(block_n or default.block_n, num_warps or default.num_warps,
                        num_stages or default.num_stages)
    if block_m < group or block_m < 16 or config.block_n < 16:
        raise ValueError(f"block sizes too small: block_m={block_m}, block_n={config.block_n}, "
                         f"group={group}")
    block_q = block_m // group
    block_d = max(16, triton.next_power_of_2(head_dim))
    q_blocks = triton.cdiv(max(1, max_query_len), block_q)
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, q_blocks, num_kv_heads,
                                       block_tables.shape[1] * k_cache.shape[1], q.device)
    num_splits = max(1, int(num_splits))
    kernel = "main" if num_splits == 1 else "split"

    if autotune is None:
        autotune = autotune_enabled(q.device) and not override
    elif autotune and override:
        raise ValueError("autotune=True conflicts with explicit block_n/num_warps/num_stages")
    tune_key = None
    tuned = False
    if autotune:
        tune_key = (kernel, query_len_bucket(max_query_len), head_dim, group,
                    str(q.dtype).replace("torch.", ""))
        cached = ATTENTION_TUNER.lookup(tune_key)
        if cached is not None:
            config, tuned = cached, True
    return LaunchPlan(kernel, num_splits, block_m, block_q, block_d, q_blocks, config, tune_key,
                      tuned)


def block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    meta: AttentionMetadata, scale: float, **launch: Any,
) -> torch.Tensor:
    """Launch the paged attention kernels (inputs assumed validated by ``kernels.ops``;
    ``meta.max_query_len`` must be set).

    ``launch`` takes the keywords of ``plan_launch``. ``num_splits``: None picks automatically (``choose_num_splits``), 1 disables split-KV, more
    forces that many prefix chunks. ``block_m``/``block_n`` override the tile sizes (powers of
    two, at least 16; ``block_m`` at least the GQA group); ``num_warps``/``num_stages`` the
    warps per program and pipeline stages.

    Autotuning (``autotune=None``: on for CUDA tensors, off under the interpreter, off when any
    of ``block_n``/``num_warps``/``num_stages`` is given or ``NLD_ATTN_AUTOTUNE=0``): the
    ``(BLOCK_N, num_warps, num_stages)`` of the main kernel, or of the split kernel (timed with
    its merge), is picked by ``ATTENTION_TUNER`` per key ``(kernel, query_len_bucket,
    head_dim, group, dtype)``. The first call per key compiles and times the candidates
    (``tile_candidates`` then ``stage_variants`` of the winner; seconds, with device syncs);
    every later call is a dict lookup, sync-free. So tuning must happen on an eager call: the
    CUDA-graph runner's warm-up pass, which precedes each capture with the same shapes, does
    it. A call made while a graph is being captured with an untuned key launches the default
    config (never tunes inside a capture) and leaves the key untuned.
    """
    block_tables, context_lens, query_start_loc, causal = (
        meta.block_tables, meta.context_lens, meta.query_start_loc, meta.causal)
    max_query_len = meta.max_query_len
    assert max_query_len is not None, "kernels.ops fills max_query_len"
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    num_seqs = context_lens.shape[0]
    page_size = k_cache.shape[1]
    out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0 or max_query_len <= 0:
        return out

    plan = plan_launch(q, k, k_cache, block_tables, max_query_len, **launch)
    num_splits = plan.num_splits
    interpreting = _interpreting()

    # bf16 arithmetic is wrong in the interpreter: there, compute on fp32 copies of the tiles.
    upcast = q.dtype == torch.bfloat16 and interpreting
    # fp32 dots must not silently use tf32; half inputs keep the default.
    dot_precision = "ieee" if (q.dtype == torch.float32 or upcast) else None
    causal_u8 = causal.view(torch.uint8)
    qk_scale = float(scale) * _LOG2E
    quadratic = meta.mask_block is not None
    shapes = dict(HEAD_DIM=head_dim, GROUP=group, BLOCK_Q=plan.block_q, BLOCK_M=plan.block_m,
                  BLOCK_D=plan.block_d, UPCAST=upcast, DOT_PRECISION=dot_precision,
                  QUADRATIC=quadratic)
    # without mask_block its pointer is never read (QUADRATIC is a compile-time False)
    metadata = (block_tables, context_lens, query_start_loc, causal_u8,
                meta.mask_block if quadratic else context_lens, qk_scale, page_size)
    fresh_strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                     v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                     block_tables.stride(0))

    def meta(cfg: TileConfig) -> dict:
        m = dict(shapes, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps)
        if not interpreting:  # the interpreter launch stays exactly as it always was
            m["num_stages"] = cfg.num_stages
        return m

    if num_splits == 1:
        grid = (num_seqs, plan.q_blocks, num_kv_heads)

        def launch(cfg: TileConfig):  # type: ignore[no-untyped-def]
            return _paged_attention_kernel[grid](
                out, q, k, v, k_cache, v_cache, *metadata,
                out.stride(0), out.stride(1), *fresh_strides, *cache_strides, **meta(cfg))
    else:
        part_out = torch.empty((num_splits, num_tokens, num_q_heads, head_dim),
                               dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_splits, num_tokens, num_q_heads), dtype=torch.float32,
                               device=q.device)
        grid = (num_seqs, plan.q_blocks, num_kv_heads * num_splits)
        merge_grid = (num_tokens, num_q_heads)

        def launch(cfg: TileConfig):  # type: ignore[no-untyped-def]
            compiled = _paged_attention_split_kernel[grid](
                part_out, part_lse, q, k, v, k_cache, v_cache, *metadata, num_splits,
                part_out.stride(0), part_out.stride(1), part_out.stride(2),
                part_lse.stride(0), part_lse.stride(1),
                *fresh_strides, *cache_strides, **meta(cfg))
            _merge_splits_kernel[merge_grid](
                out, part_out, part_lse, num_splits,
                out.stride(0), out.stride(1), part_out.stride(0), part_out.stride(1),
                part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
                HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits),
                BLOCK_D=plan.block_d, num_warps=1)
            return compiled

    config = plan.config
    if plan.tune_key is not None and not plan.tuned:
        if capturing():
            logger.warning("paged attention: key %s not tuned before CUDA-graph capture; "
                           "launching the default %s", plan.tune_key, config)
        else:
            config = ATTENTION_TUNER.tune(plan.tune_key, tile_candidates(head_dim),
                                          stage_variants, launch, lambda: out, q.device)
    launch(config)
    return out

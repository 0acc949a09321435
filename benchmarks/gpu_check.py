"""One prepared GPU check: kernel correctness, attention timings, and 8B-shaped step timings.

    python benchmarks/gpu_check.py --out DIR            # on a GPU (about 3-5 minutes)
    python benchmarks/gpu_check.py --reduced --out DIR  # CPU smoke form (CI), tiny shapes

1. Every Triton kernel against the PyTorch reference, in bf16 and fp16 (fp32/fp16 under the
   interpreter in reduced form): random inputs made fresh for each case, the allocator poisoned
   with NaNs before each run, cache slots that must stay untouched poisoned too. Attention here
   runs its fixed default tile config; the fused elementwise kernels (rms_norm with and without
   the residual add, rotary_qk on strided views of a fused QKV output, silu_mul) too.
2. The paged attention kernel timed against SDPA (dense, contiguous K/V) and FlexAttention on
   the same masks: decode, block-bidirectional (32-token block over a prefix), causal prefill.
   On CUDA the first call per shape autotunes the tile config (``kernels/tuner.py``); each row
   reports the kernel (main / split-KV) and config picked, the time of the untuned default
   config, and the tuned output is checked against the reference (a kernel-check row); for
   decode and block shapes also the times with 2, 4 and 8 prefix splits forced.
3. An 8B-shaped Nemotron-Labs Diffusion model with random bf16 weights, one step at batch 1,
   8 and 32 for AR decode, a 32-token denoise pass and a 32-token verify pass, through the
   engine's runner (CUDA graphs), beside the card's copy bandwidth and the bandwidth floor
   (bytes read per step / bandwidth). The model is fused as the engine does on CUDA
   (``fuse_projections``: fused QKV / gate-up GEMMs and the fused elementwise kernels); AR
   decode at batch 1 is timed once unfused first, as the baseline.
Prints a short table last (with every autotuned attention key: pick, tuning time, speedup over
the default config); writes results.json (and the table) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def timeit(fn: Callable[[], Any], device: torch.device, warmup: int = 3, iters: int = 20) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def poison_allocator(device: torch.device, nbytes: int = 1 << 26) -> None:
    """Fill freed allocator blocks with NaN so an unwritten output cannot pass by luck."""
    if device.type == "cuda":
        torch.empty(nbytes // 2, dtype=torch.float16, device=device).fill_(float("nan"))


# --------------------------------------------------------------- kernel checks
def make_case(
    seq_specs: list[tuple[int, int, bool]], hq: int, hkv: int, d: int, page: int, dtype: torch.dtype, device: torch.device
) -> dict[str, Any]:
    """Random ragged batch; seq_specs = [(prefix_len, query_len, causal)]. Pages shuffled."""
    total_pages = sum(-(-(c + q) // page) for c, q, _ in seq_specs) + 4
    perm = torch.randperm(total_pages).tolist()
    tables, ctx, qsl, causal, slots = [], [], [0], [], []
    used = 0
    for c, q, is_causal in seq_specs:
        n = -(-(c + q) // page)
        pages = perm[used : used + n]
        used += n
        tables.append(pages)
        ctx.append(c)
        qsl.append(qsl[-1] + q)
        causal.append(is_causal)
        slots.extend(pages[p // page] * page + p % page for p in range(c, c + q))
    width = max(len(t) for t in tables)
    bt = torch.zeros((len(tables), width), dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t)
    t_total = qsl[-1]
    return {
        "q": torch.randn(t_total, hq, d, dtype=dtype, device=device),
        "k": torch.randn(t_total, hkv, d, dtype=dtype, device=device),
        "v": torch.randn(t_total, hkv, d, dtype=dtype, device=device),
        "k_cache": torch.randn(total_pages, page, hkv, d, dtype=dtype, device=device),
        "v_cache": torch.randn(total_pages, page, hkv, d, dtype=dtype, device=device),
        "block_tables": bt.to(device),
        "context_lens": torch.tensor(ctx, dtype=torch.int32, device=device),
        "query_start_loc": torch.tensor(qsl, dtype=torch.int32, device=device),
        "causal": torch.tensor(causal, dtype=torch.bool, device=device),
        "slots": torch.tensor(slots, dtype=torch.int64, device=device),
        "max_query_len": max(q for _, q, _ in seq_specs),
    }


def case_args(case: dict[str, Any], device: torch.device | None = None, dtype: torch.dtype | None = None) -> tuple:
    """``(q, k, v, k_cache, v_cache, meta)`` of a case, optionally copied to ``device`` with the
    floating tensors cast to ``dtype`` (the reference runs on CPU fp32 copies)."""
    from kernels.attention_metadata import AttentionMetadata

    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device) if device is not None else t
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    tensors = tuple(move(case[k]) for k in ("q", "k", "v", "k_cache", "v_cache"))
    meta = AttentionMetadata(*(move(case[k]) for k in ("block_tables", "context_lens", "query_start_loc", "causal")),
                             max_query_len=case["max_query_len"])
    return (*tensors, meta)


def check_kernels(device: torch.device, reduced: bool) -> list[dict[str, Any]]:
    from kernels.block_attention import block_attention
    from kernels.kv_store import kv_store
    from kernels.reference import paged_attention_reference, store_kv_reference

    dtypes = [torch.float32, torch.float16] if device.type == "cpu" else [torch.bfloat16, torch.float16]
    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
    d = 32 if reduced else 128
    mixed = [(0, 9, True), (20, 1, True), (37, 5, False), (0, 1, True), (50, 8, False)]
    long_prefix = [(600 if reduced else 6000, 1, True), (300 if reduced else 3000, 8, False)]
    cases = [
        ("mixed gqa4 page16", mixed, 8, 2, 16, None),
        ("mixed gqa1 page32", mixed, 4, 4, 32, None),
        ("decode batch", [(c, 1, True) for c in (5, 17, 64, 33)], 8, 2, 16, None),
        ("long prefix split-kv", long_prefix, 8, 2, 16, 4),
    ]
    results = []
    for dtype in dtypes:
        for name, specs, hq, hkv, page, splits in cases:
            case = make_case(specs, hq, hkv, d, page, dtype, device)
            ref = paged_attention_reference(*case_args(case, torch.device("cpu"), torch.float32), d**-0.5)
            poison_allocator(device)
            out = block_attention(*case_args(case), d**-0.5, num_splits=splits, autotune=False)
            err = (out.float().cpu() - ref.float()).abs().max().item()
            ok = bool(torch.isfinite(out).all()) and err <= tol[dtype]
            results.append({"kernel": "paged_attention", "case": name, "dtype": str(dtype), "max_abs_err": err, "ok": ok})
            # store_kv: untouched slots must keep their poison
            kc = torch.full_like(case["k_cache"], float("nan"))
            vc = torch.full_like(case["v_cache"], float("nan"))
            slots = case["slots"].clone()
            slots[::3] = -1
            kv_store(case["k"], case["v"], kc, vc, slots)
            rk, rv = torch.full_like(kc, float("nan")).cpu(), torch.full_like(vc, float("nan")).cpu()
            store_kv_reference(case["k"].cpu(), case["v"].cpu(), rk, rv, slots.cpu())
            same = torch.equal(kc.cpu().nan_to_num(123.0), rk.nan_to_num(123.0)) and torch.equal(
                vc.cpu().nan_to_num(123.0), rv.nan_to_num(123.0)
            )
            results.append({"kernel": "store_kv", "case": name, "dtype": str(dtype), "max_abs_err": 0.0 if same else math.inf, "ok": same})
    return results


def sync_free_check(kernel: str, case: str, dtype: torch.dtype, fn: Callable[[], Any]) -> dict[str, Any]:
    """CUDA: ``fn`` (a launch through kernels.ops) must not synchronise with the device
    (``torch.cuda.set_sync_debug_mode("error")`` raises on any sync)."""
    ok = True
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as exc:
        ok = False
        log(f"FAIL {kernel} {case}: the launch synchronised: {str(exc)[:200]}")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"kernel": f"{kernel} sync-free launch", "case": case, "dtype": str(dtype), "max_abs_err": 0.0 if ok else math.inf, "ok": ok}


def check_elementwise(device: torch.device, reduced: bool) -> list[dict[str, Any]]:
    """The fused elementwise kernels against their references (computed on the CPU in the same
    dtype); the allocator is poisoned first so an unwritten output element shows up as NaN."""
    from kernels.elementwise import rms_norm_triton, rotary_qk_triton, silu_mul_triton
    from kernels.reference import rms_norm_reference, rotary_qk_reference, silu_mul_reference

    dtypes = [torch.float32, torch.float16] if device.type == "cpu" else [torch.bfloat16, torch.float16]
    tol = {torch.float32: 1e-4, torch.float16: 8e-3, torch.bfloat16: 6e-2}
    hidden_sizes = (64, 96) if reduced else (4096, 96)
    hq, hkv, d = (8, 2, 32) if reduced else (32, 8, 128)
    inter = 96 if reduced else 14336
    rows = 5

    def row(kernel: str, case: str, dtype: torch.dtype, out: torch.Tensor, ref: torch.Tensor, exact: bool = False) -> dict[str, Any]:
        err = (out.float().cpu() - ref.float()).abs().max().item() if out.numel() else 0.0
        ok = bool(torch.isfinite(out).all()) and (err == 0.0 if exact else err <= tol[dtype])
        return {"kernel": kernel, "case": case, "dtype": str(dtype), "max_abs_err": err, "ok": ok}

    results = []
    for dtype in dtypes:
        for hidden in hidden_sizes:
            x = torch.randn(rows, hidden, dtype=dtype, device=device) * 3
            res = torch.randn(rows, hidden, dtype=dtype, device=device)
            w = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
            poison_allocator(device)
            y, _ = rms_norm_triton(x, w, 1e-5)
            results.append(row("rms_norm", f"hidden {hidden}", dtype, y, rms_norm_reference(x.cpu(), w.cpu(), 1e-5)[0]))
            poison_allocator(device)
            y, new_res = rms_norm_triton(x, w, 1e-5, res)
            y_ref, res_ref = rms_norm_reference(x.cpu(), w.cpu(), 1e-5, res.cpu())
            results.append(row("rms_norm+residual", f"hidden {hidden}", dtype, y, y_ref))
            results.append(row("rms_norm+residual", f"hidden {hidden} (sum, exact)", dtype, new_res, res_ref, exact=True))
        # rotary on strided q/k views of a fused QKV row, per-token query scale in the tables
        qkv = torch.randn(rows, (hq + 2 * hkv) * d, dtype=dtype, device=device)
        q = qkv[:, : hq * d].view(rows, hq, d)
        k = qkv[:, hq * d : (hq + hkv) * d].view(rows, hkv, d)
        cos, sin = torch.randn(rows, d, device=device), torch.randn(rows, d, device=device)
        scale = 1 + torch.rand(rows, 1, device=device)
        tables = (cos * scale, sin * scale, cos, sin)
        poison_allocator(device)
        q_out, k_out = rotary_qk_triton(q, k, *tables)
        q_ref, k_ref = rotary_qk_reference(q.cpu(), k.cpu(), *[t.cpu() for t in tables])
        results.append(row("rotary_qk", f"q {hq}x{d} (strided)", dtype, q_out, q_ref))
        results.append(row("rotary_qk", f"k {hkv}x{d} (strided)", dtype, k_out, k_ref))
        gate_up = torch.randn(rows, 2 * inter, dtype=dtype, device=device) * 3
        poison_allocator(device)
        out = silu_mul_triton(gate_up)
        results.append(row("silu_mul", f"intermediate {inter}", dtype, out, silu_mul_reference(gate_up.cpu())))
        if device.type == "cuda":  # the public ops (what the model calls), launched without a sync
            from kernels import ops

            def fused_ops() -> None:
                ops.rms_norm(x, w, 1e-5, res)
                ops.rotary_qk(q, k, *tables)
                ops.silu_mul(gate_up)

            results.append(sync_free_check("rms_norm/rotary_qk/silu_mul", "ops", dtype, fused_ops))
    for r in results:
        if not r["ok"]:
            log(f"FAIL {r['kernel']} {r['case']} {r['dtype']}: max abs err {r['max_abs_err']:.2e}")
    return results


# ------------------------------------------------------------ attention timing
def time_attention(device: torch.device, reduced: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Timing rows, and kernel-check rows for the autotuned launches (CUDA)."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from kernels.block_attention import block_attention, plan_launch
    from kernels.ops import paged_attention
    from kernels.reference import paged_attention_reference

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    hq, hkv, d = (8, 2, 32) if reduced else (32, 8, 128)
    shapes = {
        "decode": (8 if reduced else 32, 128 if reduced else 4096, 1, True),
        "block_bidirectional": (2 if reduced else 8, 128 if reduced else 4096, 8 if reduced else 32, False),
        "prefill": (1 if reduced else 4, 0, 64 if reduced else 2048, True),
    }
    flex = None
    if device.type == "cuda":
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            flex = (torch.compile(flex_attention), create_block_mask)
        except Exception as exc:  # pragma: no cover - depends on the torch build
            log(f"flex attention unavailable: {exc}")
    rows, checks = [], []
    for name, (batch, prefix, qlen, causal) in shapes.items():
        case = make_case([(prefix, qlen, causal)] * batch, hq, hkv, d, 16, dtype, device)
        args = case_args(case)
        t_tune = time.time()
        ours = timeit(lambda: paged_attention(*args, d**-0.5), device)  # 1st call tunes (CUDA)
        t_tune = time.time() - t_tune
        # the launch the Triton path makes (on CUDA: the tuned pick; reduced/CPU: the fixed default)
        plan = plan_launch(case["q"], case["k"], case["k_cache"], case["block_tables"], case["max_query_len"])
        launch = {"kernel": plan.kernel, "num_splits": plan.num_splits, "block_m": plan.block_m, "config": str(plan.config), "tuned": plan.tuned}
        if device.type == "cuda":
            default = timeit(lambda: block_attention(*args, d**-0.5, autotune=False), device)
            launch["default_ms"] = default * 1e3
            poison_allocator(device)
            out = paged_attention(*args, d**-0.5)
            expected = paged_attention_reference(*args, d**-0.5)
            err = (out.float() - expected.float()).abs().max().item()
            ok = bool(torch.isfinite(out).all()) and err <= 3e-2
            checks.append({"kernel": "paged_attention (tuned)", "case": f"{name} {launch['config']}", "dtype": str(dtype), "max_abs_err": err, "ok": ok})
            del out, expected
            checks.append(sync_free_check("paged_attention (tuned)", name, dtype, lambda: paged_attention(*args, d**-0.5)))
        # SDPA over dense, contiguous K/V (prefix + segment) per sequence: its best case
        kv_len = prefix + qlen
        qd = torch.randn(batch, hq, qlen, d, dtype=dtype, device=device)
        kd = torch.randn(batch, hkv, kv_len, d, dtype=dtype, device=device)
        vd = torch.randn(batch, hkv, kv_len, d, dtype=dtype, device=device)
        mask = None
        if causal and qlen > 1:
            mask = torch.ones(qlen, kv_len, dtype=torch.bool, device=device).tril(diagonal=prefix)
        ref = timeit(lambda: sdpa(qd, kd, vd, attn_mask=mask, enable_gqa=True), device)
        row = {"shape": name, "batch": batch, "prefix": prefix, "query_len": qlen, "ours_ms": ours * 1e3, "sdpa_ms": ref * 1e3,
               "first_calls_s": t_tune, **launch}
        if flex is not None:
            try:
                flex_fn, create_block_mask = flex

                def mask_mod(b, h, q_idx, kv_idx, prefix=prefix, causal=causal):  # type: ignore[no-untyped-def]
                    return (kv_idx <= q_idx + prefix) | (not causal)

                bm = create_block_mask(mask_mod, None, None, qlen, kv_len, device=device)
                row["flex_ms"] = timeit(lambda: flex_fn(qd, kd, vd, block_mask=bm, enable_gqa=True), device) * 1e3
            except Exception as exc:  # pragma: no cover
                row["flex_error"] = str(exc)[:200]
        if device.type == "cuda" and name != "prefill":
            # how the split-KV count the heuristic leaves at 1 for these grids would do
            row["splits_ms"] = {n: timeit(lambda n=n: block_attention(*args, d**-0.5, num_splits=n), device) * 1e3
                                for n in (2, 4, 8)}
        rows.append(row)
        log(f"attention {name}: ours {row['ours_ms']:.3f} ms ({row['kernel']} {row['config']}, tuned={row['tuned']}, "
            f"default config {row.get('default_ms', float('nan')):.3f} ms), sdpa {row['sdpa_ms']:.3f} ms, "
            f"flex {row.get('flex_ms', float('nan')):.3f} ms")
    if device.type == "cpu":
        checks += tuning_smoke(device)
    return rows, checks


def tuning_smoke(device: torch.device) -> list[dict[str, Any]]:
    """Reduced form only: the interpreter path never autotunes, so run the tuner once on a tiny
    case (one timed launch per candidate) to exercise it and the tuning report end to end."""
    import functools

    from kernels.block_attention import ATTENTION_TUNER, block_attention
    from kernels.reference import paged_attention_reference
    from kernels.tuner import time_launch

    case = make_case([(40, 1, True), (20, 1, True)], 4, 2, 16, 16, torch.float32, device)
    args = case_args(case)
    timer = ATTENTION_TUNER.timer
    ATTENTION_TUNER.timer = functools.partial(time_launch, reps=1, rounds=1)
    try:
        out = block_attention(*args, 16**-0.5, num_splits=1, autotune=True)
    finally:
        ATTENTION_TUNER.timer = timer
    err = (out - paged_attention_reference(*args, 16**-0.5)).abs().max().item()
    ok = bool(torch.isfinite(out).all()) and err <= 1e-4
    return [{"kernel": "paged_attention (tuned)", "case": "interpreter tuning smoke", "dtype": str(torch.float32), "max_abs_err": err, "ok": ok}]


# ----------------------------------------------------------------- model steps
def copy_bandwidth(device: torch.device, reduced: bool) -> float:
    """Bytes per second of a device copy, counting bytes read and written."""
    n = (1 << 24) if reduced else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, warmup=3, iters=10)
    return 2 * n / t


def model_config_dict(reduced: bool) -> dict[str, Any]:
    from server.model.tiny import tiny_nld_config

    if reduced:
        return tiny_nld_config(vocab_size=512, mask_token_id=500, block_size=32, hidden_size=64, head_dim=16, num_layers=2)
    return tiny_nld_config(
        vocab_size=131072,
        hidden_size=4096,
        num_layers=34,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        mask_token_id=100,
        block_size=32,
        eos_token_id=11,
    )


def build_model(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    from server.model.config import ModelConfig
    from server.model.model import DecoderModel

    with torch.device("meta"):
        model = DecoderModel(ModelConfig.from_dict(cfg))
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.rotary = type(model.rotary)(model.config.rope, model.config.head_dim).to(device)
    return model.eval()


def time_model_steps(device: torch.device, reduced: bool, bandwidth: float, unfused_baseline: bool = True) -> list[dict[str, Any]]:
    from server.engine.modes.diffusion import DENOISE
    from server.engine.modes.self_spec import VERIFY
    from server.engine.params import ModeParams, ResolvedParams, SamplingParams
    from server.engine.request import Request
    from server.engine.runner import ModelRunner
    from server.engine.sampler import RowSpec, select_tokens
    from server.engine.work import DECODE, Work

    cfg = model_config_dict(reduced)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = build_model(cfg, device, dtype)
    mc = model.config
    page, prefix, block = 16, 512, 32
    batches = (1, 8, 32)
    pages_per_seq = -(-(prefix + block) // page)
    num_pages = max(batches) * pages_per_seq + 1
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "embed_tokens.weight")
    kv_bytes_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * torch.finfo(dtype).bits // 8
    kinds = {
        "ar_decode": Work(DECODE, [5], [0]),
        "denoise_32": Work(DENOISE, [100] * block, list(range(block))),
        "verify_32": Work(VERIFY, [5] * block, list(range(block))),
    }

    def make_runner(graph_batches: tuple[int, ...], graph_lens: tuple[int, ...]) -> ModelRunner:
        on_gpu = device.type == "cuda"
        return ModelRunner(
            model, num_pages, page, device, dtype, max_pages_per_seq=pages_per_seq,
            graph_query_lens=graph_lens if on_gpu else (), graph_batch_sizes=graph_batches if on_gpu else (),
        )

    def time_step(runner: ModelRunner, kind: str, b: int, label: str) -> dict[str, Any]:
        work = kinds[kind]
        reqs = []
        for s in range(b):
            r = Request(f"r{s}", [1] * prefix, ResolvedParams(SamplingParams(), ModeParams("ar")), seed=s, stop_ids=frozenset(),
                        max_model_len=prefix + block + 1)
            r.num_computed = prefix
            r.table.pages = list(range(s * pages_per_seq, (s + 1) * pages_per_seq))
            reqs.append(r)
        batch = [(r, work) for r in reqs]
        specs = [RowSpec(0.0, 0, 1.0, 0, prefix, 1)] * (b * len(work.logit_rows))

        def step() -> None:
            logits = runner.run(batch)
            select_tokens(torch.cat(logits), specs, mc.mask_token_id)

        t = timeit(step, device, warmup=2, iters=10 if not reduced else 3)
        read = weight_bytes + b * prefix * kv_bytes_per_token
        floor = read / bandwidth
        log(f"step {label} batch {b}: {t*1e3:.2f} ms (floor {floor*1e3:.2f} ms, {100*floor/t:.0f}% of bandwidth floor)")
        return {"step": label, "batch": b, "ms": t * 1e3, "floor_ms": floor * 1e3, "fraction_of_floor": floor / t,
                "tokens_per_s": b * (1 if kind == "ar_decode" else block) / t}

    rows = []
    if unfused_baseline:  # the model as it ran before fusing (three QKV GEMMs, PyTorch elementwise ops)
        runner = make_runner((1,), (1,))
        rows.append(time_step(runner, "ar_decode", 1, "ar_decode_unfused"))
        del runner  # its graphs point at the unfused weights
    model.fuse_projections()  # what LLMEngine does on CUDA
    runner = make_runner(batches, (1, block))
    for b in batches:
        for kind in kinds:
            rows.append(time_step(runner, kind, b, kind))
    try:
        rows_profile = profile_step(runner, device, time_step)
    except Exception as exc:  # a profiler failure must not cost the rest of the results
        log(f"profile failed: {exc!r}")
        rows_profile = []
    replays = runner.graphs.replays if runner.graphs is not None else 0
    rows.append({"step": "graph_replays", "batch": 0, "ms": 0.0, "floor_ms": 0.0, "fraction_of_floor": 0.0, "tokens_per_s": replays})
    rows += rows_profile
    del model, runner
    return rows


def profile_step(runner, device: torch.device, time_step) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Where the time of a batch-1 AR decode step goes: the top kernels (CUDA; CPU ops on the
    CPU) by total time under torch.profiler over the timed steps, run eagerly so that each
    kernel is its own record, as rows ``profile:<name>``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"

    def spent(e) -> float:  # type: ignore[no-untyped-def]
        return e.device_time_total if cuda else e.self_cpu_time_total

    graphs, runner.graphs = runner.graphs, None
    try:
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            time_step(runner, "ar_decode", 1, "ar_decode (eager, profiled)")
    finally:
        runner.graphs = graphs
    events = [e for e in prof.key_averages() if spent(e) > 0]
    total = sum(spent(e) for e in events) or 1.0
    rows = []
    for e in sorted(events, key=lambda e: -spent(e))[:12]:
        rows.append({"step": f"profile:{e.key[:60]}", "batch": 1, "ms": spent(e) / 1e3 / max(1, e.count),
                     "floor_ms": 0.0, "fraction_of_floor": spent(e) / total, "tokens_per_s": e.count})
        log(f"profile ar_decode b1: {100 * spent(e) / total:5.1f}%  calls {e.count:6d}  {e.key[:80]}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for results.json and table.md")
    p.add_argument("--reduced", action="store_true", help="tiny shapes for a CPU smoke run")
    p.add_argument("--budget-s", type=float, default=290.0,
                   help="soft wall-time budget: when the checks and attention timings (which autotune) have used "
                        "more than half of it, the model steps run without autotuning and without the unfused baseline")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        args.reduced = True
        os.environ.setdefault("TRITON_INTERPRET", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.time()
    info = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "reduced": args.reduced}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    log(f"gpu_check on {info['device']} (torch {info['torch']}, triton {info.get('triton')})")
    from kernels.block_attention import ATTENTION_TUNER

    kernel_rows = check_kernels(device, args.reduced)
    kernel_rows += check_elementwise(device, args.reduced)
    log(f"kernel checks done ({time.time() - t0:.0f} s)")
    bandwidth = copy_bandwidth(device, args.reduced)
    log(f"copy bandwidth: {bandwidth/1e9:.0f} GB/s")
    attention_rows, tuned_checks = time_attention(device, args.reduced)
    kernel_rows += tuned_checks
    elapsed = time.time() - t0
    log(f"attention timings done ({elapsed:.0f} s)")
    full_steps = elapsed < args.budget_s / 2
    if not full_steps:
        os.environ["NLD_ATTN_AUTOTUNE"] = "0"
        log(f"over half the {args.budget_s:.0f} s budget: model steps without autotuning or the unfused baseline")
    info["step_autotune"] = full_steps
    step_rows = time_model_steps(device, args.reduced, bandwidth, unfused_baseline=full_steps)
    tuning = [rec.as_dict() for rec in ATTENTION_TUNER.records.values()]
    results = {"info": info, "kernels": kernel_rows, "copy_bandwidth_GBps": bandwidth / 1e9, "attention": attention_rows,
               "attention_tuning": tuning, "steps": step_rows, "seconds": time.time() - t0}
    lines = [f"device: {info['device']}  torch {info['torch']}  triton {info.get('triton')}  {info['date']}",
             f"kernel checks: {sum(r['ok'] for r in kernel_rows)}/{len(kernel_rows)} passed "
             f"(worst error {max(r['max_abs_err'] for r in kernel_rows):.2e})",
             f"copy bandwidth: {bandwidth/1e9:.0f} GB/s", "",
             "| attention | batch | prefix | q | ours ms | default cfg ms | SDPA ms | Flex ms | kernel | config (tuned?) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in attention_rows:
        lines.append(f"| {r['shape']} | {r['batch']} | {r['prefix']} | {r['query_len']} | {r['ours_ms']:.3f} | "
                     f"{r.get('default_ms', float('nan')):.3f} | {r['sdpa_ms']:.3f} | {r.get('flex_ms', float('nan')):.3f} | "
                     f"{r['kernel']} x{r['num_splits']} M{r['block_m']} | {r['config']} ({'tuned' if r['tuned'] else 'fixed'}) |")
    if tuning:
        lines += ["", "| tuned key (kernel, q bucket, D, group, dtype) | pick | tune s | default us | pick us | rejected |",
                  "|---|---|---|---|---|---|"]
        for t in tuning:
            timings = t["timings_us"]
            default_us = timings.get(t["default"], float("nan"))
            lines.append(f"| {', '.join(t['key'])} | {t['best']} | {t['tune_seconds']:.1f} | {default_us:.1f} | "
                         f"{timings.get(t['best'], float('nan')):.1f} | {len(t['rejected'])} |")
    lines += ["", "| step | batch | ms | floor ms | % of floor | tokens/s |", "|---|---|---|---|---|---|"]
    for r in step_rows:
        if r["step"] != "graph_replays" and not r["step"].startswith("profile:"):
            lines.append(f"| {r['step']} | {r['batch']} | {r['ms']:.2f} | {r['floor_ms']:.2f} | {100*r['fraction_of_floor']:.0f}% | {r['tokens_per_s']:.0f} |")
    profile_rows = [r for r in step_rows if r["step"].startswith("profile:")]
    if profile_rows:
        lines += ["", "| ar_decode batch 1, kernel (torch.profiler, timed steps) | share of CUDA time | calls | ms per call |",
                  "|---|---|---|---|"]
        lines += [f"| {r['step'][8:]} | {100 * r['fraction_of_floor']:.1f}% | {r['tokens_per_s']} | {r['ms']:.4f} |" for r in profile_rows]
    split_rows = [r for r in attention_rows if "splits_ms" in r]
    if split_rows:
        lines += ["", "| attention | ours ms (auto splits) | 2 splits ms | 4 splits ms | 8 splits ms |", "|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['ours_ms']:.3f} | " + " | ".join(f"{r['splits_ms'][n]:.3f}" for n in (2, 4, 8)) + " |"
                  for r in split_rows]
    table = "\n".join(lines)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(table + "\n")
    log("\n" + table)
    failed = [r for r in kernel_rows if not r["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""One prepared GPU check: kernel correctness, attention timings, and 8B-shaped step timings.

    python benchmarks/gpu_check.py --out DIR            # on a GPU (about 3-5 minutes)
    python benchmarks/gpu_check.py --reduced --out DIR  # CPU smoke form (CI), tiny shapes

1. Every Triton kernel against the PyTorch reference, in bf16 and fp16 (fp32/fp16 under the
   interpreter in reduced form): random inputs made fresh for each case, the allocator poisoned
   with NaNs before each run, cache slots that must stay untouched poisoned too.
2. The paged attention kernel timed against SDPA (dense, contiguous K/V) and FlexAttention on
   the same masks: decode, block-bidirectional (32-token block over a prefix), causal prefill.
3. An 8B-shaped Nemotron-Labs Diffusion model with random bf16 weights, one step at batch 1,
   8 and 32 for AR decode, a 32-token denoise pass and a 32-token verify pass, through the
   engine's runner (CUDA graphs), beside the card's copy bandwidth and the bandwidth floor
   (bytes read per step / bandwidth).
Prints a short table last; writes results.json (and the table) to --out.
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
            args = [case[k] for k in ("q", "k", "v", "k_cache", "v_cache", "block_tables", "context_lens", "query_start_loc", "causal")]
            poison_allocator(device)
            out = block_attention(*args, d**-0.5, case["max_query_len"], num_splits=splits)
            ref = paged_attention_reference(*[a.cpu() if a.dtype != dtype else a.float().cpu() for a in args], d**-0.5)
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


# ------------------------------------------------------------ attention timing
def time_attention(device: torch.device, reduced: bool) -> list[dict[str, Any]]:
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from kernels.ops import paged_attention

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
    rows = []
    for name, (batch, prefix, qlen, causal) in shapes.items():
        case = make_case([(prefix, qlen, causal)] * batch, hq, hkv, d, 16, dtype, device)
        args = [case[k] for k in ("q", "k", "v", "k_cache", "v_cache", "block_tables", "context_lens", "query_start_loc", "causal")]
        ours = timeit(lambda: paged_attention(*args, d**-0.5, case["max_query_len"]), device)
        # SDPA over dense, contiguous K/V (prefix + segment) per sequence: its best case
        kv_len = prefix + qlen
        qd = torch.randn(batch, hq, qlen, d, dtype=dtype, device=device)
        kd = torch.randn(batch, hkv, kv_len, d, dtype=dtype, device=device)
        vd = torch.randn(batch, hkv, kv_len, d, dtype=dtype, device=device)
        mask = None
        if causal and qlen > 1:
            mask = torch.ones(qlen, kv_len, dtype=torch.bool, device=device).tril(diagonal=prefix)
        ref = timeit(lambda: sdpa(qd, kd, vd, attn_mask=mask, enable_gqa=True), device)
        row = {"shape": name, "batch": batch, "prefix": prefix, "query_len": qlen, "ours_ms": ours * 1e3, "sdpa_ms": ref * 1e3}
        if flex is not None:
            try:
                flex_fn, create_block_mask = flex

                def mask_mod(b, h, q_idx, kv_idx, prefix=prefix, causal=causal):  # type: ignore[no-untyped-def]
                    return (kv_idx <= q_idx + prefix) | (not causal)

                bm = create_block_mask(mask_mod, None, None, qlen, kv_len, device=device)
                row["flex_ms"] = timeit(lambda: flex_fn(qd, kd, vd, block_mask=bm, enable_gqa=True), device) * 1e3
            except Exception as exc:  # pragma: no cover
                row["flex_error"] = str(exc)[:200]
        rows.append(row)
        log(f"attention {name}: ours {row['ours_ms']:.3f} ms, sdpa {row['sdpa_ms']:.3f} ms, flex {row.get('flex_ms', float('nan')):.3f} ms")
    return rows


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


def time_model_steps(device: torch.device, reduced: bool, bandwidth: float) -> list[dict[str, Any]]:
    from server.engine.params import RequestParams
    from server.engine.request import Request, Work
    from server.engine.runner import ModelRunner
    from server.engine.sampler import RowSpec, select_tokens

    cfg = model_config_dict(reduced)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = build_model(cfg, device, dtype)
    mc = model.config
    page, prefix, block = 16, 512, 32
    batches = (1, 8, 32)
    pages_per_seq = -(-(prefix + block) // page)
    num_pages = max(batches) * pages_per_seq + 1
    runner = ModelRunner(
        model, num_pages, page, device, dtype, max_pages_per_seq=pages_per_seq,
        graph_query_lens=(1, block) if device.type == "cuda" else (), graph_batch_sizes=batches if device.type == "cuda" else (),
    )
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "embed_tokens.weight")
    kv_bytes_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * torch.finfo(dtype).bits // 8
    rows = []
    for b in batches:
        reqs = []
        for s in range(b):
            r = Request(f"r{s}", [1] * prefix, RequestParams(), seed=s, stop_ids=frozenset(), max_model_len=prefix + block + 1)
            r.num_computed = prefix
            r.table.pages = list(range(s * pages_per_seq, (s + 1) * pages_per_seq))
            reqs.append(r)
        kinds = {
            "ar_decode": Work("decode", [5], True, [0]),
            "denoise_32": Work("denoise", [100] * block, False, list(range(block))),
            "verify_32": Work("verify", [5] * block, True, list(range(block))),
        }
        for kind, work in kinds.items():
            batch = [(r, work) for r in reqs]
            specs = [RowSpec(0.0, 0, 1.0, 0, prefix, 1)] * (b * len(work.logit_rows))

            def step() -> None:
                logits = runner.run(batch)
                select_tokens(torch.cat(logits), specs, mc.mask_token_id)

            t = timeit(step, device, warmup=2, iters=10 if not reduced else 3)
            read = weight_bytes + b * prefix * kv_bytes_per_token
            floor = read / bandwidth
            rows.append(
                {"step": kind, "batch": b, "ms": t * 1e3, "floor_ms": floor * 1e3, "fraction_of_floor": floor / t,
                 "tokens_per_s": b * (1 if kind == "ar_decode" else block) / t}
            )
            log(f"step {kind} batch {b}: {t*1e3:.2f} ms (floor {floor*1e3:.2f} ms, {100*floor/t:.0f}% of bandwidth floor)")
    replays = runner.graphs.replays if runner.graphs is not None else 0
    rows.append({"step": "graph_replays", "batch": 0, "ms": 0.0, "floor_ms": 0.0, "fraction_of_floor": 0.0, "tokens_per_s": replays})
    del model, runner
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for results.json and table.md")
    p.add_argument("--reduced", action="store_true", help="tiny shapes for a CPU smoke run")
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
    kernel_rows = check_kernels(device, args.reduced)
    bandwidth = copy_bandwidth(device, args.reduced)
    log(f"copy bandwidth: {bandwidth/1e9:.0f} GB/s")
    attention_rows = time_attention(device, args.reduced)
    step_rows = time_model_steps(device, args.reduced, bandwidth)
    results = {"info": info, "kernels": kernel_rows, "copy_bandwidth_GBps": bandwidth / 1e9, "attention": attention_rows,
               "steps": step_rows, "seconds": time.time() - t0}
    lines = [f"device: {info['device']}  torch {info['torch']}  triton {info.get('triton')}  {info['date']}",
             f"kernel checks: {sum(r['ok'] for r in kernel_rows)}/{len(kernel_rows)} passed "
             f"(worst error {max(r['max_abs_err'] for r in kernel_rows):.2e})",
             f"copy bandwidth: {bandwidth/1e9:.0f} GB/s", "",
             "| attention | batch | prefix | q | ours ms | SDPA ms | Flex ms |", "|---|---|---|---|---|---|---|"]
    for r in attention_rows:
        lines.append(f"| {r['shape']} | {r['batch']} | {r['prefix']} | {r['query_len']} | {r['ours_ms']:.3f} | {r['sdpa_ms']:.3f} | {r.get('flex_ms', float('nan')):.3f} |")
    lines += ["", "| step | batch | ms | floor ms | % of floor | tokens/s |", "|---|---|---|---|---|---|"]
    for r in step_rows:
        if r["step"] != "graph_replays":
            lines.append(f"| {r['step']} | {r['batch']} | {r['ms']:.2f} | {r['floor_ms']:.2f} | {100*r['fraction_of_floor']:.0f}% | {r['tokens_per_s']:.0f} |")
    table = "\n".join(lines)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(table + "\n")
    log("\n" + table)
    failed = [r for r in kernel_rows if not r["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""How many prefix splits paged attention should use for decode and block passes.

    python benchmarks/attention_splits.py --out DIR            # on a GPU (about a minute)
    python benchmarks/attention_splits.py --reduced --out DIR  # CPU smoke form (interpreter)

For each shape (batch, prefix length, query length) and for two block-table widths (tight:
the pages the prefix needs; wide: 2048 pages, what a CUDA graph captured for a 32k context
passes), times the launch ``kernels.ops.paged_attention`` makes (automatic split count) and
the kernel with 1, 2, 4, 8, 16 and 32 splits forced (the tuned tile config of each kernel).
``choose_num_splits`` sees only host ints: the table width, not the true prefix length, which
is why the width matters. Writes splits.json and splits.md to --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

if not torch.cuda.is_available():  # before triton is imported: the interpreter needs no driver
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.gpu_check import case_args, make_case, timeit  # noqa: E402

FORCED = (1, 2, 4, 8, 16, 32)


def widen(case: dict[str, Any], pages: int) -> dict[str, Any]:
    """The case with its block table padded to ``pages`` columns (padding points at page 0)."""
    bt = case["block_tables"]
    if pages <= bt.shape[1]:
        return case
    wide = torch.zeros((bt.shape[0], pages), dtype=bt.dtype, device=bt.device)
    wide[:, : bt.shape[1]] = bt
    return {**case, "block_tables": wide}


def main(argv: list[str] | None = None) -> int:
    from kernels.block_attention import block_attention, plan_launch
    from kernels.ops import paged_attention
    from kernels.reference import paged_attention_reference

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--reduced", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        args.reduced = True
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hq, hkv, d = (8, 2, 32) if args.reduced else (32, 8, 128)
    page = 16
    if args.reduced:
        shapes = [(1, 40, 1)]
        wide_pages = 8
    else:
        shapes = [(1, 512, 1), (1, 4096, 1), (8, 512, 1), (8, 4096, 1), (32, 4096, 1),
                  (1, 512, 32), (1, 4096, 32), (8, 4096, 32)]
        wide_pages = 2048
    torch.manual_seed(0)
    rows = []
    t0 = time.time()
    for batch, prefix, qlen in shapes:
        base = make_case([(prefix, qlen, qlen == 1)] * batch, hq, hkv, d, page, dtype, device)
        for width_name, case in (("tight", base), ("wide", widen(base, wide_pages))):
            a = case_args(case)
            auto = timeit(lambda: paged_attention(*a, d**-0.5), device)  # its first call tunes (CUDA)
            plan = plan_launch(a[0], a[1], a[3], a[5].block_tables, qlen)  # after tuning: the pick
            expected = paged_attention_reference(*a, d**-0.5)
            forced = {}
            for n in (FORCED[:3] if args.reduced else FORCED):
                out = block_attention(*a, d**-0.5, num_splits=n)
                err = (out.float() - expected.float()).abs().max().item()
                if not err <= (3e-2 if dtype == torch.bfloat16 else 1e-4):
                    print(f"FAIL batch {batch} prefix {prefix} q {qlen} splits {n}: error {err:.2e}", flush=True)
                    return 1
                forced[n] = timeit(lambda n=n: block_attention(*a, d**-0.5, num_splits=n), device) * 1e3
            best = min(forced, key=forced.__getitem__)
            row = {"batch": batch, "prefix": prefix, "query_len": qlen, "table": width_name, "auto_splits": plan.num_splits,
                   "auto_ms": auto * 1e3, "forced_ms": forced, "best_splits": best, "config": str(plan.config)}
            rows.append(row)
            print(f"b{batch} prefix {prefix} q{qlen} {width_name}: auto {plan.num_splits} splits {row['auto_ms']:.4f} ms; "
                  + ", ".join(f"{n}: {ms:.4f}" for n, ms in forced.items()) + f" ({time.time() - t0:.0f} s)", flush=True)
    lines = ["| batch | prefix | q | table | auto splits | auto ms | " + " | ".join(f"{n} ms" for n in FORCED) + " | best |",
             "|---|---|---|---|---|---|" + "---|" * len(FORCED) + "---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['prefix']} | {r['query_len']} | {r['table']} | {r['auto_splits']} | {r['auto_ms']:.4f} | "
                     + " | ".join(f"{r['forced_ms'][n]:.4f}" if n in r["forced_ms"] else "-" for n in FORCED) + f" | {r['best_splits']} |")
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    (out / "splits.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    (out / "splits.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

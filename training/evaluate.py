"""Held-out metrics of a saved checkpoint folder (as the server loads it).

    python -m training.evaluate MODEL_DIR --data RUN/data.npz [--seq-len 256] [--windows 64]

Prints JSON: AR cross-entropy / perplexity (plain causal forward) and, for each block size,
the masked-token cross-entropy of the diffusion stream (``sbd_block_diff`` layout, masking
ratio t ~ U(eps, 1) per block, fixed noise seed).
"""

from __future__ import annotations

import argparse
import json

import torch

from server.model.loader import load_model
from training.data import TokenData, eval_windows
from training.objective import BLOCK_SIZES
from training.train import evaluate


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--data", required=True, help="data.npz written by training.train (held-out stream)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=64, help="held-out windows (0 = all)")
    ap.add_argument("--block-sizes", type=int, nargs="+", default=list(BLOCK_SIZES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model_dir, device=args.device, dtype=torch.float32, progress=False)
    data = TokenData.load(args.data)
    windows = eval_windows(data.heldout, args.seq_len, args.windows or 10**9)
    result: dict[str, object] = {"model": args.model_dir, "seq_len": args.seq_len, "windows": len(windows)}
    per_block = {}
    for i, b in enumerate(args.block_sizes):
        m = evaluate(model, windows, torch.device(args.device), args.batch_size, block_size=b, with_ar=i == 0)
        if i == 0:
            result.update(ar_ce=m["ar_ce"], ar_ppl=m["ar_ppl"], eval_tokens=m["eval_tokens"])
        per_block[b] = {"masked_ce": m["masked_ce"], "diffusion_loss": m["diffusion_loss"]}
    result["diffusion_by_block"] = per_block
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Quadratic vs linear self-speculation vs AR, and mode=auto vs the best fixed mode.

    python benchmarks/spec_auto_cpu.py [--model DIR] [--max-tokens 24] [--quick]

On the given model (default: the embedded one), temperature 0, offline engine (no HTTP):
1. TPF and tokens/s of ar and self_spec linear / quadratic at block 4, 8, 16, at batch 1
   (requests one after another) and batch 8 (eight at once);
2. tokens/s of auto and of every fixed lossless mode at concurrency 1, 4 and 16, and over a
   mixed load (a phase of single requests, then a burst of 16).
Every run's output is checked against AR greedy. All numbers come from one sitting.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.modes_cpu import PROMPTS  # noqa: E402

MORE = [
    "The quality of mercy is not strained;",
    "It was the best of times, it was the worst of times,",
    "Call me Ishmael. Some years ago",
    "Happy families are all alike;",
    "All the world's a stage,",
    "Now is the winter of our discontent",
    "Friends, Romans, countrymen, lend me your ears;",
    "There was no possibility of taking a walk that day.",
    "Whose woods these are I think I know.",
    "Shall I compare thee to a summer's day?",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--quick", action="store_true", help="blocks 4 and 8 only, concurrency 1 and 4")
    args = ap.parse_args()

    from server.config import DEFAULT_MODEL_DIR, EngineConfig
    from server.engine.engine import LLMEngine
    from server.engine.params import DecodeParams, RequestParams, SamplingParams

    model_dir = args.model or str(DEFAULT_MODEL_DIR)
    engine = LLMEngine.from_pretrained(EngineConfig(model=model_dir, max_model_len=512, kv_cache_tokens=16384,
                                                    max_num_seqs=32, max_num_batched_tokens=8192))
    tok = engine.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS + MORE]

    def params(**decode: object) -> RequestParams:
        return RequestParams(SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True),
                             DecodeParams(**decode))  # type: ignore[arg-type]

    def run(ps: list[list[int]], p: RequestParams, batch: int) -> tuple[list[list[int]], float, int, int]:
        """Outputs, seconds, tokens, passes; ``batch`` requests at a time."""
        outs, tokens, passes = [], 0, 0
        t0 = time.perf_counter()
        for i in range(0, len(ps), batch):
            for o in engine.generate(ps[i : i + batch], p):
                outs.append(o["token_ids"])
                tokens += len(o["token_ids"])
                passes += o["stats"].total_forward_passes
        return outs, time.perf_counter() - t0, tokens, passes

    blocks = (4, 8) if args.quick else (4, 8, 16)
    fixed = [("ar", dict(mode="ar"))]
    for v in ("linear", "quadratic"):
        fixed += [(f"{v} B={b}", dict(mode="self_spec", variant=v, block_length=b)) for b in blocks]

    run(prompts[:2], params(mode="ar"), 2)  # warm-up
    print(f"model: {model_dir}; max_tokens {args.max_tokens}; temperature 0; torch threads "
          f"{__import__('torch').get_num_threads()}\n")
    print("| decoder | batch | TPF (tokens/request pass) | tokens/s | = AR |\n|---|---|---|---|---|")
    for batch, ps in ((1, prompts[:2]), (8, prompts[:8])):
        want = run(ps, params(mode="ar"), batch)[0]
        for name, d in fixed:
            outs, secs, tokens, passes = run(ps, params(**d), batch)
            print(f"| {name} | {batch} | {tokens / passes:.2f} | {tokens / secs:.1f} | {outs == want} |", flush=True)

    conc = (1, 4) if args.quick else (1, 4, 16)
    # the concurrency sweep: AR, the two smaller blocks of each variant, and auto
    lossless = [f for f in fixed if "16" not in f[0]] + [("auto", dict(mode="auto"))]
    print("\n| decoder | " + " | ".join(f"c={c} tok/s" for c in conc) + " | mixed load tok/s |")
    print("|---|" + "---|" * (len(conc) + 1))
    want_all = run(prompts[:16], params(mode="ar"), 16)[0]
    for name, d in lossless:
        cells = []
        for c in conc:
            outs, secs, tokens, _ = run(prompts[:c] if c > 1 else prompts[:2], params(**d), c)
            assert outs == want_all[: len(outs)], name
            cells.append(tokens / secs)
        # mixed: two single requests, then a burst of 16
        t0 = time.perf_counter()
        n = 0
        for ps, b in ((prompts[:2], 1), (prompts[:16], 16)):
            outs, _, tokens, _ = run(ps, params(**d), b)
            n += tokens
        cells.append(n / (time.perf_counter() - t0))
        print(f"| {name} | " + " | ".join(f"{x:.1f}" for x in cells) + " |", flush=True)


if __name__ == "__main__":
    main()

"""AR decoding throughput on this machine: our engine vs transformers' ``generate``.

    python benchmarks/ar_cpu.py [--model DIR] [--batches 1 16] [--new-tokens 64]

Same prompts, same greedy settings, both in the same run; prints output tokens/s for each
and the ratio. Default model: SmolLM2-135M-Instruct (built from PyPI by tests/fixtures).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

PROMPTS = [
    "The quick brown fox",
    "Write a short poem about the sea.",
    "Explain what a KV cache is in one paragraph.",
    "List three prime numbers and explain why they are prime.",
    "Once upon a time, in a small village at the edge of a forest, there lived",
    "What is the capital of France?",
    "Translate 'good morning' into Spanish, French and German.",
    "Give me a recipe for pancakes.",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads for both (default: the engine's choice)")
    p.add_argument("--compile", action="store_true", help="our engine with --cpu-compile")
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.config import EngineConfig
    from server.engine.engine import LLMEngine
    from server.engine.params import DecodeParams, RequestParams, SamplingParams
    from server.model.loader import load_model

    if args.model is None:
        from tests.fixtures.smollm2 import smollm2_dir

        args.model = str(smollm2_dir())
    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(args.model)
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    ours = LLMEngine(load_model(args.model, dtype=dtype), EngineConfig(model=args.model, max_model_len=1024, kv_cache_tokens=32768,
                                                                        cpu_threads=args.threads, cpu_compile=args.compile))
    print(f"model {args.model} ({args.dtype}), {torch.get_num_threads()} threads, {args.new_tokens} new tokens"
          f"{', ours compiled' if ours.runner.compiled is not None else ''}")
    print(f"{'batch':>5} {'transformers tok/s':>19} {'ours tok/s':>11} {'ratio':>6}")
    for batch in args.batches:
        prompts = [PROMPTS[i % len(PROMPTS)] + (" " * (i // len(PROMPTS))) for i in range(batch)]
        ids = [tok.encode(pr) for pr in prompts]
        # transformers: left-padded batch, greedy, fixed length
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            hf.generate(**enc, max_new_tokens=4, do_sample=False, min_new_tokens=4)  # warm-up
            t = time.perf_counter()
            out = hf.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            hf_s = time.perf_counter() - t
        hf_tokens = (out.shape[1] - enc["input_ids"].shape[1]) * batch
        params = RequestParams(SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True), DecodeParams(mode="ar"))
        ours.generate([ids[0]], RequestParams(SamplingParams(max_tokens=4, temperature=0), DecodeParams()))  # warm-up
        t = time.perf_counter()
        res = ours.generate(ids, params)
        our_s = time.perf_counter() - t
        our_tokens = sum(len(r["token_ids"]) for r in res)
        a, b = hf_tokens / hf_s, our_tokens / our_s
        print(f"{batch:>5} {a:>19.1f} {b:>11.1f} {b / a:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tokens per forward, acceptance length, speed and quality of each decoding mode.

    python benchmarks/modes_cpu.py [--model DIR] [--max-tokens 64] [--out docs/modes.md]

For the given model (default: the embedded one), at batch 1 and temperature 0, on fixed
prompts: wall-clock tokens/s and TPF per mode, self_spec acceptance length, and for
diffusion a sweep over refine_steps (and the unmasking threshold) reporting TPF beside
quality: the model's own AR perplexity of the generated text and the fraction of tokens
agreeing with the AR greedy output. All numbers come from one run; prints a markdown report.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

PROMPTS = [
    "To be, or not to be, that is",
    "It is a truth universally acknowledged, that a single man",
    "In the beginning God created",
    "ROMEO.\nBut soft, what light through yonder window",
    "Elizabeth walked into the drawing room and",
    "Of Man's first disobedience, and the fruit",
]


def ar_perplexity(engine, prompts: list[list[int]], outputs: list[list[int]]) -> float:  # type: ignore[no-untyped-def]
    """Perplexity of ``outputs`` given ``prompts`` under the model's causal (AR) distribution."""
    from server.model.model import DenseAttention

    model = engine.model
    nll, count = 0.0, 0
    with torch.inference_mode():
        for p, o in zip(prompts, outputs):
            if not o:
                continue
            seq = torch.tensor(p + o)
            t = len(seq)
            hidden = model(seq, torch.arange(t), DenseAttention(torch.ones(t, t, dtype=torch.bool).tril()))
            logp = torch.log_softmax(model.compute_logits(hidden[len(p) - 1 : t - 1]), dim=-1)
            nll -= float(logp.gather(1, seq[len(p) :, None]).sum())
            count += len(o)
    return math.exp(nll / max(count, 1))


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(x == y for u, v in zip(a, b) for x, y in zip(u, v))
    total = sum(min(len(u), len(v)) for u, v in zip(a, b))
    return same / max(total, 1)


def run(engine, prompts: list[list[int]], max_tokens: int, **decode) -> dict:  # type: ignore[no-untyped-def]
    from server.engine.params import DecodeParams, RequestParams, SamplingParams

    params = RequestParams(SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), DecodeParams(**decode))
    outputs, tokens, passes, acc = [], 0, 0, []
    t0 = time.perf_counter()
    for p in prompts:  # batch 1: one request at a time
        out = engine.generate([p], params)[0]
        outputs.append(out["token_ids"])
        tokens += out["stats"].completion_tokens
        passes += out["stats"].total_forward_passes
        acc += out["stats"].acceptance_lengths
    seconds = time.perf_counter() - t0
    return {"outputs": outputs, "tok_s": tokens / seconds, "tpf": tokens / passes, "acc": sum(acc) / len(acc) if acc else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default=None, help="also write the report to this file")
    args = ap.parse_args(argv)
    from server.config import DEFAULT_MODEL_DIR, EngineConfig
    from server.engine.engine import LLMEngine

    model_dir = args.model or str(DEFAULT_MODEL_DIR)
    engine = LLMEngine.from_pretrained(EngineConfig(model=model_dir, max_model_len=512, kv_cache_tokens=8192, enable_prefix_caching=False))
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    engine.generate([prompts[0]], __import__("server.engine.params", fromlist=["RequestParams"]).RequestParams())  # warm-up
    lines = [f"model `{Path(model_dir).name}`, {len(prompts)} prompts, batch 1, temperature 0, {args.max_tokens} new tokens, "
             f"{torch.get_num_threads()} CPU threads", ""]
    ar = run(engine, prompts, args.max_tokens, mode="ar")
    ar_ppl = ar_perplexity(engine, prompts, ar["outputs"])
    rows = [("ar", "", ar)]
    block = engine.model_config.block_size
    rows.append(("diffusion", f"block {block}, threshold 0.9, refine_steps {block}", run(engine, prompts, args.max_tokens, mode="diffusion")))
    rows.append(("self_spec", f"draft {block - 1}", run(engine, prompts, args.max_tokens, mode="self_spec")))
    rows.append(("self_spec", "draft 3", run(engine, prompts, args.max_tokens, mode="self_spec", draft_length=3)))
    lines += ["| mode | settings | TPF | acceptance length | tokens/s (CPU) | AR ppl of output | agreement with AR |",
              "|---|---|---|---|---|---|---|"]
    for mode, settings, r in rows:
        ppl = ar_perplexity(engine, prompts, r["outputs"])
        acc = f"{r['acc']:.2f}" if r["acc"] is not None else "-"
        lines.append(f"| {mode} | {settings} | {r['tpf']:.2f} | {acc} | {r['tok_s']:.1f} | {ppl:.1f} | {agreement(r['outputs'], ar['outputs']):.2f} |")
    lines += ["", f"Diffusion across refine_steps (block {block}; TPF counts every pass: prefill, denoise, commit):", "",
              "| refine_steps | threshold | TPF | tokens/s (CPU) | AR ppl of output (AR: %.1f) | agreement with AR |" % ar_ppl,
              "|---|---|---|---|---|---|"]
    for steps in (1, 2, 4, 8, 16, block):
        for threshold in (0.9, 0.5):
            r = run(engine, prompts, args.max_tokens, mode="diffusion", refine_steps=steps, threshold=threshold)
            lines.append(f"| {steps} | {threshold} | {r['tpf']:.2f} | {r['tok_s']:.1f} | {ar_perplexity(engine, prompts, r['outputs']):.1f} | "
                         f"{agreement(r['outputs'], ar['outputs']):.2f} |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

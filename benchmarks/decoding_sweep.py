"""Decoding settings of the embedded model, measured on held-out prompts.

    python benchmarks/decoding_sweep.py sweep   [--model DIR] [--data RUN/data.npz --heldout-windows 48]
                                                [--out FILE.md] [--write-defaults]
    python benchmarks/decoding_sweep.py compare --models A B [--data RUN/data.npz] [--out FILE.md]
    python benchmarks/decoding_sweep.py prompts --data RUN/data.npz   # rebuild heldout_prompts.json

Prompts: ``benchmarks/heldout_prompts.json``, text cut from the held-out split of the
training corpus (never used for training or distillation): plain passages and chat-wrapped
openings; ``sweep --heldout-windows N`` adds N windows of the held-out token stream (the
shipped defaults were chosen on 24 + 48: 24 prompts are too few to rank settings whose output
perplexities differ by a few per cent). All decoding is greedy (temperature 0),
``ignore_eos``, ``--max-tokens`` new tokens.

* ``sweep``: diffusion over block length x confidence measure x threshold x lookahead (the
  commit pass also proposes the next block; ``--lookahead off|on|guess|both|all``, guess being
  lookahead with ``guess_seed``); ``--thresholds``
  apply to the probability measure, ``--margins`` to the margin one (its scale is lower);
  self_spec over draft length. TPF and
  acceptance are counts (emitted tokens / forward passes the request took part in), so the
  prompts run batched; quality = agreement with AR greedy (share of equal tokens) and the
  model's own AR perplexity of the output against AR output's. ``--write-defaults`` writes
  the chosen settings into the model's ``generation_config.json`` under ``nld_decoding``.
  Selection rule: diffusion = the highest TPF among settings with agreement >= 0.9 and
  output perplexity within 10% of AR's; if none qualifies, the highest TPF among settings
  whose output perplexity is within 10% of AR's; if none, the lowest output perplexity.
  self_spec = the draft length with the highest TPF (its output is AR greedy whatever the
  length; ties go to the shorter draft, which costs less per pass).
* ``compare``: per model, every mode at the model's ``nld_decoding`` settings (or the
  engine defaults when absent): TPF, acceptance, agreement, output perplexity, and wall-clock
  output tokens/s at batch 1 (one request at a time) and batch 8, all in one run; with
  ``--data``, the held-out AR perplexity on real text (all 256-token held-out windows).
  Timing: ``--speed-rounds`` rounds, each running every mode once at batch 1 and 8; the
  medians are printed with their ratio to AR's (a shared VM drifts by up to 2x within
  minutes, so only interleaved ratios are worth comparing).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

PROMPTS_FILE = REPO / "benchmarks" / "heldout_prompts.json"
DIFFUSION_BLOCKS = (4, 8, 16, 32)
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)
MARGINS = (0.4, 0.5, 0.6, 0.7, 0.8)
DRAFT_LENGTHS = (3, 5, 7, 11, 15)


def load_prompts(engine: Any) -> list[list[int]]:
    """Token ids of the held-out prompts (chat ones through the model's chat template)."""
    spec = json.loads(PROMPTS_FILE.read_text())
    tok = engine.tokenizer
    ids = [tok.encode(t, add_special_tokens=False) for t in spec["plain"]]
    ids += [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                    return_dict=False) for t in spec["chat"]]
    return ids


def heldout_windows(data: str, count: int, seed: int = 0) -> list[list[int]]:
    """``count`` plain prompts of 16-48 tokens from random places of the held-out token
    stream (special tokens dropped): more held-out text for a sweep whose 24 file prompts
    are too few to tell settings apart."""
    import random

    import numpy as np

    stream = np.load(data)["heldout"]
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        n = rng.randint(16, 48)
        start = rng.randrange(len(stream) - 2 * n)
        window = [int(t) for t in stream[start : start + 2 * n] if t > 6][:n]
        if len(window) == n:
            out.append(window)
    return out


def nld_decoding(model_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The ``nld_decoding`` settings of a model folder's generation_config.json ({} if none)."""
    path = Path(model_dir) / "generation_config.json"
    return json.loads(path.read_text()).get("nld_decoding", {}) if path.is_file() else {}


def make_engine(model_dir: str, dtype: str = "auto") -> Any:
    from server.config import EngineConfig
    from server.engine.engine import LLMEngine

    return LLMEngine.from_pretrained(EngineConfig(model=model_dir, max_model_len=512, kv_cache_tokens=16384, max_num_seqs=64,
                                                  enable_prefix_caching=False, dtype=dtype))


def run(engine: Any, prompts: list[list[int]], max_tokens: int, batch: int, **decode: Any) -> dict[str, Any]:
    """Greedy decoding of every prompt, ``batch`` requests at a time; counts and wall time."""
    from server.engine.params import DecodeParams, RequestParams, SamplingParams

    params = RequestParams(SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), DecodeParams(**decode))
    outs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs += engine.generate(prompts[i : i + batch], params)
    seconds = time.perf_counter() - t0
    tokens = sum(o["stats"].completion_tokens for o in outs)
    passes = sum(o["stats"].total_forward_passes for o in outs)
    acc = [a for o in outs for a in o["stats"].acceptance_lengths]
    return {"outputs": [o["token_ids"] for o in outs], "tpf": tokens / passes, "tok_s": tokens / seconds,
            "accept_len": sum(acc) / len(acc) if acc else None}


def output_ppl(engine: Any, prompts: list[list[int]], outputs: list[list[int]]) -> float:
    from benchmarks.modes_cpu import ar_perplexity

    return ar_perplexity(engine, prompts, outputs)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    from benchmarks.modes_cpu import agreement as agree

    return agree(a, b)


def choose(diffusion_rows: list[dict[str, Any]], spec_rows: list[dict[str, Any]], ar_ppl: float) -> dict[str, dict[str, Any]]:
    """The selection rule of the module docstring."""
    close = [r for r in diffusion_rows if r["ppl"] <= 1.1 * ar_ppl]
    agreeing = [r for r in close if r["agreement"] >= 0.9]
    if agreeing or close:
        best = max(agreeing or close, key=lambda r: (r["tpf"], r["agreement"]))
    else:
        best = min(diffusion_rows, key=lambda r: (r["ppl"], -r["tpf"]))
    spec = max(spec_rows, key=lambda r: (round(r["tpf"], 3), -r["draft_length"]))
    settings = {k: best[k] for k in ("block_length", "confidence", "threshold", "lookahead") if k in best}
    if best.get("guess_seed"):
        settings["guess_seed"] = True
    return {"diffusion": settings,
            "self_spec": {"draft_length": spec["draft_length"], "block_length": spec["draft_length"] + 1}}


def sweep(args: argparse.Namespace) -> str:
    model_dir = args.model
    engine = make_engine(model_dir)
    prompts = load_prompts(engine)
    if args.heldout_windows:
        if not args.data:
            raise SystemExit("--heldout-windows needs --data")
        prompts += heldout_windows(args.data, args.heldout_windows)
    ar = run(engine, prompts, args.max_tokens, len(prompts), mode="ar")
    ar_ppl = output_ppl(engine, prompts, ar["outputs"])
    lines = [f"model `{model_dir}`, {len(prompts)} held-out prompts, greedy, {args.max_tokens} new tokens; "
             f"AR output perplexity {ar_ppl:.2f}", "",
             "| mode | block | confidence | threshold / draft | lookahead | TPF | acceptance length | agreement with AR | "
             "AR ppl of output |", "|---|---|---|---|---|---|---|---|---|"]
    diffusion_rows, spec_rows = [], []
    lookaheads = {"off": ("off",), "on": ("on",), "guess": ("guess",), "both": ("off", "on"),
                  "all": ("off", "on", "guess")}[args.lookahead]
    grid = [("probability", t) for t in args.thresholds] + [("margin", t) for t in args.margins]
    for block in args.blocks:
        for confidence, threshold in grid:
            for ahead in lookaheads:
                lookahead, guess_seed = ahead != "off", ahead == "guess"
                r = run(engine, prompts, args.max_tokens, len(prompts), mode="diffusion", block_length=block,
                        confidence=confidence, threshold=threshold, lookahead=lookahead, guess_seed=guess_seed)
                row = {"block_length": block, "confidence": confidence, "threshold": threshold, "lookahead": lookahead,
                       "guess_seed": guess_seed, "tpf": r["tpf"], "agreement": agreement(r["outputs"], ar["outputs"]),
                       "ppl": output_ppl(engine, prompts, r["outputs"])}
                diffusion_rows.append(row)
                lines.append(f"| diffusion | {block} | {confidence} | {threshold} | {ahead} | "
                             f"{row['tpf']:.2f} | - | {row['agreement']:.3f} | {row['ppl']:.2f} |")
                print(lines[-1], flush=True)
    for draft in args.drafts:
        r = run(engine, prompts, args.max_tokens, len(prompts), mode="self_spec", draft_length=draft)
        assert r["outputs"] == ar["outputs"], "self_spec at temperature 0 must equal AR greedy"
        spec_rows.append({"draft_length": draft, "tpf": r["tpf"], "accept_len": r["accept_len"]})
        lines.append(f"| self_spec | - | - | {draft} | - | {r['tpf']:.2f} | {r['accept_len']:.2f} | 1.000 | {ar_ppl:.2f} |")
        print(lines[-1], flush=True)
    chosen = choose(diffusion_rows, spec_rows, ar_ppl)
    lines += ["", f"chosen (`nld_decoding`): `{json.dumps(chosen)}`"]
    if args.write_defaults:
        path = Path(model_dir) / "generation_config.json"
        cfg = json.loads(path.read_text())
        cfg["nld_decoding"] = chosen
        path.write_text(json.dumps(cfg, indent=2) + "\n")
    return "\n".join(lines)


def heldout_ppl(model_dir: str, data: str, seq_len: int = 256) -> float:
    """AR perplexity on every ``seq_len`` window of the held-out stream (fp32)."""
    import numpy as np

    from server.model.loader import load_model
    from training.data import eval_windows
    from training.distill import heldout_ar

    windows = eval_windows(np.load(data)["heldout"], seq_len, 10**9)
    return heldout_ar(load_model(model_dir, dtype=torch.float32, progress=False), windows)["ar_ppl"]


def compare(args: argparse.Namespace) -> str:
    lines = [f"held-out prompts, greedy, {args.max_tokens} new tokens, {torch.get_num_threads()} CPU thread(s), dtype "
             f"{args.dtype}; each model's "
             "`nld_decoding` settings (engine defaults where absent); tok/s: the median of "
             f"{args.speed_rounds} rounds in this one run, each timing every mode once (ratio to AR's)", ""]
    if args.data:
        lines += ["| model | held-out AR perplexity (all 256-token windows) |", "|---|---|"]
        lines += [f"| `{m}` | {heldout_ppl(m, args.data):.2f} |" for m in args.models]
        lines.append("")
    lines += ["| model | mode | settings | TPF | acceptance length | agreement with AR | AR ppl of output | tok/s batch 1 | "
              "tok/s batch 8 |", "|---|---|---|---|---|---|---|---|---|"]
    for model_dir in args.models:
        engine = make_engine(model_dir, args.dtype)
        prompts = load_prompts(engine)
        run(engine, prompts[:1], 8, 1, mode="ar")  # warm-up
        settings = nld_decoding(model_dir)
        decodes = {mode: {"mode": mode, **{k: v for k, v in settings.get(mode, {}).items()
                                           if not (mode == "self_spec" and k == "block_length")}}
                   for mode in ("ar", "diffusion", "self_spec")}
        counted = {mode: run(engine, prompts, args.max_tokens, len(prompts), **d) for mode, d in decodes.items()}
        speeds = timed_rounds(engine, prompts[: args.speed_prompts], args.max_tokens, decodes, args.speed_rounds)
        for mode, decode in decodes.items():
            c = counted[mode]
            acc = f"{c['accept_len']:.2f}" if c["accept_len"] is not None else "-"
            shown = ", ".join(f"{k} {v}" for k, v in decode.items() if k != "mode") or "-"
            lines.append(f"| `{Path(model_dir).name}` | {mode} | {shown} | {c['tpf']:.2f} | {acc} | "
                         f"{agreement(c['outputs'], counted['ar']['outputs']):.3f} | "
                         f"{output_ppl(engine, prompts, c['outputs']):.2f} | "
                         + " | ".join(f"{speeds[mode][b]:.1f} ({speeds[mode][b] / speeds['ar'][b]:.2f}x)" for b in (1, 8))
                         + " |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def timed_rounds(engine: Any, prompts: list[list[int]], max_tokens: int, decodes: dict[str, dict[str, Any]],
                 rounds: int) -> dict[str, dict[int, float]]:
    """Median output tok/s per mode at batch 1 and 8 over ``rounds`` rounds, each round timing
    every mode once: a slow spell of a shared machine then lands on all modes alike, so their
    ratios hold even where the absolute numbers drift."""
    samples: dict[str, dict[int, list[float]]] = {m: {1: [], 8: []} for m in decodes}
    for _ in range(rounds):
        for mode, decode in decodes.items():
            for batch in (1, 8):
                samples[mode][batch].append(run(engine, prompts, max_tokens, batch, **decode)["tok_s"])
    return {m: {b: statistics.median(v) for b, v in per.items()} for m, per in samples.items()}


def build_prompts(args: argparse.Namespace) -> str:
    """Cut plain and chat prompts from the held-out token stream (evenly spread windows)."""
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(REPO / "server" / "default_model"))
    stream = np.load(args.data)["heldout"]
    n = args.plain + args.chat
    starts = np.linspace(0, len(stream) - 200, num=n).astype(int)
    texts = []
    for s in starts:
        window = [int(t) for t in stream[s : s + 200] if t > 6]  # no special tokens
        text = tok.decode(window[5:5 + args.prompt_tokens])
        texts.append(text[text.find(" ") + 1 :].strip())  # start at a word boundary
    spec = {"source": "held-out split of training/corpus.py (never trained on); windows spread evenly over it",
            "plain": texts[: args.plain], "chat": ["Continue: " + t for t in texts[args.plain :]]}
    PROMPTS_FILE.write_text(json.dumps(spec, indent=2) + "\n")
    return f"wrote {PROMPTS_FILE} ({args.plain} plain, {args.chat} chat prompts)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--model", default=str(REPO / "server" / "default_model"))
    s.add_argument("--write-defaults", action="store_true")
    s.add_argument("--blocks", type=int, nargs="+", default=list(DIFFUSION_BLOCKS), help="diffusion block lengths")
    s.add_argument("--thresholds", type=float, nargs="*", default=list(THRESHOLDS),
                   help="diffusion unmasking thresholds on a proposal's probability")
    s.add_argument("--data", default=None, help="data.npz of training.train (for --heldout-windows)")
    s.add_argument("--heldout-windows", type=int, default=0, help="also decode this many windows of the held-out stream")
    s.add_argument("--margins", type=float, nargs="*", default=list(MARGINS),
                   help="diffusion unmasking thresholds on a proposal's margin over the runner-up")
    s.add_argument("--drafts", type=int, nargs="+", default=list(DRAFT_LENGTHS), help="self_spec draft lengths")
    s.add_argument("--lookahead", choices=("off", "on", "guess", "both", "all"), default="both",
                   help="diffusion lookahead settings to sweep (guess: lookahead with guess_seed; both: off and on; all: the three)")
    c = sub.add_parser("compare")
    c.add_argument("--models", nargs="+", required=True)
    c.add_argument("--data", default=None, help="data.npz of training.train (held-out perplexity on real text)")
    c.add_argument("--speed-prompts", type=int, default=8, help="prompts timed at batch 1 and batch 8")
    c.add_argument("--speed-rounds", type=int, default=5, help="timing rounds, modes interleaved; medians reported")
    c.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the engine's dtype (auto: the server's default for the device)")
    p = sub.add_parser("prompts")
    p.add_argument("--data", required=True)
    p.add_argument("--plain", type=int, default=16)
    p.add_argument("--chat", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=24)
    for q in (s, c):
        q.add_argument("--max-tokens", type=int, default=64)
        q.add_argument("--threads", type=int, default=1)
        q.add_argument("--out", default=None, help="also write the report to this file")
    args = ap.parse_args(argv)
    if args.cmd == "prompts":
        print(build_prompts(args))
        return 0
    torch.set_num_threads(args.threads)
    report = sweep(args) if args.cmd == "sweep" else compare(args)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

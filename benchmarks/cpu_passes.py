"""Per-pass cost of the engine's forward passes on this CPU, and where the time goes.

    python benchmarks/cpu_passes.py [--model DIR|smollm2] [--dtype float32] [--batches 1 8]
                                    [--context 128] [--repeats 20] [--profile]
                                    [--ab KERNEL [--generate 64 --rounds 3]]

Times ``ModelRunner.run`` on the pass kinds of the three modes: a 1-token AR decode, a
32-token bidirectional denoise block (diffusion, also the self_spec draft) and a causal
verify pass of draft + 1 tokens (self_spec), at each batch size, with every sequence sitting
on ``--context`` cached tokens. "cpu ms" is the process's CPU time per pass (all its
threads), steadier than wall time on a shared machine. ``--compile`` times the compiled
decoder (``--cpu-compile``). ``--profile`` adds a torch.profiler table (self CPU time per
op) of each pass. ``--ab`` times each pass with and without one kernel, interleaved;
``--generate`` adds served tokens/s per mode with and without it. Default model: the
embedded one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# --code DIR: time another checkout of the project (e.g. main, for before/after)
CODE = Path(sys.argv[sys.argv.index("--code") + 1]) if "--code" in sys.argv else REPO
sys.path.insert(0, str(CODE))

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder, 'smollm2', or the embedded model (default)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--ragged", action="store_true",
                   help="sequence i holds context - i %% 8 tokens (lengths differ, as when serving)")
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--draft", type=int, default=3, help="verify pass length is draft + 1")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--code", default=str(REPO), help="checkout whose server package is timed")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the engine's choice)")
    p.add_argument("--compile", action="store_true", help="time the compiled decoder (--cpu-compile)")
    p.add_argument("--generate", type=int, default=0,
                   help="with --ab: also time serving this many new tokens per mode, with and without")
    p.add_argument("--rounds", type=int, default=3, help="--generate's interleaved rounds")
    p.add_argument("--ab", choices=["gemv", "attention", "amx", "sgemm", "elementwise", "packed", "decoder", "bf16w",
                                    "whole", "pairs"],
                   default=None,
                   help="interleave passes with and without one C kernel (kernels.cpu_gemv: few-row "
                        "projections; kernels.cpu_paged_attention: short-segment attention; kernels.cpu_amx: "
                        "bf16 projections of 5+ rows, against oneDNN's packed GEMM; kernels.cpu_sgemm: fp32 "
                        "projections on panels, against oneDNN's packed GEMM; kernels.cpu_elementwise: "
                        "RMSNorm, rotary, silu * up; packed: the prepacked weight copies against none; decoder: the "
                        "whole-pass C path, kernels.cpu_decoder, against the eager fused path, at any pass size; bf16w: "
                        "bf16 panels of a bf16 checkpoint's fp32 weights against fp32 panels; whole: both of these "
                        "against neither; pairs (with --dtype bfloat16): the bf16 pair panels and the whole-pass "
                        "path against oneDNN's packed bf16 GEMM on the eager path) "
                        "and print both")
    args = p.parse_args(argv)

    from server.config import EngineConfig
    from server.engine.engine import LLMEngine
    from server.engine.params import DecodeParams, RequestParams, SamplingParams
    from server.engine.modes.diffusion import DENOISE
    from server.engine.modes.self_spec import VERIFY
    from server.engine.work import DECODE, PREFILL, Work
    from server.model.loader import load_model

    if args.model == "smollm2":
        from tests.fixtures.smollm2 import smollm2_dir

        args.model = str(smollm2_dir())
    model_dir = args.model or str(REPO / "server" / "default_model")
    model = load_model(model_dir, dtype=getattr(torch, args.dtype))
    engine = LLMEngine(model, EngineConfig(model=model_dir, max_model_len=2048, kv_cache_tokens=65536,
                                                **({"cpu_compile": True} if args.compile else {})))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    params = RequestParams(SamplingParams(max_tokens=1), DecodeParams(mode="ar"))
    reqs = []
    for i in range(max(args.batches)):
        length = args.context - (i % 8 if args.ragged else 0)
        req = engine.add_request(f"r{i}", [(7 * i + j) % 1000 + 10 for j in range(length)], params)
        reqs.append(req)
    # prefill every sequence once (writes its K/V), then keep it resident at that length
    for r in reqs:
        engine.kv.allocate(r.table, args.context + max(args.block, args.draft + 1) + 1)
        engine.runner.run([(r, Work(PREFILL, r.prompt_ids, [len(r.prompt_ids) - 1]))])
        r.num_computed = len(r.prompt_ids)

    kinds = {
        "decode (1 tok)": lambda: Work(DECODE, [11], logit_rows=[0]),
        f"denoise ({args.block} tok, bidir)": lambda: Work(
            DENOISE, [3] * args.block, logit_rows=list(range(args.block))),
        f"verify ({args.draft + 1} tok)": lambda: Work(
            VERIFY, [11] * (args.draft + 1), logit_rows=list(range(args.draft + 1))),
    }
    print(f"model {model_dir} ({args.dtype}), {torch.get_num_threads()} torch threads, context {args.context}, "
          f"{model.config.num_layers} layers, hidden {model.config.hidden_size}")
    print(f"code {args.code}, {'compiled' if getattr(engine.runner, 'compiled', None) is not None else 'eager'}")
    if args.ab is not None:
        return _ab_kernel(engine, reqs, kinds, args)
    print(f"{'pass':<26} {'batch':>5} {'ms p50':>8} {'ms min':>8} {'cpu ms p50':>10} {'tok/s':>9}")
    for name, make in kinds.items():
        for b in args.batches:
            batch = [(r, make()) for r in reqs[:b]]
            for _ in range(3):
                engine.runner.run(batch)
            times, cpu = [], []
            for _ in range(args.repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                engine.runner.run(batch)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            med = statistics.median(times)
            ntok = sum(len(w) for _, w in batch)
            print(f"{name:<26} {b:>5} {med * 1e3:>8.2f} {min(times) * 1e3:>8.2f} {statistics.median(cpu) * 1e3:>10.2f} "
                  f"{ntok / med:>9.1f}", flush=True)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(5):
                        engine.runner.run(batch)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


def _pack_switch(model, other: str):  # type: ignore[no-untyped-def]
    """A function that puts the model's packed weights (True) or the ``other`` set (False) in
    place: ``amx``/``sgemm``: oneDNN-packed copies instead of AMX tiles / fp32 panels;
    ``bf16w``: fp32 panels instead of bf16 ones; ``packed``: none (plain GEMMs). Both sets are
    made up front."""
    from kernels import cpu_amx, cpu_sgemm

    def packs() -> list:
        return [(layer.self_attn.packed, layer.mlp.packed) for layer in model.layers] + [model.packed_head]

    tiles = packs()
    if other in ("amx", "sgemm"):
        kernel = cpu_amx if other == "amx" else cpu_sgemm
        kernel.enabled = False
        model.prepack_cpu_weights()
        kernel.enabled = True
        alternative = packs()
    elif other == "bf16w":
        cpu_sgemm.bf16_panels = False
        model.prepack_cpu_weights()
        cpu_sgemm.bf16_panels = True
        alternative = packs()
    else:
        alternative = [(None, None)] * len(model.layers) + [None]

    def use(on: bool) -> None:
        chosen = tiles if on else alternative
        for layer, (attn, mlp) in zip(model.layers, chosen):
            layer.self_attn.packed, layer.mlp.packed = attn, mlp
        model.packed_head = chosen[-1]

    return use


def _ab_kernel(engine, reqs, kinds, args) -> int:  # type: ignore[no-untyped-def]
    """Each pass alternately with and without one C kernel, so both see the same machine.
    The attention plan is made per pass (``runner.run``), so switching between passes is exact."""
    from kernels import cpu_amx, cpu_elementwise, cpu_gemv, cpu_paged_attention, cpu_sgemm

    from server.engine import cpu_decoder_pass

    max_rows = cpu_decoder_pass.MAX_ROWS
    if args.ab in ("amx", "sgemm", "packed", "bf16w", "whole", "pairs"):
        from server.engine.cpu_decoder_pass import CpuDecoderPass

        print(f"kernels.cpu_amx available: {cpu_amx.available()}, kernels.cpu_sgemm: {cpu_sgemm.available()}")
        if args.ab == "pairs" and not cpu_sgemm.pairs_available():
            print("no AVX512-BF16 pair kernel here: both sides run the same path")
        use_packs = _pack_switch(engine.model, {"whole": "bf16w", "pairs": "sgemm"}.get(args.ab, args.ab))
        # the whole-pass path binds the packed weights it was made with: one per set
        whole_pass = {}
        for on in (True, False):
            use_packs(on)
            whole_pass[on] = None if engine.runner.cpu_pass is None or (args.ab in ("whole", "pairs") and not on) \
                else CpuDecoderPass.for_model(engine.model, engine.runner.kv)

        def use(on: bool) -> None:
            use_packs(on)
            engine.runner.cpu_pass = whole_pass[on]
    elif args.ab == "decoder":
        whole_pass = engine.runner.cpu_pass
        print(f"whole-pass path: {whole_pass is not None} (timed here above its MAX_ROWS "
              f"{cpu_decoder_pass.MAX_ROWS} too)")
        cpu_decoder_pass.MAX_ROWS = 1 << 30
        use = lambda on: setattr(engine.runner, "cpu_pass", whole_pass if on else None)  # noqa: E731
    else:
        kernel = {"gemv": cpu_gemv, "attention": cpu_paged_attention, "elementwise": cpu_elementwise}[args.ab]
        print(f"{kernel.__name__} available: {kernel.available()}")
        use = lambda on: setattr(kernel, "enabled", on)  # noqa: E731
    print(f"{'pass':<26} {'batch':>5} {'kernel ms':>9} {'without':>8} {'speed-up':>8}")
    for name, make in kinds.items():
        for b in args.batches:
            batch = [(r, make()) for r in reqs[:b]]
            times: dict[bool, list[float]] = {True: [], False: []}
            for i in range(2 * args.repeats + 4):
                use(i % 2 == 0)
                t0 = time.perf_counter()
                engine.runner.run(batch)
                if i >= 4:
                    times[i % 2 == 0].append(time.perf_counter() - t0)
            use(True)
            on, off = statistics.median(times[True]), statistics.median(times[False])
            print(f"{name:<26} {b:>5} {on * 1e3:>9.2f} {off * 1e3:>8.2f} {off / on:>8.2f}", flush=True)
    if args.generate:
        cpu_decoder_pass.MAX_ROWS = max_rows
        for r in reqs:  # the passes' resident sequences leave (their pages freed)
            engine.abort(r.request_id)
        _ab_generate(engine, use, args)
    return 0


def _ab_generate(engine, use, args) -> None:  # type: ignore[no-untyped-def]
    """Served tokens/s per mode (its shipped settings, greedy, ``--generate`` new tokens on
    fixed 24-token prompts) at each batch size, with (A) and without (B) the kernel: every
    (mode, batch) run alternates A and B within each of ``--rounds`` rounds; medians."""
    from server.engine.params import DecodeParams, RequestParams, SamplingParams

    vocab = engine.model_config.vocab_size
    modes = ("ar", "diffusion", "self_spec") if engine.model_config.is_diffusion else ("ar",)

    def serve(mode: str, batch: int, tokens: int) -> float:
        params = RequestParams(SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
                               DecodeParams(mode=mode))
        prompts = [[(31 * i + 7 * j) % (vocab - 10) + 10 for j in range(24)] for i in range(batch)]
        t0 = time.perf_counter()
        engine.generate(prompts, params)
        return tokens * batch / (time.perf_counter() - t0)

    rates: dict[tuple[str, int, bool], list[float]] = {}
    for _ in range(args.rounds):
        for mode in modes:
            for b in args.batches:
                for on in (True, False):
                    use(on)
                    serve(mode, b, 4)  # warm: the first pass of a new shape
                    rates.setdefault((mode, b, on), []).append(serve(mode, b, args.generate))
    use(True)
    print(f"\nserved tok/s ({args.generate} new tokens, {args.rounds} rounds)")
    print(f"{'mode':<10} {'batch':>5} {'kernel':>9} {'without':>9} {'speed-up':>8} {'x AR':>6} {'x AR without':>12}")
    med = {key: statistics.median(v) for key, v in rates.items()}
    for mode in modes:
        for b in args.batches:
            on, off = med[(mode, b, True)], med[(mode, b, False)]
            print(f"{mode:<10} {b:>5} {on:>9.1f} {off:>9.1f} {on / off:>8.2f} {on / med[('ar', b, True)]:>6.2f} "
                  f"{off / med[('ar', b, False)]:>12.2f}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())

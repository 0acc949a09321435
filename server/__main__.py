"""Command line: ``python -m server [serve] ...``, ``python -m server generate ...``,
``python -m server bench ...``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from server.config import DEFAULT_MODEL_DIR, EngineConfig
from server.engine.modes import mode_names
from server.engine.params import POLICIES, SPEC_VARIANTS


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local Hugging Face folder (default: the embedded model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--kv-cache-tokens", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--default-mode", default="ar", choices=mode_names())
    p.add_argument("--default-refine-steps", type=int, default=None)


def engine_config(args: argparse.Namespace, **extra: object) -> EngineConfig:
    return EngineConfig(
        model=str(args.model or DEFAULT_MODEL_DIR),
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        page_size=args.page_size,
        kv_cache_tokens=args.kv_cache_tokens,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
        default_mode=args.default_mode,
        default_refine_steps=args.default_refine_steps,
        **extra,  # type: ignore[arg-type]
    )


def cmd_generate(argv: list[str]) -> int:
    from server.engine.engine import LLMEngine
    from server.engine.params import DecodeParams, RequestParams, SamplingParams

    p = argparse.ArgumentParser(prog="python -m server generate", description="Generate offline and print JSON.")
    add_engine_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--mode", default=None, choices=mode_names())
    p.add_argument("--refine-steps", type=int, default=None)
    p.add_argument("--block-length", type=int, default=None)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--policy", default=None, choices=POLICIES)
    p.add_argument("--draft-length", type=int, default=None)
    p.add_argument("--variant", default=None, choices=SPEC_VARIANTS, help="self_spec: linear or quadratic")
    args = p.parse_args(argv)
    try:
        engine = LLMEngine.from_pretrained(engine_config(args))
        tok = engine.tokenizer
        if tok is None:
            raise ValueError("the model folder has no tokenizer; cannot encode --prompt")
        if args.chat:
            ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        else:
            ids = tok.encode(args.prompt)
        params = RequestParams(
            SamplingParams(
                max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
            ),
            DecodeParams(
                mode=args.mode or args.default_mode,
                refine_steps=args.refine_steps,
                block_length=args.block_length,
                threshold=args.threshold,
                policy=args.policy,
                draft_length=args.draft_length,
                variant=args.variant,
            ),
        )
        out = engine.generate([ids], params)[0]
    except ValueError as exc:
        print(json.dumps({"error": str(exc)}), file=sys.stderr)
        return 2
    stats = out["stats"]
    print(
        json.dumps(
            {
                "text": tok.decode(out["token_ids"], skip_special_tokens=True),
                "token_ids": out["token_ids"],
                "finish_reason": out["finish_reason"],
                "mode": params.decode.mode,
                "prompt_tokens": stats.prompt_tokens,
                "completion_tokens": stats.completion_tokens,
                "forward_passes": stats.total_forward_passes,
                "forward_passes_by_kind": {k: v for k, v in stats.forward_passes.items() if v},
                "tokens_per_forward": round(stats.tokens_per_forward, 4),
                "acceptance_lengths": stats.acceptance_lengths,
                "mean_acceptance_length": round(stats.mean_acceptance_length, 4),
                "denoise_steps_per_block": stats.denoise_steps_per_block,
            }
        )
    )
    return 0


def cmd_serve(argv: list[str]) -> int:
    from server.api.serve import serve

    p = argparse.ArgumentParser(prog="python -m server", description="Serve the OpenAI-compatible API.")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None)
    p.add_argument("--served-model-name", action="append", default=None)
    p.add_argument("--max-waiting", type=int, default=1024)
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    config = engine_config(args, max_waiting=args.max_waiting)
    names = args.served_model_name or [Path(config.model).name]
    return serve(config, args, names)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "generate":
        return cmd_generate(argv[1:])
    if argv and argv[0] == "bench":
        from server.bench import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "serve":
        argv = argv[1:]
    return cmd_serve(argv)


if __name__ == "__main__":
    sys.exit(main())

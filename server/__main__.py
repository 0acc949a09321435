"""Command line: ``python -m server [serve] ...``, ``python -m server generate ...``,
``python -m server bench ...``."""

from __future__ import annotations

import argparse
import json
import sys

from server.options import GENERATE, SERVE, OptionError, Settings, add_arguments, options_for, resolve


def parse_settings(parser: argparse.ArgumentParser, command: str, argv: list[str]) -> tuple[argparse.Namespace, Settings]:
    """Parse ``argv`` and layer it over the defaults, config files and ``NLD_*`` variables;
    a bad setting ends the program with status 2 and a message naming it."""
    args = parser.parse_args(argv)
    keys = {"config"} | {o.key for o in options_for(command)}
    given = {k: v for k, v in vars(args).items() if k in keys}
    try:
        settings = resolve(command, given)
        settings.engine_config()  # cross-field checks, before anything loads
    except OptionError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    return args, settings


def generate_parser() -> argparse.ArgumentParser:
    from server.engine.modes import mode_names
    from server.engine.params import CONFIDENCE_MEASURES, POLICIES, SPEC_VARIANTS

    p = argparse.ArgumentParser(prog="python -m server generate", description="Generate offline and print JSON.")
    add_arguments(p, GENERATE)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--mode", default=None, choices=mode_names(), help="decoding mode (default: --default-mode)")
    p.add_argument("--refine-steps", type=int, default=None, help="diffusion: denoising passes per block")
    p.add_argument("--block-length", type=int, default=None, help="diffusion/self_spec block length")
    p.add_argument("--threshold", type=float, default=None, help="diffusion: confidence to unmask a token")
    p.add_argument("--policy", default=None, choices=POLICIES,
                   help="diffusion: which masked tokens to commit each pass")
    p.add_argument("--draft-length", type=int, default=None, help="self_spec: tokens drafted per cycle")
    p.add_argument("--variant", default=None, choices=SPEC_VARIANTS, help="self_spec: linear or quadratic")
    p.add_argument("--lookahead", default=None, action=argparse.BooleanOptionalAction,
                   help="diffusion: each commit pass also proposes the next block")
    p.add_argument("--guess-seed", default=None, action=argparse.BooleanOptionalAction,
                   help="diffusion with lookahead: the proposed block starts with a guessed seed (a right guess saves a pass)")
    p.add_argument("--confidence", default=None, choices=CONFIDENCE_MEASURES,
                   help="diffusion: what --threshold compares (a proposal's probability, or its margin over the runner-up)")
    return p


def cmd_generate(argv: list[str]) -> int:
    from server.engine.engine import LLMEngine
    from server.engine.params import DecodeParams, RequestParams, SamplingParams

    p = generate_parser()
    args, settings = parse_settings(p, GENERATE, argv)
    try:
        engine = LLMEngine.from_pretrained(settings.engine_config())
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
            DecodeParams.from_fields(args.mode or settings.default_mode, args),
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


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server", description="Serve the OpenAI-compatible API.",
        epilog="Settings layer as: defaults < --config files < NLD_* environment variables < flags.",
    )
    add_arguments(p, SERVE)
    return p


def cmd_serve(argv: list[str]) -> int:
    from server.api.serve import serve

    _, settings = parse_settings(serve_parser(), SERVE, argv)
    return serve(settings)


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

"""Cost of grammar-constrained decoding on the CPU.

    python benchmarks/grammar_cpu.py [--model DIR] [--max-tokens 80]

Prints a markdown report: (1) grammar compile time per schema (cold: first compile; warm:
a cache hit); (2) the per-step mask cost at batch 1 and 16 (llguidance mask computation of
one row per request, serially as the engine does, and with llguidance's parallel executor;
plus unpacking the bitmask and masking fp32 logits); (3) tokens per forward (TPF) of
constrained vs free decoding for diffusion and self_spec (and AR as the baseline) on a JSON
workload, temperature 0, batch 1. All numbers come from one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tests.engine.test_grammar import PERSON  # noqa: E402  (the schema the tests constrain with)

SCHEMAS = {
    "person (4 fields)": PERSON,
    "order (nested, 12 fields)": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "customer": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 16}, "email": {"type": "string", "maxLength": 24},
                               "vip": {"type": "boolean"}},
                "required": ["name", "email", "vip"], "additionalProperties": False,
            },
            "items": {
                "type": "array", "maxItems": 3,
                "items": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                                          "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                                                          "price": {"type": "number"}},
                          "required": ["sku", "qty", "price"], "additionalProperties": False},
            },
            "status": {"enum": ["new", "paid", "shipped"]},
            "note": {"anyOf": [{"type": "string", "maxLength": 20}, {"type": "null"}]},
        },
        "required": ["id", "customer", "items", "status", "note"],
        "additionalProperties": False,
    },
    "json_object": None,
}
PROMPTS = ["Describe a person.", "Write down the order.", "It is a truth universally acknowledged", "ROMEO.\nBut soft"]


def compile_times(engine) -> list[tuple[str, float, float]]:  # type: ignore[no-untyped-def]
    from server.engine.grammar import GrammarCompiler, GrammarSpec

    compiler = GrammarCompiler(engine.tokenizer, engine.model_config.vocab_size, engine.eos_ids)
    compiler.compile(GrammarSpec("regex", "warm-up"))  # builds the llguidance tokenizer once
    rows = []
    for name, schema in SCHEMAS.items():
        spec = GrammarSpec("json_object") if schema is None else GrammarSpec.json_schema(schema)
        t0 = time.perf_counter()
        compiled = compiler.compile(spec)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiler.compile(spec)
        warm = time.perf_counter() - t0
        assert compiled.compile_seconds > 0
        rows.append((name, cold * 1e3, warm * 1e6))
    return rows


def mask_cost(engine, batch: int, steps: int = 30) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    """Per step (ms): serial masks, parallel masks, unpack + apply."""
    import llguidance
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask, fill_next_token_bitmask_par

    from server.engine.grammar import GrammarCompiler, GrammarSpec, unpack_bitmask

    vocab = engine.model_config.vocab_size
    compiler = GrammarCompiler(engine.tokenizer, vocab, engine.eos_ids)
    compiled = compiler.compile(GrammarSpec.json_schema(SCHEMAS["order (nested, 12 fields)"]))
    matchers = [compiled.matcher() for _ in range(batch)]
    gen = torch.Generator().manual_seed(0)
    bitmask = allocate_token_bitmask(batch, vocab)
    executor = llguidance.LLExecutor()
    serial, par, apply = [], [], []
    logits = torch.randn(batch, vocab)
    for _ in range(steps):
        t0 = time.perf_counter()
        for i, m in enumerate(matchers):
            fill_next_token_bitmask(m._m, bitmask, i)
        serial.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fill_next_token_bitmask_par(executor, [(m._m, i) for i, m in enumerate(matchers)], bitmask)
        par.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        allowed = unpack_bitmask(bitmask, vocab)
        masked = logits.masked_fill(~allowed, float("-inf"))
        apply.append(time.perf_counter() - t0)
        # advance every matcher by a random allowed token (the states drift apart)
        for i, m in enumerate(matchers):
            choices = allowed[i].nonzero().flatten()
            if m.is_stopped or len(choices) == 0:
                matchers[i] = compiled.matcher()
                continue
            tok = int(choices[torch.randint(len(choices), (1,), generator=gen)])
            assert m.accept(tok)
        del masked
    med = statistics.median
    return med(serial) * 1e3, med(par) * 1e3, med(apply) * 1e3


def tpf_rows(engine, max_tokens: int) -> list[tuple[str, str, float, float, int]]:  # type: ignore[no-untyped-def]
    from server.engine.grammar import GrammarSpec
    from server.engine.params import DecodeParams, RequestParams, SamplingParams

    prompts = [list(engine.tokenizer.encode(p, add_special_tokens=False)) for p in PROMPTS]
    modes = {
        "ar": DecodeParams(mode="ar"),
        "self_spec": DecodeParams(mode="self_spec"),
        "diffusion threshold 0.9": DecodeParams(mode="diffusion", block_length=32, threshold=0.9),
        "diffusion threshold 0.5": DecodeParams(mode="diffusion", block_length=32, threshold=0.5),
        "diffusion low_confidence, 8 steps": DecodeParams(mode="diffusion", block_length=32, refine_steps=8, policy="low_confidence"),
    }
    rows = []
    for name, decode in modes.items():
        for label, spec in (("free", None), ("person", GrammarSpec.json_schema(SCHEMAS["person (4 fields)"])),
                            ("order", GrammarSpec.json_schema(SCHEMAS["order (nested, 12 fields)"]))):
            tokens = passes = 0
            t0 = time.perf_counter()
            for prompt in prompts:
                params = RequestParams(SamplingParams(max_tokens=max_tokens, temperature=0.0, grammar=spec), decode)
                out = engine.generate([prompt], params)[0]
                stats = out["stats"]
                tokens += len(out["token_ids"])
                passes += sum(v for k, v in stats.forward_passes.items() if k not in ("prefill",))
            rows.append((name, label, tokens / max(1, passes), tokens / (time.perf_counter() - t0), tokens))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "server" / "default_model"))
    parser.add_argument("--max-tokens", type=int, default=80)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from server.config import EngineConfig
    from server.engine.engine import LLMEngine

    engine = LLMEngine.from_pretrained(EngineConfig(model=args.model, device="cpu", max_model_len=1024))
    print(f"# Grammar cost ({args.model}, vocab {engine.model_config.vocab_size}, 1 torch thread)\n")
    print("| schema | cold compile (ms) | cache hit (us) |\n|---|---|---|")
    for name, cold, warm in compile_times(engine):
        print(f"| {name} | {cold:.2f} | {warm:.1f} |")
    print("\n| batch | masks, serial (ms/step) | masks, parallel executor (ms/step) | unpack + apply (ms/step) |\n|---|---|---|---|")
    for batch in (1, 16):
        serial, par, apply = mask_cost(engine, batch)
        print(f"| {batch} | {serial:.3f} | {par:.3f} | {apply:.3f} |")
    print("\nTPF = tokens / (non-prefill forward passes); temperature 0, batch 1, "
          f"{len(PROMPTS)} prompts, max_tokens {args.max_tokens}.\n")
    print("| mode | grammar | TPF | tokens/s | tokens |\n|---|---|---|---|---|")
    for name, label, tpf, tps, tokens in tpf_rows(engine, args.max_tokens):
        print(f"| {name} | {label} | {tpf:.2f} | {tps:.1f} | {tokens} |")


if __name__ == "__main__":
    main()

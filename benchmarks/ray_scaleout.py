"""Ray Serve scale-out on this machine: throughput with 1 and 2 CPU replicas of the
embedded model at a fixed concurrency, and the time for a killed replica to be replaced.

    python benchmarks/ray_scaleout.py [--requests 64] [--concurrency 8] [--max-tokens 32]

Both replica counts run in one local Ray instance, in one sitting, through Ray's HTTP
proxy (the deployment of deploy/ray/serve-cpu.yaml, as the Ray test builds it). On a
2-core machine two replicas compete for the same cores: expect little gain.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration import test_ray_serve as rs  # noqa: E402


def measure(url: str, replicas: int, args: argparse.Namespace) -> dict[str, float]:
    rs.deploy(num_replicas=replicas)
    rs.run_requests(url, range(args.concurrency), args.concurrency, args.max_tokens)  # warm-up
    t0 = time.monotonic()
    records = rs.run_requests(url, range(args.requests), args.concurrency, args.max_tokens)
    wall = time.monotonic() - t0
    ok = [r for r in records if r["ok"]]
    return {"replicas": replicas, "ok": len(ok), "wall_s": wall, "req_per_s": len(ok) / wall,
            "tok_per_s": len(ok) * args.max_tokens / wall, "served_by": len({r["replica"] for r in ok})}


def replacement_time(url: str) -> tuple[float, float]:
    """Kill one of two replicas; seconds until Ray reports two RUNNING again, and until a
    new replica has answered a request."""
    before = set(rs.kv_pools(2))
    t_kill = time.monotonic()
    rs.kill(sorted(before)[0])
    rs.wait_for(lambda: rs.replica_states().get("RUNNING", 0) < 2, 60)
    rs.wait_for(lambda: rs.replica_states().get("RUNNING", 0) == 2, 600)
    running = time.monotonic() - t_kill
    while time.monotonic() - t_kill < 600:
        served = {r["replica"] for r in rs.run_requests(url, range(8), 8, 4) if r["ok"]}
        if served - before:
            break
    return running, time.monotonic() - t_kill


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=64, help="measured requests per replica count")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request")
    args = p.parse_args()
    with rs.local_serve() as url:
        results = [measure(url, n, args) for n in (1, 2)]
        base = results[0]["req_per_s"]
        print(f"concurrency {args.concurrency}, {args.requests} requests of {args.max_tokens} tokens (ignore_eos), "
              "modes ar/diffusion/self_spec, half streaming")
        print(f"{'replicas':>8} {'ok':>4} {'wall s':>7} {'req/s':>7} {'tok/s':>7} {'vs 1':>5} {'served by':>9}")
        for r in results:
            print(f"{r['replicas']:>8} {r['ok']:>4} {r['wall_s']:7.1f} {r['req_per_s']:7.2f} {r['tok_per_s']:7.1f} "
                  f"{r['req_per_s'] / base:5.2f} {r['served_by']:>9}")
        running, serving = replacement_time(url)
        print(f"killed replica: replacement RUNNING after {running:.1f} s, serving requests after {serving:.1f} s")


if __name__ == "__main__":
    main()

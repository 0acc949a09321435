"""Ray Serve on a local Ray instance: two CPU replicas of the embedded model, built from
deploy/ray/serve-cpu.yaml, serve 40 mixed-mode requests (streaming and not) through Ray's
HTTP proxy, both replicas take traffic; one replica is killed mid-run, the application
recovers (a new replica serves), no request started after the kill was detected fails,
and the survivor's KV pool ends at its initial free count."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import ray
import yaml
from ray import serve
from prometheus_client.parser import text_string_to_metric_families
from ray.serve.schema import ServeDeploySchema

from tests.integration.conftest import ROOT, SUBPROCESS_ENV, free_port

CONFIG = ROOT / "deploy" / "ray" / "serve-cpu.yaml"
APP = "nld"
MODES = ("ar", "diffusion", "self_spec")
CONCURRENCY = 8
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic v1-style fields inside Ray


def load_config() -> dict[str, Any]:
    data = yaml.safe_load(CONFIG.read_text())
    ServeDeploySchema.model_validate(data)  # what `serve run` / `serve deploy` accept
    return data


@contextlib.contextmanager
def local_serve() -> Iterator[str]:
    """A local Ray instance with Serve's HTTP proxy on a free loopback port; yields its URL."""
    env = {**SUBPROCESS_ENV, "PYTHONPATH": str(ROOT)}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="nld-test",
             runtime_env={"env_vars": env})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def proxy_url() -> Iterator[str]:
    with local_serve() as url:
        yield url


def free_port_pair() -> int:
    """A port p with p and p + 1 free (the per-replica metrics ports of two replicas)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def deploy(num_replicas: int, metrics_port: int | None = None) -> None:
    """The application of deploy/ray/serve-cpu.yaml with a fixed replica count and a
    small KV pool (the 2-core CI machine)."""
    from server.ray_serve import NLDServer

    app = load_config()["applications"][0]
    deployment = {k: v for k, v in app["deployments"][0].items() if k not in ("name", "autoscaling_config")}
    settings = {**app["args"]["settings"], "config": str(ROOT / app["args"]["settings"]["config"]),
                "kv_cache_tokens": 4096, "max_model_len": 1024}
    bound = NLDServer.options(num_replicas=num_replicas, **deployment).bind(settings, metrics_port)
    serve.run(bound, name=APP, route_prefix="/")


def finished_requests(metrics_url: str) -> tuple[str, float]:
    """(the replica label, finished requests) from one replica's own /metrics."""
    text = httpx.get(metrics_url, timeout=10).text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "nld_request_success_total"]
    replicas = {s.labels["replica"] for s in samples}
    assert len(replicas) == 1, replicas
    return replicas.pop(), sum(s.value for s in samples)


def one_request(url: str, i: int, client: httpx.Client, max_tokens: int = 6) -> dict[str, Any]:
    """Request ``i`` (mode and streaming vary with i); never raises."""
    mode, stream = MODES[i % 3], i % 2 == 0
    body = {"model": "nld-embedded", "messages": [{"role": "user", "content": f"Tell story number {i}."}],
            "max_tokens": max_tokens, "ignore_eos": True, "mode": mode, "stream": stream, "temperature": 0}
    started = time.monotonic()
    record: dict[str, Any] = {"i": i, "mode": mode, "stream": stream, "started": started, "ok": False}
    try:
        if stream:
            with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                record["replica"] = resp.headers.get("x-nld-replica")
                events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
            chunks = [json.loads(e) for e in events[:-1]]
            record["ok"] = (resp.status_code == 200 and events[-1] == "[DONE]" and all("error" not in c for c in chunks)
                            and any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks))
        else:
            resp = client.post(f"{url}/v1/chat/completions", json=body)
            record["replica"] = resp.headers.get("x-nld-replica")
            record["ok"] = resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] >= 1
        record["status"] = resp.status_code
    except httpx.HTTPError as exc:
        record["error"] = repr(exc)
    record["finished"] = time.monotonic()
    return record


def run_requests(url: str, indices: range, concurrency: int = CONCURRENCY, max_tokens: int = 6) -> list[dict[str, Any]]:
    with httpx.Client(timeout=httpx.Timeout(120, connect=10)) as client:
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(lambda i: one_request(url, i, client, max_tokens), indices))


def replica_states() -> dict[str, int]:
    status = serve.status().applications[APP].deployments["NLDServer"]
    return {str(getattr(k, "value", k)): v for k, v in status.replica_states.items()}


def kv_pools(expected: int) -> dict[str, dict[str, int]]:
    """{replica: {"free", "total"}}, asking through the handle until ``expected`` replicas answered."""
    handle = serve.get_app_handle(APP)
    pools: dict[str, dict[str, int]] = {}
    deadline = time.monotonic() + 60
    while len(pools) < expected and time.monotonic() < deadline:
        answer = handle.kv_pages.remote().result(timeout_s=30)
        pools[answer["replica"]] = {"free": answer["free"], "total": answer["total"]}
    assert len(pools) == expected, pools
    return pools


def kill(replica: str) -> None:
    """Kill the Ray actor of ``replica`` ("NLDServer#<id>") as a crash would (no restart)."""
    unique_id = replica.split("#")[-1]
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(unique_id)]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_replicas_serve_survive_a_kill_and_recover(proxy_url: str) -> None:
    t0 = time.monotonic()
    metrics_port = free_port_pair()
    deploy(num_replicas=2, metrics_port=metrics_port)
    print(f"\ntwo replicas deployed in {time.monotonic() - t0:.1f} s")
    initial = kv_pools(2)
    assert all(p["free"] == p["total"] for p in initial.values()), initial

    records = run_requests(proxy_url, range(40))
    assert all(r["ok"] for r in records), [r for r in records if not r["ok"]]
    assert {(r["mode"], r["stream"]) for r in records} == {(m, s) for m in MODES for s in (True, False)}
    served = {r["replica"] for r in records}
    assert served == set(initial), (served, set(initial))  # both replicas took traffic
    # each replica's own /metrics (metrics_port + its rank on the node) counts its share
    per_replica = dict(finished_requests(f"http://127.0.0.1:{metrics_port + k}/metrics") for k in (0, 1))
    assert set(per_replica) == set(initial), per_replica
    for replica, count in per_replica.items():
        assert count == sum(r["replica"] == replica for r in records), (per_replica, replica)

    # --- kill one replica while requests flow -----------------------------------------
    victim, survivor = sorted(initial)
    flow: list[dict[str, Any]] = []
    stop = threading.Event()

    def keep_sending(worker: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(120, connect=10)) as client:
            i = 1000 + worker
            while not stop.is_set():
                flow.append(one_request(proxy_url, i, client))
                i += CONCURRENCY

    senders = [threading.Thread(target=keep_sending, args=(w,), daemon=True) for w in range(4)]
    for s in senders:
        s.start()
    assert wait_for(lambda: len(flow) >= 8, 120)
    t_kill = time.monotonic()
    kill(victim)
    assert wait_for(lambda: replica_states().get("RUNNING", 0) < 2, 60), replica_states()
    t_detected = time.monotonic()
    assert wait_for(lambda: replica_states().get("RUNNING", 0) == 2, 300), replica_states()
    t_replaced = time.monotonic()
    time.sleep(2)
    stop.set()
    for s in senders:
        s.join(150)
    late = [r for r in flow if r["started"] >= t_detected]
    assert late and all(r["ok"] for r in late), [r for r in late if not r["ok"]]
    lost = [r for r in flow if not r["ok"]]
    assert all(r["started"] < t_detected for r in lost)

    after = run_requests(proxy_url, range(2000, 2024))
    assert all(r["ok"] for r in after), [r for r in after if not r["ok"]]
    replacement = {r["replica"] for r in after} - {survivor}
    assert replacement and victim not in replacement  # a new replica serves
    t_new_serving = min(r["finished"] for r in after if r["replica"] in replacement)
    print(f"killed {victim}: detected after {t_detected - t_kill:.1f} s, replacement RUNNING after "
          f"{t_replaced - t_kill:.1f} s (serving by {t_new_serving - t_kill:.1f} s); {len(flow)} requests during, "
          f"{len(lost)} failed (all in flight before detection), {len(late)} after detection all ok")

    pools = kv_pools(2)
    assert survivor in pools and pools[survivor]["free"] == initial[survivor]["free"], (pools, initial)
    assert all(p["free"] == p["total"] for p in pools.values()), pools


def wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


def test_build_app_from_the_config_args() -> None:
    app = load_config()["applications"][0]
    assert app["import_path"] == "server.ray_serve:build_app"
    from server.ray_serve import build_app

    assert isinstance(build_app(app["args"]), serve.Application)
    with pytest.raises(ValueError, match="unknown application args"):
        build_app({"max_num_seqs": 3})
    with pytest.raises(ValueError, match="metrics_port must be a port number"):
        build_app({"metrics_port": "9100"})
    gpu = yaml.safe_load((ROOT / "deploy" / "ray" / "serve-gpu.yaml").read_text())
    ServeDeploySchema.model_validate(gpu)
    assert gpu["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"] == 1

"""The load generator against the fake OpenAI server of conftest.py."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from fake_openai_server import answer_tokens, plan

from server.bench import main
from server.bench.cli import arrival_offsets, plan_runs
from server.bench.prompts import BUILTIN_PROMPTS, load_prompts
from server.bench.stats import agreement, percentile

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[2]


def _png_ok(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 2000


def _run(tmp_path: Path, base_url: str, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "out"
    rc = main(["--base-url", base_url, "--num-prompts", "6", "--max-tokens", "16", "--no-progress",
               "--out", str(out), *extra])
    result = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {}
    return rc, result


def test_sweep_modes_and_refine_steps(fake_server, tmp_path, capsys):
    rc, res = _run(tmp_path, fake_server.base_url, "--modes", "ar,diffusion,self_spec",
                   "--refine-steps", "1,2,4", "--request-rate", "500", "--arrival", "constant",
                   "--max-concurrency", "4", "--ignore-eos", "--extra-body", '{"seed": 7}')
    assert rc == 0
    assert res["config"]["model"] == "fake-model"  # discovered from /v1/models
    labels = [r["label"] for r in res["runs"]]
    assert labels == ["ar", "diffusion/rs=1", "diffusion/rs=2", "diffusion/rs=4",
                      "self_spec/rs=1", "self_spec/rs=2", "self_spec/rs=4"]
    assert res["references"]["source"] == "run ar"  # the AR run is its own reference

    runs = {r["label"]: r for r in res["runs"]}
    prompts = [BUILTIN_PROMPTS[i] for i in range(6)]
    expected_tokens = sum(len(answer_tokens(p, 16)) for p in prompts)
    for r in res["runs"]:
        s = r["summary"]
        assert s["completed"] == 6 and s["failed"] == 0
        assert s["total_output_tokens"] == expected_tokens
        assert s["output_tokens_from_usage"] is True
        assert s["output_throughput"] > 0 and s["request_throughput"] > 0
        for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2el_ms"):
            d = s[key]
            assert d["p50"] is not None and d["p50"] <= d["p90"] <= d["p99"], (r["label"], key, d)
        assert s["e2el_ms"]["p50"] >= s["ttft_ms"]["p50"]
        assert r["tpf"]["source"] == "usage"
        assert len(r["requests"]) == 6

    # TPF per mode, as the fake server computes it (token-weighted over the 6 requests)
    for label, body in (("ar", {"mode": "ar"}), ("diffusion/rs=2", {"mode": "diffusion", "refine_steps": 2}),
                        ("self_spec/rs=4", {"mode": "self_spec"})):
        toks = passes = 0
        for p in prompts:
            t, _, ext, _ = plan(p, {**body, "max_tokens": 16})
            toks += len(t)
            passes += ext["forward_passes"]
        assert runs[label]["tpf"]["tpf_weighted"] == pytest.approx(toks / passes)
    assert runs["ar"]["tpf"]["tpf_weighted"] == pytest.approx(1.0)  # prefill + (n - 1) decodes
    assert runs["diffusion/rs=1"]["tpf"]["tpf_weighted"] > 1.0
    assert runs["self_spec/rs=4"]["tpf"]["mean_acceptance_length"] > 2.0
    assert runs["ar"]["tpf"]["mean_acceptance_length"] is None

    # chunking: ITL is measured between content chunks (a 4-token block counts once)
    assert runs["ar"]["summary"]["mean_chunks_per_request"] > runs["diffusion/rs=4"]["summary"]["mean_chunks_per_request"]

    # agreement with AR falls as refine_steps falls
    q = {k: v["quality"] for k, v in runs.items()}
    assert q["ar"]["exact_match"] == 1.0
    assert q["diffusion/rs=4"]["exact_match"] == 1.0
    assert q["diffusion/rs=1"]["exact_match"] == 0.0
    assert 0.0 <= q["diffusion/rs=2"]["exact_match"] < 1.0
    assert 0.5 < q["diffusion/rs=1"]["token_agreement"] < 1.0
    assert q["self_spec/rs=1"]["exact_match"] == 1.0

    # request bodies: streaming with usage, the sweep fields, extra body and ignore_eos
    bodies = fake_server.app.state.requests
    b = next(x for x in reversed(bodies) if x.get("mode") == "diffusion")
    assert b["stream"] is True and b["stream_options"] == {"include_usage": True}
    assert b["seed"] == 7 and b["ignore_eos"] is True and b["temperature"] == 0.0
    assert "refine_steps" not in next(x for x in reversed(bodies) if x.get("mode") == "ar")

    out = tmp_path / "out"
    assert set(res["plots"]) == {"throughput_tpf.png", "latency.png", "tradeoff_refine_steps.png"}
    for name in res["plots"]:
        assert _png_ok(out / name), name
    printed = capsys.readouterr().out
    assert "diffusion/rs=4" in printed and "TTFT p50" in printed and "result.json" in printed


def test_references_fetched_and_poisson(fake_server, tmp_path):
    rc, res = _run(tmp_path, fake_server.base_url, "--model", "fake-model", "--modes", "diffusion",
                   "--refine-steps", "1,4", "--request-rate", "300", "--save-outputs")
    assert rc == 0
    ref = res["references"]
    assert ref["source"] == "fetched" and ref["n"] == 6 and ref["fields"] == {"mode": "ar"}
    runs = {r["label"]: r for r in res["runs"]}
    assert runs["diffusion/rs=4"]["quality"]["exact_match"] == 1.0
    assert runs["diffusion/rs=1"]["quality"]["exact_match"] == 0.0
    assert all("text" in q for q in runs["diffusion/rs=4"]["requests"])
    starts = [q["start_s"] for q in runs["diffusion/rs=1"]["requests"]]
    assert max(starts) > 0.0  # arrivals were spread out, not all at t=0
    assert _png_ok(tmp_path / "out" / "tradeoff_refine_steps.png")


def test_tpf_from_metrics_when_usage_has_no_extension(fake_server_no_ext, tmp_path):
    rc, res = _run(tmp_path, fake_server_no_ext.base_url, "--modes", "diffusion,ar", "--no-plots")
    assert rc == 0
    assert res["plots"] == []
    prompts = [BUILTIN_PROMPTS[i] for i in range(6)]
    for run in res["runs"]:
        assert run["quality"] is None  # no refine_steps sweep: quality is off (auto)
        tpf = run["tpf"]
        assert tpf["source"] == "metrics"
        toks = passes = 0
        per_req = []
        for p in prompts:
            t, _, ext, _ = plan(p, {"mode": run["mode"], "max_tokens": 16})
            toks += len(t)
            passes += ext["forward_passes"]
            per_req.append(ext["tokens_per_forward"])
        assert tpf["tpf_weighted"] == pytest.approx(toks / passes)
        assert tpf["tpf_mean"] == pytest.approx(sum(per_req) / len(per_req))


def test_failed_requests_are_reported(fake_server, tmp_path, capsys):
    rc, res = _run(tmp_path, fake_server.base_url, "--modes", "bogus", "--no-plots")
    assert rc == 1
    s = res["runs"][0]["summary"]
    assert s["completed"] == 0 and s["failed"] == 6
    assert "HTTP 400" in s["errors"][0]
    assert "error" in capsys.readouterr().err


def test_unreachable_server_and_bad_arguments(tmp_path, capsys):
    rc = main(["--base-url", "http://127.0.0.1:9", "--num-prompts", "1", "--no-progress", "--out", str(tmp_path)])
    assert rc == 1
    assert main(["--extra-body", "[1]"]) == 2
    assert main(["--refine-steps", "a,b"]) == 2
    assert main(["--prompts-file", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]) == 2


def test_prompt_files(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text('{"prompt": "hello"}\n\n"plain string"\n'
                 '{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],'
                 ' "max_tokens": 5}\n')
    ps = load_prompts(j)
    assert [p.text() for p in ps] == ["hello", "plain string", "be brief\nhi"]
    assert ps[2].max_tokens == 5 and ps[2].chat_messages()[0] == {"role": "system", "content": "be brief"}
    t = tmp_path / "p.txt"
    t.write_text("one\n\n two \n")
    assert [p.text() for p in load_prompts(t)] == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nope": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_prompts(bad)


def test_prompts_file_used_by_run(fake_server, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("alpha beta\ngamma\n")
    rc, res = _run(tmp_path, fake_server.base_url, "--prompts-file", str(f), "--no-plots", "--num-prompts", "4")
    assert rc == 0
    assert res["config"]["num_distinct_prompts"] == 2
    run = res["runs"][0]
    assert run["label"] == "default" and run["mode"] is None
    assert [q["prompt_id"] for q in run["requests"]] == [0, 1, 0, 1]


def test_helpers():
    assert [s.label for s in plan_runs(None, None)] == ["default"]
    assert [s.label for s in plan_runs(["ar", "diffusion"], [2, 8])] == ["ar", "diffusion/rs=2", "diffusion/rs=8"]
    assert [s.label for s in plan_runs(None, [3])] == ["default/rs=3"]
    runs = plan_runs(["ar", "self_spec", "auto"], None, ["linear", "quadratic"], [4, 8])
    assert [s.label for s in runs] == [
        "ar", "self_spec/linear/B=4", "self_spec/linear/B=8", "self_spec/quadratic/B=4",
        "self_spec/quadratic/B=8", "auto",
    ]
    assert runs[3].fields() == {"mode": "self_spec", "variant": "quadratic", "block_length": 4}
    rng = random.Random(0)
    assert arrival_offsets(3, math.inf, "poisson", rng) == [0.0, 0.0, 0.0]
    assert arrival_offsets(3, 2.0, "constant", rng) == [0.0, 0.5, 1.0]
    po = arrival_offsets(2000, 100.0, "poisson", random.Random(1))
    assert po == sorted(po) and 15.0 < po[-1] < 25.0  # mean gap 1/rate
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5
    assert math.isnan(percentile([], 50))


def test_agreement_metrics():
    from server.bench.client import RequestResult

    rs = [RequestResult(index=0, prompt_id=0, ok=True, text="a b c d"),
          RequestResult(index=1, prompt_id=1, ok=True, text="a b x"),
          RequestResult(index=2, prompt_id=2, ok=False, text="")]
    q = agreement(rs, {0: "a b c d", 1: "a b c d", 2: "zzz"})
    assert q["n"] == 2 and q["exact_match"] == 0.5
    assert q["token_agreement"] == pytest.approx((1.0 + 2 / 4) / 2)
    assert q["prefix_agreement"] == pytest.approx((1.0 + 4 / 7) / 2)
    assert agreement(rs, None) is None


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "server.bench", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    for opt in ("--base-url", "--request-rate", "--max-concurrency", "--modes", "--refine-steps", "--extra-body"):
        assert opt in r.stdout


def test_tpf_from_usage_shapes():
    from server.bench.client import RequestResult
    from server.bench.report import tpf_value
    from server.bench.stats import tpf_from_usage

    only_tpf = [RequestResult(index=0, prompt_id=0, ok=True, chunks=2,
                              usage={"completion_tokens": 8, "tokens_per_forward": 2.0})]
    t = tpf_from_usage(only_tpf)
    assert t["tpf_mean"] == 2.0 and t["tpf_weighted"] is None
    assert tpf_value({"tpf": t}) == 2.0
    by_kind = [RequestResult(index=0, prompt_id=0, ok=True, usage={"completion_tokens": 9,
                                                                  "forward_passes": {"prefill": 1, "draft": 1, "verify": 1},
                                                                  "mean_acceptance_length": 4.0}),
               RequestResult(index=1, prompt_id=1, ok=True, usage={"completion_tokens": 3, "forward_passes": 3})]
    t = tpf_from_usage(by_kind)
    assert t["tpf_weighted"] == pytest.approx(12 / 6) and t["tpf_mean"] == pytest.approx((3 + 1) / 2)
    assert t["mean_acceptance_length"] == 4.0
    assert tpf_from_usage([RequestResult(index=0, prompt_id=0, ok=True, usage={"completion_tokens": 3})]) is None

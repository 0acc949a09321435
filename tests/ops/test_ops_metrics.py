"""server.metrics: exposition values for synthetic RequestStats, and promtool's lint."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from server.engine.modes import work_kind_names
from server.engine.outputs import RequestStats
from server.metrics import Metrics

M = "tiny"


def stats(mode="ar", **kw) -> RequestStats:
    fp = {k: 0 for k in work_kind_names()}
    fp.update(kw.pop("forward_passes", {}))
    return RequestStats(mode=mode, forward_passes=fp, model=M, **kw)


def val(m: Metrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


def bucket(m: Metrics, name: str, le: float, **labels) -> float | None:
    return m.registry.get_sample_value(name + "_bucket", {**labels, "le": str(float(le))})


def ar_request() -> RequestStats:
    # arrival 100.0, scheduled +0.5, prefill done +0.7, first token +0.8, 5 tokens one by one
    return stats("ar", prompt_tokens=12, cached_prompt_tokens=4, completion_tokens=5,
                 forward_passes={"prefill": 1, "decode": 4},
                 arrival_time=100.0, first_scheduled_time=100.5, prefill_done_time=100.7,
                 first_token_time=100.8, finished_time=101.2,
                 emission_times=[100.8, 100.9, 101.0, 101.1, 101.2])


def diffusion_request() -> RequestStats:
    # 2 blocks of 8 tokens: 3 and 5 denoise passes + 2 commits + 1 prefill -> TPF 16/11
    return stats("diffusion", prompt_tokens=7, completion_tokens=16,
                 forward_passes={"prefill": 1, "denoise": 8, "commit": 2},
                 denoise_steps_per_block=[3, 5],
                 arrival_time=10.0, first_scheduled_time=10.0, prefill_done_time=10.1,
                 first_token_time=10.4, finished_time=10.9, emission_times=[10.4, 10.9])


def self_spec_request() -> RequestStats:
    return stats("self_spec", prompt_tokens=3, completion_tokens=9,
                 forward_passes={"prefill": 1, "draft": 3, "verify": 3},
                 acceptance_lengths=[4, 2, 3],
                 arrival_time=0.0, first_scheduled_time=0.01, prefill_done_time=0.02,
                 first_token_time=0.05, finished_time=0.25, emission_times=[0.05, 0.15, 0.25])


def test_request_histograms_and_counters():
    m = Metrics(M)
    m.on_request_finished(ar_request(), "stop")
    ar = {"mode": "ar", "model": M}

    assert val(m, "nld_time_to_first_token_seconds_count", **ar) == 1
    assert val(m, "nld_time_to_first_token_seconds_sum", **ar) == pytest.approx(0.8)
    assert bucket(m, "nld_time_to_first_token_seconds", 0.75, **ar) == 0
    assert bucket(m, "nld_time_to_first_token_seconds", 1.0, **ar) == 1
    assert val(m, "nld_inter_token_latency_seconds_count", **ar) == 4
    assert val(m, "nld_inter_token_latency_seconds_sum", **ar) == pytest.approx(0.4)
    assert bucket(m, "nld_inter_token_latency_seconds", 0.15, **ar) == 4  # gaps of ~0.1 s
    assert bucket(m, "nld_inter_token_latency_seconds", 0.075, **ar) == 0
    assert val(m, "nld_request_time_per_output_token_seconds_sum", **ar) == pytest.approx(0.4 / 4)
    assert val(m, "nld_e2e_request_latency_seconds_sum", **ar) == pytest.approx(1.2)
    assert val(m, "nld_request_queue_time_seconds_sum", **ar) == pytest.approx(0.5)
    assert val(m, "nld_request_prefill_time_seconds_sum", **ar) == pytest.approx(0.2)
    assert val(m, "nld_request_decode_time_seconds_sum", **ar) == pytest.approx(0.5)
    assert val(m, "nld_request_tokens_per_forward_sum", **ar) == pytest.approx(1.0)
    assert val(m, "nld_request_tokens_per_forward_count", **ar) == 1

    assert val(m, "nld_prompt_tokens_total", **ar) == 12
    assert val(m, "nld_prompt_tokens_cached_total", **ar) == 4
    assert val(m, "nld_generation_tokens_total", **ar) == 5
    assert val(m, "nld_forward_passes_total", kind="prefill", **ar) == 1
    assert val(m, "nld_forward_passes_total", kind="decode", **ar) == 4
    assert val(m, "nld_forward_passes_total", kind="denoise", **ar) is None  # never observed
    assert val(m, "nld_request_success_total", finished_reason="stop", **ar) == 1
    assert val(m, "nld_request_success_total", finished_reason="length", **ar) == 0
    assert val(m, "nld_num_aborted_requests_total", **ar) == 0
    # AR never observes acceptance/denoise histograms
    assert val(m, "nld_spec_decode_acceptance_length_count", **ar) is None
    assert val(m, "nld_diffusion_denoising_steps_per_block_count", **ar) is None


def test_mode_specific_histograms():
    m = Metrics(M)
    m.on_request_finished(diffusion_request(), "length")
    m.on_request_finished(self_spec_request(), "stop")
    d = {"mode": "diffusion", "model": M}
    s = {"mode": "self_spec", "model": M}

    assert val(m, "nld_diffusion_denoising_steps_per_block_count", **d) == 2
    assert val(m, "nld_diffusion_denoising_steps_per_block_sum", **d) == 8
    assert bucket(m, "nld_diffusion_denoising_steps_per_block", 3, **d) == 1
    assert bucket(m, "nld_diffusion_denoising_steps_per_block", 5, **d) == 2
    assert bucket(m, "nld_diffusion_denoising_steps_per_block", 64, **d) == 2
    assert val(m, "nld_request_tokens_per_forward_sum", **d) == pytest.approx(16 / 11)
    assert bucket(m, "nld_request_tokens_per_forward", 1.25, **d) == 0
    assert bucket(m, "nld_request_tokens_per_forward", 1.5, **d) == 1
    assert val(m, "nld_inter_token_latency_seconds_count", **d) == 1  # one gap between two blocks
    assert val(m, "nld_request_time_per_output_token_seconds_sum", **d) == pytest.approx(0.5 / 15)
    assert val(m, "nld_forward_passes_total", kind="denoise", **d) == 8
    assert val(m, "nld_request_success_total", finished_reason="length", **d) == 1

    assert val(m, "nld_spec_decode_acceptance_length_count", **s) == 3
    assert val(m, "nld_spec_decode_acceptance_length_sum", **s) == 9
    assert bucket(m, "nld_spec_decode_acceptance_length", 2, **s) == 1
    assert bucket(m, "nld_spec_decode_acceptance_length", 3, **s) == 2
    assert bucket(m, "nld_spec_decode_acceptance_length", 33, **s) == 3
    assert val(m, "nld_request_tokens_per_forward_sum", **s) == pytest.approx(9 / 7)
    assert val(m, "nld_diffusion_denoising_steps_per_block_count", **s) is None
    # the AR series exist (pre-created) but are empty
    assert val(m, "nld_time_to_first_token_seconds_count", mode="ar", model=M) == 0


def test_tpf_count_equals_finished_requests_with_tokens_and_none_inputs_skipped():
    m = Metrics(M)
    for _ in range(3):
        m.on_request_finished(diffusion_request(), "stop")
    # aborted while queued: no timestamps but arrival, no tokens, no passes
    m.on_request_finished(stats("diffusion", prompt_tokens=5, arrival_time=1.0), "abort")
    # aborted after one token: finished_time unknown
    m.on_request_finished(stats("diffusion", prompt_tokens=5, completion_tokens=1,
                                forward_passes={"prefill": 1, "denoise": 2}, arrival_time=1.0,
                                first_scheduled_time=1.1, first_token_time=1.5,
                                emission_times=[1.5]), "abort")
    d = {"mode": "diffusion", "model": M}
    assert val(m, "nld_request_tokens_per_forward_count", **d) == 4  # 3 full + the 1-token one
    assert val(m, "nld_request_success_total", finished_reason="abort", **d) == 2
    assert val(m, "nld_num_aborted_requests_total", **d) == 2
    assert val(m, "nld_time_to_first_token_seconds_count", **d) == 4
    assert val(m, "nld_e2e_request_latency_seconds_count", **d) == 3
    assert val(m, "nld_request_queue_time_seconds_count", **d) == 4
    assert val(m, "nld_request_prefill_time_seconds_count", **d) == 3
    assert val(m, "nld_request_time_per_output_token_seconds_count", **d) == 3
    assert val(m, "nld_prompt_tokens_total", **d) == 3 * 7 + 10
    assert val(m, "nld_generation_tokens_total", **d) == 3 * 16 + 1


def test_engine_hooks():
    m = Metrics(M)
    m.on_step(0.0125, num_running=3, num_waiting=7, kv_usage=0.42)
    m.on_step(0.02, num_running=2, num_waiting=1, kv_usage=0.5)
    assert val(m, "nld_scheduler_step_duration_seconds", model=M) == pytest.approx(0.02)
    assert val(m, "nld_num_requests_running", model=M) == 2
    assert val(m, "nld_num_requests_waiting", model=M) == 1
    assert val(m, "nld_kv_cache_usage_perc", model=M) == pytest.approx(0.5)
    m.on_preemption("self_spec")
    m.on_preemption("self_spec")
    m.on_queue_rejected("ar")
    m.on_prefix_cache(queried_tokens=100, hit_tokens=64)
    m.on_prefix_cache(queried_tokens=10, hit_tokens=0)
    assert val(m, "nld_num_preemptions_total", mode="self_spec", model=M) == 2
    assert val(m, "nld_num_preemptions_total", mode="ar", model=M) == 0
    assert val(m, "nld_admission_rejections_total", mode="ar", model=M, reason="queue_full") == 1
    assert val(m, "nld_prefix_cache_queries_total", model=M) == 110
    assert val(m, "nld_prefix_cache_hits_total", model=M) == 64


def test_own_registry_by_default_and_shared_registry():
    a, b = Metrics(M), Metrics(M)
    assert a.registry is not b.registry  # two instances do not clash
    reg = CollectorRegistry()
    c = Metrics("other", registry=reg)
    assert c.registry is reg
    c.on_request_finished(ar_request(), "stop")
    assert reg.get_sample_value("nld_generation_tokens_total", {"mode": "ar", "model": "other"}) == 5


def test_exposition_text_and_labels():
    m = Metrics(M)
    m.on_request_finished(ar_request(), "stop")
    m.on_request_finished(diffusion_request(), "length")
    m.on_request_finished(self_spec_request(), "stop")
    m.on_step(0.01, 1, 0, 0.1)
    text = m.render().decode()
    assert ":" not in "".join(line.split("{")[0].split(" ")[0] for line in text.splitlines()
                              if line and not line.startswith("#"))
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("nld_time_to_first_token_seconds", "nld_inter_token_latency_seconds",
                 "nld_request_time_per_output_token_seconds", "nld_e2e_request_latency_seconds",
                 "nld_request_queue_time_seconds", "nld_request_prefill_time_seconds",
                 "nld_request_tokens_per_forward", "nld_spec_decode_acceptance_length",
                 "nld_diffusion_denoising_steps_per_block"):
        assert fams[name].type == "histogram", name
        for s in fams[name].samples:
            assert {"mode", "model"} <= set(s.labels), (name, s.labels)
    for name in ("nld_prompt_tokens", "nld_generation_tokens", "nld_forward_passes", "nld_request_success",
                 "nld_num_aborted_requests", "nld_num_preemptions", "nld_admission_rejections"):
        assert fams[name].type == "counter", name
    for name in ("nld_num_requests_running", "nld_num_requests_waiting", "nld_kv_cache_usage_perc",
                 "nld_scheduler_step_duration_seconds"):
        assert fams[name].type == "gauge", name
    assert "nld_generation_tokens_total" in m.metric_names()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package 'prometheus')")
def test_promtool_check_metrics():
    m = Metrics(M)
    m.on_request_finished(ar_request(), "stop")
    m.on_request_finished(diffusion_request(), "length")
    m.on_request_finished(self_spec_request(), "abort")
    m.on_step(0.01, 1, 2, 0.3)
    m.on_preemption("ar")
    m.on_queue_rejected("diffusion")
    m.on_prefix_cache(8, 4)
    r = subprocess.run(["promtool", "check", "metrics"], input=m.render(), capture_output=True, timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    assert not (r.stdout + r.stderr).strip(), (r.stdout + r.stderr).decode()  # no lint warnings either

"""Prometheus metrics of the engine.

Names follow vLLM's (``vllm:time_to_first_token_seconds`` ->
``nld_time_to_first_token_seconds``) with the namespace ``nld`` and an underscore instead
of vLLM's colon (promtool rejects colons outside recording rules). Every per-request
metric carries the labels ``mode`` (a registered mode's name) and ``model``; the
engine-wide gauges and the prefix-cache counters carry ``model`` only.

The engine thread calls the ``on_*`` methods; prometheus_client is thread-safe, so the
HTTP layer can render :meth:`Metrics.render` concurrently.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.engine.modes import all_modes
from server.engine.outputs import RequestStats

NAMESPACE = "nld"
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort", "error")
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Latency buckets (seconds). TTFT and e2e follow vLLM's, with a finer low end because a
# small model answers in milliseconds; ITL/TPOT reach down to 0.5 ms.
TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
ITL_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0,
    20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)
PHASE_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
)
# Tokens per forward pass of a request: below 1 for short answers (the prefill counts),
# up to the block length (32) for a fully parallel diffusion block.
TPF_BUCKETS: tuple[float, ...] = (
    0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0,
    10.0, 12.0, 14.0, 16.0, 20.0, 24.0, 28.0, 32.0,
)
# Tokens committed per self-speculation cycle (accepted drafts + bonus): 1 .. draft+1 = 33.
ACCEPTANCE_BUCKETS: tuple[float, ...] = (
    1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 14.0, 16.0, 20.0, 24.0, 28.0, 32.0, 33.0,
)
# Denoising passes spent on one diffusion block: 1 .. refine_steps (<= 64 in practice).
DENOISE_BUCKETS: tuple[float, ...] = (
    1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0, 40.0, 48.0, 56.0, 64.0,
)


def _name(suffix: str) -> str:
    return f"{NAMESPACE}_{suffix}"


class Metrics:
    """All metrics of one served model, in their own registry unless one is given.
    Implements ``server.engine.metrics_sink.MetricsSink``."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        req = ("mode", "model")

        # --- engine-wide gauges -------------------------------------------------
        self.num_requests_running = Gauge(
            _name("num_requests_running"), "Requests in the running batch.", ["model"], registry=r)
        self.num_requests_waiting = Gauge(
            _name("num_requests_waiting"), "Requests waiting to be scheduled.", ["model"], registry=r)
        self.kv_cache_usage_perc = Gauge(
            _name("kv_cache_usage_perc"), "KV-cache page usage, 0..1 (1 = full).", ["model"], registry=r)
        self.scheduler_step_duration_seconds = Gauge(
            _name("scheduler_step_duration_seconds"),
            "Wall time of the last engine step (schedule + forward + sample).", ["model"], registry=r)

        # --- counters -------------------------------------------------------------
        self.prompt_tokens = Counter(
            _name("prompt_tokens"), "Prompt tokens of finished requests.", req, registry=r)
        self.prompt_tokens_cached = Counter(
            _name("prompt_tokens_cached"), "Prompt tokens of finished requests served from the prefix cache.",
            req, registry=r)
        self.generation_tokens = Counter(
            _name("generation_tokens"), "Tokens emitted by finished requests.", req, registry=r)
        self.forward_passes = Counter(
            _name("forward_passes"),
            "Forward passes finished requests took part in, by kind "
            "(prefill/decode/denoise/commit/draft/verify).", req + ("kind",), registry=r)
        self.passes_by_decoder = Counter(
            _name("forward_passes_by_decoder"),
            "Forward passes finished requests took part in, by the decoder that ran them "
            "(ar, self_spec_linear, self_spec_quadratic; what mode=auto chose) and kind.",
            req + ("decoder", "kind"), registry=r)
        self.request_success = Counter(
            _name("request_success"), "Finished requests by finish reason (stop/length/abort/error).",
            req + ("finished_reason",), registry=r)
        self.num_aborted_requests = Counter(
            _name("num_aborted_requests"), "Requests aborted (client disconnect or abort call).", req, registry=r)
        self.num_preemptions = Counter(
            _name("num_preemptions"), "Preemptions (a running request evicted to free KV pages).", req, registry=r)
        self.admission_rejections = Counter(
            _name("admission_rejections"), "Requests rejected at admission (HTTP 503), by reason.",
            req + ("reason",), registry=r)
        self.prefix_cache_queries = Counter(
            _name("prefix_cache_queries"), "Prompt tokens looked up in the prefix cache.", ["model"], registry=r)
        self.prefix_cache_hits = Counter(
            _name("prefix_cache_hits"), "Prompt tokens found in the prefix cache.", ["model"], registry=r)
        self.vision_images_processed = Counter(
            _name("vision_images_processed"), "Images run through the vision encoder (prefix-cache hits skip it).",
            ["model"], registry=r)
        self.vision_encoder_seconds = Counter(
            _name("vision_encoder_seconds"), "Wall time spent in the vision encoder.", ["model"], registry=r)

        # --- per-request histograms -------------------------------------------------
        self.time_to_first_token_seconds = Histogram(
            _name("time_to_first_token_seconds"), "Arrival to first emitted token.", req,
            buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency_seconds = Histogram(
            _name("inter_token_latency_seconds"),
            "Time between consecutive output increments (a multi-token increment counts once).", req,
            buckets=ITL_BUCKETS, registry=r)
        self.request_time_per_output_token_seconds = Histogram(
            _name("request_time_per_output_token_seconds"),
            "Per request: (finished - first token) / (completion tokens - 1).", req,
            buckets=ITL_BUCKETS, registry=r)
        self.e2e_request_latency_seconds = Histogram(
            _name("e2e_request_latency_seconds"), "Arrival to finish.", req,
            buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.request_queue_time_seconds = Histogram(
            _name("request_queue_time_seconds"), "Arrival to first scheduled.", req,
            buckets=PHASE_BUCKETS, registry=r)
        self.request_prefill_time_seconds = Histogram(
            _name("request_prefill_time_seconds"), "First scheduled to prompt fully prefilled.", req,
            buckets=PHASE_BUCKETS, registry=r)
        self.request_decode_time_seconds = Histogram(
            _name("request_decode_time_seconds"), "Prompt fully prefilled to finish.", req,
            buckets=PHASE_BUCKETS, registry=r)
        self.request_tokens_per_forward = Histogram(
            _name("request_tokens_per_forward"),
            "Per request: emitted tokens / forward passes of every kind (TPF).", req,
            buckets=TPF_BUCKETS, registry=r)
        self.spec_decode_acceptance_length = Histogram(
            _name("spec_decode_acceptance_length"),
            "self_spec: tokens committed per draft/verify cycle (accepted drafts + bonus).", req,
            buckets=ACCEPTANCE_BUCKETS, registry=r)
        self.diffusion_denoising_steps_per_block = Histogram(
            _name("diffusion_denoising_steps_per_block"),
            "diffusion: denoising passes spent on one block.", req,
            buckets=DENOISE_BUCKETS, registry=r)

        self._init_series()

    # ------------------------------------------------------------------ helpers
    def _init_series(self) -> None:
        """Create the zero-valued series dashboards expect, so rates work from the start."""
        m = self.model_name
        for g in (self.num_requests_running, self.num_requests_waiting, self.kv_cache_usage_perc,
                  self.scheduler_step_duration_seconds, self.prefix_cache_queries, self.prefix_cache_hits,
                  self.vision_images_processed, self.vision_encoder_seconds):
            g.labels(model=m)
        for mode_obj in all_modes():
            mode = mode_obj.name
            for c in (self.prompt_tokens, self.prompt_tokens_cached, self.generation_tokens,
                      self.num_aborted_requests, self.num_preemptions):
                c.labels(mode=mode, model=m)
            for reason in FINISH_REASONS:
                self.request_success.labels(mode=mode, model=m, finished_reason=reason)
            for h in (self.time_to_first_token_seconds, self.inter_token_latency_seconds,
                      self.request_time_per_output_token_seconds, self.e2e_request_latency_seconds,
                      self.request_tokens_per_forward):
                h.labels(mode=mode, model=m)
            for name in mode_obj.metric_histograms:
                getattr(self, name).labels(mode=mode, model=m)

    @staticmethod
    def _observe_all(hist, values: Iterable[float]) -> None:
        for v in values:
            hist.observe(v)

    # ------------------------------------------------------------------ engine hooks
    def on_request_finished(self, stats: RequestStats, finish_reason: str) -> None:
        """Record a finished request (any finish reason). Observations whose inputs are
        missing (None timestamps, no tokens) are skipped."""
        mode = stats.mode or "ar"
        lab = {"mode": mode, "model": self.model_name}

        self.prompt_tokens.labels(**lab).inc(max(0, stats.prompt_tokens))
        self.prompt_tokens_cached.labels(**lab).inc(max(0, stats.cached_prompt_tokens))
        self.generation_tokens.labels(**lab).inc(max(0, stats.completion_tokens))
        for kind, n in stats.forward_passes.items():
            if n:
                self.forward_passes.labels(kind=kind, **lab).inc(n)
        for decoder, kinds in stats.passes_by_decoder.items():
            for kind, n in kinds.items():
                self.passes_by_decoder.labels(decoder=decoder, kind=kind, **lab).inc(n)
        self.request_success.labels(finished_reason=finish_reason, **lab).inc()
        if finish_reason == "abort":
            self.num_aborted_requests.labels(**lab).inc()

        arrival = stats.arrival_time
        first_sched = stats.first_scheduled_time
        first_tok = stats.first_token_time
        prefill_done = stats.prefill_done_time
        finished = stats.finished_time

        if first_tok is not None:
            self.time_to_first_token_seconds.labels(**lab).observe(max(0.0, first_tok - arrival))
        if finished is not None:
            self.e2e_request_latency_seconds.labels(**lab).observe(max(0.0, finished - arrival))
        if first_sched is not None:
            self.request_queue_time_seconds.labels(**lab).observe(max(0.0, first_sched - arrival))
            if prefill_done is not None:
                self.request_prefill_time_seconds.labels(**lab).observe(max(0.0, prefill_done - first_sched))
        if prefill_done is not None and finished is not None:
            self.request_decode_time_seconds.labels(**lab).observe(max(0.0, finished - prefill_done))

        em = stats.emission_times
        if len(em) > 1:
            itl = self.inter_token_latency_seconds.labels(**lab)
            self._observe_all(itl, (max(0.0, b - a) for a, b in zip(em, em[1:])))
        if first_tok is not None and finished is not None and stats.completion_tokens > 1:
            self.request_time_per_output_token_seconds.labels(**lab).observe(
                max(0.0, finished - first_tok) / (stats.completion_tokens - 1))

        if stats.completion_tokens >= 1 and stats.total_forward_passes > 0:
            self.request_tokens_per_forward.labels(**lab).observe(stats.tokens_per_forward)
        if stats.acceptance_lengths:
            self._observe_all(self.spec_decode_acceptance_length.labels(**lab), stats.acceptance_lengths)
        if stats.denoise_steps_per_block:
            self._observe_all(self.diffusion_denoising_steps_per_block.labels(**lab),
                              stats.denoise_steps_per_block)

    def on_step(self, duration_s: float, num_running: int, num_waiting: int, kv_usage: float) -> None:
        m = self.model_name
        self.scheduler_step_duration_seconds.labels(model=m).set(duration_s)
        self.num_requests_running.labels(model=m).set(num_running)
        self.num_requests_waiting.labels(model=m).set(num_waiting)
        self.kv_cache_usage_perc.labels(model=m).set(kv_usage)

    def on_preemption(self, mode: str) -> None:
        self.num_preemptions.labels(mode=mode, model=self.model_name).inc()

    def on_queue_rejected(self, mode: str, reason: str = "queue_full") -> None:
        self.admission_rejections.labels(mode=mode, model=self.model_name, reason=reason).inc()

    def on_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        m = self.model_name
        if queried_tokens > 0:
            self.prefix_cache_queries.labels(model=m).inc(queried_tokens)
        if hit_tokens > 0:
            self.prefix_cache_hits.labels(model=m).inc(hit_tokens)

    def on_vision_encode(self, images: int, seconds: float) -> None:
        self.vision_images_processed.labels(model=self.model_name).inc(images)
        self.vision_encoder_seconds.labels(model=self.model_name).inc(seconds)

    # ------------------------------------------------------------------ exposition
    def render(self) -> bytes:
        """The text exposition of this registry (serve with :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    def metric_names(self) -> Sequence[str]:
        """Sample names this registry exposes (``_bucket``/``_sum``/``_count``/``_total`` included)."""
        names: set[str] = set()
        for fam in self.registry.collect():
            for s in fam.samples:
                names.add(s.name)
        return sorted(names)


__all__ = ["Metrics", "CONTENT_TYPE", "FINISH_REASONS"]

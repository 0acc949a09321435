"""Generate deploy/grafana/dashboards/nld-server.json (the provisioned Grafana dashboard).

    python deploy/grafana/make_dashboard.py        # rewrite the JSON
    python deploy/grafana/make_dashboard.py --check  # exit 1 if the JSON is stale

Every latency/throughput panel is split by ``mode`` (ar | diffusion | self_spec); the
variables ``model`` and ``mode`` filter all panels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "nld-server.json"
DS = {"type": "prometheus", "uid": "nld-prometheus"}
SEL = 'model=~"$model", mode=~"$mode"'
MSEL = 'model=~"$model"'
RI = "$__rate_interval"


def _target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def _panel(pid: int, title: str, targets: list[tuple[str, str]], x: int, y: int, unit: str = "short",
           w: int = 8, h: int = 8, description: str = "", min_zero: bool = True,
           max_val: float | None = None) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "custom": {"drawStyle": "line", "lineWidth": 1,
                                                         "fillOpacity": 10, "showPoints": "never",
                                                         "spanNulls": True}}
    if min_zero:
        defaults["min"] = 0
    if max_val is not None:
        defaults["max"] = max_val
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [_target(e, lg, chr(ord("A") + i)) for i, (e, lg) in enumerate(targets)],
    }


def _row(pid: int, title: str, y: int) -> dict[str, Any]:
    return {"id": pid, "type": "row", "title": title, "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}


def _quantiles(metric: str, qs: tuple[float, ...] = (0.5, 0.99)) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le, mode) (rate({metric}_bucket{{{SEL}}}[{RI}])))",
             f"{{{{mode}}}} p{int(q * 100)}") for q in qs]


def _mean(metric: str, label: str = "{{mode}} mean") -> tuple[str, str]:
    return (f"sum by (mode) (rate({metric}_sum{{{SEL}}}[{RI}])) / sum by (mode) (rate({metric}_count{{{SEL}}}[{RI}]))",
            label)


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid = 0

    def nid() -> int:
        nonlocal pid
        pid += 1
        return pid

    y = 0
    panels.append(_row(nid(), "Load", y))
    y += 1
    panels.append(_panel(nid(), "Requests running / waiting", [
        (f"sum(nld_num_requests_running{{{MSEL}}})", "running"),
        (f"sum(nld_num_requests_waiting{{{MSEL}}})", "waiting"),
    ], 0, y, description="Requests in the running batch and in the queue (all modes)."))
    panels.append(_panel(nid(), "KV-cache usage", [
        (f"max(nld_kv_cache_usage_perc{{{MSEL}}})", "KV usage"),
    ], 8, y, unit="percentunit", max_val=1, description="Fraction of KV pages in use (1 = full)."))
    panels.append(_panel(nid(), "Finished requests / s by mode and reason", [
        (f"sum by (mode, finished_reason) (rate(nld_request_success_total{{{SEL}}}[{RI}]))",
         "{{mode}} {{finished_reason}}"),
    ], 16, y, unit="reqps"))
    y += 8

    panels.append(_row(nid(), "Latency by mode", y))
    y += 1
    panels.append(_panel(nid(), "Time to first token", _quantiles("nld_time_to_first_token_seconds"), 0, y,
                         unit="s", w=12, description="Arrival to first emitted token."))
    panels.append(_panel(nid(), "Inter-token latency", _quantiles("nld_inter_token_latency_seconds"), 12, y,
                         unit="s", w=12,
                         description="Gap between output increments; a diffusion block or an accepted "
                                     "self_spec run counts once, so compare modes on TPOT."))
    y += 8
    panels.append(_panel(nid(), "Time per output token", _quantiles("nld_request_time_per_output_token_seconds"),
                         0, y, unit="s", w=12,
                         description="Per request: (finish - first token) / (tokens - 1)."))
    panels.append(_panel(nid(), "End-to-end latency", _quantiles("nld_e2e_request_latency_seconds")
                         + _quantiles("nld_request_queue_time_seconds", (0.99,)), 12, y, unit="s", w=12,
                         description="Arrival to finish (p50/p99), and queue time p99."))
    y += 8

    panels.append(_row(nid(), "Throughput and parallelism by mode", y))
    y += 1
    panels.append(_panel(nid(), "Generated tokens / s", [
        (f"sum by (mode) (rate(nld_generation_tokens_total{{{SEL}}}[{RI}]))", "{{mode}}"),
        (f"sum(rate(nld_prompt_tokens_total{{{SEL}}}[{RI}]))", "prompt tokens (all modes)"),
    ], 0, y, unit="short", description="Tokens of finished requests per second."))
    panels.append(_panel(nid(), "Tokens per forward pass (TPF)", [
        (f"sum by (mode) (rate(nld_generation_tokens_total{{{SEL}}}[{RI}])) / "
         f"sum by (mode) (rate(nld_forward_passes_total{{{SEL}}}[{RI}]))", "{{mode}} (token-weighted)"),
        _mean("nld_request_tokens_per_forward", "{{mode}} (mean per request)"),
    ], 8, y, description="Emitted tokens / forward passes of every kind (prefill included)."))
    panels.append(_panel(nid(), "Forward passes / s by kind", [
        (f"sum by (mode, kind) (rate(nld_forward_passes_total{{{SEL}}}[{RI}]))", "{{mode}} {{kind}}"),
    ], 16, y, unit="short"))
    y += 8
    panels.append(_panel(nid(), "self_spec acceptance length", [
        _mean("nld_spec_decode_acceptance_length"),
        *_quantiles("nld_spec_decode_acceptance_length", (0.5,)),
    ], 0, y, w=12, description="Tokens committed per draft/verify cycle (accepted drafts + bonus)."))
    panels.append(_panel(nid(), "diffusion denoising passes per block", [
        _mean("nld_diffusion_denoising_steps_per_block"),
        *_quantiles("nld_diffusion_denoising_steps_per_block", (0.5, 0.9)),
    ], 12, y, w=12))
    y += 8

    panels.append(_row(nid(), "Engine", y))
    y += 1
    panels.append(_panel(nid(), "Scheduler step duration", [
        (f"max(nld_scheduler_step_duration_seconds{{{MSEL}}})", "last step"),
    ], 0, y, unit="s", w=6))
    panels.append(_panel(nid(), "Prefix-cache hit rate", [
        (f"sum(rate(nld_prefix_cache_hits_total{{{MSEL}}}[{RI}])) / "
         f"sum(rate(nld_prefix_cache_queries_total{{{MSEL}}}[{RI}]))", "hit rate"),
    ], 6, y, unit="percentunit", w=6, max_val=1))
    panels.append(_panel(nid(), "Preemptions, rejections, aborts / s", [
        (f"sum by (mode) (rate(nld_num_preemptions_total{{{SEL}}}[{RI}]))", "{{mode}} preempted"),
        (f"sum by (mode) (rate(nld_admission_rejections_total{{{SEL}}}[{RI}]))", "{{mode}} rejected (queue full)"),
        (f"sum by (mode) (rate(nld_num_aborted_requests_total{{{SEL}}}[{RI}]))", "{{mode}} aborted"),
    ], 12, y, unit="reqps", w=12))

    return {
        "uid": "nld-server",
        "title": "nld-server",
        "description": "Tri-mode diffusion LM server: latency, throughput and TPF by mode.",
        "tags": ["nld", "llm", "inference"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "templating": {"list": [
            {"name": "model", "label": "model", "type": "query", "datasource": DS,
             "query": {"query": "label_values(nld_num_requests_running, model)", "refId": "model"},
             "definition": "label_values(nld_num_requests_running, model)", "refresh": 2,
             "includeAll": True, "multi": True, "allValue": ".*",
             "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1},
            {"name": "mode", "label": "mode", "type": "custom", "query": "ar,diffusion,self_spec",
             "includeAll": True, "multi": True, "allValue": ".*",
             "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
             "options": [{"selected": v == "All", "text": v, "value": "$__all" if v == "All" else v}
                         for v in ("All", "ar", "diffusion", "self_spec")]},
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Generate the Grafana dashboard JSON.")
    p.add_argument("--check", action="store_true", help="only check that the committed JSON is current")
    a = p.parse_args(argv)
    text = render()
    if a.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale; run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

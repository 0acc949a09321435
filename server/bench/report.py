"""Output of the load generator: a text table, result.json and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

MODE_COLORS = {"ar": "#4C72B0", "diffusion": "#DD8452", "self_spec": "#55A868", None: "#8172B3"}


def _fmt(x: Any, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def tpf_value(run: dict[str, Any]) -> float | None:
    """The run's TPF: token-weighted when forward-pass counts are known, else the mean per request."""
    t = run.get("tpf") or {}
    return t.get("tpf_weighted") if t.get("tpf_weighted") is not None else t.get("tpf_mean")


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    cols = [
        ("run", lambda r: r["label"]),
        ("ok/fail", lambda r: f"{r['summary']['completed']}/{r['summary']['failed']}"),
        ("req/s", lambda r: _fmt(r["summary"]["request_throughput"], 2)),
        ("out tok/s", lambda r: _fmt(r["summary"]["output_throughput"], 1)),
        ("TTFT p50", lambda r: _fmt(r["summary"]["ttft_ms"]["p50"])),
        ("TTFT p99", lambda r: _fmt(r["summary"]["ttft_ms"]["p99"])),
        ("ITL p50", lambda r: _fmt(r["summary"]["itl_ms"]["p50"])),
        ("ITL p99", lambda r: _fmt(r["summary"]["itl_ms"]["p99"])),
        ("TPOT p50", lambda r: _fmt(r["summary"]["tpot_ms"]["p50"])),
        ("E2E p50", lambda r: _fmt(r["summary"]["e2el_ms"]["p50"])),
        ("E2E p99", lambda r: _fmt(r["summary"]["e2el_ms"]["p99"])),
        ("TPF", lambda r: _fmt(tpf_value(r), 2)),
        ("acc len", lambda r: _fmt((r.get("tpf") or {}).get("mean_acceptance_length"), 2)),
        ("exact", lambda r: _fmt((r.get("quality") or {}).get("exact_match"), 2)),
        ("tok agree", lambda r: _fmt((r.get("quality") or {}).get("token_agreement"), 2)),
    ]
    rows = [[name for name, _ in cols]] + [[f(r) for _, f in cols] for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("(latencies in ms; TPF = output tokens / forward passes, from the usage extension or /metrics)")
    return "\n".join(lines)


def write_json(path: Path, result: dict[str, Any]) -> None:
    def clean(o: Any) -> Any:
        if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
            return None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    path.write_text(json.dumps(clean(result), indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_throughput_tpf(runs: Sequence[dict[str, Any]], path: Path) -> None:
    """Bars per run: output tokens/s and TPF, coloured by mode."""
    plt = _plt()
    labels = [r["label"] for r in runs]
    colors = [MODE_COLORS.get(r.get("mode"), MODE_COLORS[None]) for r in runs]
    tps = [r["summary"]["output_throughput"] or 0.0 for r in runs]
    tpf = [tpf_value(r) for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(runs) + 4), 4.5))
    x = list(range(len(runs)))
    axes[0].bar(x, tps, color=colors)
    axes[0].set_title("Output throughput")
    axes[0].set_ylabel("tokens / s")
    axes[1].bar(x, [v if v is not None else 0.0 for v in tpf], color=colors)
    for i, v in enumerate(tpf):
        if v is None:
            axes[1].text(i, 0, "n/a", ha="center", va="bottom")
    axes[1].set_title("Tokens per forward pass (TPF)")
    axes[1].set_ylabel("tokens / forward")
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30, ha="right")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_latency(runs: Sequence[dict[str, Any]], path: Path) -> None:
    """Grouped bars per run: TTFT, ITL, TPOT, E2E at p50 (bar) and p99 (marker)."""
    plt = _plt()
    metrics = [("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("tpot_ms", "TPOT"), ("e2el_ms", "E2E")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(10, 1.2 * len(runs) * 2 + 4), 4.2))
    x = list(range(len(runs)))
    colors = [MODE_COLORS.get(r.get("mode"), MODE_COLORS[None]) for r in runs]
    for ax, (key, title) in zip(axes, metrics):
        p50 = [r["summary"][key]["p50"] or 0.0 for r in runs]
        p99 = [r["summary"][key]["p99"] for r in runs]
        ax.bar(x, p50, color=colors, label="p50")
        ax.scatter([i for i, v in enumerate(p99) if v is not None], [v for v in p99 if v is not None],
                   color="black", marker="_", s=200, label="p99", zorder=3)
        ax.set_title(f"{title} (ms)")
        ax.set_xticks(x)
        ax.set_xticklabels([r["label"] for r in runs], rotation=30, ha="right")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_tradeoff(runs: Sequence[dict[str, Any]], path: Path) -> bool:
    """Speed/quality as refine_steps varies, per mode: tokens/s, TPF and agreement with
    AR against refine_steps, and tokens/s against agreement. False if nothing to plot."""
    swept = [r for r in runs if r.get("refine_steps") is not None and r.get("quality")]
    if not swept:
        return False
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax_tps, ax_tpf, ax_q, ax_tr = axes[0][0], axes[0][1], axes[1][0], axes[1][1]
    modes: list[Any] = []
    for r in swept:
        if r.get("mode") not in modes:
            modes.append(r.get("mode"))
    ar = next((r for r in runs if r.get("mode") == "ar"), None)
    for mode in modes:
        pts = sorted((r for r in swept if r.get("mode") == mode), key=lambda r: r["refine_steps"])
        steps = [r["refine_steps"] for r in pts]
        tps = [r["summary"]["output_throughput"] or 0.0 for r in pts]
        tpf = [tpf_value(r) for r in pts]
        q = [r["quality"]["token_agreement"] for r in pts]
        em = [r["quality"]["exact_match"] for r in pts]
        c = MODE_COLORS.get(mode, MODE_COLORS[None])
        name = mode or "default"
        ax_tps.plot(steps, tps, "o-", color=c, label=name)
        if any(v is not None for v in tpf):
            ax_tpf.plot([s for s, v in zip(steps, tpf) if v is not None], [v for v in tpf if v is not None],
                        "o-", color=c, label=name)
        ax_q.plot(steps, q, "o-", color=c, label=f"{name} token agreement")
        ax_q.plot(steps, em, "^:", color=c, label=f"{name} exact match")
        ax_tr.plot(q, tps, "o-", color=c, label=name)
        for r, qq, t in zip(pts, q, tps):
            ax_tr.annotate(f"rs={r['refine_steps']}", (qq, t), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if ar is not None:  # the AR baseline, where measured
        c = MODE_COLORS["ar"]
        ax_tps.axhline(ar["summary"]["output_throughput"] or 0.0, color=c, ls="--", label="ar")
        ar_tpf = tpf_value(ar)
        if ar_tpf is not None:
            ax_tpf.axhline(ar_tpf, color=c, ls="--", label="ar")
        if ar.get("quality"):
            ax_tr.scatter([ar["quality"]["token_agreement"]], [ar["summary"]["output_throughput"] or 0.0],
                          marker="*", s=150, color=c, label="ar", zorder=3)
    ax_tps.set(title="Output throughput", xlabel="refine_steps", ylabel="tokens / s")
    ax_tpf.set(title="Tokens per forward pass", xlabel="refine_steps", ylabel="TPF")
    ax_q.set(title="Agreement with AR (temperature 0)", xlabel="refine_steps", ylabel="fraction", ylim=(-0.05, 1.05))
    ax_tr.set(title="Speed / quality trade-off", xlabel="token agreement with AR", ylabel="tokens / s",
              xlim=(-0.05, 1.05))
    for ax in (ax_tps, ax_tpf, ax_q, ax_tr):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_plots(runs: Sequence[dict[str, Any]], out: Path) -> list[str]:
    """Write the PNGs; returns their file names (empty if matplotlib is missing)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    files = []
    plot_throughput_tpf(runs, out / "throughput_tpf.png")
    files.append("throughput_tpf.png")
    plot_latency(runs, out / "latency.png")
    files.append("latency.png")
    if plot_tradeoff(runs, out / "tradeoff_refine_steps.png"):
        files.append("tradeoff_refine_steps.png")
    return files

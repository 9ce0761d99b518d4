"""
Charts from the benchmark's JSON (``bench/results/latest.json``), as PNGs
for docs/performance.md.  ``bash bench/run`` calls this at the end; to
redraw from an existing result:

    .venv-bench/bin/python bench/charts.py [RESULTS.json] [OUTDIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

OURS = "#1f6feb"
OTHERS = "#8c959f"
#: Lines for the other contenders in the memory chart (none of them blue).
PALETTE = ("#d1242f", "#bf8700", "#1a7f37", "#8250df", "#57606a")


def _colour(key: str) -> str:
    return OURS if key.startswith("clerkproxy") else OTHERS


def _bars(
    ax: Any,
    labels: list[str],
    values: list[float],
    colours: list[str],
    log: bool = False,
) -> None:
    positions = range(len(labels))
    ax.barh(positions, values, color=colours)
    ax.set_yticks(list(positions), labels)
    ax.invert_yaxis()
    top = max(values, default=0) or 1
    for y, value in zip(positions, values, strict=True):
        text = f"{value:,.0f}" if value >= 100 else f"{value:.2f}"
        x = value * 1.05 if log else value + top * 0.01
        ax.text(x, y, text, va="center", fontsize=8)
    if log:
        ax.set_xscale("log")
        ax.set_xlim(min(v for v in values if v > 0) / 2, top * 4)
    else:
        ax.set_xlim(0, top * 1.18)
    ax.grid(axis="x", alpha=0.3)


def render(results: Path, outdir: Path) -> list[Path]:
    """Draw every chart the results allow; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())
    outdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    note = (
        "" if not data["settings"].get("quick") else " (quick smoke run: meaningless)"
    )

    def save(fig: Any, name: str) -> None:
        fig.text(0.01, 0.005, data["machine"][:150] + note, fontsize=6, color="#57606a")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = outdir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    contenders = data["contenders"]
    if contenders:
        keys = list(contenders)
        names = [contenders[k]["name"] for k in keys]
        colours = [_colour(k) for k in keys]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.5 * len(keys) + 1.6))
        _bars(left, names, [contenders[k]["median"]["rps"] for k in keys], colours)
        left.set_title("Requests per second (higher is better)")
        p99 = [contenders[k]["median"]["p99_ms"] for k in keys]
        p999 = [contenders[k]["median"].get("p999_ms", 0.0) for k in keys]
        positions = range(len(keys))
        right.barh(
            [p - 0.2 for p in positions], p99, height=0.4, color=colours, label="p99"
        )
        right.barh(
            [p + 0.2 for p in positions],
            p999,
            height=0.4,
            color=colours,
            alpha=0.45,
            label="p99.9",
        )
        right.set_yticks(list(positions), [""] * len(keys))
        right.invert_yaxis()
        right.legend(fontsize=8)
        right.grid(axis="x", alpha=0.3)
        right.set_title("Latency p99 and p99.9, ms (lower is better)")
        save(fig, "perf-throughput.png")

        cpu_labels = list(names)
        cpu = [contenders[k]["median"]["cpu_per_1k"] * 1000 for k in keys]
        cpu_colours = list(colours)
        tls = data.get("tls") or {}
        for key, row in (tls.get("keepalive") or {}).items():
            cpu_labels.append(f"{key} (clients over TLS)")
            cpu.append(row["median"]["cpu_per_1k"] * 1000)
            cpu_colours.append(_colour(key))
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(cpu_labels) + 1.4))
        _bars(ax, cpu_labels, cpu, cpu_colours, log=True)
        ax.set_title("CPU time per request, µs, log scale (lower is better)")
        save(fig, "perf-cpu.png")

    curves = data.get("idle_curves") or {}
    if curves:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        others = iter(PALETTE * 3)
        for name, points in curves.items():
            xs = [p["connections"] for p in points]
            ys = [(p["rss_kib"] - points[0]["rss_kib"]) / 1024 for p in points]
            ax.plot(
                xs,
                ys,
                marker="o",
                label=name,
                color=OURS if name.startswith("clerkproxy") else next(others),
                linestyle="--" if "tls" in name.lower() else "-",
            )
        ax.set_xlabel("idle keep-alive client connections held")
        ax.set_ylabel("RSS added, MiB")
        ax.set_title("Memory against idle connections (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "perf-idle-memory.png")

    handshakes = (data.get("tls") or {}).get("handshakes") or {}
    if handshakes:
        keys = sorted({k.rsplit("/", 1)[0] for k in handshakes})
        names = {
            "clerkproxy": "clerkproxy --tls-cert",
            "nginx-recipe": "nginx (recipe, ssl)",
        }
        fig, ax = plt.subplots(figsize=(8, 0.9 * len(keys) + 1.4))
        positions = range(len(keys))
        for offset, mode, alpha in ((-0.2, "off", 0.5), (0.2, "on", 1.0)):
            values = [
                handshakes[f"{k}/{mode}"]["median"]["per_cpu_second"] for k in keys
            ]
            ax.barh(
                [p + offset for p in positions],
                values,
                height=0.4,
                color=[_colour(k) for k in keys],
                alpha=alpha,
                label=f"resumption {mode}",
            )
            for p, value in zip(positions, values, strict=True):
                ax.text(value, p + offset, f" {value:,.0f}", va="center", fontsize=8)
        ax.set_yticks(list(positions), [names.get(k, k) for k in keys])
        ax.invert_yaxis()
        ax.legend(fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(
            "New TLS connections (one request each) per CPU-second (higher is better)"
        )
        save(fig, "perf-tls-handshakes.png")
    return written


def main() -> None:
    results = (
        Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results" / "latest.json"
    )
    outdir = Path(sys.argv[2]) if len(sys.argv) > 2 else HERE.parent / "docs"
    for path in render(results, outdir):
        print(path)


if __name__ == "__main__":
    main()

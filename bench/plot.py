"""PNG of scenarios 1 and 2 from a results file: ``python -m bench.plot [results.json]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.report import RESULTS_DIR


def plot(results: Path = RESULTS_DIR / "latest.json", out: Path | None = None) -> Path:
    doc: dict[str, Any] = json.loads(results.read_text())
    out = out or results.parent / "throughput.png"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))

    throughput = doc["scenarios"].get("throughput", [])
    names = list(dict.fromkeys(r["scenario"] for r in throughput))
    rtts = sorted({r["rtt_ms"] for r in throughput})
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        values = [next((r["msgs_per_s"] or 0 for r in throughput
                        if r["scenario"] == name and r["rtt_ms"] == rtt), 0) for rtt in rtts]
        xs = [j + i * width for j in range(len(rtts))]
        bars = ax1.bar(xs, values, width, label=name)
        ax1.bar_label(bars, fmt="%.0f", fontsize=8)
    ax1.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(rtts))])
    ax1.set_xticklabels([f"{rtt:.0f} ms RTT" for rtt in rtts])
    ax1.set_ylabel("messages / s (1 worker, incl. start-up)")
    ax1.set_yscale("log")
    ax1.set_title("Scenario 1: end-to-end throughput")
    ax1.legend(fontsize=7)

    scaling = doc["scenarios"].get("scaling", [])
    for name in dict.fromkeys(r["scenario"] for r in scaling):
        rows = sorted((r for r in scaling if r["scenario"] == name), key=lambda r: r["workers"])
        (line,) = ax2.plot([r["workers"] for r in rows], [r["msgs_per_s"] or 0 for r in rows], marker="o",
                           label=name)
        ax2.plot([r["workers"] for r in rows], [r.get("steady_msgs_per_s") or 0 for r in rows], marker=".",
                 linestyle=":", color=line.get_color(), alpha=0.7, label=f"{name} (steady)")
    workers = sorted({r["workers"] for r in scaling})
    if workers:
        # one connection per worker at one round trip per message: 1000 / RTT msg/s each
        rtt_ms = scaling[0]["rtt_ms"] or 1.0
        ax2.plot(workers, [w * 1000 / rtt_ms for w in workers], linestyle="--", color="grey",
                 label="limit: 1 RTT per message per connection")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.minorticks_off()
    ax2.set_xticks(workers, [str(w) for w in workers])
    ax2.set_xlabel("worker processes / concurrency")
    ax2.set_ylabel("messages / s")
    ax2.set_title(f"Scenario 2: scaling at {scaling[0]['rtt_ms']:.0f} ms RTT" if scaling else "Scenario 2")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)

    meta = doc.get("meta", {})
    fig.suptitle(f"dispatcher bench {doc.get('timestamp', '')} ({meta.get('mode', '?')}, "
                 f"{meta.get('cpu_count', '?')} cores, rq {meta.get('rq', '?')})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(plot(Path(sys.argv[1])) if len(sys.argv) > 1 else plot())

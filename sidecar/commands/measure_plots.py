"""``measure``'s PNG plots (matplotlib, Agg backend: no display needed).

* ``measure-acceptance.png``: token-weighted acceptance per temperature, one line per concurrency, P10-P90 of
  per-request acceptance as error bars, with the break-even and near-break-even lines.
* ``measure-speedup.png`` (with a baseline): throughput and TPOT speed-up per concurrency, one line per
  temperature, 95% intervals as error bars, with the no-change line at 1.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sidecar.commands.measure_stats import SPEC, MeasureResults  # noqa: E402


def _errors(values: list[float], lows: list[float | None], highs: list[float | None]) -> list[list[float]]:
    return [[max(0.0, v - (lo if lo is not None else v)) for v, lo in zip(values, lows)],
            [max(0.0, (hi if hi is not None else v) - v) for v, hi in zip(values, highs)]]


def acceptance_plot(results: MeasureResults, path: Path) -> Path:
    spec = [r for r in results.cells if r.server == SPEC and r.acceptance_rate is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for concurrency in sorted({r.concurrency for r in spec}):
        rows = sorted((r for r in spec if r.concurrency == concurrency), key=lambda r: r.temperature)
        xs = [r.temperature for r in rows]
        ys = [r.acceptance_rate for r in rows]
        ax.errorbar(xs, ys, yerr=_errors(ys, [r.acceptance_p10 for r in rows], [r.acceptance_p90 for r in rows]),
                    marker="o", capsize=3, label=f"concurrency {concurrency}")
    thresholds = results.thresholds
    ax.axhline(thresholds.break_even, color="tab:red", linestyle="--", linewidth=1,
               label=f"break-even {thresholds.break_even:g}")
    ax.axhline(thresholds.near_break_even_upper, color="tab:orange", linestyle=":", linewidth=1,
               label=f"near break-even up to {thresholds.near_break_even_upper:g}")
    ax.set_xlabel("temperature")
    ax.set_ylabel("acceptance (accepted / drafted)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{results.model}: draft acceptance ({results.prompts} prompts)\n"
                 "points: token-weighted; bars: P10-P90 of per-request acceptance", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def speedup_plot(results: MeasureResults, path: Path) -> Path | None:
    spec = [r for r in results.cells if r.server == SPEC and r.speedup is not None]
    if not spec:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110, sharey=True)
    for ax, kind, label in ((axes[0], "throughput", "output tokens/s"), (axes[1], "tpot", "TPOT P50")):
        for temperature in sorted({r.temperature for r in spec}):
            intervals = sorted(((r.concurrency, getattr(r.speedup, kind)) for r in spec if r.temperature == temperature
                                and getattr(r.speedup, kind).value), key=lambda pair: pair[0])
            if not intervals:
                continue
            xs = [concurrency for concurrency, _ in intervals]
            ys = [interval.value for _, interval in intervals]
            ax.errorbar(xs, ys, yerr=_errors(ys, [interval.ci_low for _, interval in intervals],
                                             [interval.ci_high for _, interval in intervals]),
                        marker="o", capsize=3, label=f"T={temperature:g}")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r.concurrency for r in spec}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrency (clients)")
        ax.set_title(f"speed-up of {label} (95% CI)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speculative / baseline (>1 helps)")
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"{results.model}: speculative vs baseline ({results.prompts} prompts, "
                 f"{results.max_tokens} tokens)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(results: MeasureResults, out: Path) -> list[Path]:
    paths = [acceptance_plot(results, out / "measure-acceptance.png")]
    if (speedup := speedup_plot(results, out / "measure-speedup.png")) is not None:
        paths.append(speedup)
    return paths

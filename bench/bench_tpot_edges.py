"""How well the TPOT histogram edges recover a P50 and the baseline comparison's P50 ratio (docs/scaling.md).

PromQL's ``histogram_quantile`` interpolates linearly inside a bucket, so one arm's TPOT median can be off by
a good part of its bucket's width, and a ratio of two arms' medians by both. This runs the edge sets side by
side on seeded log-normal TPOTs (medians over a range, spreads sigma) and, given ``--requests`` files from
``measure`` (requests.jsonl), on measured TPOTs: the ratio of the two servers' P50s per cell, exact against
the histogram's.

    .venv/bin/python bench/bench_tpot_edges.py [--requests run/measure/requests.jsonl ...]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from bisect import bisect_left
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar.tap.metrics import TPOT_BUCKETS
from sidecar.tap.windows import quantile

EDGE_SETS = {
    "shipped (9 edges)": TPOT_BUCKETS,
    # the alternative: steps of about 1.45x from 3 to 60 ms, two edges (16 series) more
    "1.45x steps (11 edges)": (0.003, 0.0045, 0.0065, 0.009, 0.013, 0.019, 0.027, 0.04, 0.06, 0.1, 0.3),
}


def p50(values: list[float], edges: tuple[float, ...]) -> float:
    """The P50 PromQL reads from *values* observed into *edges* (bucketed as the tap does)."""
    counts = [0] * (len(edges) + 1)
    for v in values:
        counts[bisect_left(edges, v)] += 1
    return quantile(0.5, edges, counts)


def lognormal(rng: random.Random, median: float, sigma: float, n: int) -> list[float]:
    return [median * math.exp(rng.gauss(0, sigma)) for _ in range(n)]


def simulated(low: float, high: float, rng: random.Random) -> dict[str, tuple[float, float]]:
    """Worst relative error of one P50 (sigma 0.2, 0.5, 1) and of a P50 ratio (sigma 0.3, 0.5; arms 0.7x,
    1.3x and 2x apart) over medians from *low* to *high*."""
    medians = [low * (high / low) ** (i / 24) for i in range(25)]
    out = {}
    for name, edges in EDGE_SETS.items():
        one = max(abs(p50(v := lognormal(rng, m, s, 5000), edges) / statistics.median(v) - 1)
                  for m in medians for s in (0.2, 0.5, 1.0))
        worst = 0.0
        for m in medians:
            for s in (0.3, 0.5):
                for factor in (0.7, 1.3, 2.0):
                    a, b = lognormal(rng, m, s, 2000), lognormal(rng, m * factor, s, 2000)
                    exact = statistics.median(b) / statistics.median(a)
                    worst = max(worst, abs(p50(b, edges) / p50(a, edges) / exact - 1))
        out[name] = (one, worst)
    return out


def measured(paths: list[Path]) -> list[tuple[str, float, dict[str, float]]]:
    rows = []
    for path in paths:
        cells: dict = defaultdict(list)
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("ok") and r.get("tpot_s"):
                cells[(r["temperature"], r["concurrency"], r["server"])].append(r["tpot_s"])
        for (t, c, server), base in sorted(cells.items()):
            if server != "baseline" or (t, c, "spec") not in cells:
                continue
            spec = cells[(t, c, "spec")]
            exact = statistics.median(base) / statistics.median(spec)
            rows.append((f"{path.parent.parent.name} T={t:g} C={c}", exact,
                         {name: p50(base, e) / p50(spec, e) for name, e in EDGE_SETS.items()}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=Path, nargs="*", default=[])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print("| TPOT medians | edges | worst P50 error | worst error of the P50 ratio |\n|---|---|---|---|")
    for low, high in ((0.008, 0.2), (0.002, 0.2), (0.003, 0.06)):
        for name, (one, ratio) in simulated(low, high, rng).items():
            print(f"| {low * 1000:g}–{high * 1000:g} ms | {name} | {one:.0%} | {ratio:.0%} |")
    rows = measured(args.requests)
    if rows:
        names = list(EDGE_SETS)
        print("\n| cell | exact P50 ratio | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
        for cell, exact, got in rows:
            print(f"| {cell} | {exact:.2f} | " + " | ".join(f"{got[n]:.2f} ({got[n] / exact - 1:+.0%})" for n in names) + " |")


if __name__ == "__main__":
    main()

"""The tap's cost per read of a vLLM stream, outside the event loop: the same reads through the observer's
paths side by side in one run.

    python bench/bench_tap.py [--write docs/benchmarks.md]

Reads are real-shaped vLLM 0.32 chat chunks (the layout of tests/fixtures/chat-stream.sse, usage in every
chunk) of 1, 4 and 16 events. Paths, per read:

* ``template (C)``: the stream's template, matched by ``sidecar/tap/_scan.c`` (the default);
* ``template (Python)``: the same template matched by its Python twin (where the C scan is not built);
* ``byte patterns``: the whole-read pattern counts the observer used before templates (still its path
  for reads the template does not take);
* ``JSON per event``: ``json.loads`` of every event, the obvious way.

Each figure is the best of 7 repeats of N feeds (the minimum is the least disturbed by the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sidecar.tap import observe  # noqa: E402
from sidecar.tap.observe import Outcome, SseObserver  # noqa: E402

TOKENS = (" the", " model", ",", " and", "\\n", " of", " def", "(", ' \\"x\\"', "42")
EVENT = ('data: {{"id":"chatcmpl-924a0b139de023f5","object":"chat.completion.chunk","created":1795545098,'
         '"model":"tiny-target","choices":[{{"index":0,"delta":{{"content":"{token}"}},"logprobs":null,'
         '"finish_reason":null,"token_ids":null}}],"usage":{{"prompt_tokens":3,"total_tokens":{total},'
         '"completion_tokens":{done},"completion_tokens_details":null}}}}\n\n')


def reads(events_per_read: int) -> list[bytes]:
    """512 events of a stream from its 100th token on (usage counts of three digits throughout, so one
    template takes them all), in reads of *events_per_read*."""
    out, i = [], 0
    for _ in range(512 // events_per_read):
        out.append("".join(EVENT.format(token=TOKENS[(i + k) % len(TOKENS)], total=103 + i + k, done=100 + i + k)
                           for k in range(events_per_read)).encode())
        i += events_per_read
    return out


def per_read_us(feed, data: list[bytes], number: int) -> float:
    def run() -> None:
        for chunk in data:
            feed(chunk)
    return min(timeit.repeat(run, number=number, repeat=7)) / (number * len(data)) * 1e6


def observer_feed(path: str):
    scan = observe.templated_py if path == "template (Python)" else observe.DEFAULT_SCAN
    observer, outcome = SseObserver(scan=scan), Outcome(status=200)
    if path == "byte patterns":
        def feed(chunk: bytes) -> None:
            observer._block(chunk, len(chunk), 1.0, outcome)
        return feed, observer
    return (lambda chunk: observer.feed(chunk, 1.0, outcome)), observer


def json_feed(chunk: bytes) -> None:
    for line in chunk.split(b"\n"):
        if line.startswith(b"data: {"):
            json.loads(line[6:])


def measure(number: int) -> dict[str, dict[int, float]]:
    results: dict[str, dict[int, float]] = {}
    built = observe.templated_c is not None
    for path in ("template (C)", "template (Python)", "byte patterns", "JSON per event"):
        if path == "template (C)" and not built:
            continue
        results[path] = {}
        for size in (1, 4, 16):
            data = reads(size)
            if path == "JSON per event":
                results[path][size] = per_read_us(json_feed, data, number)
                continue
            feed, observer = observer_feed(path)
            for chunk in data[:2]:  # the first read teaches the template
                feed(chunk)
            results[path][size] = per_read_us(feed, data, number)
            if path.startswith("template"):
                assert observer.templated > 0, "the template did not take the reads"
    return results


def render(results: dict[str, dict[int, float]], load: tuple[float, float]) -> str:
    lines = [
        "## Tap per read (`bench/bench_tap.py`)",
        "",
        "CPU time of the observer per read of real-shaped vLLM chat chunks (usage in every chunk), outside the",
        "event loop, best of 7 repeats; lower is better. `template (C)` is what the sidecar runs; the others",
        "are its Python twin, the byte-pattern path it used before, and a JSON parse of every event.",
        "",
        "| path | 1 event per read | 4 events | 16 events |",
        "|---|---|---|---|",
    ]
    for path, row in results.items():
        lines.append(f"| {path} | " + " | ".join(f"{row[size]:.2f} µs" for size in (1, 4, 16)) + " |")
    lines += ["", f"Run {time.strftime('%Y-%m-%d')}, one-minute load average {load[0]:.2f} before and "
                  f"{load[1]:.2f} after, Python {sys.version.split()[0]}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="update this Markdown file's section")
    parser.add_argument("--number", type=int, default=20, help="passes over the 512 events per repeat")
    args = parser.parse_args()
    before = os.getloadavg()[0]
    results = measure(args.number)
    text = render(results, (before, os.getloadavg()[0]))
    print(text)
    if args.write:
        from bench_scrape import _replace_section
        _replace_section(args.write, "## Tap per read", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Record real vLLM output for the test fixtures: /metrics over time, across a restart, and raw responses.

    .venv/bin/python tools/capture_fixtures.py --out tests/fixtures

Starts vLLM (CPU build) with the tiny pair under ``models/``: first with draft-model speculation (k=4),
sending greedy then high-temperature traffic and saving /metrics after each phase; then restarts it (counters
reset) and saves again; then an n-gram server. Raw response bytes are saved unchanged for the proxy tests.
Writes ``MANIFEST.json`` saying what each file is and what was sent before it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devstack.vllm_server import (  # noqa: E402
    DEFAULT_MODELS,
    VllmServer,
    draft_model_config,
    get_text,
    ngram_config,
    post_json,
)

PROMPTS = ["import os\n", "def main(", "class Config:\n", "for line in ", "    return self.", "from typing import "]


def traffic(url: str, temperature: float | None, count: int, max_tokens: int = 32) -> list[dict]:
    def one(i: int) -> dict:
        body = {"model": "tiny-target", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens}
        if temperature is not None:
            body["temperature"] = temperature
        return post_json(url + "/v1/completions", body)

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def raw(url: str, path: str, body: dict) -> bytes:
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read()


def spec_sums(responses: list[dict]) -> dict:
    accepted = sum(r["metrics"]["speculative_decoding"]["num_accepted_draft_tokens"] for r in responses)
    drafted = sum(r["metrics"]["speculative_decoding"]["num_draft_tokens"] for r in responses)
    return {"requests": len(responses), "accepted": accepted, "draft_tokens": drafted}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures"))
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    parser.add_argument("--log", type=Path, default=Path(".cache/capture-vllm.log"))
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, dict] = {}
    version = None

    def save(name: str, data: bytes | str, what: str, **facts: object) -> None:
        path = out / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        manifest[name] = {"what": what, **facts}
        print(f"saved {name}: {what}", flush=True)

    draft = VllmServer(
        model=args.models / "tiny-target",
        speculative=draft_model_config(args.models / "tiny-draft"),
        log_path=args.log,
    )
    with draft:
        version = get_text(draft.url + "/version")
        save("vllm-0.32-draft-t0.prom", get_text(draft.url + "/metrics"), "draft-model k=4, idle after start")
        greedy = traffic(draft.url, 0.0, 24)
        save("vllm-0.32-draft-t1.prom", get_text(draft.url + "/metrics"), "after greedy traffic",
             sent=spec_sums(greedy), temperature=0.0)
        greedy2 = traffic(draft.url, 0.0, 24)
        save("vllm-0.32-draft-t2.prom", get_text(draft.url + "/metrics"), "after more greedy traffic",
             sent=spec_sums(greedy2), temperature=0.0)
        hot = traffic(draft.url, 1.0, 24)
        save("vllm-0.32-draft-t3.prom", get_text(draft.url + "/metrics"), "after temperature 1.0 traffic",
             sent=spec_sums(hot), temperature=1.0)
        completion = {"model": "tiny-target", "prompt": "import os\n", "max_tokens": 24, "temperature": 0}
        save("completion-nonstream.json", raw(draft.url, "/v1/completions", completion), "non-streaming completion")
        save("completion-stream.sse", raw(draft.url, "/v1/completions", {**completion, "stream": True}),
             "streaming completion (force-include-usage)")
        chat = {"model": "tiny-target", "messages": [{"role": "user", "content": "import sys"}],
                "max_tokens": 24, "temperature": 0.0}
        save("chat-nonstream.json", raw(draft.url, "/v1/chat/completions", chat), "non-streaming chat")
        save("chat-stream.sse", raw(draft.url, "/v1/chat/completions", {**chat, "stream": True}),
             "streaming chat (force-include-usage)")
        time.sleep(1)
        save("vllm-0.32-draft-t4.prom", get_text(draft.url + "/metrics"), "after the raw responses above")
    with draft:  # same server restarted: every counter starts from zero
        after = traffic(draft.url, 0.0, 8)
        save("vllm-0.32-draft-restarted.prom", get_text(draft.url + "/metrics"), "restarted, then greedy traffic",
             sent=spec_sums(after), temperature=0.0)

    ngram = VllmServer(model=args.models / "tiny-target", speculative=ngram_config(), log_path=args.log)
    with ngram:
        traffic(ngram.url, 0.0, 16)
        save("vllm-0.32-ngram.prom", get_text(ngram.url + "/metrics"), "n-gram k=4 after greedy traffic")

    plain = VllmServer(model=args.models / "tiny-target", speculative=draft_model_config(args.models / "tiny-draft"),
                       per_request_metrics=False, log_path=args.log)
    with plain:
        save("completion-stream-no-spec-metrics.sse",
             raw(plain.url, "/v1/completions", {**completion, "stream": True}),
             "streaming completion without --per-request-spec-decode-metrics")
        save("vllm-0.32-draft-no-per-request.prom", get_text(plain.url + "/metrics"),
             "draft-model server without per-request metrics, after one streamed request")

    (out / "MANIFEST.json").write_text(
        json.dumps({"vllm_version": json.loads(version)["version"] if version else None, "files": manifest},
                   indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

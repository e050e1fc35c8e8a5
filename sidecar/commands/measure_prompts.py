"""Prompt sets for ``measure``: what the requests ask for decides how much a drafter can guess.

* ``echo``: asks to repeat a piece of code given in the prompt. A prompt-lookup (n-gram) drafter finds the
  continuation in the prompt, so at temperature 0 most drafts are accepted: the best case.
* ``code``: free-form code to continue; nothing to copy, drafts are accepted only where code repeats itself.
* ``chat``: short chat messages through ``/v1/chat/completions``.
* ``FILE.jsonl``: one JSON object a line, ``{"prompt": "..."}`` (completions) or ``{"messages": [...]}``
  (chat), optionally with ``"max_tokens"``.

Requests cycle through the set, so every cell sees the same prompts in the same order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BUILTIN = ("echo", "code", "chat")


@dataclass(frozen=True, slots=True)
class Prompt:
    """One request's input: ``prompt`` for /v1/completions or ``messages`` for /v1/chat/completions."""

    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    max_tokens: int | None = None

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.messages is not None else "/v1/completions"

    def body(self) -> dict:
        if self.messages is not None:
            return {"messages": [dict(m) for m in self.messages]}
        return {"prompt": self.prompt}


@dataclass(frozen=True, slots=True)
class PromptSet:
    """The prompts of a run and the name they were chosen by (``echo`` ... or the file), for results.json."""

    name: str
    prompts: tuple[Prompt, ...]


_SNIPPETS = (
    '''def merge_intervals(intervals):
    """Merge overlapping (start, end) pairs and return them sorted."""
    result = []
    for start, end in sorted(intervals):
        if result and start <= result[-1][1]:
            result[-1] = (result[-1][0], max(result[-1][1], end))
        else:
            result.append((start, end))
    return result
''',
    '''class LineCounter:
    def __init__(self, path):
        self.path = path
        self.counts = {}

    def count(self):
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                key = line.strip()
                self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts
''',
    '''def parse_header(line):
    name, _, value = line.partition(":")
    name = name.strip().lower()
    value = value.strip()
    if not name:
        raise ValueError("empty header name")
    return name, value


def parse_headers(lines):
    headers = {}
    for line in lines:
        name, value = parse_header(line)
        headers[name] = value
    return headers
''',
    '''import os


def walk_sizes(root):
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            if os.path.isfile(path):
                total += os.path.getsize(path)
    return total
''',
)

_CODE_STARTS = (
    "def read_config(path):\n",
    "class Cache:\n    def __init__(self, size):\n",
    "import sys\n\n\ndef main(argv):\n",
    "def _split_words(text, sep=None):\n",
    "class Request:\n",
    "for index, item in enumerate(",
)

_CHAT = (
    "Write a function that reverses a list.",
    "How do I read a file line by line?",
    "Explain what a dictionary is used for.",
    "Write a class that stores a counter.",
)


def echo_prompt(snippet: str) -> str:
    """The code, then a request to repeat it, then its first line so the copy has started."""
    first = snippet.splitlines(keepends=True)[0]
    return f"# Repeat this code exactly.\n\n{snippet}\n# The same code again:\n\n{first}"


def builtin(name: str) -> list[Prompt]:
    if name == "echo":
        return [Prompt(prompt=echo_prompt(s)) for s in _SNIPPETS]
    if name == "code":
        return [Prompt(prompt=p) for p in _CODE_STARTS]
    if name == "chat":
        return [Prompt(messages=({"role": "user", "content": c},)) for c in _CHAT]
    raise ValueError(f"unknown prompt set {name!r}")


def load(spec: str) -> list[Prompt]:
    """``echo``, ``code``, ``chat`` or a JSONL file path; raises ValueError naming what is wrong."""
    if spec in BUILTIN:
        return builtin(spec)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"{spec!r} is neither one of {', '.join(BUILTIN)} nor a readable file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"{spec}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{spec}: not UTF-8 text") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise ValueError(f"{spec}:{number}: not JSON") from None
        if not isinstance(item, dict):
            raise ValueError(f"{spec}:{number}: not a JSON object")
        max_tokens = item.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
            raise ValueError(f"{spec}:{number}: max_tokens must be a positive integer")
        if isinstance(item.get("prompt"), str):
            prompts.append(Prompt(prompt=item["prompt"], max_tokens=max_tokens))
        elif isinstance(item.get("messages"), list) and all(isinstance(m, dict) for m in item["messages"]):
            prompts.append(Prompt(messages=tuple(item["messages"]), max_tokens=max_tokens))
        else:
            raise ValueError(f"{spec}:{number}: needs a string 'prompt' or a list 'messages'")
    if not prompts:
        raise ValueError(f"{spec}: no prompts")
    return prompts


def load_set(spec: str) -> PromptSet:
    """``load`` keeping the name the set was chosen by."""
    return PromptSet(spec, tuple(load(spec)))

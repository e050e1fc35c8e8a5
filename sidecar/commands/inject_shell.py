"""Finding and rewriting vLLM's server command inside a ``sh -c`` script, for ``specdec-sidecar inject``.

A small lexer of POSIX shell words (quotes, escapes, ``$`` expansions, comments, line continuations,
command separators) that keeps each word's place in the script, so the rewrite changes only the words it
must (the value of ``--port``/``--host``) and inserts the added flags right after the server's last
argument. Anything it cannot read for certain (a here-document, a port that comes from a variable, two
servers in one script) is reported as :class:`ShellError` and the object is left alone.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

SHELLS = {"sh", "bash", "ash", "dash", "zsh", "ksh"}
# words that run the command after them (with their own options/assignments skipped)
PREFIX_COMMANDS = {"exec", "nohup", "env", "command"}
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = ("&&", "||", ";;", ";", "&", "|", "(", ")", "\n")
REDIRECTIONS = re.compile(r"\d*(>>|>&|<&|>\||<>|>|<)")


class ShellError(ValueError):
    """The script cannot be rewritten with certainty; the message says why."""


@dataclass(frozen=True)
class Word:
    start: int  # offsets into the script
    end: int
    value: str  # after quote removal
    dynamic: bool  # holds an unquoted or double-quoted expansion ($x, ${x}, $(...), `...`)


def _skip_balanced(script: str, i: int, opening: str, closing: str) -> int:
    """Index just past the *closing* that matches the *opening* at ``script[i]``, quotes respected."""
    depth = 0
    n = len(script)
    while i < n:
        ch = script[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "'":
            end = script.find("'", i + 1)
            if end < 0:
                raise ShellError("unterminated single quote")
            i = end + 1
            continue
        if ch == '"':
            i = _skip_double_quoted(script, i + 1)[0]
            continue
        if ch == opening:
            depth += 1
        elif ch == closing:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ShellError(f"unbalanced {opening}{closing}")


def _expansion_end(script: str, i: int) -> int:
    """``script[i] == '$'``: index just past the expansion that starts there."""
    nxt = script[i + 1] if i + 1 < len(script) else ""
    if nxt == "(":
        return _skip_balanced(script, i + 1, "(", ")")
    if nxt == "{":
        return _skip_balanced(script, i + 1, "{", "}")
    j = i + 1
    while j < len(script) and (script[j].isalnum() or script[j] == "_"):
        j += 1
    if j == i + 1 and j < len(script) and script[j] in "@*#?$!-0123456789":
        j += 1
    return j


def _skip_double_quoted(script: str, i: int) -> tuple[int, str, bool]:
    """From just inside an opening ``"``: (index past the closing quote, the text, whether it expands)."""
    out: list[str] = []
    dynamic = False
    n = len(script)
    while i < n:
        ch = script[i]
        if ch == '"':
            return i + 1, "".join(out), dynamic
        if ch == "\\" and i + 1 < n and script[i + 1] in '$`"\\\n':
            if script[i + 1] != "\n":
                out.append(script[i + 1])
            i += 2
            continue
        if ch == "$" and i + 1 < n and (script[i + 1] in "({_@*#?!-" or script[i + 1].isalnum()):
            end = _expansion_end(script, i)
            out.append(script[i:end])
            dynamic = True
            i = end
            continue
        if ch == "`":
            end = script.find("`", i + 1)
            if end < 0:
                raise ShellError("unterminated backquote")
            out.append(script[i : end + 1])
            dynamic = True
            i = end + 1
            continue
        out.append(ch)
        i += 1
    raise ShellError("unterminated double quote")


def tokenize(script: str) -> list[Word | str]:
    """Words and separators (as plain strings: ``;``, ``&&``, ``\\n`` …); redirection operators are
    returned as strings starting with ``<`` or ``>`` (or digits then one of those)."""
    tokens: list[Word | str] = []
    i = 0
    n = len(script)
    while i < n:
        ch = script[i]
        if ch in " \t\r":
            i += 1
            continue
        if ch == "\\" and i + 1 < n and script[i + 1] == "\n":
            i += 2
            continue
        if ch == "#":
            end = script.find("\n", i)
            i = n if end < 0 else end
            continue
        if script.startswith("<<", i):
            raise ShellError("here-documents are not rewritten")
        sep = next((s for s in SEPARATORS if script.startswith(s, i)), None)
        if sep is not None:
            tokens.append(sep)
            i += len(sep)
            continue
        redirect = REDIRECTIONS.match(script, i)
        if redirect:
            tokens.append(redirect.group(0))
            i = redirect.end()
            continue
        # a word: runs until unquoted whitespace or an operator character
        start = i
        out: list[str] = []
        dynamic = False
        while i < n:
            ch = script[i]
            if ch in " \t\r\n;&|()<>":
                break
            if ch == "\\":
                if i + 1 < n and script[i + 1] == "\n":
                    i += 2
                    continue
                if i + 1 < n:
                    out.append(script[i + 1])
                i += 2
                continue
            if ch == "'":
                end = script.find("'", i + 1)
                if end < 0:
                    raise ShellError("unterminated single quote")
                out.append(script[i + 1 : end])
                i = end + 1
                continue
            if ch == '"':
                i, text, dyn = _skip_double_quoted(script, i + 1)
                out.append(text)
                dynamic = dynamic or dyn
                continue
            if ch == "$" and i + 1 < n and script[i + 1] not in " \t\r\n;&|<>\"'":
                end = _expansion_end(script, i)
                out.append(script[i:end])
                dynamic = True
                i = end
                continue
            if ch == "`":
                end = script.find("`", i + 1)
                if end < 0:
                    raise ShellError("unterminated backquote")
                out.append(script[i : end + 1])
                dynamic = True
                i = end + 1
                continue
            out.append(ch)
            i += 1
        tokens.append(Word(start, i, "".join(out), dynamic))
    return tokens


def simple_commands(tokens: list[Word | str]) -> list[tuple[list[Word], list[Word]]]:
    """Each simple command as (argument words, redirection targets)."""
    commands: list[tuple[list[Word], list[Word]]] = []
    words: list[Word] = []
    targets: list[Word] = []
    expect_target = False
    for token in tokens:
        if isinstance(token, Word):
            if expect_target:
                targets.append(token)
                expect_target = False
            else:
                words.append(token)
            continue
        if token not in SEPARATORS:  # a redirection: the next word is its target, not an argument
            expect_target = True
            continue
        if words or targets:
            commands.append((words, targets))
        words, targets = [], []
    if words or targets:
        commands.append((words, targets))
    return commands


def server_args_start(values: list[str]) -> int | None:
    """Index of vLLM's OpenAI-server arguments in *values* when they start that server (``vllm serve``,
    ``python -m vllm.entrypoints.openai.api_server``, after assignments and exec/env/nohup), else None."""
    i = 0
    while i < len(values):
        word = values[i]
        if ASSIGNMENT.match(word):
            i += 1
            continue
        if os.path.basename(word) in PREFIX_COMMANDS:
            i += 1
            while i < len(values) and values[i].startswith("-") and values[i] != "-":
                i += 1
            continue
        break
    rest = values[i:]
    if len(rest) >= 2 and os.path.basename(rest[0]) == "vllm" and rest[1] == "serve":
        return i + 2
    if len(rest) >= 3 and re.fullmatch(r"python[0-9.]*", os.path.basename(rest[0])):
        if rest[1] == "-m" and rest[2] == "vllm.entrypoints.openai.api_server":
            return i + 3
    if len(rest) >= 2 and re.fullmatch(r"python[0-9.]*", os.path.basename(rest[0])):
        if rest[1] == "-mvllm.entrypoints.openai.api_server":
            return i + 2
    return None


def shell_script_index(argv: list[str]) -> int | None:
    """Index of the script in ``sh -c SCRIPT …`` (options such as ``-e``, ``-ec``, ``--login`` allowed),
    or None when *argv* is not a shell running a script."""
    if not argv or os.path.basename(argv[0]) not in SHELLS:
        return None
    for j in range(1, len(argv)):
        word = argv[j]
        if word.startswith("--"):
            continue
        if re.fullmatch(r"-[a-zA-Z]+", word):
            if "c" in word[1:]:
                return j + 1 if j + 1 < len(argv) else None
            continue
        return None
    return None


@dataclass(frozen=True)
class ScriptServer:
    """vLLM's server command found in a script: its argument words (after ``serve``)."""

    args: list[Word]
    all_words: list[Word]


def find_server(script: str) -> ScriptServer | None:
    """The one vLLM server command of *script*; None when there is none; ShellError when it cannot be
    read for certain or there are several."""
    found = []
    for words, _targets in simple_commands(tokenize(script)):
        start = server_args_start([w.value for w in words])
        if start is not None:
            if any(w.dynamic for w in words[:start]):
                raise ShellError("the command that starts vLLM is built from variables")
            found.append(ScriptServer(words[start:], words))
    if len(found) > 1:
        raise ShellError(f"{len(found)} vLLM server commands in one script")
    return found[0] if found else None


def quote(value: str) -> str:
    return value if re.fullmatch(r"[A-Za-z0-9_./:,=+@%-]+", value) else "'" + value.replace("'", "'\\''") + "'"

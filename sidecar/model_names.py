"""The bounded set of ``model`` label values, shared by the tap and the poll loop.

A request's ``model`` becomes a label only when it is a name vLLM serves: from ``--models`` when given,
otherwise the union of what vLLM's ``/v1/models`` lists and the ``model_name`` values its ``/metrics``
carries (the latter needs no API key, so a vLLM run with ``--api-key`` still gets proper labels). Anything
else is ``other``; a request with no model is ``unknown``.

Aliases (``--served-model-name a b``) share one ``root`` in ``/v1/models``; vLLM labels its own series with
the first name, so every alias is labelled with that first name and the tap's series join vLLM's. LoRA
adapters keep their own name (their acceptance differs from the base model's); vLLM counts their tokens
under the base model in its own series.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

OTHER_MODEL = "other"
UNKNOWN_MODEL = "unknown"
MAX_NAMES = 64  # per source: a bound on label values whatever vLLM lists


class ModelNames:
    def __init__(self, allowlist: Iterable[str] = ()) -> None:
        self._fixed = frozenset(allowlist)
        self._served: frozenset[str] = frozenset()
        self._scraped: frozenset[str] = frozenset()
        self._aliases: Mapping[str, str] = {}

    def update_served(self, names: Iterable[str], aliases: Mapping[str, str] | None = None) -> None:
        """What ``/v1/models`` lists; *aliases* maps an alias to the name vLLM's series use."""
        if self._fixed:
            return
        self._served = frozenset(list(names)[:MAX_NAMES])
        self._aliases = dict(list((aliases or {}).items())[:MAX_NAMES])

    def update_scraped(self, names: Iterable[str]) -> None:
        """The ``model_name`` values of the last successful poll of ``/metrics``."""
        if not self._fixed:
            self._scraped = frozenset(list(names)[:MAX_NAMES])

    def label(self, model: str | None) -> str:
        if model is None:
            return UNKNOWN_MODEL
        if self._fixed:
            return model if model in self._fixed else OTHER_MODEL
        model = self._aliases.get(model, model)
        return model if model in self._served or model in self._scraped else OTHER_MODEL


def served_names(listing: object) -> tuple[list[str], dict[str, str]]:
    """(ids, alias -> canonical name) from a ``/v1/models`` answer; malformed entries are skipped.

    Entries sharing a ``root`` are aliases of one model: the first listed is the name vLLM's series use.
    """
    data = listing.get("data") if isinstance(listing, dict) else None
    ids: list[str] = []
    aliases: dict[str, str] = {}
    first_by_root: dict[str, str] = {}
    for entry in data if isinstance(data, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        name = entry["id"]
        ids.append(name)
        root, parent = entry.get("root"), entry.get("parent")
        if isinstance(root, str) and not parent:
            canonical = first_by_root.setdefault(root, name)
            if canonical != name:
                aliases[name] = canonical
    return ids, aliases

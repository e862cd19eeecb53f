"""The egress guard: the last check before anything leaves a site.

It knows only names and roles (from the factor manifest), the site policy's tensor-name patterns
and its byte limit, never the model, so it can be read and audited on its own. A tensor leaves
only when the coordinator's manifest declares it shared AND the site's own patterns allow it: the
manifest is the coordinator's word, the patterns are the site's. A refusal is logged and raised;
nothing is sent.
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Iterable, Mapping

log = logging.getLogger(__name__)


class EgressRefused(PermissionError):
    def __init__(self, names: list[str], roles: Mapping[str, str], rule: str = "manifest", detail: str = ""):
        self.names, self.rule = names, rule
        if detail:
            super().__init__(detail)
            return
        described = ", ".join(f"{n} ({roles.get(n, 'not in the manifest')})" for n in names)
        super().__init__(f"egress guard refused tensors not declared shared: {described}")


class EgressGuard:
    def __init__(self, roles: Mapping[str, str], site: str, *, patterns: Iterable[str] = ("*",),
                 max_bytes: int = 0):
        """`roles`: tensor name -> "shared" | "private" | "frozen", from the factor manifest;
        `patterns`: the site policy's names that may leave; `max_bytes`: one update's limit (0: none)."""
        self.roles = dict(roles)
        self.site = site
        self.patterns = tuple(patterns)
        self.max_bytes = int(max_bytes)
        self.allowed = frozenset(n for n, r in self.roles.items() if r == "shared")

    def check(self, tensors: Mapping[str, object] | Iterable[str], destination: str) -> None:
        """`tensors`: the update (name -> array, its bytes counted) or only its names."""
        names = list(tensors)
        refused = sorted(n for n in names if n not in self.allowed)
        if refused:
            self._refuse(EgressRefused(refused, self.roles), destination)
        outside = sorted(n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in self.patterns))
        if outside:
            self._refuse(EgressRefused(outside, self.roles, "egress.tensor_patterns",
                                       f"site policy egress.tensor_patterns: {len(outside)} tensors no pattern "
                                       f"allows, e.g. {outside[0]!r}"), destination)
        size = sum(int(getattr(a, "nbytes", 0)) for a in tensors.values()) if isinstance(tensors, Mapping) else 0
        if self.max_bytes and size > self.max_bytes:
            self._refuse(EgressRefused(names, self.roles, "egress.max_upload_bytes",
                                       f"site policy egress.max_upload_bytes: the update is {size} bytes, more "
                                       f"than {self.max_bytes}"), destination)
        log.info("egress allowed at %s -> %s: %d shared tensors", self.site, destination, len(names))

    def _refuse(self, error: EgressRefused, destination: str) -> None:
        log.error("egress refused at %s -> %s: %s", self.site, destination, error)
        raise error

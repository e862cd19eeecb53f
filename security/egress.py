"""The egress guard: the last check before anything leaves a site.

It knows only names and roles (from the factor manifest), never the model, so it can be read and
audited on its own. A refusal is logged and raised; nothing is sent.
"""
from __future__ import annotations

import logging
from typing import Iterable, Mapping

log = logging.getLogger(__name__)


class EgressRefused(PermissionError):
    def __init__(self, names: list[str], roles: Mapping[str, str]):
        self.names = names
        described = ", ".join(f"{n} ({roles.get(n, 'not in the manifest')})" for n in names)
        super().__init__(f"egress guard refused tensors not declared shared: {described}")


class EgressGuard:
    def __init__(self, roles: Mapping[str, str], site: str):
        """`roles`: tensor name -> "shared" | "private" | "frozen", from the factor manifest."""
        self.roles = dict(roles)
        self.site = site
        self.allowed = frozenset(n for n, r in self.roles.items() if r == "shared")

    def check(self, names: Iterable[str], destination: str) -> None:
        names = list(names)
        refused = sorted(n for n in names if n not in self.allowed)
        if refused:
            error = EgressRefused(refused, self.roles)
            log.error("egress refused at %s -> %s: %s", self.site, destination, error)
            raise error
        log.info("egress allowed at %s -> %s: %d shared tensors", self.site, destination, len(names))

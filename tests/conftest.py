"""Shared fixtures: a real PKI, real coordinator and participant processes on 127.0.0.1."""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import grpc
import pytest
import torch

from ktfed.launcher import Federation, free_port, make_pki
from ktfed.launcher import _spawn as spawn
from ktfed.operator import OperatorClient
from tests import fault_harness

SITES = ["site-a", "site-b", "site-c"]

# Two shared cores: torch's own threads would fight the coordinator and participant processes.
torch.set_num_threads(1)


# a bound on a site's pull on the mean (README "One site's pull on the mean") that leaves whole the
# synthetic updates some tests fold: every element one value, L2 norms in the hundreds
WIDE_BOUND = "[secagg]\nclip_norm = 1e9\n"


def fast_config(rounds: int = 3, min_sites: int = 2, timeout: float = 60, sites=SITES,
                adapter: str = "waffle", epochs: int = 2, max_chunk_bytes: int = 1 << 20, extra: str = "") -> str:
    """A run on sklearn digits: small enough that a round takes a fraction of a second."""
    names = ", ".join(f'"{s}"' for s in sites)
    return f"""
[federation]
rounds = {rounds}
min_sites = {min_sites}
round_timeout_s = {timeout}
sites = [{names}]
max_chunk_bytes = {max_chunk_bytes}
seed = 3

[model]
adapter = "{adapter}"
hidden = [64]
n_factors = 8
seed = 3

[train]
epochs = {epochs}
batch_size = 32
lr = 0.05

[data]
dataset = "digits"

[data.partition]
scheme = "dirichlet"
alpha = 1.0
seed = 3
{extra}
"""


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory) -> Path:
    """One federation CA for the whole session, with the usual cast of certificates."""
    path = tmp_path_factory.mktemp("pki") / "pki"
    make_pki(path, SITES + ["site-x"])
    return path


class LocalFederation(Federation):
    """A Federation whose PKI is shared across tests and which knows how to wait for things."""

    def __init__(self, workdir: Path, pki: Path):
        super().__init__(workdir, f"127.0.0.1:{free_port()}")
        self._pki = pki
        self._client: OperatorClient | None = None

    @property
    def pki(self) -> Path:  # type: ignore[override]
        return self._pki

    def start_participant(self, site: str, env: dict | None = None, args: list[str] | None = None):
        """A participant process; one asked for a fault (tests/fault_harness.py) runs through the harness."""
        if not fault_harness.wanted(env):
            return super().start_participant(site, env, args)
        cmd = fault_harness.command(self.participant_command(site)) + list(args or ())
        self.participants[site] = spawn(cmd, self.workdir / "logs" / f"{site}.out", fault_harness.environment(env))
        return self.participants[site]

    def start_coordinator(self, config: Path | None = None, env: dict | None = None, args: list[str] | None = None):
        """The coordinator process; one asked for a fault (tests/fault_harness.py) runs through the harness."""
        if not fault_harness.wanted(env):
            return super().start_coordinator(config, env, args)
        cmd = fault_harness.command(self.coordinator_command(config)) + list(args or ())
        self.coordinator = spawn(cmd, self.workdir / "logs" / "coordinator.out", fault_harness.environment(env))
        return self.coordinator

    def write_config(self, text: str) -> Path:
        path = self.workdir / "run.toml"
        path.write_text(text)
        return path

    @property
    def client(self) -> OperatorClient:
        if self._client is None:
            self._client = OperatorClient(self.address, self.operator_tls())
        return self._client

    def wait_serving(self, timeout: float = 60) -> None:
        self.wait_for(lambda: self.client.serving(), timeout, "the coordinator to serve")

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = predicate()
            except grpc.RpcError as err:  # a coordinator that is (re)starting is not an answer yet
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.tail_logs()}")
            time.sleep(0.1)

    def status(self):
        return self.client.status()

    def wait_rounds(self, n: int, timeout: float = 120):
        return self.wait_for(lambda: (s := self.status()).rounds_completed >= n and s, timeout,
                             f"{n} completed rounds")

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.workdir / "coordinator" / "coordinator.sqlite3")

    def log(self, name: str = "coordinator") -> str:
        path = self.workdir / "logs" / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def tail_logs(self, lines: int = 15) -> str:
        out = []
        for path in sorted((self.workdir / "logs").glob("*")):
            out.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def close_client(self) -> None:
        """Forget the operator channel (e.g. across a coordinator restart)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self.shutdown()


@pytest.fixture
def federation(tmp_path, pki_dir):
    fed = LocalFederation(tmp_path, pki_dir)
    yield fed
    fed.close()

"""The coordinator's core: runs, their round engines, and resumption after a restart.

No gRPC server here (see server.py) so tests can drive it directly.
"""
from __future__ import annotations

import logging
import threading
import uuid

import numpy as np

from coordinator import secagg_round
from coordinator.rounds import Refusal, RoundEngine
from coordinator.store import CorruptStateError, Store
from coordinator.strategy import FedAvg
from kt_core.config import ConfigError, RunConfig
from kt_core.manifest import FactorManifest, Role, manifest_of
from kt_core.models import build_model, shared_state

import grpc

log = logging.getLogger(__name__)


def initial_state(config: RunConfig) -> tuple[FactorManifest, dict[str, np.ndarray]]:
    """The round-0 model: built from the run's seed, exactly as every site builds it."""
    model = build_model(config.model)
    return manifest_of(model), {n: t.numpy() for n, t in shared_state(model).items()}


def shared_specs(manifest: FactorManifest) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {e.name: (e.dtype, tuple(e.shape)) for e in manifest.entries if e.role == Role.SHARED}


class Coordinator:
    def __init__(self, store: Store):
        self.store = store
        self.engine: RoundEngine | None = None
        self.manifest: FactorManifest | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def resume(self) -> bool:
        """Pick up the unfinished run, if any; raises CorruptStateError on a bad state file."""
        record = self.store.active_run()
        if record is None:
            return False
        config = RunConfig.from_json(record.config_json)
        manifest = FactorManifest.from_json(record.manifest_json)
        self.store.sweep(record.run_id)
        self._start_engine(record.run_id, config, manifest)
        log.info("resumed run %s at round %d", record.run_id, self.engine.rounds_completed)
        return True

    def start_run(self, config: RunConfig) -> str:
        with self._lock:
            if self.engine is not None and self.engine.state == "running":
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                              f"run {self.engine.run_id} is still running; stop it first")
            config = config.resolved()
            manifest, state = initial_state(config)
            try:
                secagg_round.check_config(config, shared_specs(manifest))
            except ConfigError as err:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
            run_id = "run-" + uuid.uuid4().hex[:12]
            self.store.create_run(run_id, config.to_json(), manifest.to_json(), state)
            self._start_engine(run_id, config, manifest)
            log.info("started run %s: %d rounds, sites %s, model %s with %d shared parameters",
                     run_id, config.federation.rounds, ", ".join(config.federation.sites),
                     config.model.mode, manifest.shared_numel())
            if config.secagg.enabled:
                log.info("run %s: secure aggregation on (%s)", run_id, config.secagg)
            return run_id

    def _start_engine(self, run_id: str, config: RunConfig, manifest: FactorManifest) -> None:
        self.manifest = manifest
        self.engine = RoundEngine(self.store, run_id, config, shared_specs(manifest),
                                  FedAvg(config.federation.server_lr))
        self._thread = threading.Thread(target=self.engine.run, name=f"rounds-{run_id}", daemon=True)
        self._thread.start()

    def current(self) -> RoundEngine:
        if self.engine is None:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "no run has been started on this coordinator")
        return self.engine

    def engine_for(self, run_id: str) -> RoundEngine:
        engine = self.current()
        if run_id != engine.run_id:
            raise Refusal(grpc.StatusCode.NOT_FOUND, f"unknown run id {run_id!r} (current run is {engine.run_id})")
        return engine

    def stop(self, reason: str = "stopped") -> None:
        if self.engine is not None:
            self.engine.stop(reason)
            if reason == "stopped":
                self.store.set_run_state(self.engine.run_id, "stopped")
        if self._thread is not None:
            self._thread.join(timeout=10)


__all__ = ["Coordinator", "CorruptStateError", "initial_state"]

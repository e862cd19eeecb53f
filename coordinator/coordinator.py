"""The coordinator's core: runs, their round engines, and resumption after a restart.

No gRPC server here (see server.py) so tests can drive it directly.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
import uuid

import numpy as np

from coordinator import secagg_round
from coordinator.audit_trail import AuditTrail
from coordinator.hosting import HostedBackbone, HostingError
from coordinator.rounds import Refusal, RoundEngine
from coordinator.store import CorruptStateError, Store
from coordinator.strategy import FedAvg
from kt_core.config import ConfigError, RunConfig
from kt_core.manifest import FactorManifest, Role, manifest_of
from kt_core import tasks
from kt_core.models import shared_state

import grpc

log = logging.getLogger(__name__)


def initial_state(config: RunConfig) -> tuple[FactorManifest, dict[str, np.ndarray]]:
    """The round-0 model: built from the run's seed, exactly as every site builds it."""
    backbone = Path(config.vln.backbone) if config.task.kind == "vln" else None
    model = tasks.build(config, backbone).model
    return manifest_of(model), {n: t.numpy() for n, t in shared_state(model).items()}


def host_backbone(config: RunConfig) -> tuple[RunConfig, HostedBackbone | None]:
    """A VLN run hosts its backbone checkpoint: digest it and name the digest in the run config."""
    if config.task.kind != "vln":
        return config, None
    if not config.vln.backbone:
        raise ConfigError("vln.backbone: a vln run needs the path of a pretrained checkpoint (ktfed pretrain)")
    try:
        hosted = HostedBackbone.open(config.vln.backbone)
    except HostingError as err:
        raise ConfigError(f"vln.backbone: {err}") from None
    if config.vln.backbone_sha256 and config.vln.backbone_sha256 != hosted.sha256:
        raise ConfigError(f"vln.backbone: {hosted.path} has sha256 {hosted.sha256[:16]}…, but the run names "
                          f"{config.vln.backbone_sha256[:16]}… (the checkpoint was replaced)")
    return tasks.with_backbone_digest(config, hosted.sha256), hosted


def shared_specs(manifest: FactorManifest) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {e.name: (e.dtype, tuple(e.shape)) for e in manifest.entries if e.role == Role.SHARED}


class Coordinator:
    def __init__(self, store: Store, trail: AuditTrail | None = None):
        self.store = store
        self.trail = trail or AuditTrail(None, "coordinator")
        self.engine: RoundEngine | None = None
        self.manifest: FactorManifest | None = None
        self.backbone: HostedBackbone | None = None   # the run's frozen checkpoint, when it has one
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def resume(self) -> bool:
        """Pick up the unfinished run, if any; raises CorruptStateError on a bad state file."""
        record = self.store.active_run()
        if record is None:
            return False
        config = RunConfig.from_json(record.config_json)
        manifest = FactorManifest.from_json(record.manifest_json)
        try:
            config, self.backbone = host_backbone(config)
        except ConfigError as err:
            raise CorruptStateError(f"run {record.run_id}: {err}") from None
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
            try:
                tasks.check_levels(config)
                config, hosted = host_backbone(config)
                manifest, state = initial_state(config)
            except ConfigError as err:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
            self.backbone = hosted
            try:
                secagg_round.check_config(config, shared_specs(manifest))
            except ConfigError as err:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
            run_id = "run-" + uuid.uuid4().hex[:12]
            self.store.create_run(run_id, config.to_json(), manifest.to_json(), state)
            self.trail.config(run_id, json.loads(config.to_json()))
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
                                  FedAvg(config.federation.server_lr), trail=self.trail)
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

"""The coordinator's core: runs, their round engines, and resumption after a restart.

No gRPC server here (see server.py) so tests can drive it directly.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Callable
import uuid

import numpy as np

from coordinator import secagg_round
from coordinator.audit_trail import AuditTrail
from coordinator.hosting import HostedBackbone, HostingError
from coordinator.limits import ServerCapacity
from coordinator.errors import Code, Refusal
from coordinator.rounds import RoundEngine
from coordinator.store import CorruptStateError, Store
from coordinator.strategy import strategy_for
from kt_core.config import ConfigError, RunConfig
from kt_core.manifest import FactorManifest, Role, manifest_of
from kt_core import tasks
from kt_core.python_task import TaskMismatch
from kt_core.models import shared_state

log = logging.getLogger(__name__)


class ResumeRefused(ValueError):
    """The unfinished run cannot go on here as it was started; the message says what to do."""


def backbone_path(config: RunConfig) -> Path | None:
    """The checkpoint the run hosts for its sites, or None when its task hosts none. The one place
    the coordinator asks what kind of task a run has."""
    if not tasks.task_for(config).hosts_backbone:
        return None
    return Path(config.vln.backbone)


def initial_state(config: RunConfig) -> tuple[FactorManifest, dict[str, np.ndarray]]:
    """The round-0 model: built from the run's seed, exactly as every site builds it."""
    model = tasks.build(config, backbone_path(config)).model
    return manifest_of(model), {n: t.numpy() for n, t in shared_state(model).items()}


def host_backbone(config: RunConfig) -> tuple[RunConfig, HostedBackbone | None]:
    """A run whose task hosts a backbone: digest the checkpoint and name the digest in the run config."""
    if backbone_path(config) is None:
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
    def __init__(self, store: Store, trail: AuditTrail | None = None,
                 on_failure: Callable[[RoundEngine], None] | None = None, capacity: ServerCapacity | None = None):
        self.store = store
        self.capacity = capacity   # None: no server to carry the run (in-process use)
        self.trail = trail or AuditTrail(None, "coordinator")
        self.engine: RoundEngine | None = None
        self.manifest: FactorManifest | None = None
        self.backbone: HostedBackbone | None = None   # the run's frozen checkpoint, when it has one
        self._thread: threading.Thread | None = None
        self.on_failure = on_failure   # the server reports NOT_SERVING when the round engine fails
        self._lock = threading.Lock()

    def resume(self, abandon: str | None = None) -> bool:
        """Pick up the unfinished run, if any; raises CorruptStateError on a bad state file and
        ResumeRefused when this machine no longer has the task the run was started with. With
        `abandon` (the operator's --abandon-run RUN_ID), that unfinished run is marked stopped and
        its audit log sealed instead, so a new run can start."""
        record = self.store.active_run()
        if abandon is not None:
            self._abandon(record, abandon)
            return False
        if record is None:
            return False
        config = RunConfig.from_json(record.config_json)
        manifest = FactorManifest.from_json(record.manifest_json)
        try:
            config, self.backbone = host_backbone(config)
        except TaskMismatch as err:
            # the run's model and every site's pins are those of the task as it was started: going on
            # with another one would train a different model under the same run id
            raise ResumeRefused(f"cannot resume run {record.run_id}: {err}. Install what the run announced to "
                                f"resume it, or start with --abandon-run {record.run_id} to mark it stopped") from None
        except ConfigError as err:
            raise CorruptStateError(f"run {record.run_id}: {err}") from None
        if self.capacity is not None and (why := self.capacity.problem(config.federation.max_sites)):
            raise ValueError(f"cannot resume run {record.run_id}: {why}")
        self.store.sweep(record.run_id)
        self._start_engine(record.run_id, config, manifest)
        log.info("resumed run %s at round %d", record.run_id, self.engine.rounds_completed)
        return True

    def _abandon(self, record, run_id: str) -> None:
        if record is None or record.run_id != run_id:
            raise ValueError(f"--abandon-run {run_id!r}: the unfinished run is "
                             f"{record.run_id if record else 'none'}; nothing was changed")
        rounds, _, _ = self.store.last_round(run_id)
        self.store.set_run_state(run_id, "stopped")
        self.trail.seal(run_id, rounds, "abandoned by the operator (--abandon-run)")
        log.warning("run %s abandoned by the operator after %d completed rounds: marked stopped, its audit log "
                    "sealed; it will not resume", run_id, rounds)

    def start_run(self, config: RunConfig) -> str:
        with self._lock:
            if self.engine is not None and self.engine.state == "running":
                raise Refusal(Code.FAILED_PRECONDITION,
                              f"run {self.engine.run_id} is still running; stop it first")
            config = config.resolved()
            if self.capacity is not None and (why := self.capacity.problem(config.federation.max_sites)):
                raise Refusal(Code.INVALID_ARGUMENT, why)
            try:
                tasks.check_levels(config)
                config, hosted = host_backbone(config)
                manifest, state = initial_state(config)
            except ConfigError as err:
                raise Refusal(Code.INVALID_ARGUMENT, str(err)) from None
            self.backbone = hosted
            try:
                secagg_round.check_config(config, shared_specs(manifest))
            except ConfigError as err:
                raise Refusal(Code.INVALID_ARGUMENT, str(err)) from None
            run_id = "run-" + uuid.uuid4().hex[:12]
            self.store.create_run(run_id, config.to_json(), manifest.to_json(), state)
            self.trail.config(run_id, json.loads(config.to_json()))
            self._start_engine(run_id, config, manifest)
            log.info("started run %s: %d rounds, sites %s, model %s with %d shared parameters",
                     run_id, config.federation.rounds, ", ".join(config.federation.sites),
                     config.model.adapter, manifest.shared_numel())
            if config.secagg.enabled:
                sa = config.secagg
                log.info("run %s: secure aggregation on (threshold %s, %s, clip norm %g, %d fractional bits%s)",
                         run_id, sa.threshold or "automatic", f"{sa.neighbours} neighbours" if sa.neighbours
                         else "complete graph", sa.clip_norm, sa.bits, ", active" if sa.active else "")
            return run_id

    def _start_engine(self, run_id: str, config: RunConfig, manifest: FactorManifest) -> None:
        self.manifest = manifest
        self.engine = RoundEngine(self.store, run_id, config, shared_specs(manifest),
                                  strategy_for(config), trail=self.trail, manifest_digest=manifest.digest())
        self._thread = threading.Thread(target=self._drive, args=(self.engine,), name=f"rounds-{run_id}", daemon=True)
        self._thread.start()

    def _drive(self, engine: RoundEngine) -> None:
        """The engine's thread. An error it did not expect stops the run where everyone sees it (run
        state "failed", health NOT_SERVING) instead of leaving a run that looks alive and never moves;
        the store still holds the run as running, so a restart resumes it at its last completed round."""
        try:
            engine.run()
        except Exception:  # noqa: BLE001 - whatever it was, the run must not stall silently
            log.exception("run %s: the round engine failed; the run stops here (a restart resumes it at "
                          "round %d)", engine.run_id, engine.rounds_completed + 1)
            engine.stop("failed")
            engine.sessions.end_streams()
            if self.on_failure is not None:
                self.on_failure(engine)

    def current(self) -> RoundEngine:
        if self.engine is None:
            raise Refusal(Code.UNAVAILABLE, "no run has been started on this coordinator")
        return self.engine

    def engine_for(self, run_id: str) -> RoundEngine:
        engine = self.current()
        if run_id != engine.run_id:
            raise Refusal(Code.NOT_FOUND, f"unknown run id {run_id!r} (current run is {engine.run_id})")
        return engine

    def stop(self, reason: str = "stopped") -> None:
        if self.engine is not None:
            # a run that already finished or failed keeps that verdict in the store
            running = self.engine.state == "running"
            self.engine.stop(reason)
            if reason == "stopped" and running:
                self.store.set_run_state(self.engine.run_id, "stopped")
        if self._thread is not None:
            self._thread.join(timeout=10)


__all__ = ["Coordinator", "CorruptStateError", "ResumeRefused", "initial_state"]

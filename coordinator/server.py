"""Bootstrap of the coordinator process: store, core, servicers, mTLS server, health, signals."""
from __future__ import annotations

import logging
import math
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2

from coordinator.admission import Admission
from coordinator.audit_trail import AuditTrail
from coordinator.auth import Authenticator
from coordinator.coordinator import Coordinator
from coordinator.core_log import HANDSHAKE_PEER
from coordinator.limits import RecordBudget, ServerCapacity, StreamWatchdog
from coordinator.metrics import Traffic, collect
from coordinator.service import MAX_REFUSAL_REASON, OperatorServicer, ParticipantServicer, generic_handler
from coordinator.store import Store
from kt_core.bounded import escape_field
from kt_core.config import FederationSettings, RunConfig
from kt_core.wire.exposition import MetricsServer
from kt_core.wire import transport
from security.audit import AuditLog
from security.pki import RevocationWatcher, check_key_pair, identity_from_pem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    listen: str
    state_dir: Path
    tls: transport.TLSFiles | None      # None only with insecure
    crl: Path | None = None
    insecure: bool = False
    # each connected participant holds one assignment stream: room for max_sites (100) streams,
    # max_concurrent_uploads (16) and the short calls
    max_workers: int = 160
    metrics_listen: str | None = None   # HOST:PORT of the Prometheus endpoint; None = off
    audit: bool = True                  # keep the audit log (STATE/audit); off only to measure it
    # a call that sends nothing this long after it opened, or a client stream (Upload, SubmitSecAgg)
    # between two messages, is ended: a stalled caller must not hold a thread or an upload slot
    stream_first_message_timeout_s: float = 30.0
    stream_idle_timeout_s: float = 60.0
    # calls in progress at once, every service and caller together; gRPC refuses one more
    # (RESOURCE_EXHAUSTED) before it takes a worker thread or a place in the queue. None: the
    # pool's threads plus one waiting call for each site of a run of max_sites (100)
    max_concurrent_rpcs: int | None = None
    # the operator's decision that the unfinished run with this id will not resume (ktfed
    # coordinator --abandon-run): it is marked stopped and its audit log sealed before anything starts
    abandon_run: str | None = None

    @property
    def concurrent_rpcs(self) -> int:
        return self.max_concurrent_rpcs or self.max_workers + FederationSettings().max_sites

    def validate(self) -> None:
        if not 4 <= self.max_workers <= 10_000:
            raise ValueError("max_workers: must be between 4 and 10000")
        if not self.max_workers <= self.concurrent_rpcs <= 100_000:
            raise ValueError("max_concurrent_rpcs: must be between max_workers and 100000 (fewer calls than "
                             "threads would leave threads no call can use)")
        for name in ("stream_first_message_timeout_s", "stream_idle_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= 86_400):
                raise ValueError(f"{name}: must be a finite number of seconds > 0 (at most a day)")


class HealthGate:
    """The standard health service behind the plumbing of the coordinator's own services: any
    certificate of the federation's CA may ask (the pod's probe uses the coordinator's own), but
    none may hold more calls open than a site may, and a request must come within the first-
    message timeout, so idle health calls cannot hold the worker threads either."""

    def __init__(self, servicer: health.HealthServicer, admission: Admission):
        self.servicer, self.admission = servicer, admission

    def admit(self, context) -> None:
        self.admission.identify(context, None)

    def __getattr__(self, method: str):   # Check, List, Watch: the health servicer's own
        return getattr(self.servicer, method)


class CoordinatorServer:
    def __init__(self, settings: ServerSettings):
        settings.validate()
        self.settings = settings
        self.store = Store(settings.state_dir)
        self.trail = AuditTrail(None, "coordinator")
        if settings.audit and not settings.insecure:
            # what crossed every boundary, signed with this coordinator's certificate key
            name = identity_from_pem(Path(settings.tls.cert).read_bytes()).name
            self.trail = AuditTrail(AuditLog.open(Path(settings.state_dir) / "audit", name, settings.tls.key,
                                                  settings.tls.cert, sync="on_head"), name)
        self.coordinator = Coordinator(self.store, self.trail,
                                       on_failure=lambda _engine: self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING),
                                       capacity=ServerCapacity(settings.max_workers, settings.concurrent_rpcs))
        revocations = None
        if settings.crl is not None and not settings.insecure:
            revocations = RevocationWatcher(settings.crl, settings.tls.ca_cert)
        self.auth = Authenticator(revocations, insecure=settings.insecure)
        self.health = health.HealthServicer()
        self.traffic = Traffic()
        self._handshake_budget = RecordBudget()
        self.serving = False
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.max_workers,
                                                             thread_name_prefix="grpc"),
                                  options=transport.SERVER_OPTIONS, maximum_concurrent_rpcs=settings.concurrent_rpcs)
        self._stopped = threading.Event()
        self.server.add_generic_rpc_handlers(self._handlers())
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if settings.insecure:
            log.warning("listening WITHOUT TLS on %s (--insecure): for local debugging only", settings.listen)
            self.port = self.server.add_insecure_port(settings.listen)
        else:
            # Certificates are re-read when their files change: rotation needs no restart.
            self.certificates = transport.ReloadingServerCertificates(settings.tls, check=check_key_pair)
            self.port = self.server.add_secure_port(settings.listen, self.certificates.credentials())
        if self.port == 0:
            raise OSError(f"cannot listen on {settings.listen}")
        self.metrics = None
        if settings.metrics_listen:
            self.metrics = MetricsServer(settings.metrics_listen,
                                         lambda: collect(self.coordinator, self.traffic, lambda: self.serving))

    def _handlers(self) -> tuple[grpc.GenericRpcHandler, ...]:
        """Every service, health included, through service.generic_handler: each method reads its
        request as a stream, so admission runs before the request arrives, the watchdog bounds the
        wait for it, and a message that gRPC refuses for its size is logged and recorded like any
        other refusal. One admission for all three: a caller's allowance is per certificate."""
        settings = self.settings
        watchdog = StreamWatchdog(settings.stream_first_message_timeout_s, settings.stream_idle_timeout_s)
        participants = ParticipantServicer(self.coordinator, self.auth, self.traffic)
        services = (("ParticipantService", participants),
                    ("OperatorService", OperatorServicer(self.coordinator, self.auth, participants.admission)),
                    ("grpc.health.v1.Health", HealthGate(self.health, participants.admission)))
        return tuple(generic_handler(name, servicer, self._record_refusal, watchdog, streamed=True,
                                     stopping=self._stopped.is_set) for name, servicer in services)

    def record_handshake_failure(self, reason: str) -> None:
        """A TLS handshake that gRPC's core refused (coordinator.core_log): logged and recorded like
        a refusal, under one peer name since the core does not say who it was."""
        reason = escape_field(f"TLS handshake refused: {reason}", MAX_REFUSAL_REASON)
        held = self._handshake_budget.take(HANDSHAKE_PEER)
        if held is None:
            return
        more = f" (and {held} more failed handshakes before this one, not recorded one by one)" if held else ""
        log.warning("refused a TLS connection: %s%s", reason, more)
        self._record_refusal(HANDSHAKE_PEER, "TLS", "UNAUTHENTICATED", reason + more)

    def _record_refusal(self, peer: str, method: str, code: str, reason: str) -> None:
        self.store.record_refusal(peer, method, code, reason)
        engine = self.coordinator.engine
        run_id, round_no = (engine.run_id, engine.rounds_completed + 1) if engine is not None else ("", 0)
        self.trail.refusal(run_id, round_no, peer, method, code, reason)

    def _set_health(self, status) -> None:
        self.serving = status == health_pb2.HealthCheckResponse.SERVING
        for service in ("", "ktfed.v1.ParticipantService", "ktfed.v1.OperatorService"):
            self.health.set(service, status)

    def start(self, config: RunConfig | None = None) -> None:
        """Listen, resume an unfinished run (or start `config`'s), then report SERVING."""
        self.server.start()
        if self.metrics is not None:
            self.metrics.start()
        log.info("coordinator listening on %s (mTLS %s)", self.settings.listen,
                 "off" if self.settings.insecure else "on")
        if not self.coordinator.resume(abandon=self.settings.abandon_run) and config is not None:
            self.coordinator.start_run(config)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.coordinator.stop("shutdown")  # the round in progress is abandoned, not half-committed
        self.server.stop(grace).wait()
        if self.metrics is not None:
            self.metrics.stop()
        self.trail.close("shutdown")
        self.store.close()
        log.info("coordinator stopped")

    def wait(self) -> None:
        """Block until SIGTERM or SIGINT, then shut down cleanly (the run resumes at the next start)."""
        signalled = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: signalled.set())
        while not signalled.wait(0.5):
            pass
        log.info("signal received: shutting down")
        self.stop()

"""Simulation: N virtual participants in one process, through the same code as a real federation.

What runs is the product's own code: each virtual site is a `ParticipantAgent` (its session,
download, `LocalTrainer` training, egress guard, upload, SecAgg client steps, DP-SGD and privacy
ledger, declines) in a thread, and the coordinator is a real `Coordinator` with its `RoundEngine`,
FedAvg and SecAgg server, reached through the real `ParticipantServicer` handlers. Only the
transport differs: instead of sockets and TLS, `InProcessStub` serializes each request, hands it to
the servicer's gRPC method handler in the caller's thread with a small in-process context, and
parses the response, so refusals, limits and the wire format behave as over gRPC. A virtual site's
identity is its name, checked like a certificate subject.

Two things are shared that separate processes would not share: the torch global RNG (training
seeds it per task), so training runs one site at a time under a lock, which keeps results equal to
a real run with the same seeds; and the data set, read once and handed to every site (read-only).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import grpc
import numpy as np

from coordinator.auth import Caller
from coordinator.coordinator import Coordinator
from coordinator.errors import Refusal
from coordinator.service import ParticipantServicer, generic_handler
from coordinator.store import Store
from kt_core.config import ConfigError, RunConfig
from kt_core.wire import federation_pb2 as pb
from kt_core import image_task as trainer_module
from participant.agent import FATAL_CODES, AgentSettings, ParticipantAgent, backoff_delay

log = logging.getLogger(__name__)

SERVICE = "ParticipantService"
MARKER = ".ktfed-simulation"
# Training reads and reseeds torch's global RNG (kt_core.train): one site at a time, as in a process of its own.
_TORCH_LOCK = threading.RLock()


# -- the in-process transport -----------------------------------------------------------------

class InProcessRpcError(grpc.RpcError):
    """What a refused in-process call raises: the status a gRPC client would see."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


class InProcessContext:
    """The part of grpc.ServicerContext the servicers use, for one call of a virtual site."""

    def __init__(self, identity: str):
        self.identity = identity
        self._active = True
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def is_active(self) -> bool:
        return self._active

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if not self._active:
                return False
            self._callbacks.append(callback)
            return True

    def abort(self, code: grpc.StatusCode, details: str):
        raise _Abort(code, details)

    def auth_context(self) -> dict:
        return {}

    def peer(self) -> str:
        return f"in-process:{self.identity}"

    def invocation_metadata(self) -> tuple:
        return ()

    def time_remaining(self) -> None:
        return None

    def end(self) -> None:
        """The call is over (answered, refused or cancelled): run the callbacks, once."""
        with self._lock:
            if not self._active:
                return
            self._active = False
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001 - as grpc does, a failing callback must not break the others
                log.exception("in-process call: a termination callback failed")


class IdentityAuth:
    """The in-process stand-in for the certificate check: the caller is the virtual site whose
    stub made the call, and the id a message claims must be that site, as with a certificate."""

    insecure = False   # every caller has an identity before its request is parsed

    def caller(self, context: InProcessContext, role: str, claimed_id: str | None = None) -> Caller:
        if claimed_id is not None and claimed_id != context.identity:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED,
                          f"participant id {claimed_id!r} differs from the caller {context.identity!r}")
        return Caller(context.identity, role, "")


@dataclass(frozen=True)
class _CallDetails:
    method: str
    invocation_metadata: tuple = ()


class _ResponseStream:
    """A server-streaming call's responses, produced by the handler as the caller reads them."""

    def __init__(self, generator: Iterator, context: InProcessContext, parse: Callable):
        self._generator = generator
        self._context = context
        self._parse = parse

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return self._parse(next(self._generator))
        except StopIteration:
            self._context.end()
            raise
        except _Abort as err:
            self._context.end()
            raise InProcessRpcError(err.code, err.details) from None
        except Exception as err:  # noqa: BLE001 - as gRPC reports a servicer's bug: UNKNOWN
            self._context.end()
            log.exception("in-process call failed")
            raise InProcessRpcError(grpc.StatusCode.UNKNOWN, f"Exception iterating responses: {err}") from None

    def cancel(self) -> bool:
        self._context.end()
        self._generator.close()
        return True


class InProcessStub:
    """ParticipantServiceStub's interface for one virtual site: each method serializes its
    request(s), runs the servicer's registered handler (parse, authenticate, limits, refusals
    logged and recorded) in the calling thread, and parses the response."""

    def __init__(self, handler: grpc.GenericRpcHandler, identity: str):
        self.identity = identity
        for method in pb.DESCRIPTOR.services_by_name[SERVICE].methods:
            rpc = handler.service(_CallDetails(f"/ktfed.v1.{SERVICE}/{method.name}"))
            if rpc is None:
                continue
            parse = getattr(pb, method.output_type.name).FromString
            setattr(self, method.name, self._bind(rpc, parse))

    def _bind(self, rpc, parse):
        def response(message):
            return parse(rpc.response_serializer(message))

        if rpc.response_streaming:
            def call(request, timeout=None, **_):
                context = InProcessContext(self.identity)
                if rpc.request_streaming:
                    generator = rpc.stream_stream((m.SerializeToString() for m in request), context)
                else:
                    generator = rpc.unary_stream(request.SerializeToString(), context)
                return _ResponseStream(generator, context, response)
            return call

        def call(request, timeout=None, **_):
            context = InProcessContext(self.identity)
            try:
                if rpc.request_streaming:
                    answer = rpc.stream_unary((m.SerializeToString() for m in request), context)
                else:
                    answer = rpc.unary_unary(request.SerializeToString(), context)
                return response(answer)
            except _Abort as err:
                raise InProcessRpcError(err.code, err.details) from None
            except InProcessRpcError:
                raise
            except Exception as err:  # noqa: BLE001 - as gRPC reports a servicer's bug: UNKNOWN
                log.exception("in-process call failed")
                raise InProcessRpcError(grpc.StatusCode.UNKNOWN, f"Exception calling application: {err}") from None
            finally:
                context.end()
        return call


# -- virtual participants ---------------------------------------------------------------------

class VirtualParticipant(ParticipantAgent):
    """A ParticipantAgent whose connection is an InProcessStub; everything else is the agent's own."""

    def __init__(self, settings: AgentSettings, handler: grpc.GenericRpcHandler):
        super().__init__(settings)
        self._handler = handler

    def _run(self) -> int:
        # The agent's own loop without the socket and certificate steps: session, and on a lost
        # session, back off and join again.
        stub = InProcessStub(self._handler, self.site)
        failures = 0
        while not self._stop.is_set():
            try:
                self._session(stub)
                if self.finished:
                    return 0
                failures = 0
            except grpc.RpcError as err:
                if err.code() in FATAL_CODES:
                    log.error("%s: coordinator refused us: %s %s", self.site, err.code().name, err.details())
                    return 3
                log.warning("%s: session lost (%s: %s)", self.site, err.code().name, err.details())
                failures += 1
            self.reconnects += 1
            self._set_status("connecting")
            self._stop.wait(backoff_delay(failures, self.settings.backoff_initial_s, self.settings.backoff_max_s,
                                          self._rng))
        return 0

    # building the model and training: one virtual site at a time (see the module's docstring)
    def _prepare(self, *args, **kwargs):
        with _TORCH_LOCK:
            return super()._prepare(*args, **kwargs)

    def _train_and_upload(self, *args, **kwargs):
        with _TORCH_LOCK:
            return super()._train_and_upload(*args, **kwargs)


# -- the simulation ---------------------------------------------------------------------------

def site_names(n: int) -> list[str]:
    return [f"site-{i:03d}" for i in range(n)]


def simulation_config(config: RunConfig, participants: int, rounds: int | None = None) -> RunConfig:
    """The run config for N virtual sites: the config's own site names when it lists N of them,
    else site-000 … site-(N-1) (the data partition is laid out over them). Raises ConfigError."""
    fed = config.federation
    if participants < 1:
        raise ConfigError("--participants: must be >= 1")
    if participants > fed.max_sites:
        raise ConfigError(f"--participants: {participants} exceeds federation.max_sites "
                          f"({fed.max_sites}) of the run config; raise it to simulate that many")
    if config.secagg.enabled and config.secagg.active:
        raise ConfigError("secagg.active: the active option signs with each site's certificate key; "
                          "virtual sites have none (simulate without it)")
    sites = fed.sites if len(fed.sites) == participants else tuple(site_names(participants))
    changes = {"sites": sites, "min_sites": min(fed.min_sites, participants)}
    if rounds is not None:
        changes["rounds"] = rounds
    fed = dataclasses.replace(fed, **changes)
    try:
        fed.validate()
    except ValueError as err:
        raise ConfigError(f"federation.{err}") from None
    return dataclasses.replace(config, federation=fed)


@dataclass
class SimulationResult:
    run_id: str
    participants: int
    status: pb.RunStatus
    final_state: dict[str, np.ndarray]
    wall_s: float            # set-up included (building the model, loading data)
    rounds_wall_s: float     # from the first round's start to the run's end
    exit_codes: dict[str, int | str] = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return self.status.rounds_completed

    @property
    def throughput(self) -> float:
        """Virtual participants × rounds per second of round time."""
        return self.participants * self.rounds / self.rounds_wall_s if self.rounds_wall_s > 0 else float("nan")


def prepare_out(out: Path) -> None:
    """A fresh output folder; one that holds something other than an earlier simulation is refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise ConfigError(f"--out: {out} exists and was not made by `ktfed simulate`; choose another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()


def simulate(config: RunConfig, participants: int, out: Path, *, rounds: int | None = None,
             data_root: Path | None = None, timeout_s: float = 3600.0,
             on_round: Callable[[pb.RoundSummary], None] | None = None) -> SimulationResult:
    """Run a whole federation of `participants` virtual sites in this process; returns when the
    run finished (or raises RuntimeError naming what went wrong). Raises ConfigError on bad input."""
    config = simulation_config(config, participants, rounds)
    out = Path(out)
    prepare_out(out)
    started = time.monotonic()
    store = Store(out / "coordinator")
    coordinator = Coordinator(store)
    agents: dict[str, VirtualParticipant] = {}
    codes: dict[str, int | str] = {}
    threads: dict[str, threading.Thread] = {}
    restore = _share_datasets()
    try:
        try:
            run_id = coordinator.start_run(config)
        except Refusal as err:
            raise ConfigError(str(err)) from None
        engine = coordinator.current()
        handler = generic_handler(SERVICE, ParticipantServicer(coordinator, IdentityAuth()), store.record_refusal)
        for site in engine.fed.sites:
            agents[site] = VirtualParticipant(AgentSettings(
                site=site, coordinator="in-process", tls=None, state_dir=out / "sites" / site,
                data_root=data_root, insecure=True, backoff_initial_s=0.05, backoff_max_s=1.0,
                heartbeat_s=3600.0), handler)

        def run_agent(site: str) -> None:
            try:
                codes[site] = agents[site].run()
            except ConfigError as err:   # the site's data or the run's config: the message says it all
                log.error("%s: virtual participant stopped: %s", site, err)
                codes[site] = f"{type(err).__name__}: {err}"
            except Exception as err:  # noqa: BLE001 - reported with the result
                log.exception("%s: virtual participant failed", site)
                codes[site] = f"{type(err).__name__}: {err}"

        for site in agents:
            threads[site] = threading.Thread(target=run_agent, args=(site,), name=f"sim-{site}", daemon=True)
            threads[site].start()
        first_round = None
        shown = 0
        deadline = time.monotonic() + timeout_s
        while engine.state == "running":
            if first_round is None and (engine.attempt is not None or engine.rounds_completed):
                first_round = time.monotonic()
            if on_round is not None and engine.rounds_completed > shown:
                for record in engine.status().rounds[shown:]:
                    on_round(record)
                    shown += 1
            _check_enough_alive(engine, threads, codes)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the simulation did not finish within {timeout_s:g} s "
                                   f"({engine.rounds_completed} of {engine.fed.rounds} rounds)")
            time.sleep(0.02)
        ended = time.monotonic()
        if engine.state != "finished":
            # a site whose run failed waits for the coordinator's next run; there is none here
            for agent in agents.values():
                agent.stop()
        for thread in threads.values():
            thread.join(timeout=30)
        status = engine.status()
        if on_round is not None:
            for record in status.rounds[shown:]:
                on_round(record)
        if status.state != "finished":
            raise RuntimeError(f"the run ended {status.state} after {status.rounds_completed} rounds")
        final = {name: np.array(array) for name, array in store.last_round(run_id)[1].items()}
        return SimulationResult(run_id, participants, status, final, time.monotonic() - started,
                                ended - (first_round or started), dict(codes))
    finally:
        for agent in agents.values():
            agent.stop()
        coordinator.stop("shutdown")
        for thread in threads.values():
            thread.join(timeout=10)
        restore()
        store.close()


def _check_enough_alive(engine, threads: dict[str, threading.Thread], codes: dict) -> None:
    """Raise when fewer virtual participants are alive than a round needs: a real coordinator waits
    for sites that may yet start, but a virtual one that stopped (its data did not fit, say) never
    comes back, so the rounds left could never complete."""
    alive = sum(t.is_alive() for t in threads.values())
    if alive >= engine.fed.min_sites or engine.state != "running":
        return
    stopped = [f"{site}: {codes.get(site)}" for site, t in threads.items() if not t.is_alive()]
    raise RuntimeError(f"{len(stopped)} of {len(threads)} virtual participants stopped before the run finished, "
                       f"{alive} left, federation.min_sites = {engine.fed.min_sites}: " + "; ".join(stopped[:3])
                       + (f"; and {len(stopped) - 3} more (in the log)" if len(stopped) > 3 else ""))


def _share_datasets() -> Callable[[], None]:
    """Load each data set once for all virtual sites (LocalTrainer loads it per site, which in
    separate processes costs nothing extra). Returns the function that undoes it."""
    original = trainer_module.load_dataset
    cached = functools.lru_cache(maxsize=4)(original)
    lock = threading.Lock()

    def load_dataset(*args, **kwargs):
        with lock:  # the first site loads it, the others wait and share it
            return cached(*args, **kwargs)

    trainer_module.load_dataset = load_dataset

    def restore() -> None:
        trainer_module.load_dataset = original
    return restore

"""Back-pressure and limits: what one site, and all of them together, may hold open.

The limits are `[federation]` settings of the run (kt_core.config.FederationSettings); a refusal
is a Refusal(RESOURCE_EXHAUSTED) whose message starts with the setting that was hit, so the
servicer logs and records it like any other refusal and an operator knows what to raise:

  max_sites                 assignment streams per run; one more is refused at connect (Sessions.connect)
  max_concurrent_uploads    uploads received at once. One more WAITS up to upload_queue_timeout_s
                            for a slot (a round's uploads arrive in a burst; queueing them briefly
                            costs less than a refused site retraining), then is refused
  max_rpcs_per_site         calls one site may have open at once, its assignment stream included
                            (an agent needs two: the stream plus one download or upload)
  rpc_rate_per_site         calls per second one site may start, a token bucket holding
                            two seconds' worth (0 = no rate limit)

Counting happens per authenticated identity, after the certificate and membership checks and
before the request is read (coordinator.admission), so one site cannot exhaust another's
allowance and a flood of malformed calls is cut off before it costs parsing. Operators and
callers of the health service are held to max_rpcs_per_site calls open as well (not to
the rate): no certificate may hold every worker thread.

All callers together: the server's max_concurrent_rpcs (coordinator.server.ServerSettings), which
gRPC enforces before a call takes a worker thread or a place in the queue. Those refusals are
gRPC's own and reach no code of ours, so a run is admitted only when the server can carry it
(ServerCapacity): a thread for every site's assignment stream and room for the rest, and a call in
progress for every site's stream plus one transfer. A run larger than that is refused when it is
started (or resumed), naming the setting and the flag to raise, instead of aborting every round.

Two more bounds on what a peer can make the coordinator spend:
  RecordBudget     refusals of one peer logged and recorded one by one (10 per second, bursts of
                   30); past that they are counted into the peer's next recorded refusal
  StreamWatchdog   a call that sends no first message (every call, unary ones included: the
                   server reads every request as a stream), or a client stream (Upload,
                   SubmitSecAgg) that goes idle, within the server's timeouts is ended with
                   DEADLINE_EXCEEDED
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import grpc

from coordinator.errors import Refusal
from kt_core.config import FederationSettings

BURST_SECONDS = 2.0


class Limiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._cond = threading.Condition()
        self._open: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}   # participant -> (tokens, when)
        self._uploads = 0

    # -- per participant ----------------------------------------------------------------------
    def admit(self, site_id: str, fed: FederationSettings, on_end: Callable[[Callable[[], None]], bool],
              *, rate: bool = True, holder: str = "participant") -> None:
        """Count one call of `site_id` against its limits, or refuse it. `on_end` registers
        the release for when the call ends (grpc's `context.add_callback`); a call that already
        ended (it returns False) is released at once. Without `rate`, only the calls it holds open
        count (operators and health callers: what must be bounded there is the threads they hold)."""
        with self._cond:
            if rate:
                self._take_token(site_id, fed.rpc_rate_per_site)
            open_now = self._open.get(site_id, 0)
            if open_now >= fed.max_rpcs_per_site:
                raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"federation.max_rpcs_per_site: {site_id} already has {open_now} calls "
                              f"open, the most one {holder} may hold at once")
            self._open[site_id] = open_now + 1
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            released.set()
            with self._cond:
                left = self._open.get(site_id, 1) - 1
                if left > 0:
                    self._open[site_id] = left
                else:
                    self._open.pop(site_id, None)

        if not on_end(release):
            release()

    def _take_token(self, site_id: str, rate: float) -> None:
        if rate <= 0:
            return
        capacity = max(1.0, rate * BURST_SECONDS)
        now = self._clock()
        tokens, then = self._buckets.get(site_id, (capacity, now))
        tokens = min(capacity, tokens + (now - then) * rate)
        if tokens < 1.0:
            self._buckets[site_id] = (tokens, now)
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"federation.rpc_rate_per_site: {site_id} started calls faster than "
                          f"{rate:g} per second (bursts up to {capacity:g}); slow down")
        self._buckets[site_id] = (tokens - 1.0, now)

    def open_calls(self, site_id: str) -> int:
        with self._cond:
            return self._open.get(site_id, 0)

    # -- all participants together ------------------------------------------------------------
    @contextmanager
    def upload_slot(self, fed: FederationSettings) -> Iterator[None]:
        """Hold one of the max_concurrent_uploads slots while an upload is received and folded in."""
        deadline = self._clock() + fed.upload_queue_timeout_s
        with self._cond:
            while self._uploads >= fed.max_concurrent_uploads:
                left = deadline - self._clock()
                if left <= 0:
                    raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"federation.max_concurrent_uploads: {self._uploads} uploads are being received, "
                                  f"the most the coordinator takes at once (waited "
                                  f"{fed.upload_queue_timeout_s:g} s for a slot); retry later")
                self._cond.wait(left)
            self._uploads += 1
        try:
            yield
        finally:
            with self._cond:
                self._uploads -= 1
                self._cond.notify_all()

    @property
    def uploads_in_progress(self) -> int:
        with self._cond:
            return self._uploads


# -- what refusals may cost ------------------------------------------------------------------------
REFUSAL_RECORDS_PER_S = 10.0     # refusals of one peer logged and recorded per second
REFUSAL_RECORD_BURST = 30.0


class RecordBudget:
    """How many of one peer's refusals are logged and recorded one by one: a flood of bad calls
    must not cost a log line and a database row each. Past the budget a refusal is counted, and
    the count goes with the peer's next recorded refusal."""

    def __init__(self, rate: float = REFUSAL_RECORDS_PER_S, burst: float = REFUSAL_RECORD_BURST,
                 clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self._clock = rate, burst, clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}
        self._held: dict[str, int] = {}

    def take(self, peer: str) -> int | None:
        """None: do not record this one; else how many of the peer's refusals went unrecorded before it."""
        with self._lock:
            now = self._clock()
            tokens, then = self._buckets.get(peer, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            if tokens < 1.0:
                self._buckets[peer] = (tokens, now)
                self._held[peer] = self._held.get(peer, 0) + 1
                return None
            self._buckets[peer] = (tokens - 1.0, now)
            return self._held.pop(peer, 0)


# -- streams that stall ----------------------------------------------------------------------------
class StreamWatchdog:
    """Ends a call whose first message does not come within `first_message_s` of its start, or a
    client stream whose next message does not come within `idle_s`: a stalled caller must not
    hold a worker thread or an upload slot. One thread watches every call."""

    def __init__(self, first_message_s: float, idle_s: float, clock: Callable[[], float] = time.monotonic):
        self.first_message_s, self.idle_s, self._clock = first_message_s, idle_s, clock
        self._cond = threading.Condition()
        self._watched: set[Watch] = set()
        self._thread: threading.Thread | None = None

    def watch(self, context) -> "Watch":
        watch = Watch(self, context)
        with self._cond:
            self._watched.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stream-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return watch

    def _forget(self, watch: "Watch") -> None:
        with self._cond:
            self._watched.discard(watch)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._watched:
                    self._cond.wait()
                now = self._clock()
                due = [w for w in self._watched if w.deadline <= now]
                for w in due:
                    self._watched.discard(w)
            for w in due:
                w.expire()
            time.sleep(0.1)


class Watch:
    """One watched call: `touch()` when a message arrives, `done()` when the call no longer reads."""

    def __init__(self, dog: StreamWatchdog, context):
        self._dog, self._context = dog, context
        self.deadline = dog._clock() + dog.first_message_s
        self.first = True
        self.reason: str | None = None

    def touch(self) -> None:
        self.first = False
        self.deadline = self._dog._clock() + self._dog.idle_s

    def done(self) -> None:
        self._dog._forget(self)

    def expire(self) -> None:
        self.reason = (f"no first message within {self._dog.first_message_s:g} s of the call's start" if self.first
                       else f"idle: no message for more than {self._dog.idle_s:g} s")
        # grpc's public cancel() answers CANCELLED; the call object can say why (DEADLINE_EXCEEDED)
        call = getattr(getattr(self._context, "_rpc_event", None), "call", None)
        try:
            if call is not None:
                call.cancel(grpc.StatusCode.DEADLINE_EXCEEDED.value[0], self.reason)
            else:
                self._context.cancel()
        except Exception:  # noqa: BLE001 - a call that ended meanwhile needs no ending
            pass


# threads beyond the assignment streams: uploads, downloads, joins, status and health calls queue for
# these; calls beyond a stream and a transfer per site: operators, health, a burst of joins
RESERVE_THREADS = 32
RESERVE_CALLS = 32


class ServerCapacity:
    """What one coordinator process can carry: its gRPC worker threads and calls in progress."""

    def __init__(self, workers: int, calls: int):
        self.workers, self.calls = workers, calls

    def problem(self, max_sites: int) -> str | None:
        """Why a run of `max_sites` sites cannot be carried, or None."""
        threads = max_sites + RESERVE_THREADS
        calls = 2 * max_sites + RESERVE_CALLS
        if threads > self.workers:
            return (f"federation.max_sites = {max_sites}: every site holds a worker thread for its "
                    f"assignment stream, so this coordinator needs {threads} threads and has {self.workers}; lower "
                    f"federation.max_sites or start the coordinator with --max-workers {threads}")
        if calls > self.calls:
            return (f"federation.max_sites = {max_sites}: a site holds its assignment stream and one "
                    f"transfer at once, so this coordinator needs {calls} calls in progress and allows "
                    f"{self.calls}; lower federation.max_sites or start the coordinator with "
                    f"--max-concurrent-rpcs {calls}")
        return None


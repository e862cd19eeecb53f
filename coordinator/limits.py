"""Back-pressure and limits: what one participant, and all of them together, may hold open.

The limits are `[federation]` settings of the run (kt_core.config.FederationSettings); a refusal
is a Refusal(RESOURCE_EXHAUSTED) whose message starts with the setting that was hit, so the
servicer logs and records it like any other refusal and an operator knows what to raise:

  max_participants          task streams per run; one more is refused at connect (RoundEngine.connect)
  max_concurrent_uploads    uploads received at once. One more WAITS up to upload_queue_timeout_s
                            for a slot (a round's uploads arrive in a burst; queueing them briefly
                            costs less than a refused site retraining), then is refused
  max_rpcs_per_participant  calls one participant may have open at once, its task stream included
                            (an agent needs two: the stream plus one download or upload)
  rpc_rate_per_participant  calls per second one participant may start, a token bucket holding
                            two seconds' worth (0 = no rate limit)

Counting happens per authenticated identity, after the certificate check, so one site cannot
exhaust another's allowance.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import grpc

from coordinator.rounds import Refusal
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
    def admit(self, participant_id: str, fed: FederationSettings, on_end: Callable[[Callable[[], None]], bool]) -> None:
        """Count one call of `participant_id` against its limits, or refuse it. `on_end` registers
        the release for when the call ends (grpc's `context.add_callback`); a call that already
        ended (it returns False) is released at once."""
        with self._cond:
            self._take_token(participant_id, fed.rpc_rate_per_participant)
            open_now = self._open.get(participant_id, 0)
            if open_now >= fed.max_rpcs_per_participant:
                raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"federation.max_rpcs_per_participant: {participant_id} already has {open_now} calls "
                              f"open, the most one participant may hold at once")
            self._open[participant_id] = open_now + 1
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            released.set()
            with self._cond:
                left = self._open.get(participant_id, 1) - 1
                if left > 0:
                    self._open[participant_id] = left
                else:
                    self._open.pop(participant_id, None)

        if not on_end(release):
            release()

    def _take_token(self, participant_id: str, rate: float) -> None:
        if rate <= 0:
            return
        capacity = max(1.0, rate * BURST_SECONDS)
        now = self._clock()
        tokens, then = self._buckets.get(participant_id, (capacity, now))
        tokens = min(capacity, tokens + (now - then) * rate)
        if tokens < 1.0:
            self._buckets[participant_id] = (tokens, now)
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"federation.rpc_rate_per_participant: {participant_id} started calls faster than "
                          f"{rate:g} per second (bursts up to {capacity:g}); slow down")
        self._buckets[participant_id] = (tokens - 1.0, now)

    def open_calls(self, participant_id: str) -> int:
        with self._cond:
            return self._open.get(participant_id, 0)

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

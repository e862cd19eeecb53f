"""The sites' assignment streams of one run: who holds one, who may be selected, and whether
enough of them are there for a round (the job of a Flower server's ClientManager).

The round engine owns one `Sessions` (`engine.sessions`) and shares its condition variable with
it: the servicers connect and disconnect streams and note what a site showed at join, the engine's
thread waits here for sites and pushes messages through here, and nobody else touches a stream's
queue. A site that declined for its privacy budget, or refused the whole run under its site
policy, stays connected but is not selected again until it reconnects (restarted, perhaps with a
larger budget or another policy); once too few sites are left to complete a round the run fails,
naming them, rather than retrying rounds that cannot complete.
"""
from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from coordinator.admission import check_capabilities
from coordinator.attempt import name_reasons
from coordinator.errors import Code, Refusal

if TYPE_CHECKING:
    from coordinator.rounds import RoundEngine

log = logging.getLogger(__name__)

# How long a second assignment stream of a site waits for the first to go before it is refused: a
# site that reconnects cancels its old stream first, and that cancellation may still be in flight.
DUPLICATE_GRACE_S = 2.0


@dataclass
class Session:
    """One site's open assignment stream. `None` on the queue ends the stream."""

    site_id: str
    queue: queue.Queue = field(default_factory=queue.Queue)
    open: bool = True
    # whether the stream's peer is still there (gRPC's is_active); a session that cannot tell is
    # replaced by a newer stream of its site rather than refusing it
    alive: Callable[[], bool] = lambda: False
    opened: float = field(default_factory=time.monotonic)


class Sessions:
    def __init__(self, engine: "RoundEngine"):
        self.engine = engine
        self.cond = engine.cond          # one lock for the run: the engine's
        self._open: dict[str, Session] = {}
        self._certificates: dict[str, bytes] = {}   # site -> the PEM it connected with
        self._left_out: dict[str, str] = {}   # site -> why it is not selected (the decline's code: reason)

    # -- what the servicers call ---------------------------------------------------------------
    def refuse_duplicate(self, site_id: str) -> None:
        """Refuse a second agent of a site while its first holds a live assignment stream (two
        agents of one site flap, each stream replacing the other's). PERMISSION_DENIED: the site
        stops and says so rather than retrying."""
        until = time.monotonic() + DUPLICATE_GRACE_S
        with self.cond:   # re-entrant: connect calls this with the lock held
            while (old := self._open.get(site_id)) is not None and old.open and old.alive() \
                    and (left := until - time.monotonic()) > 0:
                self.cond.wait(timeout=min(left, 0.2))
            old = self._open.get(site_id)
            if old is None or not old.open or not old.alive():
                return
            raise Refusal(Code.PERMISSION_DENIED,
                          f"duplicate session: {site_id} already has a live assignment stream with run "
                          f"{self.engine.run_id} (open {time.monotonic() - old.opened:.0f}s); a second agent of "
                          f"{site_id} is refused: stop one of them")

    def connect(self, site_id: str, alive: Callable[[], bool] | None = None) -> Session:
        e = self.engine
        with self.cond:
            if e.state != "running":
                raise Refusal(Code.FAILED_PRECONDITION, f"run {e.run_id} is {e.state}")
            self.refuse_duplicate(site_id)
            old = self._open.get(site_id)
            if old is None and len(self._open) >= e.fed.max_sites:
                raise Refusal(Code.RESOURCE_EXHAUSTED,
                              f"federation.max_sites: run {e.run_id} already has {len(self._open)} "
                              f"sites connected, the most it allows; {site_id} is refused")
            if old is not None:  # a reconnect replaces the stale stream
                old.open = False
                old.queue.put(None)
            session = Session(site_id) if alive is None else Session(site_id, alive=alive)
            # a site that comes back (restarted, perhaps with a larger budget or another policy) is
            # asked again: a second such decline leaves it out again; a connected one is never re-asked
            self._left_out.pop(site_id, None)
            self._open[site_id] = session
            e.sites[site_id].connected = True
            e.rejoined(site_id)
            self.cond.notify_all()
            log.info("site %s connected (%d connected)", site_id, len(self._open))
            return session

    def disconnect(self, session: Session) -> None:
        with self.cond:
            session.open = False
            if self._open.get(session.site_id) is not session:
                return  # already replaced by a newer stream
            del self._open[session.site_id]
            self.engine.sites[session.site_id].connected = False
            self.engine.dropped(session.site_id)
            self.cond.notify_all()
            log.info("site %s disconnected (%d connected)", session.site_id, len(self._open))

    def note_capabilities(self, site_id: str, caps) -> None:
        """What a site reported at join, bounded before it is kept and shown."""
        check_capabilities(caps)
        with self.cond:
            self.engine.sites.note_capabilities(site_id, caps)

    def note_certificate(self, site_id: str, pem: bytes) -> None:
        """The certificate a site connected with: SecAgg's active option relays it to the other
        sites and verifies that site's signatures with it; the audit trail checks its
        countersignatures with it."""
        with self.cond:
            self._certificates[site_id] = pem

    def note_state_sent(self, site_id: str, round_no: int, digest: str, specs) -> None:
        """A global state streamed to a site (DownloadState), for the audit log."""
        self.engine.trail.sent(self.engine.run_id, round_no, site_id, "state", digest, specs)

    # -- what the engine, the SecAgg driver and the run status ask -------------------------------
    def __contains__(self, site_id: str) -> bool:
        """Whether the site holds an assignment stream now."""
        return site_id in self._open

    def connected(self) -> frozenset[str]:
        return frozenset(self._open)

    def certificate(self, site_id: str) -> bytes | None:
        return self._certificates.get(site_id)

    def push(self, site_id: str, message) -> None:
        """Queue a message on a connected site's stream (call locked; the site is connected)."""
        self._open[site_id].queue.put(message)

    def broadcast(self, message) -> None:
        """Queue a message on every open stream; `None` ends them without a verdict."""
        with self.cond:
            for session in self._open.values():
                session.queue.put(message)

    def end_streams(self) -> None:
        """End every open assignment stream without a verdict (its site reconnects)."""
        self.broadcast(None)

    def leave_out(self, site_id: str, why: str) -> None:
        """The site declined for a reason that holds while it stays connected (its privacy budget is
        spent, its site policy refuses the run): not selected again until it reconnects."""
        self._left_out[site_id] = why

    def selectable(self) -> frozenset[str]:
        """The connected sites a round may select: not those left out (`leave_out`)."""
        return frozenset(s for s in self._open if s not in self._left_out)

    def taking_part(self) -> list[str]:
        """The run's sites, connected or not, that are not left out."""
        return [s for s in self.engine.fed.sites if s not in self._left_out]

    def cannot_go_on(self) -> str | None:
        """Why no round of this run can complete any more (too few sites not left out), or None."""
        fed = self.engine.fed
        taking_part = self.taking_part()
        if len(taking_part) >= fed.min_sites:
            return None
        return (f"too few sites take part: {name_reasons(self._left_out)}; {len(taking_part)} site(s) left, "
                f"federation.min_sites = {fed.min_sites}")

    def wait_for_round(self) -> bool:
        """Wait until enough selectable sites are connected (federation.min_sites, then up to
        gather_timeout_s for the rest); False when the engine stops first, or when too few sites
        taking part remain for a round ever to complete (the engine then fails the run).
        Call locked."""
        e, fed = self.engine, self.engine.fed
        if (why := self.cannot_go_on()) is not None:
            e.fail(why)
            return False
        taking_part = self.taking_part()
        while True:
            while len(self.selectable()) < fed.min_sites and not e.stopped.is_set():
                self.cond.wait(timeout=0.5)
            # Enough sites to run, but give the others a short window to connect: starting
            # without a site that is seconds away would leave it out of a whole round.
            gather_until = time.monotonic() + fed.gather_timeout_s
            while (len(self.selectable()) < len(taking_part) and not e.stopped.is_set()
                   and (left := gather_until - time.monotonic()) > 0):
                self.cond.wait(timeout=min(left, 0.5))
            if e.stopped.is_set():
                return False
            if len(self.selectable()) >= fed.min_sites:
                return True


__all__ = ["DUPLICATE_GRACE_S", "Session", "Sessions"]

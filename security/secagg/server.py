"""The server's side of one SecAgg round: collects, routes and finally unmasks only the sum.

Per step: receive_*() for each arriving message (each checked and refused with a precise
SecAggError), then close_*() when the step's deadline passes, which returns what to send next:

  receive_advertisement -> close_advertise()   -> {participant: KeyRoster}        (U1)
  receive_shares        -> close_share_keys()  -> {participant: ShareDelivery}    (U2)
  receive_masked_input  -> close_masked_input() -> SurvivorList (same for all)    (U3)
  receive_ack           -> close_consistency() -> {participant: UnmaskRequest}    (U4; each
                           request relays the acks of the recipient's share holders)
  receive_unmask        -> finish()            -> AggregateResult                 (U5)

A close_*() with fewer than t participants refuses (SecAggError) and aborts the round. The
server never sees an individual input: only masked vectors, and shares of at most one secret
per participant (self-mask seeds of survivors, mask keys of dropouts). It does not even keep the
masked vectors: each is added to a running sum mod 2^32 as it arrives (unmasking needs only the
sum of the survivors' inputs, and every sender of a masked input is a survivor), so its memory is
one vector whatever the number of participants.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from . import primitives as P
from . import shamir
from .config import SecAggProtocolSettings
from .errors import SecAggError
from .messages import (ConsistencyAck, KeyAdvertisement, KeyRoster, MaskedInput, ShareDelivery,
                       ShareKeys, SurvivorList, UnmaskRequest, UnmaskShares, check_round, coerce,
                       survivors_digest)
from .protocol import RoundSetup, as_uint32_vector, pair_sign

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AggregateResult:
    total: np.ndarray                 # uint32, sum of the survivors' encoded inputs mod 2^32
    survivors: tuple[str, ...]        # U3: whose inputs are in the sum
    dropped: tuple[str, ...]          # U2 minus U3: shared keys, then sent no input
    responders: tuple[str, ...]       # U5: sent unmasking shares


class SecAggServer:
    def __init__(self, run_id: str, round_no: int, roster: Sequence[str], settings: SecAggProtocolSettings,
                 vector_length: int, *, verify_keys: Optional[Mapping[str, P.VerifyKey]] = None,
                 graph_seed: Optional[bytes] = None):
        """`vector_length`: entries of every encoded input (update entries + 1 for the count)."""
        self.setup = RoundSetup.create(run_id, round_no, roster, settings, graph_seed)
        if isinstance(vector_length, bool) or not isinstance(vector_length, int) or vector_length < 1:
            raise SecAggError(f"vector_length must be an integer >= 1, got {vector_length!r}")
        if settings.active:
            missing = sorted(set(self.setup.roster) - set(verify_keys or {}))
            if missing:
                raise SecAggError(f"active option: no verification key for {', '.join(missing)}")
        self.verify_keys = dict(verify_keys or {})
        self.m = vector_length
        self.t = self.setup.threshold
        self.stage = "advertise"
        self.ads: dict[str, KeyAdvertisement] = {}
        self.shares: dict[str, ShareKeys] = {}
        self.inputs: dict[str, str] = {}          # sender of each masked input -> SHA-256 of it (hex)
        self._total = np.zeros(self.m, dtype=np.uint32)   # running sum mod 2^32 of the masked inputs
        self.acks: dict[str, ConsistencyAck] = {}
        self.requests: dict[str, UnmaskRequest] = {}
        self.unmasks: dict[str, UnmaskShares] = {}
        self.u3: tuple[str, ...] = ()

    # ------------------------------------------------------------------ helpers
    def _enter(self, stage: str, what: str) -> None:
        if self.stage != stage:
            raise SecAggError(f"server: {what} refused: round is at step {self.stage!r}")

    def _check(self, msg, cls, stage: str, members, collected: Mapping, what: str):
        self._enter(stage, what)
        msg = coerce(msg, cls, "server")
        check_round(msg, self.setup.run_id, self.setup.round, "server")
        if msg.sender not in members:
            if msg.sender not in self.setup.index:
                raise SecAggError(f"server: {what} from {msg.sender!r}, which is not in the round")
            raise SecAggError(f"server: {what} from {msg.sender!r}, which is not eligible at this step")
        if msg.sender in collected:
            raise SecAggError(f"server: duplicate {what} from {msg.sender!r}")
        return msg

    def _close(self, got: Sequence[str], what: str) -> None:
        if len(got) < self.t:
            self.stage = "aborted"
            log.warning("secagg %s round %s aborted: %d %s, threshold %d",
                        self.setup.run_id, self.setup.round, len(got), what, self.t)
            raise SecAggError(f"server: round aborted: only {len(got)} {what}, fewer than threshold t={self.t}")

    def _verify(self, sender: str, signature: bytes, payload: bytes, what: str) -> None:
        if self.setup.settings.active:
            P.verify(self.verify_keys[sender], signature, payload, f"server: {what} from {sender}")

    def _nbrs(self, u: str, among) -> list[str]:
        return sorted(self.setup.graph[u] & set(among))

    # ------------------------------------------------------------------ step 0
    def receive_advertisement(self, msg) -> None:
        ad = self._check(msg, KeyAdvertisement, "advertise", self.setup.index, self.ads, "key advertisement")
        self._verify(ad.sender, ad.signature, ad.signed_payload(), "key advertisement")
        if ad.enc_pk == ad.mask_pk:
            raise SecAggError(f"server: key advertisement from {ad.sender!r} uses one key for both purposes")
        self.ads[ad.sender] = ad

    def close_advertise(self) -> dict[str, KeyRoster]:
        self._enter("advertise", "closing key advertisement")
        self._close(list(self.ads), "participants advertised keys")
        self.stage = "share_keys"
        return {u: KeyRoster(self.setup.run_id, self.setup.round, u,
                             tuple(self.ads[v] for v in sorted(self.setup.holders_of(u) & set(self.ads))))
                for u in sorted(self.ads)}

    # ------------------------------------------------------------------ step 1
    def receive_shares(self, msg) -> None:
        sk = self._check(msg, ShareKeys, "share_keys", self.ads, self.shares, "key shares")
        expected = set(self._nbrs(sk.sender, self.ads))
        seen = set()
        for s in sk.shares:
            if s.sender != sk.sender:
                raise SecAggError(f"server: key shares from {sk.sender!r} hold a share claiming sender {s.sender!r}")
            if s.receiver not in expected:
                raise SecAggError(f"server: key shares from {sk.sender!r} hold a share for {s.receiver!r}, "
                                  "which is not one of its neighbours that advertised keys")
            if s.receiver in seen:
                raise SecAggError(f"server: key shares from {sk.sender!r} hold two shares for {s.receiver!r}")
            seen.add(s.receiver)
        if seen != expected:
            raise SecAggError(f"server: key shares from {sk.sender!r} miss shares for {sorted(expected - seen)}")
        self.shares[sk.sender] = sk

    def close_share_keys(self) -> dict[str, ShareDelivery]:
        self._enter("share_keys", "closing key sharing")
        self._close(list(self.shares), "participants shared keys")
        self.stage = "masked_input"
        inbox: dict[str, list] = {u: [] for u in self.shares}
        for u in sorted(self.shares):
            for s in self.shares[u].shares:
                if s.receiver in inbox:
                    inbox[s.receiver].append(s)
        return {u: ShareDelivery(self.setup.run_id, self.setup.round, u, tuple(v)) for u, v in inbox.items()}

    # ------------------------------------------------------------------ step 2
    def receive_masked_input(self, msg) -> None:
        mi = self._check(msg, MaskedInput, "masked_input", self.shares, self.inputs, "masked input")
        vec = as_uint32_vector(mi.vector, f"server: masked input from {mi.sender!r}")
        if vec.shape[0] != self.m:
            raise SecAggError(f"server: masked input from {mi.sender!r} has {vec.shape[0]} entries, expected {self.m}")
        np.add(self._total, vec, out=self._total)  # uint32 arithmetic wraps: the sum is mod 2^32
        self.inputs[mi.sender] = hashlib.sha256(vec.astype("<u4", copy=False).tobytes()).hexdigest()

    def close_masked_input(self) -> SurvivorList:
        self._enter("masked_input", "closing masked input")
        self._close(list(self.inputs), "participants sent masked input")
        self.u3 = tuple(sorted(self.inputs))
        self._digest = survivors_digest(self.setup.run_id, self.setup.round, self.u3)
        self.stage = "consistency"
        return SurvivorList(self.setup.run_id, self.setup.round, self.u3)

    # ------------------------------------------------------------------ step 3
    def receive_ack(self, msg) -> None:
        ack = self._check(msg, ConsistencyAck, "consistency", self.inputs, self.acks, "consistency acknowledgement")
        self._verify(ack.sender, ack.signature, ack.signed_payload(), "consistency acknowledgement")
        if ack.survivors_digest != self._digest:
            raise SecAggError(f"server: acknowledgement from {ack.sender!r} is for another survivor set")
        if ack.state_hash != self.ads[ack.sender].state_hash:
            raise SecAggError(f"server: acknowledgement from {ack.sender!r} names another global state "
                              "than its key advertisement")
        self.acks[ack.sender] = ack

    def close_consistency(self) -> dict[str, UnmaskRequest]:
        self._enter("consistency", "closing the consistency check")
        self._close(list(self.acks), "participants acknowledged the survivor set")
        self.stage = "unmask"
        u2, u3 = set(self.shares), set(self.u3)
        for u in sorted(self.acks):
            held = self.setup.holders_of(u) & u2
            acks = tuple(self.acks[v] for v in sorted(self.setup.holders_of(u) & set(self.acks)))
            self.requests[u] = UnmaskRequest(self.setup.run_id, self.setup.round, u, acks,
                                             tuple(sorted(held & u3)), tuple(sorted(held - u3)))
        return dict(self.requests)

    # ------------------------------------------------------------------ step 4
    def receive_unmask(self, msg) -> None:
        um = self._check(msg, UnmaskShares, "unmask", self.requests, self.unmasks, "unmasking shares")
        req = self.requests[um.sender]
        if set(um.self_mask_shares) != set(req.self_mask_of) or set(um.mask_key_shares) != set(req.mask_key_of):
            raise SecAggError(f"server: unmasking shares from {um.sender!r} do not answer the request")
        x = self.setup.index[um.sender]
        for kind, table in (("self-mask", um.self_mask_shares), ("mask-key", um.mask_key_shares)):
            for peer, raw in table.items():
                if shamir.Share.from_bytes(raw).x != x:
                    raise SecAggError(f"server: {kind} share of {peer!r} from {um.sender!r} has another "
                                      "participant's share index")
        self.unmasks[um.sender] = um

    def _recover(self, peer: str, kind: str) -> bytes:
        field = "self_mask_shares" if kind == "self-mask" else "mask_key_shares"
        got = [shamir.Share.from_bytes(getattr(um, field)[peer])
               for u, um in sorted(self.unmasks.items()) if peer in getattr(um, field)]
        if len(got) < self.t:
            raise SecAggError(f"server: cannot recover the {kind} seed of {peer!r}: {len(got)} shares "
                              f"returned, threshold is {self.t}")
        return shamir.reconstruct(got, self.t)

    def finish(self) -> AggregateResult:
        """Unmask and return the sum of the survivors' inputs (refuses with fewer than t responders)."""
        self._enter("unmask", "unmasking")
        try:
            self._close(list(self.unmasks), "participants sent unmasking shares")
            total = self._total   # the survivors' masked inputs, summed as they arrived (unmasked in place)
            for v in self.u3:
                b = self._recover(v, "self-mask")
                if self.setup.commitment(v, b) != self.ads[v].self_mask_commitment:
                    raise SecAggError(f"server: recovered self-mask seed of {v!r} fails its commitment "
                                      "(a share holder returned a wrong share)")
                P.add_mask_(total, b, -1)
            dropped = tuple(sorted(set(self.shares) - set(self.u3)))
            for v in dropped:
                kp = P.KeyPair.from_private_bytes(self._recover(v, "mask-key"))
                if kp.public != self.ads[v].mask_pk:
                    raise SecAggError(f"server: recovered mask key of {v!r} does not match its advertised key")
                for w in self._nbrs(v, self.u3):
                    seed = self.setup.mask_seed(kp.private, self.ads[w].mask_pk, v, w)
                    P.add_mask_(total, seed, -pair_sign(w, v))
        except SecAggError:
            self.stage = "aborted"
            raise
        self.stage = "done"
        return AggregateResult(total, self.u3, dropped, tuple(sorted(self.unmasks)))

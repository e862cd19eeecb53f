"""A participant's side of one SecAgg round (Bonawitz et al. CCS 2017, double masking), as a state
machine over messages. Call, in order and at most once each:

  advertise()                -> KeyAdvertisement
  share_keys(KeyRoster)      -> ShareKeys
  masked_input(ShareDelivery, encoded uint32 vector) -> MaskedInput
  acknowledge(SurvivorList)  -> ConsistencyAck
  unmask(UnmaskRequest)      -> UnmaskShares

Rules enforced here whatever the server asks: the client never reveals both the self-mask share
and the mask-key share of one peer; it reveals nothing unless at least t participants survived
and at least t acknowledged the same survivor set and the same global-state hash it holds; with
the active option, every advertisement and acknowledgement must carry a valid signature.
Any violation raises SecAggError and the client is then aborted (every later call refuses).
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Mapping, Optional, Sequence

import numpy as np

from . import primitives as P
from . import shamir
from .config import SecAggProtocolSettings
from .errors import SecAggError
from .messages import (HASH_BYTES, ConsistencyAck, EncryptedShare, KeyAdvertisement, KeyRoster,
                       MaskedInput, ShareDelivery, ShareKeys, SurvivorList, UnmaskRequest,
                       UnmaskShares, check_round, coerce, survivors_digest)
from .protocol import RoundSetup, as_uint32_vector, pair_sign

log = logging.getLogger(__name__)


class SecAggClient:
    def __init__(self, site_id: str, run_id: str, round_no: int, roster: Sequence[str],
                 settings: SecAggProtocolSettings, state_hash: bytes, *, signer: Optional[P.Signer] = None,
                 verify_keys: Optional[Mapping[str, P.VerifyKey]] = None,
                 graph_seed: Optional[bytes] = None):
        """`state_hash`: SHA-256 of the global state (model) this participant received for the round.
        `signer`/`verify_keys`: required when settings.active (this participant's certificate key,
        and every roster member's public key)."""
        self.setup = RoundSetup.create(run_id, round_no, roster, settings, graph_seed)
        if site_id not in self.setup.index:
            raise SecAggError(f"participant {site_id!r} is not in the round's roster")
        if not isinstance(state_hash, bytes) or len(state_hash) != HASH_BYTES:
            raise SecAggError(f"state_hash must be {HASH_BYTES} bytes (SHA-256 of the global state)")
        if settings.active:
            if signer is None:
                raise SecAggError("active option: a signer (certificate private key) is required")
            missing = sorted(set(self.setup.roster) - set(verify_keys or {}))
            if missing:
                raise SecAggError(f"active option: no verification key for {', '.join(missing)}")
        self.id = site_id
        self.state_hash = state_hash
        self.signer = signer
        self.verify_keys = dict(verify_keys or {})
        self.t = self.setup.threshold
        self.holders = self.setup.holders_of(site_id)  # neighbours and self
        self.stage = "advertise"
        self.revealed: dict[str, str] = {}  # peer -> "self_mask" | "mask_key": the reveal ledger
        self._held: dict[str, tuple[shamir.Share, shamir.Share]] = {}  # peer -> (b share, s_sk share)
        self._ads: dict[str, KeyAdvertisement] = {}
        self._u2: frozenset = frozenset()
        self._u3: tuple[str, ...] = ()

    # ------------------------------------------------------------------ helpers
    def _who(self) -> str:
        return f"participant {self.id}"

    @property
    def masked_input_may_have_left(self) -> bool:
        """Whether this participant may have produced (and so sent) its masked input: past the
        steps before it, or aborted at a step the client cannot place (counted as sent: a privacy
        ledger must not under-count)."""
        return self.stage not in ("advertise", "share_keys", "masked_input")

    def _enter(self, stage: str) -> None:
        if self.stage != stage:
            raise SecAggError(f"{self._who()}: cannot run step {stage!r} now (state: {self.stage})")

    def _refuse(self, reason: str) -> SecAggError:
        self.stage = "aborted"
        log.warning("secagg %s round %s: %s refused: %s", self.setup.run_id, self.setup.round, self.id, reason)
        return SecAggError(f"{self._who()}: {reason}")

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except SecAggError as err:
            if self.stage != "aborted":
                raise self._refuse(str(err)) from None
            raise

    def _sign(self, payload: bytes) -> bytes:
        return P.sign(self.signer, payload) if self.setup.settings.active else b""

    def _verify(self, sender: str, signature: bytes, payload: bytes, what: str) -> None:
        if self.setup.settings.active:
            P.verify(self.verify_keys[sender], signature, payload, f"{what} from {sender}")

    # ------------------------------------------------------------------ step 0
    def advertise(self) -> KeyAdvertisement:
        self._enter("advertise")
        self._enc = P.KeyPair.generate()
        self._mask = P.KeyPair.generate()
        self._b = os.urandom(P.SEED_BYTES)
        ad = KeyAdvertisement(self.setup.run_id, self.setup.round, self.id, self._enc.public,
                              self._mask.public, self.state_hash, self.setup.commitment(self.id, self._b))
        ad = replace(ad, signature=self._sign(ad.signed_payload()))
        self._own_ad = ad
        self.stage = "share_keys"
        return ad

    # ------------------------------------------------------------------ step 1
    def share_keys(self, roster_msg) -> ShareKeys:
        self._enter("share_keys")
        return self._guard(self._share_keys, roster_msg)

    def _share_keys(self, roster_msg) -> ShareKeys:
        msg = coerce(roster_msg, KeyRoster, self._who())
        check_round(msg, self.setup.run_id, self.setup.round, self._who())
        if msg.recipient != self.id:
            raise SecAggError(f"key roster is addressed to {msg.recipient!r}")
        ads: dict[str, KeyAdvertisement] = {}
        for ad in msg.advertisements:
            check_round(ad, self.setup.run_id, self.setup.round, self._who())
            if ad.sender not in self.holders:
                raise SecAggError(f"key roster holds an advertisement from {ad.sender!r}, "
                                  "which is not a neighbour in this round")
            if ad.sender in ads:
                raise SecAggError(f"key roster holds two advertisements from {ad.sender!r}")
            self._verify(ad.sender, ad.signature, ad.signed_payload(), "key advertisement")
            if ad.state_hash != self.state_hash:
                raise SecAggError(f"global state mismatch: {ad.sender!r} advertised a different "
                                  "global-state hash than the one this participant received")
            ads[ad.sender] = ad
        if ads.get(self.id) != self._own_ad:
            raise SecAggError("key roster does not carry this participant's own advertisement unchanged")
        keys = [k for ad in ads.values() for k in (ad.enc_pk, ad.mask_pk)]
        if len(set(keys)) != len(keys):
            raise SecAggError("key roster reuses a public key (every key must be distinct)")
        if len(ads) < self.t:
            raise SecAggError(f"only {len(ads)} of this participant's share holders advertised keys; "
                              f"threshold is {self.t}")
        xs = {v: self.setup.index[v] for v in ads}
        b_shares = shamir.split(self._b, list(xs.values()), self.t)
        s_shares = shamir.split(self._mask.private_bytes(), list(xs.values()), self.t)
        out = []
        for v, x in sorted(xs.items()):
            if v == self.id:
                self._held[v] = (b_shares[x], s_shares[x])
                continue
            key = self.setup.enc_key(self._enc.private, ads[v].enc_pk, self.id, v)
            plain = P.pack("shares", self.id, v, b_shares[x].to_bytes(), s_shares[x].to_bytes())
            out.append(EncryptedShare(self.id, v, P.seal(key, plain, self.setup.share_aad(self.id, v, self.state_hash))))
        self._ads = ads
        self.stage = "masked_input"
        return ShareKeys(self.setup.run_id, self.setup.round, self.id, tuple(out))

    # ------------------------------------------------------------------ step 2
    def masked_input(self, delivery, encoded) -> MaskedInput:
        self._enter("masked_input")
        return self._guard(self._masked_input, delivery, encoded)

    def _open_share(self, s: EncryptedShare) -> None:
        if s.receiver != self.id:
            raise SecAggError(f"share from {s.sender!r} is addressed to {s.receiver!r}, not to this participant")
        if s.sender == self.id or s.sender not in self._ads:
            raise SecAggError(f"share from {s.sender!r}, which advertised no keys to this participant")
        if s.sender in self._held:
            raise SecAggError(f"two shares from {s.sender!r}")
        key = self.setup.enc_key(self._enc.private, self._ads[s.sender].enc_pk, self.id, s.sender)
        plain = P.open_sealed(key, s.ciphertext, self.setup.share_aad(s.sender, self.id, self.state_hash),
                              f"share from {s.sender}")
        tag, sender, receiver, b_raw, s_raw = P.unpack(plain, 5, f"share from {s.sender}")
        if tag != b"shares" or sender != s.sender.encode() or receiver != self.id.encode():
            raise SecAggError(f"share from {s.sender!r}: inner sender/receiver do not match")
        b, sk = shamir.Share.from_bytes(b_raw), shamir.Share.from_bytes(s_raw)
        if b.x != self.setup.index[self.id] or sk.x != self.setup.index[self.id]:
            raise SecAggError(f"share from {s.sender!r} is for another share index")
        self._held[s.sender] = (b, sk)

    def _masked_input(self, delivery, encoded) -> MaskedInput:
        msg = coerce(delivery, ShareDelivery, self._who())
        check_round(msg, self.setup.run_id, self.setup.round, self._who())
        if msg.recipient != self.id:
            raise SecAggError(f"share delivery is addressed to {msg.recipient!r}")
        x = as_uint32_vector(encoded, self._who())
        for s in msg.shares:
            self._open_share(s)
        self._u2 = frozenset(self._held)  # holders (self included) that shared keys with us
        if len(self._u2) < self.t:
            raise SecAggError(f"only {len(self._u2)} share holders remain after key sharing; threshold is {self.t}")
        y = x.copy()
        P.add_mask_(y, self._b, +1)
        for v in sorted(self._u2 - {self.id}):
            seed = self.setup.mask_seed(self._mask.private, self._ads[v].mask_pk, self.id, v)
            P.add_mask_(y, seed, pair_sign(self.id, v))
        del self._b, self._mask  # secrets now live only as shares
        self.stage = "consistency"
        return MaskedInput(self.setup.run_id, self.setup.round, self.id, y)

    # ------------------------------------------------------------------ step 3
    def acknowledge(self, survivor_msg) -> ConsistencyAck:
        self._enter("consistency")
        return self._guard(self._acknowledge, survivor_msg)

    def _acknowledge(self, survivor_msg) -> ConsistencyAck:
        msg = coerce(survivor_msg, SurvivorList, self._who())
        check_round(msg, self.setup.run_id, self.setup.round, self._who())
        u3 = tuple(sorted(msg.survivors))
        unknown = sorted(set(u3) - set(self.setup.roster))
        if unknown:
            raise SecAggError(f"survivor list names participants not in the round: {unknown}")
        if len(u3) < self.t:
            raise SecAggError(f"survivor list has {len(u3)} participants, fewer than threshold t={self.t}")
        if self.id not in u3:
            raise SecAggError("survivor list omits this participant, which sent its masked input")
        bogus = sorted((set(u3) & self.holders) - self._u2)
        if bogus:
            raise SecAggError(f"survivor list names neighbours that never shared keys: {bogus}")
        self._u3 = u3
        ack = ConsistencyAck(self.setup.run_id, self.setup.round, self.id,
                             survivors_digest(self.setup.run_id, self.setup.round, u3), self.state_hash)
        ack = replace(ack, signature=self._sign(ack.signed_payload()))
        self._digest = ack.survivors_digest
        self.stage = "unmask"
        return ack

    # ------------------------------------------------------------------ step 4
    def unmask(self, request) -> UnmaskShares:
        self._enter("unmask")
        return self._guard(self._unmask, request)

    def _unmask(self, request) -> UnmaskShares:
        msg = coerce(request, UnmaskRequest, self._who())
        check_round(msg, self.setup.run_id, self.setup.round, self._who())
        if msg.recipient != self.id:
            raise SecAggError(f"unmask request is addressed to {msg.recipient!r}")
        want_b, want_s = set(msg.self_mask_of), set(msg.mask_key_of)
        both = sorted(want_b & want_s)
        if both:
            raise SecAggError(f"refusing to reveal both the self-mask share and the mask-key share of {both}")
        for peer in want_b:
            if self.revealed.get(peer, "self_mask") != "self_mask":
                raise SecAggError(f"refusing the self-mask share of {peer!r}: its mask-key share was revealed")
        for peer in want_s:
            if self.revealed.get(peer, "mask_key") != "mask_key":
                raise SecAggError(f"refusing the mask-key share of {peer!r}: its self-mask share was revealed")
        # consistency check: at least t acks, all for the survivor set and global state we hold
        seen = set()
        for ack in msg.acks:
            check_round(ack, self.setup.run_id, self.setup.round, self._who())
            if ack.sender in seen:
                raise SecAggError(f"two acknowledgements from {ack.sender!r}")
            if ack.sender not in self._u3 or ack.sender not in self.holders:
                raise SecAggError(f"acknowledgement from {ack.sender!r}, which is not a surviving neighbour")
            self._verify(ack.sender, ack.signature, ack.signed_payload(), "consistency acknowledgement")
            if ack.survivors_digest != self._digest:
                raise SecAggError(f"consistency check failed: {ack.sender!r} was told a different survivor set")
            if ack.state_hash != self.state_hash:
                raise SecAggError(f"global state mismatch: {ack.sender!r} acknowledged a different "
                                  "global-state hash than the one this participant received")
            seen.add(ack.sender)
        if len(seen) < self.t:
            raise SecAggError(f"only {len(seen)} share holders acknowledged the survivor set; threshold is {self.t}")
        if self.id not in seen:
            raise SecAggError("acknowledgements omit this participant's own")
        u3 = set(self._u3)
        exp_b = self._u2 & u3
        exp_s = self._u2 - u3
        if want_b != exp_b or want_s != exp_s:
            raise SecAggError(
                "unmask request does not match the acknowledged survivor set: asked self-mask shares of "
                f"{sorted(want_b)} and mask-key shares of {sorted(want_s)}; expected {sorted(exp_b)} and {sorted(exp_s)}")
        for peer in want_b:
            self.revealed[peer] = "self_mask"
        for peer in want_s:
            self.revealed[peer] = "mask_key"
        self.stage = "done"
        return UnmaskShares(self.setup.run_id, self.setup.round, self.id,
                            {p: self._held[p][0].to_bytes() for p in sorted(want_b)},
                            {p: self._held[p][1].to_bytes() for p in sorted(want_s)})

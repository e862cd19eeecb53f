"""The messages of one SecAgg round, in protocol order. Each has to_bytes()/from_bytes().

client -> server: KeyAdvertisement, ShareKeys, MaskedInput, ConsistencyAck, UnmaskShares
server -> client: KeyRoster, ShareDelivery, SurvivorList, UnmaskRequest
Every message names its run and round; receivers refuse any other run or round (replays).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .errors import SecAggError
from .primitives import DOMAIN, KEY_BYTES, pack
from .shamir import SHARE_BYTES
from .wire import Fields, b64, frame, unframe

HASH_BYTES = 32
MAX_SIG = 512


class _Message:
    KIND: ClassVar[int]

    def to_bytes(self) -> bytes:
        return frame(self.KIND, self._header(), self._blob())

    def _blob(self) -> bytes:
        return b""

    @classmethod
    def from_bytes(cls, data: bytes):
        header, blob = unframe(data, cls.KIND, cls.__name__)
        f = Fields(header, cls.__name__)
        msg = cls._parse(f, blob)
        if not cls._takes_blob and blob:
            raise SecAggError(f"{cls.__name__}: unexpected trailing bytes")
        return msg

    _takes_blob: ClassVar[bool] = False


def _round(f: Fields) -> dict:
    return {"run_id": f.str("run_id"), "round": f.int("round")}


def _sig(f: Fields) -> bytes:
    sig = f.bytes("signature", allow_empty=True)
    if len(sig) > MAX_SIG:
        raise SecAggError(f"{f.what}: signature longer than {MAX_SIG} bytes")
    return sig


# ---------------------------------------------------------------- step 0: advertise keys

@dataclass(frozen=True)
class KeyAdvertisement(_Message):
    """A participant's two X25519 public keys (for share encryption and for masks), the hash of
    the global state it received, and a commitment to its self-mask seed; signed if active."""
    KIND: ClassVar[int] = 1
    run_id: str
    round: int
    sender: str
    enc_pk: bytes
    mask_pk: bytes
    state_hash: bytes
    self_mask_commitment: bytes
    signature: bytes = b""

    def signed_payload(self) -> bytes:
        return pack(DOMAIN, "advertise", self.run_id, self.round, self.sender, self.enc_pk,
                    self.mask_pk, self.state_hash, self.self_mask_commitment)

    def _header(self) -> dict:
        return {"run_id": self.run_id, "round": self.round, "sender": self.sender,
                "enc_pk": b64(self.enc_pk), "mask_pk": b64(self.mask_pk),
                "state_hash": b64(self.state_hash), "commitment": b64(self.self_mask_commitment),
                "signature": b64(self.signature)}

    @classmethod
    def _parse(cls, f: Fields, blob: bytes = b"") -> "KeyAdvertisement":
        return cls(**_round(f), sender=f.str("sender"), enc_pk=f.bytes("enc_pk", KEY_BYTES),
                   mask_pk=f.bytes("mask_pk", KEY_BYTES), state_hash=f.bytes("state_hash", HASH_BYTES),
                   self_mask_commitment=f.bytes("commitment", HASH_BYTES), signature=_sig(f))


@dataclass(frozen=True)
class KeyRoster(_Message):
    """Server -> one participant: the advertisements of its neighbours (and its own) in U1."""
    KIND: ClassVar[int] = 2
    run_id: str
    round: int
    recipient: str
    advertisements: tuple[KeyAdvertisement, ...]

    def _header(self) -> dict:
        return {"run_id": self.run_id, "round": self.round, "recipient": self.recipient,
                "advertisements": [a._header() for a in self.advertisements]}

    @classmethod
    def _parse(cls, f: Fields, blob: bytes = b"") -> "KeyRoster":
        ads = tuple(KeyAdvertisement._parse(Fields(a, "KeyRoster.advertisement"))
                    for a in f.list("advertisements"))
        return cls(**_round(f), recipient=f.str("recipient"), advertisements=ads)


# ---------------------------------------------------------------- step 1: share keys

@dataclass(frozen=True)
class EncryptedShare:
    """AES-GCM ciphertext of (shares of sender's self-mask seed and mask key) for `receiver`."""
    sender: str
    receiver: str
    ciphertext: bytes

    def _header(self) -> dict:
        return {"sender": self.sender, "receiver": self.receiver, "ciphertext": b64(self.ciphertext)}

    @classmethod
    def _parse(cls, f: Fields) -> "EncryptedShare":
        ct = f.bytes("ciphertext")
        if len(ct) > 4096:
            raise SecAggError(f"{f.what}: ciphertext too long ({len(ct)} bytes)")
        return cls(f.str("sender"), f.str("receiver"), ct)


def _shares(f: Fields) -> tuple[EncryptedShare, ...]:
    return tuple(EncryptedShare._parse(Fields(s, f"{f.what}.share")) for s in f.list("shares"))


@dataclass(frozen=True)
class ShareKeys(_Message):
    """Participant -> server: one encrypted share bundle per neighbour."""
    KIND: ClassVar[int] = 3
    run_id: str
    round: int
    sender: str
    shares: tuple[EncryptedShare, ...]

    def _header(self) -> dict:
        return {"run_id": self.run_id, "round": self.round, "sender": self.sender,
                "shares": [s._header() for s in self.shares]}

    @classmethod
    def _parse(cls, f: Fields, blob: bytes = b"") -> "ShareKeys":
        return cls(**_round(f), sender=f.str("sender"), shares=_shares(f))


@dataclass(frozen=True)
class ShareDelivery(_Message):
    """Server -> one participant: the encrypted bundles addressed to it, from senders in U2."""
    KIND: ClassVar[int] = 4
    run_id: str
    round: int
    recipient: str
    shares: tuple[EncryptedShare, ...]

    def _header(self) -> dict:
        return {"run_id": self.run_id, "round": self.round, "recipient": self.recipient,
                "shares": [s._header() for s in self.shares]}

    @classmethod
    def _parse(cls, f: Fields, blob: bytes = b"") -> "ShareDelivery":
        return cls(**_round(f), recipient=f.str("recipient"), shares=_shares(f))


# ---------------------------------------------------------------- step 2: masked input

@dataclass(frozen=True)
class MaskedInput(_Message):
    """Participant -> server: y = x + PRG(b) + sum of +-PRG(s_uv), uint32, last entry = count."""
    KIND: ClassVar[int] = 5
    _takes_blob: ClassVar[bool] = True
    run_id: str
    round: int
    sender: str
    vector: np.ndarray = field(repr=False)

    def _header(self) -> dict:
        return {"run_id": self.run_id, "round": self.round, "sender": self.sender,
                "length": int(self.vector.shape[0])}

    def _blob(self) -> bytes:
        return np.ascontiguousarray(self.vector, dtype="<u4").tobytes()

    @classmethod
    def _parse(cls, f: Fields, blob: bytes = b"") -> "MaskedInput":
        length = f.int("length", 1, 1 << 31)
        if len(blob) != 4 * length:
            raise SecAggError(f"MaskedInput: vector holds {len(blob)} bytes, header says {length} "
                              f"entries ({4 * length} bytes)")
        vec = np.frombuffer(blob, dtype="<u4").astype(np.uint32)
        return cls(**_round(f), sender=f.str("sender"), vector=vec)


# ---------------------------------------------------------------- step 3: consistency check

@dataclass(frozen=True)
class SurvivorList(_Message):
    """Server -> participants: U3, the participants whose masked input the server accepted."""
    KIND: ClassVar[int] = 6
    run_id: str
    round: int
    survivors: tuple[str, ...]

    def _header(self) -> dict:
        return {"run_id": self.run_id, "round": self.round, "survivors": list(self.survivors)}

    @classmethod
    def _parse(cls, f: Fields, blob: bytes = b"") -> "SurvivorList":
        return cls(**_round(f), survivors=f.ids("survivors"))


def survivors_digest(run_id: str, round_no: int, survivors) -> bytes:
    return hashlib.sha256(pack(DOMAIN, "survivors", run_id, round_no, *sorted(survivors))).digest()


@dataclass(frozen=True)
class ConsistencyAck(_Message):
    """Participant -> server: 'I was told survivors U3 (digest) and I hold global state H';
    signed when the active option is on. The server relays the acks to every participant."""
    KIND: ClassVar[int] = 7
    run_id: str
    round: int
    sender: str
    survivors_digest: bytes
    state_hash: bytes
    signature: bytes = b""

    def signed_payload(self) -> bytes:
        return pack(DOMAIN, "consistency", self.run_id, self.round, self.sender,
                    self.survivors_digest, self.state_hash)

    def _header(self) -> dict:
        return {"run_id": self.run_id, "round": self.round, "sender": self.sender,
                "survivors_digest": b64(self.survivors_digest), "state_hash": b64(self.state_hash),
                "signature": b64(self.signature)}

    @classmethod
    def _parse(cls, f: Fields, blob: bytes = b"") -> "ConsistencyAck":
        return cls(**_round(f), sender=f.str("sender"),
                   survivors_digest=f.bytes("survivors_digest", HASH_BYTES),
                   state_hash=f.bytes("state_hash", HASH_BYTES), signature=_sig(f))


# ---------------------------------------------------------------- step 4: unmask

@dataclass(frozen=True)
class UnmaskRequest(_Message):
    """Server -> one participant: the relayed acks of its share holders in U4, and whose self-mask shares (peers in U3)
    and whose mask-key shares (peers in U2 minus U3) it asks for."""
    KIND: ClassVar[int] = 8
    run_id: str
    round: int
    recipient: str
    acks: tuple[ConsistencyAck, ...]
    self_mask_of: tuple[str, ...]
    mask_key_of: tuple[str, ...]

    def _header(self) -> dict:
        return {"run_id": self.run_id, "round": self.round, "recipient": self.recipient,
                "acks": [a._header() for a in self.acks], "self_mask_of": list(self.self_mask_of),
                "mask_key_of": list(self.mask_key_of)}

    @classmethod
    def _parse(cls, f: Fields, blob: bytes = b"") -> "UnmaskRequest":
        acks = tuple(ConsistencyAck._parse(Fields(a, "UnmaskRequest.ack")) for a in f.list("acks"))
        return cls(**_round(f), recipient=f.str("recipient"), acks=acks,
                   self_mask_of=f.ids("self_mask_of"), mask_key_of=f.ids("mask_key_of"))


@dataclass(frozen=True)
class UnmaskShares(_Message):
    """Participant -> server: serialized Shamir shares, keyed by the peer they belong to."""
    KIND: ClassVar[int] = 9
    run_id: str
    round: int
    sender: str
    self_mask_shares: dict
    mask_key_shares: dict

    def _header(self) -> dict:
        return {"run_id": self.run_id, "round": self.round, "sender": self.sender,
                "self_mask_shares": {k: b64(v) for k, v in self.self_mask_shares.items()},
                "mask_key_shares": {k: b64(v) for k, v in self.mask_key_shares.items()}}

    @classmethod
    def _parse(cls, f: Fields, blob: bytes = b"") -> "UnmaskShares":
        return cls(**_round(f), sender=f.str("sender"),
                   self_mask_shares=f.bytes_map("self_mask_shares", SHARE_BYTES),
                   mask_key_shares=f.bytes_map("mask_key_shares", SHARE_BYTES))


def check_round(msg, run_id: str, round_no: int, who: str) -> None:
    """Refuse a message from another run or round (a replay)."""
    if msg.run_id != run_id or msg.round != round_no:
        raise SecAggError(f"{who}: {type(msg).__name__} is for run {msg.run_id!r} round {msg.round}, "
                          f"this is run {run_id!r} round {round_no} (replayed or misrouted)")


def coerce(msg, cls, who: str):
    """Accept a message object or its bytes."""
    if isinstance(msg, cls):
        return msg
    if isinstance(msg, (bytes, bytearray, memoryview)):
        return cls.from_bytes(bytes(msg))
    raise SecAggError(f"{who}: expected {cls.__name__} or its bytes, got {type(msg).__name__}")

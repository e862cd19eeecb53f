"""SecAgg under attack: forged, tampered, misaddressed and replayed messages, a server that asks
for both shares of one participant or lies about survivors, and malformed bytes."""
from __future__ import annotations

import dataclasses
import hashlib
import logging

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from security.secagg import (ConsistencyAck, EncryptedShare, KeyAdvertisement, KeyRoster, MaskedInput,
                             SecAggClient, SecAggError, SecAggServer, SecAggProtocolSettings, ShareDelivery,
                             ShareKeys, SurvivorList, UnmaskRequest, UnmaskShares)
from security.secagg.primitives import KeyPair

HASH = hashlib.sha256(b"model v1").digest()


class Round:
    """Five participants and a server, stepped by hand so a test can interfere between steps."""

    def __init__(self, n=5, t=3, m=6, round_no=1, active=False, run_id="run-1"):
        self.ids = [f"site-{c}" for c in "abcdefgh"[:n]]
        self.settings = SecAggProtocolSettings(threshold=t, active=active)
        self.keys = {u: ed25519.Ed25519PrivateKey.generate() for u in self.ids} if active else {}
        vk = {u: k.public_key() for u, k in self.keys.items()} or None
        self.server = SecAggServer(run_id, round_no, self.ids, self.settings, m, verify_keys=vk)
        self.clients = {u: SecAggClient(u, run_id, round_no, self.ids, self.settings, HASH,
                                        signer=self.keys.get(u), verify_keys=vk) for u in self.ids}
        rng = np.random.default_rng(round_no)
        self.inputs = {u: rng.integers(0, 2**32, m, dtype=np.uint32) for u in self.ids}

    def advertise(self):
        self.ads = {u: c.advertise() for u, c in self.clients.items()}
        for ad in self.ads.values():
            self.server.receive_advertisement(ad)
        self.rosters = self.server.close_advertise()
        return self

    def share(self, skip=()):
        self.advertise()
        self.sk = {u: c.share_keys(self.rosters[u]) for u, c in self.clients.items() if u not in skip}
        for msg in self.sk.values():
            self.server.receive_shares(msg)
        self.deliveries = self.server.close_share_keys()
        return self

    def mask(self, skip=()):
        self.share()
        self.masked = {u: c.masked_input(self.deliveries[u], self.inputs[u])
                       for u, c in self.clients.items() if u not in skip}
        for msg in self.masked.values():
            self.server.receive_masked_input(msg)
        self.survivors = self.server.close_masked_input()
        return self

    def ack(self, skip=()):
        self.mask(skip)
        self.acks = {u: self.clients[u].acknowledge(self.survivors) for u in self.survivors.survivors}
        for a in self.acks.values():
            self.server.receive_ack(a)
        self.requests = self.server.close_consistency()
        return self


# ---------------------------------------------------------------- share encryption

def test_tampered_share_ciphertext_fails_authentication():
    r = Round().share()
    d = r.deliveries["site-c"]
    s0 = d.shares[0]
    ct = bytearray(s0.ciphertext)
    ct[20] ^= 0x01
    bad = dataclasses.replace(d, shares=(dataclasses.replace(s0, ciphertext=bytes(ct)),) + d.shares[1:])
    with pytest.raises(SecAggError, match="authentication failed"):
        r.clients["site-c"].masked_input(bad, r.inputs["site-c"])
    assert r.clients["site-c"].stage == "aborted"


def test_share_addressed_to_someone_else_is_refused():
    r = Round().share()
    for_d = r.deliveries["site-d"].shares[0]
    d = r.deliveries["site-c"]
    with pytest.raises(SecAggError, match="addressed to 'site-d', not to this participant"):
        r.clients["site-c"].masked_input(dataclasses.replace(d, shares=d.shares + (for_d,)), r.inputs["site-c"])
    # relabelled to look as if addressed to c: the pairwise key and the associated data disagree
    r = Round().share()
    for_d = r.deliveries["site-d"].shares[0]
    d = r.deliveries["site-c"]
    relabelled = dataclasses.replace(for_d, receiver="site-c")
    rest = tuple(s for s in d.shares if s.sender != for_d.sender)
    with pytest.raises(SecAggError, match="authentication failed"):
        r.clients["site-c"].masked_input(dataclasses.replace(d, shares=rest + (relabelled,)), r.inputs["site-c"])


def test_share_relabelled_to_another_sender_fails_authentication():
    r = Round().share()
    d = r.deliveries["site-c"]
    a, b = d.shares[0], d.shares[1]
    swapped = (dataclasses.replace(a, sender=b.sender), dataclasses.replace(b, sender=a.sender)) + d.shares[2:]
    with pytest.raises(SecAggError, match="authentication failed"):
        r.clients["site-c"].masked_input(dataclasses.replace(d, shares=swapped), r.inputs["site-c"])


def test_replay_from_another_round_is_refused():
    old = Round(round_no=1).share()
    new = Round(round_no=2).share()
    # the whole old message: refused by its header
    with pytest.raises(SecAggError, match=r"is for run 'run-1' round 1, this is run 'run-1' round 2"):
        new.clients["site-c"].masked_input(old.deliveries["site-c"], new.inputs["site-c"])
    with pytest.raises(SecAggError, match="replayed"):
        Round(round_no=2).server.receive_advertisement(old.ads["site-a"])
    # an old ciphertext inside a fresh header: refused by authentication
    new = Round(round_no=2).share()
    d = new.deliveries["site-c"]
    spliced = dataclasses.replace(d, shares=(old.deliveries["site-c"].shares[0],) + d.shares[1:])
    with pytest.raises(SecAggError, match="authentication failed"):
        new.clients["site-c"].masked_input(spliced, new.inputs["site-c"])


def test_server_that_isolates_a_site_with_another_model_is_caught():
    r = Round()
    other = hashlib.sha256(b"model for site-c only").digest()
    r.clients["site-c"].state_hash = other
    r.advertise()
    # the site itself sees the mismatch in the advertisements
    with pytest.raises(SecAggError, match="global state mismatch"):
        r.clients["site-c"].share_keys(r.rosters["site-c"])
    # a server that also rewrites the hash in the (unsigned) advertisements is caught when shares
    # are decrypted: the global-state hash is part of the associated data
    r = Round()
    r.clients["site-c"].state_hash = other
    r.advertise()
    forged = dataclasses.replace(r.rosters["site-c"], advertisements=tuple(
        ad if ad.sender == "site-c" else dataclasses.replace(ad, state_hash=other)
        for ad in r.rosters["site-c"].advertisements))
    sk = {u: c.share_keys(forged if u == "site-c" else r.rosters[u]) for u, c in r.clients.items()
          if u == "site-c"}
    for u in r.ids:
        if u != "site-c":
            ros = r.rosters[u]
            sk[u] = r.clients[u].share_keys(dataclasses.replace(ros, advertisements=tuple(
                dataclasses.replace(ad, state_hash=HASH) if ad.sender == "site-c" else ad
                for ad in ros.advertisements)))
    for msg in sk.values():
        r.server.receive_shares(msg)
    deliveries = r.server.close_share_keys()
    with pytest.raises(SecAggError, match="authentication failed"):
        r.clients["site-a"].masked_input(deliveries["site-a"], r.inputs["site-a"])
    with pytest.raises(SecAggError, match="authentication failed"):
        r.clients["site-c"].masked_input(deliveries["site-c"], r.inputs["site-c"])


# ---------------------------------------------------------------- the share rule

def test_server_asking_for_both_shares_of_one_peer_is_refused(caplog):
    r = Round().ack(skip=("site-b",))
    req = r.requests["site-a"]
    assert "site-b" in req.mask_key_of
    greedy = dataclasses.replace(req, self_mask_of=req.self_mask_of + ("site-b",))
    with caplog.at_level(logging.WARNING, logger="security.secagg.client"):
        with pytest.raises(SecAggError, match=r"refusing to reveal both the self-mask share and the mask-key share of \['site-b'\]"):
            r.clients["site-a"].unmask(greedy)
    assert "refusing to reveal both" in caplog.text
    # once refused, the client stays aborted: no second chance for the server
    with pytest.raises(SecAggError, match="aborted"):
        r.clients["site-a"].unmask(req)


def test_server_asking_for_the_mask_key_of_a_survivor_is_refused():
    r = Round().ack(skip=("site-b",))
    req = r.requests["site-a"]
    flipped = dataclasses.replace(req, self_mask_of=tuple(p for p in req.self_mask_of if p != "site-c"),
                                  mask_key_of=req.mask_key_of + ("site-c",))
    with pytest.raises(SecAggError, match="does not match the acknowledged survivor set"):
        r.clients["site-a"].unmask(flipped)
    assert not r.clients["site-a"].revealed


def test_client_never_reveals_both_across_rounds_of_requests():
    r = Round().ack(skip=("site-b",))
    c = r.clients["site-a"]
    shares = c.unmask(r.requests["site-a"])
    assert set(shares.mask_key_shares) == {"site-b"} and "site-b" not in shares.self_mask_shares
    with pytest.raises(SecAggError, match="cannot run step 'unmask' now"):
        c.unmask(r.requests["site-a"])


# ---------------------------------------------------------------- thresholds

def test_threshold_checks_whatever_the_server_says():
    r = Round().mask()
    few = SurvivorList(r.survivors.run_id, r.survivors.round, ("site-a", "site-b"))
    with pytest.raises(SecAggError, match="fewer than threshold t=3"):
        r.clients["site-a"].acknowledge(few)
    r = Round().ack()
    req = r.requests["site-a"]
    with pytest.raises(SecAggError, match="only 2 share holders acknowledged"):
        r.clients["site-a"].unmask(dataclasses.replace(req, acks=req.acks[:2]))
    assert not r.clients["site-a"].revealed
    with pytest.raises(SecAggError, match="only 2 participants sent masked input, fewer than threshold t=3"):
        Round().mask(skip=("site-a", "site-b", "site-c"))
    with pytest.raises(SecAggError, match="only 0 participants advertised keys"):
        Round().server.close_advertise()


def test_survivor_set_inconsistency_is_caught_in_the_consistency_round():
    r = Round(active=True).mask()
    lie = SurvivorList(r.survivors.run_id, r.survivors.round, tuple(u for u in r.ids if u != "site-b"))
    acks = {u: r.clients[u].acknowledge(lie if u == "site-e" else r.survivors) for u in r.ids}
    with pytest.raises(SecAggError, match="another survivor set"):
        r.server.receive_ack(acks["site-e"])
    req = UnmaskRequest("run-1", 1, "site-a", tuple(acks[u] for u in sorted(acks)), tuple(r.ids), ())
    with pytest.raises(SecAggError, match="'site-e' was told a different survivor set"):
        r.clients["site-a"].unmask(req)
    # the server cannot paper over it by forging site-e's ack: signatures
    r2 = Round(active=True).mask()
    acks = {u: r2.clients[u].acknowledge(r2.survivors) for u in r2.ids}
    forged = dataclasses.replace(acks["site-e"], survivors_digest=bytes(32))
    forged = dataclasses.replace(forged, survivors_digest=acks["site-a"].survivors_digest, state_hash=bytes(32))
    req = UnmaskRequest("run-1", 1, "site-a", tuple(forged if u == "site-e" else acks[u] for u in sorted(acks)),
                        tuple(r2.ids), ())
    with pytest.raises(SecAggError, match="bad signature"):
        r2.clients["site-a"].unmask(req)


# ---------------------------------------------------------------- signatures (active option)

def test_forged_key_advertisement_is_refused_when_signing_is_on():
    r = Round(active=True)
    ads = {u: c.advertise() for u, c in r.clients.items()}
    mitm = dataclasses.replace(ads["site-b"], mask_pk=KeyPair.generate().public)
    with pytest.raises(SecAggError, match="key advertisement from site-b: bad signature"):
        r.server.receive_advertisement(mitm)
    for ad in ads.values():
        r.server.receive_advertisement(ad)
    rosters = r.server.close_advertise()
    ros = rosters["site-a"]
    tampered = dataclasses.replace(ros, advertisements=tuple(mitm if a.sender == "site-b" else a
                                                             for a in ros.advertisements))
    with pytest.raises(SecAggError, match="bad signature"):
        r.clients["site-a"].share_keys(tampered)
    r = Round(active=True).advertise()
    ros = r.rosters["site-a"]
    unsigned = dataclasses.replace(ros, advertisements=tuple(dataclasses.replace(a, signature=b"")
                                                             if a.sender == "site-b" else a for a in ros.advertisements))
    with pytest.raises(SecAggError, match="key advertisement from site-b: signature missing"):
        r.clients["site-a"].share_keys(unsigned)


def test_active_option_requires_keys():
    with pytest.raises(SecAggError, match="signer"):
        SecAggClient("site-a", "r", 0, ["site-a", "site-b", "site-c"], SecAggProtocolSettings(active=True), HASH)
    with pytest.raises(SecAggError, match="no verification key for site-c"):
        SecAggServer("r", 0, ["site-a", "site-b", "site-c"], SecAggProtocolSettings(active=True), 4,
                     verify_keys={"site-a": None, "site-b": None})


# ---------------------------------------------------------------- server input checks

def test_server_refuses_bad_submissions():
    r = Round()
    stranger = KeyAdvertisement("run-1", 1, "site-z", bytes(32), b"\x01" * 32, HASH, bytes(32))
    with pytest.raises(SecAggError, match="'site-z', which is not in the round"):
        r.server.receive_advertisement(stranger)
    r.advertise()
    with pytest.raises(SecAggError, match="refused: round is at step 'share_keys'"):
        r.server.receive_advertisement(r.ads["site-a"])
    sk = r.clients["site-a"].share_keys(r.rosters["site-a"])
    r.server.receive_shares(sk)
    with pytest.raises(SecAggError, match="duplicate key shares from 'site-a'"):
        r.server.receive_shares(sk)
    sk_b = r.clients["site-b"].share_keys(r.rosters["site-b"])
    with pytest.raises(SecAggError, match="claiming sender 'site-b'"):
        r.server.receive_shares(dataclasses.replace(sk_b, sender="site-c"))
    with pytest.raises(SecAggError, match="miss shares for"):
        r.server.receive_shares(dataclasses.replace(sk_b, shares=sk_b.shares[:-1]))

    r = Round().share()
    y = r.clients["site-a"].masked_input(r.deliveries["site-a"], r.inputs["site-a"])
    with pytest.raises(SecAggError, match="has 5 entries, expected 6"):
        r.server.receive_masked_input(dataclasses.replace(y, vector=y.vector[:5]))
    r.server.receive_masked_input(y)
    with pytest.raises(SecAggError, match="duplicate masked input"):
        r.server.receive_masked_input(y.to_bytes())


def test_client_refuses_out_of_order_and_misaddressed_steps():
    r = Round().advertise()
    c = r.clients["site-a"]
    with pytest.raises(SecAggError, match="cannot run step 'masked_input' now"):
        c.masked_input(ShareDelivery("run-1", 1, "site-a", ()), r.inputs["site-a"])
    with pytest.raises(SecAggError, match="addressed to 'site-b'"):
        c.share_keys(r.rosters["site-b"])


# ---------------------------------------------------------------- wire format

def test_every_message_round_trips_through_bytes():
    r = Round(active=True).ack(skip=("site-b",))
    c = r.clients["site-a"]
    msgs = [r.ads["site-a"], r.rosters["site-a"], r.sk["site-a"], r.deliveries["site-a"],
            r.masked["site-a"], r.survivors, r.acks["site-a"], r.requests["site-a"],
            c.unmask(r.requests["site-a"])]
    for msg in msgs:
        back = type(msg).from_bytes(msg.to_bytes())
        if isinstance(msg, MaskedInput):
            assert np.array_equal(back.vector, msg.vector) and back.sender == msg.sender
        else:
            assert back == msg


def reheader(data: bytes, fn) -> bytes:
    """Apply fn to the JSON header and re-frame with the right length."""
    import struct
    (hlen,) = struct.unpack(">I", data[5:9])
    header = fn(data[9:9 + hlen])
    return data[:5] + struct.pack(">I", len(header)) + header + data[9 + hlen:]


@pytest.mark.parametrize("mutate, error", [
    (lambda b: b[:3], "not a SecAgg message"),
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[:4] + bytes([3]) + b[5:], "wrong message kind 3"),
    (lambda b: b[:9], "truncated header"),
    (lambda b: reheader(b, lambda h: h[:-1]), "not valid JSON"),
    (lambda b: reheader(b, lambda h: b"[1]"), "header must be a JSON object"),
    (lambda b: reheader(b, lambda h: h.replace(b'"round":1', b'"round":"1"')), "field 'round' must be an integer"),
    (lambda b: reheader(b, lambda h: h.replace(b'"round":1', b'"round":-1')), "field 'round' must be an integer"),
    (lambda b: reheader(b, lambda h: h.replace(b'"sender":"site-a"', b'"sendr":"site-a"')), "missing field 'sender'"),
    (lambda b: reheader(b, lambda h: h.replace(b'"enc_pk":"', b'"enc_pk":"!')), "field 'enc_pk' is not valid base64"),
    (lambda b: b + b"extra", "unexpected trailing bytes"),
])
def test_malformed_bytes_are_refused_with_precise_errors(mutate, error):
    ad = Round().clients["site-a"].advertise()
    with pytest.raises(SecAggError, match=error):
        KeyAdvertisement.from_bytes(mutate(ad.to_bytes()))


def test_wrong_key_length_and_vector_length_mismatch():
    ad = KeyAdvertisement("r", 0, "a", b"\x01" * 31, b"\x02" * 32, HASH, bytes(32))
    with pytest.raises(SecAggError, match="field 'enc_pk' must be 32 bytes, got 31"):
        KeyAdvertisement.from_bytes(ad.to_bytes())
    y = MaskedInput("r", 0, "a", np.arange(4, dtype=np.uint32)).to_bytes()
    with pytest.raises(SecAggError, match="header says 4 entries"):
        MaskedInput.from_bytes(y[:-1])
    u = UnmaskShares("r", 0, "a", {"b": b"x" * 10}, {}).to_bytes()
    with pytest.raises(SecAggError, match="must be 68 bytes"):
        UnmaskShares.from_bytes(u)

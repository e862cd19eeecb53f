"""A site's side of secure aggregation: encode its update once, then answer each step the
coordinator opens, through security.secagg's client state machine.

What leaves the site here is only what the protocol sends: public keys, shares encrypted to
other sites, and the update masked so that only the sum over sites can be unmasked. The client
enforces the rules that hold whatever the coordinator asks (never both secrets of one peer,
the same global state acknowledged by everyone, no unmasking below t).
"""
from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
from cryptography import x509

from kt_core import vector
from kt_core.config import RunConfig
from security import secagg
from security.pki import PKIError, identity_from_pem
from security.pki.identity import verify_chain
from security.secagg import SecAggClient, SecAggError, SecAggSettings

log = logging.getLogger(__name__)

_PARSE = {"share_keys": secagg.KeyRoster, "masked_input": secagg.ShareDelivery,
          "consistency": secagg.SurvivorList, "unmask": secagg.UnmaskRequest}


def peer_verify_keys(certificates: Mapping[str, bytes], roster, ca_pem: bytes) -> dict:
    """Each roster member's certificate key, after checking the certificate chains to the
    federation CA and names that member: the coordinator relays them but cannot forge them."""
    keys = {}
    for pid in roster:
        pem = certificates.get(pid)
        if not pem:
            raise SecAggError(f"active option: the task carries no certificate for {pid!r}")
        try:
            verify_chain(pem, ca_pem)
            identity = identity_from_pem(pem)
        except PKIError as err:
            raise SecAggError(f"active option: certificate relayed for {pid!r} is not valid: {err}") from None
        if identity.name != pid or identity.role != "participant":
            raise SecAggError(f"active option: certificate relayed for {pid!r} names {identity.name!r} "
                              f"({identity.role})")
        keys[pid] = x509.load_pem_x509_certificate(pem).public_key()
    return keys


class SecureUpdate:
    """One round's update under secure aggregation, from encoding to the unmasking shares."""

    def __init__(self, site: str, run_id: str, round_no: int, task_id: bytes, roster, global_state_digest: str,
                 config: RunConfig, update: Mapping[str, np.ndarray], num_samples: int,
                 shared: vector.Specs, *, metrics: Mapping[str, float] | None = None, signer=None,
                 verify_keys=None):
        self.site = site
        self.metrics = dict(metrics or {})   # reported with the masked input (no sample count)
        self.round = round_no
        self.task_id = task_id
        roster = list(roster)
        settings = SecAggSettings.from_mapping(config.secagg.protocol_settings()).validate(len(roster))
        self.client = SecAggClient(site, run_id, round_no, roster, settings, bytes.fromhex(global_state_digest),
                                   signer=signer, verify_keys=verify_keys)
        # Weighted mean from a sum: encode weight / scale * clip(update) and carry the weight, which
        # the masking hides like the rest of the vector.
        scale = config.secagg_weight_scale()
        weight = min(int(num_samples), scale)
        flat = vector.flatten(update, shared)
        norm = float(np.linalg.norm(flat))
        if norm > settings.clip_norm:
            log.info("%s: round %d: update norm %.4g clipped to secagg.clip_norm %.4g", site, round_no, norm,
                     settings.clip_norm)
        clipped = secagg.clip_l2(flat, settings.clip_norm)
        self.encoded = secagg.encode_input(clipped * (weight / scale), weight, settings.clip_norm, settings.bits,
                                           len(roster))
        self.flat = flat
        self.done = False
        self.task = None   # the RoundTask this update answers (its audit head is countersigned)

    def advertise(self) -> bytes:
        return self.client.advertise().to_bytes()

    def answer(self, step: str, payload: bytes) -> bytes:
        """The reply to the message that opens `step`; raises SecAggError when the client refuses."""
        if step not in _PARSE:
            raise SecAggError(f"the coordinator opened an unknown step {step!r}")
        message = _PARSE[step].from_bytes(payload)
        if step == "share_keys":
            reply = self.client.share_keys(message)
        elif step == "masked_input":
            reply = self.client.masked_input(message, self.encoded)
        elif step == "consistency":
            reply = self.client.acknowledge(message)
        else:
            reply = self.client.unmask(message)
            self.done = True
        return reply.to_bytes()

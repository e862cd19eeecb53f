"""A site's side of secure aggregation: encode its update once (SecAggUpdate), then answer each
step the coordinator opens on the assignment stream and submit the reply (SecAggSession), through
security.secagg's client state machine.

What leaves the site here is only what the protocol sends: public keys, shares encrypted to
other sites, and the update masked so that only the sum over sites can be unmasked. The client
enforces the rules that hold whatever the coordinator asks (never both secrets of one peer,
the same global state acknowledged by everyone, no unmasking below t).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Mapping

import grpc
import numpy as np
from cryptography import x509

from kt_core import vector
from kt_core.config import RunConfig
from kt_core.wire import convert
from kt_core.wire import federation_pb2 as pb
from participant import policy as site_policy
from participant.site_run import ROUND_CODES
from security import secagg
from security.pki import PKIError, identity_from_pem
from security.pki.identity import verify_chain
from security.pki.primitives import load_private_key
from security.secagg import SecAggClient, SecAggError, SecAggProtocolSettings

log = logging.getLogger(__name__)

_PARSE = {"share_keys": secagg.KeyRoster, "masked_input": secagg.ShareDelivery,
          "consistency": secagg.SurvivorList, "unmask": secagg.UnmaskRequest}


def peer_verify_keys(certificates: Mapping[str, bytes], roster, ca_pem: bytes) -> dict:
    """Each roster member's certificate key, after checking the certificate chains to the
    federation CA and names that member: the coordinator relays them but cannot forge them."""
    keys = {}
    for site_id in roster:
        pem = certificates.get(site_id)
        if not pem:
            raise SecAggError(f"active option: the assignment carries no certificate for {site_id!r}")
        try:
            verify_chain(pem, ca_pem)
            identity = identity_from_pem(pem)
        except PKIError as err:
            raise SecAggError(f"active option: certificate relayed for {site_id!r} is not valid: {err}") from None
        if identity.name != site_id or identity.role != "participant":
            raise SecAggError(f"active option: certificate relayed for {site_id!r} names {identity.name!r} "
                              f"({identity.role})")
        keys[site_id] = x509.load_pem_x509_certificate(pem).public_key()
    return keys


class SecAggUpdate:
    """One round's update under secure aggregation, from encoding to the unmasking shares."""

    def __init__(self, site: str, run_id: str, round_no: int, attempt_id: bytes, roster, global_state_digest: str,
                 config: RunConfig, update: Mapping[str, np.ndarray], num_samples: int,
                 shared: vector.Specs, *, metrics: Mapping[str, float] | None = None, signer=None,
                 verify_keys=None):
        self.site = site
        self.metrics = dict(metrics or {})   # reported with the masked input (no sample count)
        self.round = round_no
        self.attempt_id = attempt_id
        roster = list(roster)
        settings = SecAggProtocolSettings.from_section(config.secagg).validate(len(roster))
        self.client = SecAggClient(site, run_id, round_no, roster, settings, bytes.fromhex(global_state_digest),
                                   signer=signer, verify_keys=verify_keys)
        # Weighted mean from a sum: encode weight / scale * clip(update) and carry the weight, which
        # the masking hides like the rest of the vector.
        scale = config.max_weight()
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



class SecAggSession:
    """This site's part in one secure aggregation round: its SecAggUpdate, and each step the
    coordinator opens on the assignment stream answered and submitted."""

    def __init__(self, site_run, stub, assignment: pb.RoundAssignment, update: SecAggUpdate):
        self.site_run, self.stub, self.assignment, self.update = site_run, stub, assignment, update
        self.round, self.attempt_id = assignment.header.round, assignment.attempt_id

    @classmethod
    def begin(cls, run, stub, assignment: pb.RoundAssignment, update: Mapping[str, np.ndarray],
              metrics: Mapping[str, float]) -> "SecAggSession | None":
        """Encode the update and advertise keys; None when this site does not take part."""
        tls, config = run.settings.tls, run.trainer.config
        try:
            signer = verify_keys = None
            if config.secagg.active:
                if tls is None:
                    raise SecAggError("the active option needs this site's certificate key (no --insecure)")
                signer = load_private_key(Path(tls.key).read_bytes(), "site key")
                verify_keys = peer_verify_keys(assignment.peer_certificates, assignment.roster, Path(tls.ca_cert).read_bytes())
            secure = SecAggUpdate(run.site, run.run_id, assignment.header.round, assignment.attempt_id, assignment.roster,
                                  assignment.global_state_digest, config, update, run.trainer.num_samples,
                                  run.trainer.shared_specs(), metrics=metrics, signer=signer, verify_keys=verify_keys)
        except SecAggError as err:
            log.error("%s: round %d: not taking part in secure aggregation: %s", run.site, assignment.header.round, err)
            return None
        session = cls(run, stub, assignment, secure)
        return session if session.submit("advertise", secure.advertise()) else None

    def step(self, message: pb.SecAggMessage) -> bool:
        """Answer the step `message` opens; False when this site has left the round (or finished)."""
        run, secure = self.site_run, self.update
        step = convert.SECAGG_STEP_FROM_PB.get(message.step, f"unknown({message.step})")
        run.audit.boundary(run.run_id, "receive", self.round, f"secagg/{step}",
                           hashlib.sha256(message.payload).hexdigest(), nbytes=len(message.payload))
        try:
            violations = self.policy_violations(step, message.payload)
            if violations:
                run.refuse(self.stub, self.assignment, f"secagg/{step}", violations)
                return False
            payload = secure.answer(step, message.payload)
        except SecAggError as err:
            run.audit.refusal(run.run_id, self.round, f"secagg/{step}", "secure aggregation rule", str(err))
            # The client refuses whatever would break the protocol's guarantees (e.g. a request for
            # both secrets of one peer): this site leaves the round rather than comply.
            log.error("%s: round %d: refusing the coordinator's secure aggregation %s: %s", run.site, self.round,
                      step, err)
            return False
        if not self.submit(step, payload):
            return False
        if secure.done:
            run.counters.rounds_contributed += 1
            log.info("%s: round %d: secure aggregation complete (update masked, %d entries)", run.site,
                     self.round, secure.encoded.shape[0])
            return False
        return True

    def policy_violations(self, step: str, payload: bytes) -> list:
        """The site policy on the set of sites still in the round, before this site sends its
        masked input (the holders that shared keys with it) and its unmasking shares (the
        survivors). Under SecAgg+ a site sees only its neighbours' shares, so only the survivor
        list, which names everyone, is counted."""
        run = self.site_run
        if step == "consistency":
            n = len(secagg.SurvivorList.from_bytes(payload).survivors)
        elif step == "masked_input" and not run.config.secagg.neighbours:
            # the holders that shared keys with this site, and the site itself: its own share
            # never travels, so it is not in the delivery
            n = len({s.sender for s in secagg.ShareDelivery.from_bytes(payload).shares} | {run.site})
        else:
            return []
        return site_policy.check_roster(run.policy, run.config, n, f"round {self.round} secagg/{step}")

    def answers(self, message: pb.SecAggMessage) -> bool:
        return message.attempt_id == self.attempt_id and message.header.round == self.round

    def submit(self, step: str, payload: bytes) -> bool:
        """Send one step's reply; False when the coordinator refused it (this site leaves the round)."""
        run = self.site_run
        metrics = self.update.metrics if step == "masked_input" else None
        token, token_seq = run.audit.countersign(run.run_id, self.assignment) if step == "advertise" else (b"", None)
        parts = list(convert.secagg_submission(run.header(self.round), self.attempt_id, step, payload,
                                               run.chunk_bytes, metrics))
        parts[0].audit_countersignature = token
        sent = run.audit.boundary(run.run_id, "send", self.round, f"secagg/{step}",
                                  hashlib.sha256(payload).hexdigest(), nbytes=len(payload))
        try:
            receipt = self.stub.SubmitSecAgg(iter(parts), timeout=run.settings.rpc_timeout_s)
        except grpc.RpcError as err:
            run.audit.undelivered((token_seq, sent), f"{err.code().name}: {err.details()}")
            if err.code() in ROUND_CODES or err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                log.warning("%s: round %d: secure aggregation %s refused: %s %s", run.site, self.round, step,
                            err.code().name, err.details())
                return False
            raise
        run.counters.bytes_uploaded += receipt.bytes_received
        return True

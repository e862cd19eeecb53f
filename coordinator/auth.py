"""Who is calling: the client certificate's subject, its role, and whether it is revoked.

TLS has already checked that the certificate chains to the federation CA (the handshake fails
otherwise); here the coordinator checks revocation, the role a method needs, and that the id a
message claims is the certificate's subject.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from coordinator.errors import Refusal
from security.pki import PKIError, RevocationWatcher, identity_from_pem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    name: str
    role: str
    fingerprint: str


class Authenticator:
    def __init__(self, revocations: RevocationWatcher | None, *, insecure: bool = False):
        self.revocations = revocations
        self.insecure = insecure

    def caller(self, context: grpc.ServicerContext, role: str | None, claimed_id: str | None = None) -> Caller:
        """The caller, if its certificate is not revoked and has `role` (None: any role will do)."""
        if self.insecure:
            # Debug mode: nobody is authenticated; the claimed id is taken at its word.
            return Caller(claimed_id or "insecure-" + (role or "caller"), role or "", "")
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
        try:
            identity = identity_from_pem(pems[0])
        except PKIError as err:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, f"unusable client certificate: {err}") from None
        if self.revocations is not None and self.revocations.is_revoked(identity.serial):
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED,
                          f"certificate of {identity.name} (serial {identity.serial:x}) is revoked")
        if role is not None and identity.role != role:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED,
                          f"{identity.name} is a {identity.role}; this call needs {'an' if role[:1] in 'aeiou' else 'a'} {role}")
        if claimed_id is not None and claimed_id != identity.name:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED,
                          f"participant id {claimed_id!r} differs from the certificate subject {identity.name!r}")
        return Caller(identity.name, identity.role, identity.fingerprint)

"""The federation's PKI: one CA, certificates that carry identity, and a CRL.

Identity is in the certificate subject: CN = name (a participant's id is its CN), OU = role.

Modules, from mechanism to policy:
  primitives  build/parse/check keys, certificates and CRLs (no knowledge of roles or folders)
  policy      names, roles, and what each role's certificate contains
  identity    PeerIdentity, identity_from_pem, verify_chain
  revocation  RevocationList (one verified CRL), RevocationWatcher (follows crl.pem on disk)
  authority   the CA folder: init_ca, issue, revoke, refresh_crl, load_ca_bundle
"""
from .authority import (
    CertRecord,
    IssuedCert,
    init_ca,
    issue,
    list_certs,
    load_ca_bundle,
    refresh_crl,
    revoke,
)
from .errors import PKIError
from .primitives import check_key_pair
from .identity import PeerIdentity, identity_from_pem, verify_chain
from .policy import ROLES, validate_name
from .revocation import RevocationList, RevocationWatcher

__all__ = [
    "PKIError", "ROLES", "check_key_pair", "validate_name",
    "init_ca", "issue", "revoke", "refresh_crl", "list_certs", "load_ca_bundle",
    "IssuedCert", "CertRecord",
    "PeerIdentity", "identity_from_pem", "verify_chain",
    "RevocationList", "RevocationWatcher",
]

"""Certificate policy: who may be named what, and what each role's certificate holds.

Identity lives in the subject: CN is the name (a participant's id *is* its certificate's CN) and
OU is the role. Everything here is pure: no keys, no files.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import PKIError

ROLES = ("participant", "coordinator", "operator")

# Lower-case only so that names compare byte-for-byte everywhere (file names, CN, wire ids).
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")

# Coordinators are reached on loopback in local runs; these SANs make that work out of the box.
DEFAULT_COORDINATOR_SANS = ("DNS:localhost", "IP:127.0.0.1", "IP:::1")

DEFAULT_CA_DAYS = 3650
DEFAULT_CERT_DAYS = 365
# A CRL is refused once past next_update; every revoke re-signs it, and `refresh_crl` extends it.
DEFAULT_CRL_DAYS = 30

_DNS_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_DNS_PATTERN = re.compile(rf"(\*\.)?{_DNS_LABEL}(\.{_DNS_LABEL})*")


def validate_name(name: object) -> str:
    # fullmatch, not `^...$`: `$` also matches before a trailing newline, which would let
    # "alice\n" through as a certificate name and a file name.
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise PKIError(
            f"invalid name {name!r}: must match ^[a-z0-9][a-z0-9.-]{{0,62}}$ "
            "(lower-case letters, digits, '.', '-'; at most 63 characters)"
        )
    return name


def validate_role(role: object) -> str:
    if role not in ROLES:
        raise PKIError(f"invalid role {role!r}: must be one of {', '.join(ROLES)}")
    return role  # type: ignore[return-value]


def validate_days(days: object, what: str) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise PKIError(f"{what} must be a positive whole number of days, got {days!r}")
    return days


def subject_for(name: str, role: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, validate_role(role)),
        x509.NameAttribute(NameOID.COMMON_NAME, validate_name(name)),
    ])


def extended_key_usages_for(role: str) -> list[x509.ObjectIdentifier]:
    # Coordinators also act as clients (e.g. a coordinator talking to another service with mTLS);
    # participants and operators only ever dial out, so a stolen participant key cannot be used
    # to impersonate a server.
    if validate_role(role) == "coordinator":
        return [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    return [ExtendedKeyUsageOID.CLIENT_AUTH]


def parse_san(text: str) -> x509.GeneralName:
    """'DNS:host', 'IP:addr', or a bare value whose kind is detected (IP if it parses as one)."""
    if not isinstance(text, str) or not text.strip():
        raise PKIError(f"invalid subject alternative name {text!r}")
    value = text.strip()
    kind = None
    prefix, sep, rest = value.partition(":")
    if sep and prefix.upper() in ("DNS", "IP"):
        kind, value = prefix.upper(), rest
    if kind in (None, "IP"):
        try:
            return x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            if kind == "IP":
                raise PKIError(f"invalid IP address in subject alternative name {text!r}") from None
    host = value.lower().rstrip(".")
    if len(host) > 253 or not _DNS_PATTERN.fullmatch(host):
        raise PKIError(f"invalid DNS name in subject alternative name {text!r}")
    return x509.DNSName(host)


def sans_for(role: str, extra: Iterable[str] = ()) -> list[x509.GeneralName]:
    if isinstance(extra, str):
        # A lone string would otherwise be split into one SAN per character.
        raise PKIError(f"sans must be a sequence of names, got the string {extra!r}")
    wanted: Sequence[str] = list(extra)
    if validate_role(role) == "coordinator":
        wanted = [*DEFAULT_COORDINATOR_SANS, *wanted]
    names: list[x509.GeneralName] = []
    for text in wanted:
        san = parse_san(text)
        if san not in names:
            names.append(san)
    return names

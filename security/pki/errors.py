"""The one exception the PKI raises for anything the caller can act on."""


class PKIError(Exception):
    """A PKI operation was refused or a certificate/CRL failed a check; the message says why."""

"""`ktfed k8s secret`: the TLS Secret a pod mounts (and the coordinator's CRL ConfigMap), made
from a `ktfed pki` folder, as YAML for `kubectl apply -f -`. Never written into the repository:
stdout, or a 0600 file. cryptography loads on use."""
from __future__ import annotations

import base64
from pathlib import Path

from .common import DEFAULT_NAMESPACE, K8sError

SECRET_NAMES = {"coordinator": "ktfed-coordinator-tls", "participant": "ktfed-participant-tls"}
CRL_CONFIGMAP = "ktfed-crl"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise K8sError(f"{path}: no such file (give --pki, the folder made by `ktfed pki init`, and the "
                       "--name its certificate was issued for)") from None
    except OSError as err:
        raise K8sError(f"cannot read {path}: {err.strerror}") from None


def _role_of(cert_pem: bytes, key_pem: bytes, name: str) -> str:
    """The certificate's role (its OU), after checking that it is NAME's and that the key fits it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, public):
        raise K8sError(f"the key of {name} does not belong to its certificate (caught mid-rotation?)")
    cn = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cn != [name]:
        raise K8sError(f"the certificate issued/{name}.crt is for {cn}, not {name!r}")
    ou = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    if not ou or ou[0] not in SECRET_NAMES:
        raise K8sError(f"{name}'s certificate has role {ou}: a pod needs a coordinator or participant one")
    return ou[0]


def secret_manifests(pki: Path, name: str, namespace: str = DEFAULT_NAMESPACE) -> tuple[str, str]:
    """(YAML, role): the Secret with ca.crt, tls.crt, tls.key; for the coordinator also the CRL
    ConfigMap it watches."""
    pki = Path(pki)
    ca, cert, key = (_read(pki / "ca.crt"), _read(pki / "issued" / f"{name}.crt"),
                     _read(pki / "issued" / f"{name}.key"))
    role = _role_of(cert, key, name)
    data = "".join(f"  {k}: {base64.b64encode(v).decode()}\n" for k, v in
                   (("ca.crt", ca), ("tls.crt", cert), ("tls.key", key)))
    text = ("# Made by `ktfed k8s secret` from a PKI folder: holds a private key. Apply it, never commit it.\n"
            "apiVersion: v1\nkind: Secret\nmetadata:\n"
            f"  name: {SECRET_NAMES[role]}\n  namespace: {namespace}\n"
            "  labels:\n    app.kubernetes.io/part-of: ktfed\n"
            f"type: Opaque\ndata:\n{data}")
    if role == "coordinator":
        crl = _read(pki / "crl.pem").decode()
        body = "".join(f"    {line}\n" for line in crl.strip().splitlines())
        text += ("---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n"
                 f"  name: {CRL_CONFIGMAP}\n  namespace: {namespace}\n"
                 "  labels:\n    app.kubernetes.io/part-of: ktfed\n"
                 f"data:\n  crl.pem: |\n{body}")
    return text, role

"""The federation PKI: CA folder, issuance per role, revocation, and real mutual TLS on loopback."""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from security import files
from security.pki import (
    ROLES,
    PKIError,
    RevocationList,
    RevocationWatcher,
    identity_from_pem,
    init_ca,
    issue,
    list_certs,
    load_ca_bundle,
    refresh_crl,
    revoke,
    verify_chain,
)
from security.pki import primitives


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    init_ca(d)
    return d


@pytest.fixture
def other_pki(tmp_path: Path) -> Path:
    """A second, unrelated CA with the same default name: only its key tells it apart."""
    d = tmp_path / "other-pki"
    init_ca(d)
    return d


# ---------------------------------------------------------------- CA

def test_init_ca_writes_ca_key_cert_registry_and_empty_signed_crl(pki_dir: Path):
    assert _mode(pki_dir / "ca.key") == 0o600
    assert _mode(pki_dir) == 0o700
    ca = _cert(pki_dir / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ktfed federation CA"
    assert load_ca_bundle(pki_dir) == (pki_dir / "ca.crt").read_bytes()
    crl = RevocationList.load(pki_dir / "crl.pem", pki_dir / "ca.crt")
    assert crl.serials == frozenset()
    assert crl.next_update > dt.datetime.now(dt.timezone.utc)
    assert json.loads((pki_dir / "registry.json").read_text())["certs"] == []


def test_init_ca_refuses_to_overwrite_an_existing_ca(pki_dir: Path):
    before = (pki_dir / "ca.key").read_bytes()
    with pytest.raises(PKIError, match="already exists"):
        init_ca(pki_dir)
    assert (pki_dir / "ca.key").read_bytes() == before


def test_init_ca_force_replaces_the_ca_and_invalidates_old_certs(pki_dir: Path):
    old = issue(pki_dir, "site-a", "participant")
    old_pem = old.cert_path.read_bytes()
    init_ca(pki_dir, force=True)
    with pytest.raises(PKIError):
        verify_chain(old_pem, load_ca_bundle(pki_dir))
    assert not old.cert_path.exists() and not old.key_path.exists()
    assert list_certs(pki_dir) == []


# ---------------------------------------------------------------- issuing

@pytest.mark.parametrize("role", ROLES)
def test_issue_each_role(pki_dir: Path, role: str):
    name = f"{role}-1"
    issued = issue(pki_dir, name, role)
    assert issued.cert_path == pki_dir / "issued" / f"{name}.crt"
    assert _mode(issued.key_path) == 0o600

    cert = _cert(issued.cert_path)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == role
    assert cert.serial_number == issued.serial
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    if role == "coordinator":
        assert eku == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    else:
        assert eku == {ExtendedKeyUsageOID.CLIENT_AUTH}

    key = primitives.load_private_key(issued.key_path.read_bytes())
    assert key.public_key() == cert.public_key()
    verify_chain(issued.cert_path.read_bytes(), load_ca_bundle(pki_dir))

    ident = identity_from_pem(issued.cert_path.read_bytes())
    assert (ident.name, ident.role, ident.serial) == (name, role, issued.serial)
    assert ident.fingerprint == issued.fingerprint
    assert ident.issuer == "CN=ktfed federation CA"

    [record] = list_certs(pki_dir)
    assert (record.name, record.role, record.serial, record.live) == (name, role, issued.serial, True)


def test_coordinator_sans_default_to_loopback_plus_given(pki_dir: Path):
    issued = issue(pki_dir, "coord", "coordinator",
                   sans=["coord.ktfed.svc", "10.1.2.3", "IP:fd00::7", "DNS:Site.Example", "localhost"])
    san = _cert(issued.cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "coord.ktfed.svc", "site.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1", "::1", "10.1.2.3", "fd00::7"]


def test_participant_certificate_has_no_default_sans(pki_dir: Path):
    issued = issue(pki_dir, "site-a", "participant")
    with pytest.raises(x509.ExtensionNotFound):
        _cert(issued.cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName)


@pytest.mark.parametrize("bad", ["", "Alice", "-site", ".site", "a" * 64, "a/b", "../x", "site a",
                                 "alice\n", "caf\u00e9", None, 7])
def test_bad_names_are_rejected_with_the_name_in_the_error(pki_dir: Path, bad):
    with pytest.raises(PKIError, match="invalid name") as err:
        issue(pki_dir, bad, "participant")
    assert repr(bad) in str(err.value)
    assert not any((pki_dir / "issued").iterdir())


@pytest.mark.parametrize("good", ["a", "0", "site-1.lab-b", "a" * 63])
def test_good_names_are_accepted(pki_dir: Path, good: str):
    assert issue(pki_dir, good, "participant").name == good


@pytest.mark.parametrize("bad", ["admin", "Participant", "", None])
def test_bad_roles_are_rejected(pki_dir: Path, bad):
    with pytest.raises(PKIError, match="invalid role.*participant, coordinator, operator"):
        issue(pki_dir, "site-a", bad)


@pytest.mark.parametrize("bad", [["IP:300.1.1.1"], ["bad_host!"], ["DNS:"], "localhost"])
def test_bad_sans_are_rejected(pki_dir: Path, bad):
    with pytest.raises(PKIError):
        issue(pki_dir, "coord", "coordinator", sans=bad)


def test_bad_validity_is_rejected(pki_dir: Path):
    with pytest.raises(PKIError, match="positive"):
        issue(pki_dir, "site-a", "participant", days=0)


def test_issue_without_a_ca_says_so(tmp_path: Path):
    with pytest.raises(PKIError, match="ktfed pki init"):
        issue(tmp_path / "nowhere", "site-a", "participant")


def test_one_name_cannot_hold_two_roles_at_once(pki_dir: Path):
    issue(pki_dir, "alice", "participant")
    with pytest.raises(PKIError, match="already holds a live participant"):
        issue(pki_dir, "alice", "operator")
    revoke(pki_dir, "alice")
    assert issue(pki_dir, "alice", "operator").role == "operator"


# ---------------------------------------------------------------- verify_chain / identity

def test_certificate_from_another_ca_fails_verify_chain(pki_dir: Path, other_pki: Path):
    foreign = issue(other_pki, "site-a", "participant")
    with pytest.raises(PKIError, match="signature does not verify"):
        verify_chain(foreign.cert_path.read_bytes(), load_ca_bundle(pki_dir))

    named = Path(init_ca(other_pki.parent / "third", common_name="evil CA")).parent
    foreign = issue(named, "site-a", "participant")
    with pytest.raises(PKIError, match="issued by CN=evil CA, not by this CA"):
        verify_chain(foreign.cert_path.read_bytes(), load_ca_bundle(pki_dir))


def _leaf(pki_dir: Path, subject: x509.Name, *, now=None, not_after=None) -> bytes:
    ca_cert = _cert(pki_dir / "ca.crt")
    ca_key = primitives.load_private_key((pki_dir / "ca.key").read_bytes())
    now = now or primitives.utcnow()
    cert = primitives.build_leaf_certificate(
        ca_cert=ca_cert, ca_key=ca_key, public_key=primitives.generate_key().public_key(),
        subject=subject, extended_key_usages=[ExtendedKeyUsageOID.CLIENT_AUTH], sans=[],
        not_after=not_after or now + dt.timedelta(days=1), now=now)
    return primitives.cert_to_pem(cert)


def _name(*attrs) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])


def test_expired_and_not_yet_valid_certificates_fail_verify_chain(pki_dir: Path):
    subject = _name((NameOID.ORGANIZATIONAL_UNIT_NAME, "participant"), (NameOID.COMMON_NAME, "old"))
    past = primitives.utcnow() - dt.timedelta(days=30)
    expired = _leaf(pki_dir, subject, now=past, not_after=past + dt.timedelta(days=1))
    with pytest.raises(PKIError, match="expired on"):
        verify_chain(expired, load_ca_bundle(pki_dir))
    future = primitives.utcnow() + dt.timedelta(days=30)
    with pytest.raises(PKIError, match="not valid before"):
        verify_chain(_leaf(pki_dir, subject, now=future), load_ca_bundle(pki_dir))


def test_verify_chain_rejects_garbage_and_non_ca_anchor(pki_dir: Path):
    leaf = issue(pki_dir, "site-a", "participant").cert_path.read_bytes()
    with pytest.raises(PKIError, match="not a readable PEM certificate"):
        verify_chain(b"not a cert", load_ca_bundle(pki_dir))
    with pytest.raises(PKIError, match="not a CA certificate"):
        verify_chain(leaf, leaf)


@pytest.mark.parametrize("attrs, message", [
    ([(NameOID.COMMON_NAME, "site-a")], "exactly one OU"),
    ([(NameOID.ORGANIZATIONAL_UNIT_NAME, "participant")], "exactly one CN"),
    ([(NameOID.ORGANIZATIONAL_UNIT_NAME, "admin"), (NameOID.COMMON_NAME, "site-a")], "unknown role 'admin'"),
    ([(NameOID.ORGANIZATIONAL_UNIT_NAME, "participant"), (NameOID.COMMON_NAME, "a"),
      (NameOID.COMMON_NAME, "b")], "exactly one CN"),
    ([(NameOID.ORGANIZATIONAL_UNIT_NAME, "participant"), (NameOID.COMMON_NAME, "Site A")], "invalid name"),
])
def test_identity_from_pem_refuses_certificates_without_a_clear_identity(pki_dir, attrs, message):
    with pytest.raises(PKIError, match=message):
        identity_from_pem(_leaf(pki_dir, _name(*attrs)))


# ---------------------------------------------------------------- revocation

def test_revoke_publishes_a_signed_crl_listing_the_serial(pki_dir: Path):
    a = issue(pki_dir, "site-a", "participant")
    b = issue(pki_dir, "site-b", "participant")
    assert revoke(pki_dir, "site-a") == [a.serial]

    crl = x509.load_pem_x509_crl((pki_dir / "crl.pem").read_bytes())
    assert crl.is_signature_valid(_cert(pki_dir / "ca.crt").public_key())
    assert crl.next_update_utc > dt.datetime.now(dt.timezone.utc)
    assert crl.get_revoked_certificate_by_serial_number(a.serial) is not None

    listed = RevocationList.load(pki_dir / "crl.pem", pki_dir / "ca.crt")
    assert listed.is_revoked(a.serial) and not listed.is_revoked(b.serial)
    records = {r.name: r for r in list_certs(pki_dir)}
    assert not records["site-a"].live and records["site-b"].live
    # Revocation is not expiry: the chain itself still verifies; the CRL is a separate check.
    verify_chain(a.cert_path.read_bytes(), load_ca_bundle(pki_dir))


def test_revoke_unknown_name(pki_dir: Path):
    with pytest.raises(PKIError, match="no certificate was ever issued to 'ghost'"):
        revoke(pki_dir, "ghost")


def test_rotation_gives_a_new_serial_and_revoke_revokes_both(pki_dir: Path):
    first = issue(pki_dir, "site-a", "participant")
    second = issue(pki_dir, "site-a", "participant")
    assert first.serial != second.serial and first.fingerprint != second.fingerprint
    assert _cert(second.cert_path).serial_number == second.serial
    assert [(r.serial, r.live) for r in list_certs(pki_dir)] == [(first.serial, True), (second.serial, True)]

    assert sorted(revoke(pki_dir, "site-a")) == sorted([first.serial, second.serial])
    listed = RevocationList.load(pki_dir / "crl.pem", pki_dir / "ca.crt")
    assert listed.is_revoked(first.serial) and listed.is_revoked(second.serial)
    assert revoke(pki_dir, "site-a") == []  # nothing live left; the CRL is simply re-published


def test_crl_signed_by_another_ca_is_refused(pki_dir: Path, other_pki: Path):
    issue(other_pki, "site-a", "participant")
    revoke(other_pki, "site-a")
    with pytest.raises(PKIError, match="CRL signature does not verify"):
        RevocationList.load(other_pki / "crl.pem", pki_dir / "ca.crt")


def test_expired_crl_is_refused(pki_dir: Path):
    ca_cert = _cert(pki_dir / "ca.crt")
    ca_key = primitives.load_private_key((pki_dir / "ca.key").read_bytes())
    past = primitives.utcnow() - dt.timedelta(days=10)
    crl = primitives.build_crl(ca_cert=ca_cert, ca_key=ca_key, revoked=[], crl_number=99,
                               next_update=past + dt.timedelta(days=1), now=past)
    with pytest.raises(PKIError, match="CRL expired"):
        RevocationList.from_pem(primitives.crl_to_pem(crl), load_ca_bundle(pki_dir))


def test_refresh_crl_resigns_with_a_higher_number(pki_dir: Path):
    before = RevocationList.load(pki_dir / "crl.pem", pki_dir / "ca.crt")
    refresh_crl(pki_dir)
    after = RevocationList.load(pki_dir / "crl.pem", pki_dir / "ca.crt")
    assert after.number == before.number + 1


def test_watcher_picks_up_a_revocation_written_after_it_started(pki_dir: Path):
    site = issue(pki_dir, "site-a", "participant")
    watcher = RevocationWatcher(pki_dir / "crl.pem", pki_dir / "ca.crt")
    assert not watcher.is_revoked(site.serial)
    revoke(pki_dir, "site-a")
    assert watcher.is_revoked(site.serial)


def test_watcher_keeps_the_last_good_crl_when_the_file_turns_bad(pki_dir: Path, other_pki: Path, caplog):
    site = issue(pki_dir, "site-a", "participant")
    revoke(pki_dir, "site-a")
    watcher = RevocationWatcher(pki_dir / "crl.pem", pki_dir / "ca.crt")

    with caplog.at_level(logging.WARNING, logger="security.pki.revocation"):
        files.write_atomic(pki_dir / "crl.pem", b"garbage, not a CRL")
        assert watcher.is_revoked(site.serial)
        assert watcher.is_revoked(site.serial)  # still the last good list; warned once, not per call
        assert sum("refusing new CRL" in r.message for r in caplog.records) == 1

        caplog.clear()  # a validly signed CRL from the wrong CA is just as bad
        files.write_atomic(pki_dir / "crl.pem", (other_pki / "crl.pem").read_bytes())
        assert watcher.is_revoked(site.serial)
        assert any("signature does not verify" in r.message for r in caplog.records)

        caplog.clear()  # an older but genuine CRL put back must not un-revoke anyone
        refresh_crl(pki_dir)
        assert watcher.current.number == 3
        files.write_atomic(pki_dir / "crl.pem", primitives.crl_to_pem(_unrevoked_crl(pki_dir, number=2)))
        assert watcher.is_revoked(site.serial)
        assert any("older than the one in force" in r.message for r in caplog.records)

    # And once a good CRL is back, it is followed again.
    late = issue(pki_dir, "site-b", "participant")
    revoke(pki_dir, "site-b")
    assert watcher.is_revoked(late.serial)


def _unrevoked_crl(pki_dir: Path, number: int):
    ca_cert = _cert(pki_dir / "ca.crt")
    ca_key = primitives.load_private_key((pki_dir / "ca.key").read_bytes())
    return primitives.build_crl(ca_cert=ca_cert, ca_key=ca_key, revoked=[], crl_number=number,
                                next_update=primitives.utcnow() + dt.timedelta(days=1))


def test_watcher_refuses_to_start_without_a_valid_crl(pki_dir: Path):
    (pki_dir / "crl.pem").write_bytes(b"garbage")
    with pytest.raises(PKIError, match="not a readable PEM CRL"):
        RevocationWatcher(pki_dir / "crl.pem", pki_dir / "ca.crt")


def test_watcher_is_safe_under_concurrent_callers(pki_dir: Path):
    site = issue(pki_dir, "site-a", "participant")
    watcher = RevocationWatcher(pki_dir / "crl.pem", pki_dir / "ca.crt")
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer():
        try:
            while not stop.is_set():
                watcher.is_revoked(site.serial)
        except BaseException as err:  # noqa: BLE001 - surfaced to the test below
            errors.append(err)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    revoke(pki_dir, "site-a")
    for _ in range(3):
        refresh_crl(pki_dir)
    stop.set()
    for t in threads:
        t.join(5)
    assert not errors
    assert watcher.is_revoked(site.serial)


# ---------------------------------------------------------------- files

def test_write_private_is_never_readable_by_others(tmp_path: Path, monkeypatch):
    seen_modes = []
    real_replace = os.replace

    def spy(src, dst):
        seen_modes.append(_mode(Path(src)))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", spy)
    old_umask = os.umask(0)  # the most permissive umask must not matter
    try:
        target = files.write_private(tmp_path / "secret.key", b"s3cret")
        files.write_private(target, b"rotated")
    finally:
        os.umask(old_umask)
    assert seen_modes == [0o600, 0o600]
    assert _mode(target) == 0o600 and target.read_bytes() == b"rotated"
    assert os.listdir(tmp_path) == ["secret.key"]  # no temporary file left behind


def test_write_atomic_sets_the_exact_mode_and_cleans_up_on_failure(tmp_path: Path, monkeypatch):
    old_umask = os.umask(0o077)
    try:
        target = files.write_atomic(tmp_path / "ca.crt", b"public")
    finally:
        os.umask(old_umask)
    assert _mode(target) == 0o644
    assert _mode(files.write_atomic(tmp_path / "x", b"", mode=0o640)) == 0o640

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        files.write_atomic(target, b"new")
    assert target.read_bytes() == b"public"
    assert sorted(os.listdir(tmp_path)) == ["ca.crt", "x"]
    with pytest.raises(TypeError):
        files.write_atomic(target, "text, not bytes")  # type: ignore[arg-type]

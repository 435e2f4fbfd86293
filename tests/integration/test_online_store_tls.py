"""TLS to the online store (`database.tls`), against real MariaDB servers: one started with a
certificate signed by a test CA, and the session's plain one (no TLS)."""
from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.config import DatabaseConfig
from common.workdir import Workdir
from feature_store.local_db import LocalMariaDB
from feature_store.online.mysql import MySQLOnlineStore
from tests.conftest import MariaDBHandle, local_mariadb_config


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer: str, issuer_key, ca: bool, ip: str | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, encipher_only=False,
                                          decipher_only=False), critical=True)
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write_ca(root: Path, name: str) -> tuple[Path, ec.EllipticCurvePrivateKey]:
    key = _key()
    path = root / f"{name}.pem"
    path.write_bytes(_cert(name, key, name, key, ca=True).public_bytes(serialization.Encoding.PEM))
    return path, key


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MariaDBHandle, Path, Path]]:
    """A MariaDB serving TLS with a certificate for 127.0.0.1 signed by a test CA; yields it,
    that CA's file and another CA's (which did not sign it)."""
    root = tmp_path_factory.mktemp("tls")
    ca, ca_key = _write_ca(root, "rayrec-test-ca")
    other_ca, _ = _write_ca(root, "someone-else-ca")
    key = _key()
    (root / "server-key.pem").write_bytes(_pem_key(key))
    server_cert = _cert("rayrec-test-db", key, "rayrec-test-ca", ca_key, ca=False, ip="127.0.0.1")
    (root / "server-cert.pem").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    cfg = local_mariadb_config()
    server = LocalMariaDB(Workdir.at(root / "db"), cfg, extra_args=[
        f"--ssl-ca={ca}", f"--ssl-cert={root / 'server-cert.pem'}", f"--ssl-key={root / 'server-key.pem'}"])
    server.start()
    try:
        yield MariaDBHandle(server=server, cfg=cfg, password=server.password()), ca, other_ca
    finally:
        server.stop()


def _cipher(cfg: DatabaseConfig, password: str) -> str:
    """The TLS cipher of a new connection made as `cfg` says ("" without TLS)."""
    store = MySQLOnlineStore.from_config(cfg, password)
    try:
        with store._conn.cursor() as cur:  # the connection from_config opened
            cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
            return cur.fetchone()[1]
    finally:
        store.close()


def test_verify_checks_the_certificate_against_the_ca(tls_server) -> None:
    db, ca, other_ca = tls_server
    assert _cipher(db.cfg.model_copy(update={"tls": "verify", "tls_ca": str(ca)}), db.password)
    with pytest.raises(ConnectionError, match=r"tls: verify.*(?i:certificate verify failed)"):
        _cipher(db.cfg.model_copy(update={"tls": "verify", "tls_ca": str(other_ca)}), db.password)


def test_verify_checks_the_host_name(tls_server) -> None:
    """The certificate names 127.0.0.1; reached as localhost, it is refused."""
    db, ca, _ = tls_server
    cfg = db.cfg.model_copy(update={"tls": "verify", "tls_ca": str(ca), "host": "localhost"})
    with pytest.raises(ConnectionError, match=r"(?i)hostname|match"):
        _cipher(cfg, db.password)


def test_required_preferred_and_disabled_on_a_tls_server(tls_server) -> None:
    db, _, _ = tls_server
    assert _cipher(db.cfg.model_copy(update={"tls": "required"}), db.password)
    assert _cipher(db.cfg.model_copy(update={"tls": "preferred"}), db.password)
    assert _cipher(db.cfg.model_copy(update={"tls": "disabled"}), db.password) == ""


def test_required_refuses_a_server_without_tls(mariadb: MariaDBHandle) -> None:
    with pytest.raises(ConnectionError, match=r"tls: required.*(?i:ssl)"):
        _cipher(mariadb.cfg.model_copy(update={"tls": "required"}), mariadb.password)
    assert _cipher(mariadb.cfg.model_copy(update={"tls": "preferred"}), mariadb.password) == ""

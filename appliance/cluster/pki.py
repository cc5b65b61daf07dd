"""The cluster's certificates: the coordinator's own CA, its client certificate, worker certificates.

The coordinator (the main appliance) keeps a private CA under APPLIANCE_HOME/cluster: an ECDSA P-256
key that never leaves the machine. It issues the coordinator's client certificate (extended key usage
clientAuth only) and, at pairing, signs the certificate request a worker sends (serverAuth only, the
name `<node id>.worker.appliance`). A worker certificate therefore cannot act as a client: a worker
that is taken over cannot use its certificate to drive the other workers. Private keys are written
0600 in 0700 directories.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ALPN_PAIR = "appliance-pair/1"  # an unpaired worker accepts only this: the one-time-code exchange
ALPN_CONTROL = "appliance-control/1"  # status requests (JSON lines)
ALPN_RPC = "ggml-rpc"  # bytes spliced to the worker's loopback ggml-rpc server
_TEN_YEARS = datetime.timedelta(days=3650)


def worker_hostname(node_id: str) -> str:
    """The name in a worker's certificate, and the name the coordinator checks it against."""
    return f"{node_id}.worker.appliance"


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner may read (created 0600, never world-readable even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def fingerprint(cert_der: bytes) -> str:
    return hashlib.sha256(cert_der).hexdigest()


def pem_fingerprint(cert_pem: bytes) -> str:
    return fingerprint(x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)  # tolerate clock skew


def self_signed(common_name: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A worker's bootstrap certificate: used only to carry the pairing exchange (bound by the code)."""
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now())
        .not_valid_after(_now() + _TEN_YEARS)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def certificate_request(key: ec.EllipticCurvePrivateKey, node_id: str) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder().subject_name(_name(worker_hostname(node_id))).sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass
class CertificateAuthority:
    """The coordinator's CA and client certificate, created on first use under `directory`."""

    directory: Path

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def cert_path(self) -> Path:
        return self.directory / "coordinator.pem"

    @property
    def key_path(self) -> Path:
        return self.directory / "coordinator.key"

    @property
    def _ca_key_path(self) -> Path:
        return self.directory / "ca.key"

    def ensure(self) -> CertificateAuthority:
        if self.ca_path.is_file() and self.cert_path.is_file() and self.key_path.is_file():
            return self
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        ca_key = new_key()
        name = _name(f"appliance cluster CA {os.urandom(4).hex()}")
        ca = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now())
            .not_valid_after(_now() + 2 * _TEN_YEARS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )  # keyCertSign, cRLSign
            .sign(ca_key, hashes.SHA256())
        )
        write_private(self._ca_key_path, key_pem(ca_key))
        self.ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        client_key = new_key()
        client = self._issue(ca_key, ca, _name("appliance coordinator"), client_key.public_key(), client=True)
        write_private(self.key_path, key_pem(client_key))
        self.cert_path.write_bytes(client)
        return self

    def _issue(self, ca_key, ca: x509.Certificate, subject: x509.Name, public_key, client: bool, san=None) -> bytes:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now())
            .not_valid_after(_now() + _TEN_YEARS)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def sign_worker(self, csr_pem: bytes, node_id: str) -> bytes:
        """A serverAuth certificate for the worker's own key, named for `node_id` (whatever the CSR asked)."""
        self.ensure()
        csr = x509.load_pem_x509_csr(csr_pem)
        if not csr.is_signature_valid:
            raise ValueError("the worker's certificate request has an invalid signature")
        ca_key = serialization.load_pem_private_key(self._ca_key_path.read_bytes(), password=None)
        ca = x509.load_pem_x509_certificate(self.ca_path.read_bytes())
        hostname = worker_hostname(node_id)
        return self._issue(ca_key, ca, _name(hostname), csr.public_key(), client=False, san=hostname)

    def client_context(self, alpn: str) -> ssl.SSLContext:
        """TLS 1.3 client context: the coordinator's certificate, trusting only workers this CA signed."""
        self.ensure()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_verify_locations(cafile=str(self.ca_path))
        context.load_cert_chain(str(self.cert_path), str(self.key_path))
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        context.set_alpn_protocols([alpn])
        return context


def worker_server_context(cert_path: Path, key_path: Path, coordinator_ca: Path) -> ssl.SSLContext:
    """A paired worker's TLS server: a client certificate chained to the pinned CA is required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(str(cert_path), str(key_path))
    context.load_verify_locations(cafile=str(coordinator_ca))
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols([ALPN_CONTROL, ALPN_RPC])
    return context


def bootstrap_server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """An unpaired worker's TLS server: only the pairing exchange, authenticated by the one-time code."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(str(cert_path), str(key_path))
    context.set_alpn_protocols([ALPN_PAIR])
    return context


def pairing_client_context() -> ssl.SSLContext:
    """The pairing client: the worker's bootstrap certificate is not trusted by chain but bound by the code."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([ALPN_PAIR])
    return context

"""Pairing a worker with a coordinator: the one-time code and the proofs built from it.

An unpaired worker shows a one-time code on its own console and serves TLS with a self-signed
bootstrap certificate. The coordinator connects (ALPN `appliance-pair/1`) and the two prove to each
other that they know the code, bound to that bootstrap certificate (so a machine in the middle, which
must present a certificate of its own, gets proofs that do not verify and cannot compute new ones):

    K = scrypt(code, salt = SHA-256 of the worker's bootstrap certificate)
    coordinator -> {"op": "pair", "ca": CA PEM, "proof": HMAC(K, "coordinator", CA, fingerprint)}
    worker      -> {"node_id", "csr": its certificate request, "proof": HMAC(K, "worker", CA, CSR)}
    coordinator -> {"op": "certificate", "certificate": the CSR signed by the coordinator's CA}
    worker      -> {"ok": true, "node_id"}

The worker then pins that CA, serves its signed certificate and requires the coordinator's client
certificate on every connection. The worker stores K, never the code; scrypt makes guessing the
code from a recorded exchange slow, and a worker forgets its code after a few wrong proofs.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I/L
CODE_LENGTH = 12  # about 59 bits
MAX_FAILURES = 5  # wrong proofs before the worker forgets its code


def new_code() -> str:
    raw = "".join(secrets.choice(_ALPHABET) for _ in range(CODE_LENGTH))
    return "-".join(raw[i : i + 4] for i in range(0, CODE_LENGTH, 4))


def normalize(code: str) -> str:
    return "".join(c for c in code.upper() if c.isalnum())


def code_key(code: str, bootstrap_fingerprint: str) -> bytes:
    return hashlib.scrypt(
        normalize(code).encode(), salt=bytes.fromhex(bootstrap_fingerprint), n=2**14, r=8, p=1, dklen=32
    )


def proof(key: bytes, label: str, *parts: str) -> str:
    mac = hmac.new(key, label.encode(), hashlib.sha256)
    for part in parts:
        data = part.encode()
        mac.update(len(data).to_bytes(8, "big") + data)
    return mac.hexdigest()


def verify(key: bytes, claimed: object, label: str, *parts: str) -> bool:
    return isinstance(claimed, str) and hmac.compare_digest(claimed, proof(key, label, *parts))

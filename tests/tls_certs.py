"""Certificates made on the spot for TLS tests: a CA, and server and client certificates it signs
(with `make certs`' own code: services/tools/make_certs.py).

Server certificates name 127.0.0.1, ::1 and localhost, so loopback targets verify as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.tools.make_certs import LOOPBACK_IPS, LOOPBACK_NAMES, Issued, cert_pem, key_pem, make_ca, make_leaf


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path

    @property
    def cert_bytes(self) -> bytes:
        return self.cert.read_bytes()

    @property
    def key_bytes(self) -> bytes:
        return self.key.read_bytes()


@dataclass(frozen=True)
class Pki:
    ca: CertFiles
    server: CertFiles
    client: CertFiles
    other_client: CertFiles  # signed by another CA: an mTLS server must refuse it

    @property
    def ca_bytes(self) -> bytes:
        return self.ca.cert_bytes


def _write(directory: Path, stem: str, issued: Issued) -> CertFiles:
    files = CertFiles(directory / f"{stem}.crt", directory / f"{stem}.key")
    files.cert.write_bytes(cert_pem(issued))
    files.key.write_bytes(key_pem(issued))
    return files


def make_pki(directory: Path) -> Pki:
    """A CA with a server and a client certificate, and a client certificate from a foreign CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca("ivl test CA", days=1)
    foreign = make_ca("foreign CA", days=1)
    return Pki(
        ca=_write(directory, "ca", ca),
        server=_write(directory, "server", make_leaf("ivl server", ca, server=True, dns_names=LOOPBACK_NAMES,
                                                    ips=LOOPBACK_IPS, days=1)),
        client=_write(directory, "client", make_leaf("ivl gateway", ca, server=False, days=1)),
        other_client=_write(directory, "intruder", make_leaf("intruder", foreign, server=False, days=1)),
    )

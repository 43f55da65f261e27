"""Certificates for mutual TLS between the gateway and the model services (`make certs`).

    python -m services.tools.make_certs --out deploy/certs            # compose (the default names)
    python -m services.tools.make_certs --out certs --namespace internvl   # Kubernetes names too

Writes, into --out: `ca.crt` (the private CA every service trusts) and `ca.key` (keep it offline: it
is needed only to issue more certificates), `encoder.crt/.key` and `decoder.crt/.key` (server
certificates naming the services as compose and the Kubernetes manifests address them) and
`gateway.crt/.key` (the client certificate the gateway presents to both). Private keys are written
readable by their owner only; existing files are never overwritten (remove them to rotate).

The encoder and decoder accept calls only from a client certificate this CA signed (`--tls-ca`), so
whoever holds `gateway.key` can call the models: it goes only to the gateway, mounted from a secret.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The names the gateway dials: compose service names, the Kubernetes Services of deploy/k8s/base, and
# loopback (make run, tests).
SERVICE_NAMES = {
    "encoder": ("encoder", "internvl-encoder"),
    "decoder": ("decoder", "internvl-decoder"),
}
LOOPBACK_NAMES = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1", "::1")
DEFAULT_DAYS = 365


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str, days: int = DEFAULT_DAYS) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def make_leaf(common_name: str, ca: Issued, *, server: bool, dns_names: Sequence[str] = (),
              ips: Sequence[str] = (), days: int = DEFAULT_DAYS) -> Issued:
    """A certificate `ca` signs: for a server (serverAuth, its names as SANs) or a client (clientAuth)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    sans = [x509.DNSName(n) for n in dns_names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def cert_pem(issued: Issued) -> bytes:
    return issued.cert.public_bytes(serialization.Encoding.PEM)


def key_pem(issued: Issued) -> bytes:
    return issued.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())


def write_pair(directory: Path, stem: str, issued: Issued) -> tuple[Path, Path]:
    """`stem.crt` (world-readable) and `stem.key` (owner only, created so: never briefly readable)."""
    cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert.write_bytes(cert_pem(issued))
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem(issued))
    return cert, key


def server_names(service: str, namespaces: Sequence[str]) -> list[str]:
    names = list(SERVICE_NAMES[service])
    k8s = SERVICE_NAMES[service][1]
    for ns in namespaces:
        names += [f"{k8s}.{ns}", f"{k8s}.{ns}.svc", f"{k8s}.{ns}.svc.cluster.local"]
    return [*names, *LOOPBACK_NAMES]


def make_deployment_certs(out: Path, namespaces: Sequence[str] = (), days: int = DEFAULT_DAYS) -> list[Path]:
    """The CA, the encoder's and decoder's server certificates, the gateway's client certificate."""
    stems = ["ca", "encoder", "decoder", "gateway"]
    existing = [p for s in stems for p in (out / f"{s}.crt", out / f"{s}.key") if p.exists()]
    if existing:
        raise FileExistsError(f"{existing[0]} exists: certificates are never overwritten (remove the old set "
                              "to issue a new one, then restart every service)")
    out.mkdir(parents=True, exist_ok=True)
    ca = make_ca("internvl-serving CA", days)
    written = [*write_pair(out, "ca", ca)]
    for service in ("encoder", "decoder"):
        leaf = make_leaf(f"internvl {service}", ca, server=True, dns_names=server_names(service, namespaces),
                         ips=LOOPBACK_IPS, days=days)
        written += write_pair(out, service, leaf)
    written += write_pair(out, "gateway", make_leaf("internvl gateway", ca, server=False, days=days))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.tools.make_certs", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("deploy/certs"), help="directory to write (default deploy/certs)")
    p.add_argument("--namespace", action="append", default=[],
                   help="Kubernetes namespace the Services run in, for their FQDNs (repeatable)")
    p.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})")
    args = p.parse_args(argv)
    if args.days < 1:
        p.error("--days must be >= 1")
    try:
        written = make_deployment_certs(args.out, args.namespace, args.days)
    except FileExistsError as exc:
        print(f"make_certs: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    print(f"keep {args.out / 'ca.key'} offline; give gateway.key only to the gateway", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""TLS certificates and node keys for a fleet (``stoprt fleet certs``).

Writes, into one folder:

* ``ca.crt`` / ``ca.key``: a self-signed certificate authority (keep ``ca.key`` off the boards);
* ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for the given
  host names and IP addresses (the names boards use to reach the server);
* ``nodes/NAME`` / ``nodes/NAME.pub``: one ECDSA key pair per board in OpenSSH format, as Flower's node
  authentication takes them (the private key stays on its board; the public key is registered with
  ``flwr supernode register``).

These are for a fleet of your own; an organisation with a PKI should issue the certificates there.
Uses ``cryptography`` (a dependency of ``flwr``). Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from ..runtime.atomic import atomic_path


def _write(path: Path, data: bytes, private: bool = False) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificates(folder: str | os.PathLike, hosts: list[str], nodes: list[str], days: int = 365) -> list[Path]:
    """Write the CA, the server certificate for ``hosts`` and one key pair per name in ``nodes``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    if not hosts:
        raise ValueError("give at least one host name or IP address the boards use to reach the server")
    bad = [n for n in nodes if not n or "/" in n or n.startswith(".")]
    if bad:
        raise ValueError(f"node names must be plain file names, got {bad}")
    now = dt.datetime.now(dt.timezone.utc)
    pem = serialization.Encoding.PEM
    pkcs8 = (serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("stoprt fleet CA")).issuer_name(_name("stoprt fleet CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))

    alt = []
    for h in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))

    written = [folder / "ca.crt", folder / "ca.key", folder / "server.pem", folder / "server.key"]
    _write(written[0], ca.public_bytes(pem))
    _write(written[1], ca_key.private_bytes(pem, *pkcs8), private=True)
    _write(written[2], cert.public_bytes(pem))
    _write(written[3], key.private_bytes(pem, *pkcs8), private=True)
    for node in nodes:
        node_key = ec.generate_private_key(ec.SECP384R1())
        private = node_key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        public = node_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(folder / "nodes" / node, private, private=True)
        _write(folder / "nodes" / f"{node}.pub", public + b"\n")
        written += [folder / "nodes" / node, folder / "nodes" / f"{node}.pub"]
    return written

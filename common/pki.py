"""Certificates and keys for a deployment (pure `cryptography`, no openssl binary); both sides use
them: the aggregator its CA and certificate, a hospital its SuperNode key and the CA certificate.

- `init_pki(out, hosts)`: a private CA (`ca.pem`, `ca.key`) and the aggregator's TLS server
  certificate (`server.pem`, `server.key`) valid for the given host names / IP addresses. The
  same server certificate serves the SuperLink and the Fleet-only proxy in front of it, so every
  name under which hospitals or the proxy reach the aggregator must be listed.
- `hospital_key(hospital_id, out)`: the hospital's SuperNode identity: an EC P-384 key pair in
  OpenSSH format, exactly what Flower 1.42 reads (`flower-supernode --auth-supernode-private-key`
  uses `load_ssh_private_key` and needs an EC key; `flwr supernode register KEY.pub` uses
  `load_ssh_public_key` and needs a NIST curve).

Files are written atomically and exclusively (common/atomic.py): nothing is ever overwritten
(InputError instead), and a private key is 0600 from its first byte.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .atomic import atomic_write
from .errors import InputError, Problem

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
_HOST_RE = re.compile(
    r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*$"
)
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class PkiPaths:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def of(cls, folder: str | Path) -> PkiPaths:
        d = Path(folder)
        return cls(d / CA_CERT, d / CA_KEY, d / SERVER_CERT, d / SERVER_KEY)

    def check_server_side(self) -> None:
        """The files the aggregator needs (CA cert, server cert and key) exist and parse."""
        problems = []
        for path in (self.ca_cert, self.server_cert, self.server_key):
            if not path.is_file():
                problems.append(Problem(str(path), None, None, "not found (create it with `fedprompt pki init`)"))
        if problems:
            raise InputError(problems)
        for path in (self.ca_cert, self.server_cert):
            load_cert(path)
        try:
            serialization.load_pem_private_key(self.server_key.read_bytes(), None)
        except (ValueError, TypeError) as exc:
            raise InputError.at(self.server_key, f"not an unencrypted PEM private key: {exc}") from exc


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError as exc:
        raise InputError.at(path, "certificate not found") from exc
    except ValueError as exc:
        raise InputError.at(path, f"not a PEM certificate: {exc}") from exc


def _check_new(paths: list[Path]) -> None:
    existing = [p for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise InputError(
            [
                Problem(
                    str(p),
                    None,
                    None,
                    "already exists; refusing to overwrite (remove it yourself or choose another --out)",
                )
                for p in existing
            ]
        )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOST_RE.match(host):
        raise InputError.at("--host", f"{host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host.lower())


def init_pki(
    out: str | Path, hosts: list[str], *, days: int = 825, ca_days: int = 3650, org: str = "fedprompt"
) -> PkiPaths:
    """Create the CA and the aggregator's server certificate in `out` (refuses to overwrite)."""
    if not hosts:
        raise InputError.at(
            "--host", "give at least one host name or IP address the hospitals use to reach the aggregator"
        )
    sans = list(dict.fromkeys(_san(h) for h in hosts))
    out = Path(out)
    paths = PkiPaths.of(out)
    _check_new([paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key])
    out.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate small clock skew
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{org} deployment CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=ca_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    first = hosts[0]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                    x509.NameAttribute(NameOID.COMMON_NAME, first[:64]),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    # Keys first (0600), certificates last: a half-written folder is never mistaken for a complete one.
    atomic_write(paths.ca_key, _pem_key(ca_key), mode=0o600, exclusive=True)
    atomic_write(paths.server_key, _pem_key(server_key), mode=0o600, exclusive=True)
    atomic_write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644, exclusive=True)
    atomic_write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), mode=0o644, exclusive=True)
    return paths


def hospital_key(hospital_id: str, out: str | Path) -> tuple[Path, Path]:
    """Write `<out>/<id>.key` (OpenSSH private key, 0600) and `<out>/<id>.pub` (OpenSSH public key)."""
    if not _ID_RE.match(hospital_id):
        raise InputError.at("--id", f"{hospital_id!r}: use letters, digits, '.', '_' or '-' (at most 64 characters)")
    out = Path(out)
    priv, pub = out / f"{hospital_id}.key", out / f"{hospital_id}.pub"
    _check_new([priv, pub])
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    atomic_write(priv, private, mode=0o600, exclusive=True)
    atomic_write(pub, public + f" fedprompt-{hospital_id}\n".encode(), mode=0o644, exclusive=True)
    return priv, pub


def check_hospital_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """The SuperNode key as Flower reads it: an unencrypted OpenSSH EC private key on a NIST curve."""
    path = Path(path)
    if not path.is_file():
        raise InputError.at(path, "SuperNode private key not found (create one with `fedprompt pki hospital`)")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as exc:
        raise InputError.at(path, f"not an unencrypted OpenSSH private key: {exc}") from exc
    except Exception as exc:  # UnsupportedAlgorithm
        raise InputError.at(path, f"unsupported key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError.at(path, f"Flower needs an EC key (NIST P-256/384/521), got {type(key).__name__}")
    mode = path.stat().st_mode & 0o077
    if mode:
        raise InputError.at(
            path, f"private key is readable by others (mode {oct(path.stat().st_mode & 0o777)}); run chmod 600 on it"
        )
    return key


def public_key_fingerprint(pub: str | Path) -> str:
    """SHA256 fingerprint of an OpenSSH public key file, as `ssh-keygen -lf` prints it."""
    import base64
    import hashlib

    blob = base64.b64decode(Path(pub).read_text().split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")

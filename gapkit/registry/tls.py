"""`registry serve --tls auto`: a CA made once and kept, and a server certificate it signs.

The state folder (`--state`, else `$GAPKIT_STATE/registry`, else
`${XDG_STATE_HOME:-~/.local/state}/gapkit/registry`) holds `ca.crt` (what every node needs
beside its hosts.toml), `ca.key`, `server.crt` and `server.key` (keys 0600). The CA is made
once and kept, so nodes configured once keep trusting the server. The server certificate is
made again whenever the names and addresses it must cover change (a new interface address, a
new `--name`), when it nears its end, or when it was not signed by the kept CA.

Its subjectAltNames cover every address of this machine's interfaces (IPv4 and global IPv6),
`localhost`, the host name, the listen address when it is a specific one, and the extra names
given (`--name`, for DNS names such as the FQDN).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gapkit.errors import UsageError

CA_DAYS = 3650
SERVER_DAYS = 825
#: Make the server certificate again when fewer days than this are left.
RENEW_DAYS = 30
_SIOCGIFADDR = 0x8915


def default_state_dir() -> Path:
    root = os.environ.get("GAPKIT_STATE")
    if root:
        return Path(root) / "registry"
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "gapkit" / "registry"


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    #: The CA nodes must trust (None for a site's own certificate).
    ca: Path | None
    #: Names and addresses the certificate covers (auto only).
    names: tuple[str, ...] = ()
    #: Whether this start made a new CA / server certificate.
    new_ca: bool = False
    new_cert: bool = False


def local_addresses() -> list[str]:
    """Every IPv4 address of this machine's interfaces and its global IPv6 addresses."""
    found: list[str] = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                answer = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue  # no IPv4 address on this interface
            found.append(socket.inet_ntoa(answer[20:24]))
    with contextlib.suppress(OSError), open("/proc/net/if_inet6") as f:
        for line in f:
            v6 = ipaddress.IPv6Address(bytes.fromhex(line.split()[0]))
            if not v6.is_link_local:
                found.append(str(v6))
    out: list[str] = []
    for address in ["127.0.0.1", "::1", *found]:
        if address not in out:
            out.append(address)
    return out


def wanted_names(listen_host: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The SANs a server certificate needs for this machine, sorted, no duplicates."""
    names = {"localhost", *local_addresses(), *extra}
    # The host name only: its FQDN would need a DNS lookup, which can hang on an air-gapped
    # machine whose resolver is unreachable. Other names come with --name.
    hostname = socket.gethostname()
    if hostname and hostname != "localhost.localdomain":
        names.add(hostname.lower())
    if listen_host not in ("", "0.0.0.0", "::"):
        names.add(listen_host)
    return tuple(sorted(names))


def _crypto() -> Any:
    try:
        from cryptography import x509
    except ImportError:
        raise UsageError("--tls auto needs the Python package cryptography",
                         hint="install it (pip install cryptography), or give --tls-cert and "
                         "--tls-key, or --tls off") from None
    return x509


def ensure_auto_tls(state_dir: Path, listen_host: str, extra_names: tuple[str, ...] = ()
                    ) -> TlsFiles:
    """The CA and a server certificate covering `wanted_names`, made or renewed as needed."""
    _crypto()
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise UsageError(f"cannot create the state folder {state_dir}: {exc.strerror or exc}",
                         hint="choose another with --state DIR") from None
    ca_cert_path, ca_key_path = state_dir / "ca.crt", state_dir / "ca.key"
    cert_path, key_path = state_dir / "server.crt", state_dir / "server.key"
    names = wanted_names(listen_host, extra_names)
    new_ca = False
    if ca_cert_path.exists() and ca_key_path.exists():
        try:
            ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
            ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        except (ValueError, OSError) as exc:
            raise UsageError(f"the CA in {state_dir} cannot be read ({exc})",
                             hint="move the folder aside to make a new CA (every node then "
                             "needs the new ca.crt)") from None
    else:
        ca_cert, ca_key = _make_ca()
        _write_key(ca_key_path, ca_key)
        _write(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        new_ca = True
    new_cert = new_ca or not _cert_fits(cert_path, key_path, ca_cert, names)
    if new_cert:
        cert, key = _make_server_cert(ca_cert, ca_key, names)
        _write_key(key_path, key)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return TlsFiles(cert_path, key_path, ca_cert_path, names, new_ca, new_cert)


def _cert_fits(cert_path: Path, key_path: Path, ca_cert: Any, names: tuple[str, ...]) -> bool:
    from cryptography import x509

    if not cert_path.exists() or not key_path.exists():
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, OSError, x509.ExtensionNotFound):
        return False
    have = {str(n) for n in sans.get_values_for_type(x509.DNSName)}
    have |= {str(a) for a in sans.get_values_for_type(x509.IPAddress)}
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    return (have == set(names) and cert.issuer == ca_cert.subject
            and left > datetime.timedelta(days=RENEW_DAYS))


def _make_ca() -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gapkit"),
        x509.NameAttribute(NameOID.COMMON_NAME,
                           f"gapkit registry CA {socket.gethostname()} {os.urandom(4).hex()}"),
    ])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_server_cert(ca_cert: Any, ca_key: Any, names: tuple[str, ...]) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, socket.gethostname()[:64]
                                                    or "gapkit registry")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _write_key(path: Path, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    _write(path, key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()), 0o600)


def _write(path: Path, data: bytes, mode: int) -> None:
    from gapkit.oci.fsutil import atomic_write

    try:
        atomic_write(path, data, mode=mode)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}",
                         hint="free some space there, or choose another folder with --state DIR"
                         ) from None


def server_context(files: TlsFiles) -> Any:
    """An `ssl.SSLContext` serving `files` (TLS 1.2+)."""
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot use the certificate {files.cert} with key {files.key}: {exc}",
                         hint="give a PEM certificate (with its chain) and its PEM key") from None
    return context

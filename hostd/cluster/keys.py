"""Cluster key material: one private CA, one certificate per member, TLS contexts.

Why a private CA rather than pre-shared keys or SSH: the master, every hostd
and the CLI (the "admin" member) authenticate each other with one mechanism,
TLS with client certificates, and QEMU's NBD can use the very same CA
(tls-creds-x509). A member's identity is its certificate's CN, so a handler
knows which host is calling without trusting anything the host says.

Layout of a key directory (0700; private keys 0600):

    ca.pem  ca.key              the CA (ca.key only where members are made)
    NAME.pem  NAME.key          one per member: CN=NAME, DNS:NAME, server+client
    qemu-NAME/                  the same, under the names tls-creds-x509 wants:
        ca-cert.pem server-cert.pem server-key.pem client-cert.pem client-key.pem

A host needs only ca.pem and its own files; the whole directory is made once
(`sfmpi cluster init` / `sfmpi lab up`) and each host gets its share.

QEMU (crypto/tlscredsx509.c) loads keys through GnuTLS, which takes unencrypted
PEM PKCS#8, and refuses a certificate whose critical keyUsage lacks
keyEncipherment even for an EC key, so members carry digitalSignature and
keyEncipherment both (OpenSSL ignores the extra bit).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import os
import re
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sfmpi.errors import HostdError, UsageError

CA_CN = "sfmpi cluster CA"
VALIDITY = datetime.timedelta(days=3650)
# Backdated so that a host whose clock is a little behind accepts a fresh cert.
BACKDATE = datetime.timedelta(hours=1)
# A member certificate this close to its end is made again by init_cluster.
RENEW_BEFORE = datetime.timedelta(days=30)
# The names become file names, a DNS subjectAltName and the peer name handlers
# see: a host name's alphabet, nothing that can escape the directory.
_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
RESERVED = {"ca"}   # ca.pem / ca.key
QEMU_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")


def _hint(directory: Path) -> str:
    return f"no cluster keys in {directory} (run `sfmpi cluster init` or `sfmpi lab up`)"


def check_name(name: str) -> str:
    if not isinstance(name, str) or len(name) > 253 or not _NAME_RE.match(name):
        raise UsageError(f"{name!r} cannot name a cluster member (letters, digits, '-' and '.', like a host name)")
    if name.lower() in RESERVED:
        raise UsageError(f"{name!r} is reserved in a cluster key directory")
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name)
        # A client checks an address against IP subjectAltNames, never DNS ones.
        raise UsageError(f"{name!r} is an address; cluster members are named, not numbered")
    return name


# -- files -----------------------------------------------------------------------

def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomic and with its final mode from the first byte: a key is never readable by others."""
    if path.exists() and path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
        return   # unchanged: keep mtimes stable, idempotent re-runs touch nothing
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)   # the umask may have taken bits off; a stale tmp may have had others
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise HostdError(f"{path} is not an EC private key")
    return key


def _prepare(directory: Path) -> Path:
    directory = Path(directory)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
    except OSError as exc:
        raise HostdError(f"cannot make the cluster key directory {directory}: {exc.strerror or exc}") from None
    return directory


@contextlib.contextmanager
def _locked(directory: Path):
    """Two `cluster init`s at once must not make two CAs."""
    fd = os.open(directory / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- certificates ------------------------------------------------------------------

def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _ca_cert(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_CN)])
    now = _now()
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))


def _member_cert(name: str, key: ec.EllipticCurvePrivateKey, ca: x509.Certificate,
                 ca_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = _now()
    # Never past the CA's own end: a chain is only as valid as its root.
    until = min(now + VALIDITY, ca.not_valid_after_utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            # Both: a hostd serves its peers and calls the master with one certificate.
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))


class _CA:
    """The CA of a key directory, made on first use; its key is read only when a member must be signed."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.cert_path, self.key_path = directory / "ca.pem", directory / "ca.key"
        self._cert: x509.Certificate | None = None
        self._key: ec.EllipticCurvePrivateKey | None = None

    @property
    def cert(self) -> x509.Certificate:
        if self._cert is None:
            if self.cert_path.exists():
                self._cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            elif self.key_path.exists():
                # A crash between the two writes: the key is the CA, its cert can be made again
                # (same subject and key, so members it signed still verify).
                self._key = _load_key(self.key_path)
                self._cert = _ca_cert(self._key)
                _write(self.cert_path, _pem_cert(self._cert), 0o644)
            else:
                self._key = ec.generate_private_key(ec.SECP256R1())
                _write(self.key_path, _pem_key(self._key), 0o600)
                self._cert = _ca_cert(self._key)
                _write(self.cert_path, _pem_cert(self._cert), 0o644)
        return self._cert

    @property
    def key(self) -> ec.EllipticCurvePrivateKey:
        cert = self.cert
        if self._key is None:
            if not self.key_path.exists():
                raise HostdError(f"{self.cert_path} has no ca.key beside it: this copy of the cluster keys cannot "
                                 "sign new members (run it where the cluster was made)")
            self._key = _load_key(self.key_path)
        if self._key.public_key() != cert.public_key():
            raise HostdError(f"{self.key_path} is not the key of {self.cert_path}")
        return self._key

    def issued(self, cert: x509.Certificate) -> bool:
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


def _usable(ca: _CA, cert_path: Path, key_path: Path) -> bool:
    """An existing member is kept when its cert is this CA's, matches its key and is not near its end."""
    if not (cert_path.exists() and key_path.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = _load_key(key_path)
    except (ValueError, TypeError, HostdError):
        return False
    return (ca.issued(cert) and key.public_key() == cert.public_key()
            and cert.not_valid_after_utc - _now() > RENEW_BEFORE)


def _member(ca: _CA, name: str) -> None:
    cert_path, key_path = ca.dir / f"{name}.pem", ca.dir / f"{name}.key"
    if not _usable(ca, cert_path, key_path):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _member_cert(name, key, ca.cert, ca.key)
        # Key first: a crash in between leaves a mismatch, which the next run repairs.
        _write(key_path, _pem_key(key), 0o600)
        _write(cert_path, _pem_cert(cert), 0o644)
    cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    qemu = ca.dir / f"qemu-{name}"
    qemu.mkdir(mode=0o700, exist_ok=True)
    os.chmod(qemu, 0o700)
    for file, data, mode in (("ca-cert.pem", _pem_cert(ca.cert), 0o644),
                             ("server-cert.pem", cert_pem, 0o644), ("server-key.pem", key_pem, 0o600),
                             ("client-cert.pem", cert_pem, 0o644), ("client-key.pem", key_pem, 0o600)):
        _write(qemu / file, data, mode)


def init_cluster(directory: Path, names: list[str]) -> None:
    """Make (or complete) a key directory: the CA if there is none, and each member not yet there."""
    if isinstance(names, str):
        names = [names]
    names = [check_name(n) for n in names]
    directory = _prepare(directory)
    try:
        with _locked(directory):
            ca = _CA(directory)
            _ = ca.cert   # the CA is made here even when names is empty
            for name in dict.fromkeys(names):
                _member(ca, name)
    except PermissionError as exc:
        raise HostdError(f"cannot write the cluster keys in {directory}: {exc.strerror}") from None
    except ValueError as exc:   # a PEM that does not parse
        raise HostdError(f"the cluster keys in {directory} are damaged: {exc}") from None


def add_member(directory: Path, name: str) -> None:
    """One more member (a host joining later) signed by the existing CA."""
    if not (Path(directory) / "ca.pem").exists():
        raise HostdError(_hint(Path(directory)))
    init_cluster(directory, [name])


# -- TLS ---------------------------------------------------------------------------

def _files(directory: Path, name: str) -> tuple[Path, Path, Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise HostdError(_hint(directory))
    ca, cert, key = directory / "ca.pem", directory / f"{name}.pem", directory / f"{name}.key"
    if not ca.exists():
        raise HostdError(_hint(directory))
    if not (cert.exists() and key.exists()):
        raise HostdError(f"no certificate for {name!r} in {directory} (run `sfmpi cluster init` or `sfmpi lab up`)")
    return ca, cert, key


def _context(purpose: int, directory: Path, name: str) -> ssl.SSLContext:
    ca, cert, key = _files(directory, name)
    ctx = ssl.SSLContext(purpose)
    # 1.3 is what two current ends negotiate; 1.2 is the floor for an older peer.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # For 1.2 only forward-secret AEAD suites (1.3's are all of that kind already).
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        # The cluster's CA only, never the system's: a public certificate is no member.
        ctx.load_verify_locations(cafile=str(ca))
        ctx.load_cert_chain(str(cert), str(key))
    except PermissionError as exc:
        raise HostdError(f"cannot read the cluster keys in {directory}: {exc.strerror}") from None
    except (ssl.SSLError, OSError) as exc:
        raise HostdError(f"the cluster keys of {name!r} in {directory} are unusable: {exc}") from None
    return ctx


def server_context(directory: Path, name: str) -> ssl.SSLContext:
    """Serves as NAME and takes only callers with a certificate from the cluster's CA."""
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, directory, name)
    # One request per connection: a session ticket would never be used.
    ctx.num_tickets = 0
    return ctx


def client_context(directory: Path, name: str) -> ssl.SSLContext:
    """Calls as NAME; the caller passes server_hostname=the peer's name, which its certificate must carry."""
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, directory, name)
    ctx.check_hostname = True
    return ctx


def peer_name(ssl_object) -> str:
    """The CN of the peer's certificate: which member is calling (verified by the handshake)."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        raise HostdError("the peer presented no certificate")
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    raise HostdError("the peer's certificate has no common name")

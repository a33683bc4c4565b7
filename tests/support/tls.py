"""Certificates made in the test, as a company's private CA issues them, and a
TLS-terminating loopback proxy that puts HTTPS in front of the real MLflow.

``Pki(directory)`` writes a CA, a server certificate it signed (for
``localhost`` and ``127.0.0.1``), one it signed for another host only, a client
certificate it signed and a self-signed server certificate, each as a PEM file. ``TlsProxy`` accepts TLS
on loopback with one of the server certificates (optionally requiring a client
certificate from the CA) and relays the decrypted bytes to MLflow's plain HTTP
port, so everything MLflow answers is MLflow's own.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCAL_NAMES = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
OTHER_HOST = "mlflow.example.internal"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "traced-run tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                 issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool,
                 usage: ExtendedKeyUsageOID | None = None,
                 names: tuple[x509.GeneralName, ...] = LOCAL_NAMES) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class Pki:
    """A private CA and the certificates it issued, as PEM files in ``directory``."""

    directory: Path
    ca_cert: Path = field(init=False)
    server_cert: Path = field(init=False)
    server_key: Path = field(init=False)
    client_cert: Path = field(init=False)
    client_key: Path = field(init=False)
    client_combined: Path = field(init=False)
    """Client certificate and key in one file, as MLFLOW_TRACKING_CLIENT_CERT_PATH takes them."""
    self_signed_cert: Path = field(init=False)
    self_signed_key: Path = field(init=False)
    other_host_cert: Path = field(init=False)
    """Signed by the CA for ``OTHER_HOST`` only: valid, but not for loopback."""
    other_host_key: Path = field(init=False)

    def __post_init__(self) -> None:
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate("traced-run test CA", ca_key, _name("traced-run test CA"), ca_key, ca=True)
        self.ca_cert = _write_cert(ca, d / "ca.pem")
        server_key = ec.generate_private_key(ec.SECP256R1())
        self.server_cert = _write_cert(_certificate("localhost", server_key, ca.subject, ca_key, ca=False,
                                                    usage=ExtendedKeyUsageOID.SERVER_AUTH), d / "server.pem")
        self.server_key = _write_key(server_key, d / "server.key")
        client_key = ec.generate_private_key(ec.SECP256R1())
        client = _certificate("traced-run client", client_key, ca.subject, ca_key, ca=False,
                              usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        self.client_cert = _write_cert(client, d / "client.pem")
        self.client_key = _write_key(client_key, d / "client.key")
        self.client_combined = d / "client-combined.pem"
        self.client_combined.write_bytes(self.client_cert.read_bytes() + self.client_key.read_bytes())
        self.client_combined.chmod(0o600)
        own_key = ec.generate_private_key(ec.SECP256R1())
        self.self_signed_cert = _write_cert(_certificate(
            "localhost", own_key, _name("localhost"), own_key, ca=False,
            usage=ExtendedKeyUsageOID.SERVER_AUTH), d / "self-signed.pem")
        self.self_signed_key = _write_key(own_key, d / "self-signed.key")
        other_key = ec.generate_private_key(ec.SECP256R1())
        self.other_host_cert = _write_cert(_certificate(
            OTHER_HOST, other_key, ca.subject, ca_key, ca=False, usage=ExtendedKeyUsageOID.SERVER_AUTH,
            names=(x509.DNSName(OTHER_HOST),)), d / "other-host.pem")
        self.other_host_key = _write_key(other_key, d / "other-host.key")


_IO_TIMEOUT = 60.0


class Relay:
    """Accepts connections on loopback and relays each to ``upstream`` (host, port);
    subclasses decide what a connection is before the relay starts."""

    answer_delay = 0.0
    """Seconds each connection's answer is held before it goes back (a slow server)."""
    held: threading.Event | None = None
    """While not set, answers wait (then ``answer_delay`` more)."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._stopped = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept_loop, name=type(self).__name__, daemon=True).start()

    def close(self) -> None:
        self._stopped.set()
        self._listener.close()
        with self._lock:
            for sock in list(self._sockets):
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            connection.settimeout(_IO_TIMEOUT)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.add(sock)
        return sock

    def _serve(self, connection: socket.socket) -> None:
        self._track(connection)
        try:
            opened = self.open(connection)
        except (OSError, ValueError):  # a refused handshake, a request that is no CONNECT
            with contextlib.suppress(OSError):
                connection.close()
            return
        if opened is None:
            return
        client, upstream = opened
        self._track(upstream)
        pump = threading.Thread(target=_pump, args=(upstream, client, self.answer_delay, self.held),
                                daemon=True)
        pump.start()
        _pump(client, upstream)
        pump.join(_IO_TIMEOUT)
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.close()

    def open(self, connection: socket.socket) -> tuple[socket.socket, socket.socket] | None:
        raise NotImplementedError


def _pump(source: socket.socket, target: socket.socket, delay: float = 0.0,
          held: threading.Event | None = None) -> None:
    try:
        while data := source.recv(65536):
            if held is not None:
                held.wait(_IO_TIMEOUT)
                held = None
            time.sleep(delay)
            delay = 0.0
            target.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)


class TlsProxy(Relay):
    """HTTPS on loopback in front of a plain-HTTP server (the real MLflow)."""

    def __init__(self, upstream: str, cert: Path, key: Path, *, client_ca: Path | None = None) -> None:
        parsed = urlsplit(upstream)
        assert parsed.hostname and parsed.port, upstream
        self._upstream = (parsed.hostname, parsed.port)
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        if client_ca is not None:
            self._context.verify_mode = ssl.CERT_REQUIRED
            self._context.load_verify_locations(client_ca)
        self.client_subjects: list[str] = []
        """The common name of each client certificate presented."""
        super().__init__()

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def open(self, connection: socket.socket) -> tuple[socket.socket, socket.socket] | None:
        client = self._context.wrap_socket(connection, server_side=True)
        peer = client.getpeercert()
        if peer:
            self.client_subjects.extend(value for rdn in peer.get("subject", ()) for key, value in rdn
                                        if key == "commonName")
        return client, socket.create_connection(self._upstream, timeout=_IO_TIMEOUT)


class SlowProxy(Relay):
    """Plain TCP to ``upstream`` (requests go on at once), each answer held until
    ``held`` is set, then ``answer_delay`` seconds more: MLflow answering, slowly."""

    def __init__(self, upstream: str, answer_delay: float) -> None:
        parsed = urlsplit(upstream)
        assert parsed.hostname and parsed.port, upstream
        self._upstream = (parsed.hostname, parsed.port)
        self.answer_delay = answer_delay
        self.held = threading.Event()
        super().__init__()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self, connection: socket.socket) -> tuple[socket.socket, socket.socket] | None:
        return connection, socket.create_connection(self._upstream, timeout=_IO_TIMEOUT)


class ConnectProxy(Relay):
    """An HTTP proxy that takes only ``CONNECT host:port`` (what a client sends it for
    an https:// URL) and records each target."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        super().__init__()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self, connection: socket.socket) -> tuple[socket.socket, socket.socket] | None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = connection.recv(4096)
            if not chunk or len(head) > 65536:
                raise ValueError("no complete CONNECT request")
            head += chunk
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        if method != "CONNECT":
            connection.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            connection.close()
            return None
        self.targets.append(target)
        host, _, port = target.rpartition(":")
        upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=_IO_TIMEOUT)
        connection.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        return connection, upstream

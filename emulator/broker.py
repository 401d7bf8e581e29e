"""A local mosquitto with mutual TLS, shaped like AWS IoT Core.

Used by the tests, ``make demo`` and the benchmark::

    certs = make_certs(tmp / "certs", thing_names=["meter-gw-1"])
    with Mosquitto(tmp / "broker", certs) as broker:
        ...  # connect to ("localhost", broker.port) with certs.client("meter-gw-1")
        broker.stop()   # an outage
        broker.start()  # back, on the same port

Like IoT Core, the broker accepts only clients presenting a certificate signed by our CA
(``require_certificate true``, ``allow_anonymous false``) and takes the certificate's CN,
the thing name, as the client's identity (``use_identity_as_username true``).

Certificates are made with the ``openssl`` CLI (EC P-256, so it takes milliseconds), which
keeps the gateway free of a Python crypto dependency.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import BrokerError

MOSQUITTO = "/usr/sbin/mosquitto"
MISSING_MOSQUITTO = "mosquitto not found: install it with `apt-get install -y mosquitto`"


@dataclass(frozen=True)
class ClientCert:
    cert: Path
    key: Path


@dataclass(frozen=True)
class CertPaths:
    """Where :func:`make_certs` wrote everything; ``clients`` is keyed by thing name."""

    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, ClientCert] = field(default_factory=dict)

    def client(self, thing_name: str) -> ClientCert:
        try:
            return self.clients[thing_name]
        except KeyError:
            raise KeyError(f"no client certificate for {thing_name!r}; have {sorted(self.clients)}") from None


def _openssl(*args: str | os.PathLike) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise BrokerError("openssl not found: install it with `apt-get install -y openssl`")
    proc = subprocess.run([openssl, *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BrokerError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")


def _signed_cert(d: Path, name: str, cn: str, ca: Path, ca_key: Path, extensions: str, days: int) -> ClientCert:
    key, csr, crt, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt", d / f"{name}.ext"
    _openssl("req", "-new", *_EC, "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
    ext.write_text(extensions)
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-days", str(days), "-sha256", "-extfile", ext, "-out", crt)
    csr.unlink()
    ext.unlink()
    return ClientCert(crt, key)


def make_certs(dirpath: str | os.PathLike, thing_names: list[str] | tuple[str, ...] = ("meter-gw-1",),
               *, days: int = 30) -> CertPaths:
    """Make a CA, a server certificate for localhost and one client certificate per thing.

    The server certificate has CN ``localhost`` and subjectAltName DNS:localhost, IP:127.0.0.1;
    each client certificate has CN = thing name. Keys are EC P-256. Calling it on another
    directory makes an unrelated CA, which is how tests get a certificate the broker must refuse.
    """
    d = Path(dirpath)
    d.mkdir(parents=True, exist_ok=True)
    ca, ca_key = d / "ca.crt", d / "ca.key"
    _openssl("req", "-x509", "-new", *_EC, "-keyout", ca_key, "-out", ca, "-days", str(days),
             "-sha256", "-subj", "/CN=meter-gateway test CA")
    server = _signed_cert(
        d, "server", "localhost", ca, ca_key,
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyAgreement\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        days,
    )
    clients = {}
    for thing in thing_names:
        if not thing or "/" in thing or thing.startswith("."):
            raise BrokerError(f"thing name {thing!r} cannot name a certificate file")
        clients[thing] = _signed_cert(
            d, f"client-{thing}", thing, ca, ca_key,
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyAgreement\n"
            "extendedKeyUsage=clientAuth\n",
            days,
        )
    return CertPaths(ca=ca, ca_key=ca_key, server_cert=server.cert, server_key=server.key, clients=clients)


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Mosquitto:
    """A mosquitto process with one mutual-TLS listener on 127.0.0.1.

    ``port=0`` picks a free ephemeral port once, at construction; :meth:`stop` then
    :meth:`start` brings the broker back on the same port, as an outage would; :meth:`kill`
    ends it without a goodbye, :meth:`pause` freezes it (connections open, no acks).
    ``acl`` is the text of a mosquitto ACL file (users are thing names), or None for no ACL.
    """

    host = "127.0.0.1"

    def __init__(self, dirpath: str | os.PathLike, certs: CertPaths, port: int = 0, *,
                 max_packet_size: int = 256 * 1024, acl: str | None = None,
                 executable: str = MOSQUITTO, start_timeout: float = 10.0):
        self.dir = Path(dirpath)
        self.certs = certs
        self.port = port or free_port(self.host)
        self.max_packet_size = max_packet_size
        self.acl = acl
        self.acl_path = self.dir / "acl"
        self.executable = executable
        self.start_timeout = start_timeout
        self.config_path = self.dir / "mosquitto.conf"
        self.log_path = self.dir / "mosquitto.log"
        self._proc: subprocess.Popen | None = None

    # -- configuration --------------------------------------------------------------------

    def config(self) -> str:
        c = self.certs
        return "\n".join([
            "# written by emulator.broker.Mosquitto",
            "per_listener_settings false",
            # Started as root, mosquitto would drop to the `mosquitto` user, which cannot read
            # keys in a private tmp dir. As a non-root user this line has no effect.
            "user root",
            "persistence false",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
            f"max_packet_size {self.max_packet_size}",
            # A slow subscriber must never lose QoS 1 messages here: the default queue of 1000
            # per client drops the rest silently, which a test would read as a lost reading.
            # Not 0 ("unlimited"): with 0, mosquitto 2.0.11 drops the connection of a client
            # right after answering an ACL-denied QoS 1 publish with PUBACK NOT_AUTHORIZED.
            "max_queued_messages 10000000",
            "allow_anonymous false",
            *([f"acl_file {self.acl_path}"] if self.acl is not None else []),
            "",
            f"listener {self.port} {self.host}",
            "protocol mqtt",
            f"cafile {c.ca}",
            f"certfile {c.server_cert}",
            f"keyfile {c.server_key}",
            "require_certificate true",
            "use_identity_as_username true",
            "",
        ])

    # -- process --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> "Mosquitto":
        """Start mosquitto and return once its port accepts TCP connections."""
        if self.running:
            return self
        if not (os.path.exists(self.executable) or shutil.which(self.executable)):
            raise BrokerError(MISSING_MOSQUITTO)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        if self.acl is not None:
            self.acl_path.write_text(self.acl)
        self._proc = subprocess.Popen(
            [self.executable, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self._wait_listening()
        return self

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                pass
            # Waiting for the process to exit doubles as the pause between connect attempts.
            try:
                self._proc.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                pass
            else:
                raise BrokerError(f"mosquitto exited with {self._proc.returncode}: {self._failure_text()}")
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} within "
                                  f"{self.start_timeout}s: {self._failure_text()}")

    def _failure_text(self) -> str:
        stderr = ""
        if self._proc is not None and self._proc.stderr is not None and self._proc.poll() is not None:
            stderr = self._proc.stderr.read().decode(errors="replace").strip()
        log = self.log_path.read_text(errors="replace").strip().splitlines()[-5:] if self.log_path.exists() else []
        return " | ".join([stderr, *log]).strip(" |") or "no output"

    def pause(self) -> None:
        """Freeze mosquitto (SIGSTOP): connections stay open, nothing is answered."""
        if self.running:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause` (SIGCONT)."""
        if self.running:
            self._proc.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop mosquitto with SIGTERM (it closes its connections) and wait for it to exit."""
        self._end(kill=False, timeout=timeout)

    def kill(self) -> None:
        """Stop mosquitto with SIGKILL: no goodbye to the clients."""
        self._end(kill=True, timeout=10.0)

    def _end(self, *, kill: bool, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            if kill:
                proc.kill()
            else:
                proc.send_signal(signal.SIGCONT)  # a paused broker cannot act on SIGTERM
                proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Mosquitto({self.host}:{self.port}, {'running' if self.running else 'stopped'})"

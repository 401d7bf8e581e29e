"""Shared fixtures: certificates, a real mosquitto with mutual TLS, a subscriber, publishers.

A missing mosquitto fails these fixtures with BrokerError ("mosquitto not found: install it
with `apt-get install -y mosquitto`"); it is never a skip.
"""

from __future__ import annotations

import socket
import threading
from typing import Callable

import pytest

from emulator.broker import CertPaths, Mosquitto, make_certs
from gateway.publishers.mqtt import MqttPublisher, MqttSubscriber

THING = "meter-gw-1"
SUBSCRIBER = "test-subscriber"


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> CertPaths:
    """A CA, a localhost server certificate and client certificates for THING and SUBSCRIBER."""
    return make_certs(tmp_path_factory.mktemp("certs"), thing_names=[THING, SUBSCRIBER])


@pytest.fixture
def broker(tmp_path, certs) -> Mosquitto:
    """A running mosquitto with mutual TLS on an ephemeral port of 127.0.0.1."""
    with Mosquitto(tmp_path / "broker", certs) as b:
        yield b


def publisher_for(broker: Mosquitto, certs: CertPaths, thing: str = THING, **kwargs) -> MqttPublisher:
    """An MqttPublisher (not started) for ``broker``; fast reconnects, local unless told."""
    client = certs.client(thing)
    kwargs.setdefault("local", True)
    kwargs.setdefault("min_reconnect_delay", 0.05)
    kwargs.setdefault("max_reconnect_delay", 0.5)
    return MqttPublisher("localhost", thing, client.cert, client.key, certs.ca, port=broker.port, **kwargs)


@pytest.fixture
def make_publisher(broker, certs) -> Callable[..., MqttPublisher]:
    """``make_publisher(**kwargs)`` -> a started, connected MqttPublisher, closed at teardown."""
    made: list[MqttPublisher] = []

    def make(*, connect: bool = True, **kwargs) -> MqttPublisher:
        pub = publisher_for(broker, certs, **kwargs)
        made.append(pub)
        pub.start()
        if connect:
            assert pub.wait_connected(10), f"publisher did not connect: {pub.last_error}"
        return pub

    yield make
    for pub in made:
        pub.close()


@pytest.fixture
def subscriber(broker, certs) -> MqttSubscriber:
    """A connected MqttSubscriber collecting ``dt/#``; it subscribes again after reconnects."""
    client = certs.client(SUBSCRIBER)
    sub = MqttSubscriber("localhost", SUBSCRIBER, client.cert, client.key, certs.ca,
                         port=broker.port, topic_filter="dt/#")
    sub.start()
    yield sub
    sub.close()


class Link:
    """A TCP relay between a gateway and the broker that a test can cut and restore.

    The gateway connects to ``link.port``; the subscriber stays connected to the broker itself,
    so everything the broker acknowledged still reaches the subscriber during a cut. ``cut()``
    closes every relayed connection and refuses new ones (an outage of the gateway's uplink);
    ``restore()`` accepts again.
    """

    def __init__(self, target_port: int, host: str = "127.0.0.1"):
        self.target = (host, target_port)
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._up = threading.Event()
        self._up.set()
        self._closed = False
        self.connections = 0  # relayed connections accepted so far
        threading.Thread(target=self._accept, name="link-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open |= {client, upstream}
                self.connections += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), name="link-pipe", daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._drop(s)

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            self._open.discard(s)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    @property
    def up(self) -> bool:
        return self._up.is_set()

    def cut(self) -> None:
        self._up.clear()
        with self._lock:
            live = list(self._open)
        for s in live:
            self._drop(s)

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._closed = True
        self.cut()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self._listener.close()


@pytest.fixture
def link(broker) -> Link:
    """A cuttable relay to ``broker`` (see :class:`Link`); point the gateway at ``link.port``."""
    relay = Link(broker.port)
    yield relay
    relay.close()

"""Shared fixtures: certificates, a real mosquitto with mutual TLS, a subscriber, publishers.

A missing mosquitto fails these fixtures with BrokerError ("mosquitto not found: install it
with `apt-get install -y mosquitto`"); it is never a skip.
"""

from __future__ import annotations

from typing import Callable

import pytest

from gateway.broker import CertPaths, Mosquitto, make_certs
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

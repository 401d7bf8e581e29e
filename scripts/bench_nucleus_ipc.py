"""Throughput of the local nucleus's IPC server: PublishToIoTCore through the real awsiotsdk client.

    .venv/bin/python scripts/bench_nucleus_ipc.py [calls]

Prints calls/s for synchronous publishes (one at a time) and for asynchronous ones (many in
flight, ``publish_to_iot_core_async``), against a no-op IoT Core bridge. The client runs in a
child process, as a component does (in one process the server and the client share the GIL).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

from emulator.nucleus.ipc import IPCServer
from emulator.nucleus.mqttproxy import MemoryIoTCore

POLICY = {"aws.greengrass.ipc.mqttproxy": {"bench:1": {
    "operations": ["aws.greengrass#PublishToIoTCore"], "resources": ["dt/meters/#"]}}}


def main(n: int = 10_000) -> None:
    bridge = MemoryIoTCore(keep=False)
    with tempfile.TemporaryDirectory() as tmp, IPCServer(Path(tmp) / "ipc.sock", iotcore=bridge) as server:
        server.register_component("bench", access_control=POLICY)
        env = {**os.environ, **server.environment("bench")}
        subprocess.run([sys.executable, __file__, "--client", str(n)], env=env, check=True)
    assert bridge.count == 2 * n, bridge.count


def client(n: int, in_flight: int = 256) -> None:
    ipc = GreengrassCoreIPCClientV2()
    payload = b"x" * 6000  # about 71 readings of JSON
    topic = "dt/meters/site/thing/raw"
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            ipc.publish_to_iot_core(topic_name=topic, qos="1", payload=payload)
        sync_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pending = []
        for _ in range(n):
            pending.append(ipc.publish_to_iot_core_async(topic_name=topic, qos="1", payload=payload))
            if len(pending) >= in_flight:
                for f in pending:
                    f.result()
                pending = []
        for f in pending:
            f.result()
        async_s = time.perf_counter() - t0
    finally:
        ipc.close()
    print(f"sync:  {n} PublishToIoTCore in {sync_s:.2f} s = {n / sync_s:,.0f} calls/s")
    print(f"async: {n} PublishToIoTCore ({in_flight} in flight) in {async_s:.2f} s = {n / async_s:,.0f} calls/s")
    print(f"at 71 readings a message: {71 * n / sync_s:,.0f} readings/s sync, {71 * n / async_s:,.0f} async")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        client(int(sys.argv[2]))
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)

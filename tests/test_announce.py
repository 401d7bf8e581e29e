"""The model announcement: read from an artifact folder's manifest, parsed strictly, published by
the model component at start, on each request and periodically, over an autospec'd IPC client."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from unittest import mock

import pytest
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
from awsiot.greengrasscoreipc.model import GetConfigurationResponse, JsonMessage, SubscriptionResponseMessage

from gateway.errors import ModelError
from gateway.model import announce
from gateway.model.announce import Announcement, Announcer, parse
from gateway.model.paths import default_model

MODEL = default_model()
VERSION = json.loads((MODEL / "manifest.json").read_text())["version"]


def artifact(tmp_path: Path) -> Path:
    """An unpacked model artifact: the model folder one level under the artifact folder."""
    root = tmp_path / "artifacts" / "1.0.0"
    shutil.copytree(MODEL, root / "ashrae-lgbm")
    return root


def client() -> mock.Mock:
    ipc = mock.create_autospec(GreengrassCoreIPCClientV2, instance=True)
    ipc.subscribe_to_topic.side_effect = lambda **kw: (mock.Mock(), mock.Mock())
    return ipc


def published(ipc) -> list[tuple[str, dict]]:
    return [(c.kwargs["topic"], c.kwargs["publish_message"].json_message.message)
            for c in ipc.publish_to_topic.call_args_list]


def test_the_announcement_is_read_from_the_folders_manifest(tmp_path):
    root = artifact(tmp_path)
    a = announce.announcement(root, "1.0.0")
    assert a == Announcement("org.metergateway.Model", "1.0.0", VERSION, str((root / "ashrae-lgbm").resolve()))
    assert announce.announcement(root / "ashrae-lgbm", "1.0.0") == a  # the model folder itself works too
    assert parse(a.payload()) == a and parse(json.dumps(a.payload()).encode()) == a


def test_a_broken_artifact_is_named(tmp_path):
    with pytest.raises(ModelError, match=r"no folder with a manifest\.json; expected one model folder$"):
        announce.announcement(tmp_path, "1.0.0")
    root = artifact(tmp_path)
    (root / "ashrae-lgbm" / "golden.json").unlink()
    with pytest.raises(ModelError, match=r"ashrae-lgbm: missing golden\.json$"):
        announce.announcement(root, "1.0.0")
    shutil.copytree(MODEL, root / "other")
    with pytest.raises(ModelError, match=r"2 folders \(ashrae-lgbm, other\) with a manifest\.json"):
        announce.announcement(root, "1.0.0")


@pytest.mark.parametrize("payload, reason", [
    (b"{nope", "not JSON: "),
    ([], "not a JSON object"),
    ({"component": "org.metergateway.Model", "version": "1", "model": "m"}, "path: None must be a non-empty string"),
    ({"component": "x.Y", "version": "1", "model": "m", "path": "/m"}, "component: 'x.Y' is not org.metergateway.Model"),
    ({"component": "org.metergateway.Model", "version": "1", "model": "m", "path": "m"}, "path: 'm' must be absolute"),
])
def test_a_bad_announcement_is_refused_with_its_reason(payload, reason):
    got = parse(payload)
    assert isinstance(got, str) and got.startswith(reason)


def test_the_announcer_announces_at_start_on_request_and_periodically(tmp_path):
    ipc = client()
    announcer = Announcer(ipc, artifact(tmp_path), "1.0.0", every_s=3600)
    t = threading.Thread(target=announcer.run)
    t.start()
    try:
        ipc_sub = ipc.subscribe_to_topic
        assert _wait(lambda: announcer.sent == 1)
        assert ipc_sub.call_args.kwargs["topic"] == announce.REQUEST_TOPIC
        on_request = ipc_sub.call_args.kwargs["on_stream_event"]
        on_request(SubscriptionResponseMessage(json_message=JsonMessage(message={})))
        assert _wait(lambda: announcer.sent == 2)
        assert published(ipc) == [(announce.ANNOUNCE_TOPIC, announcer.announcement.payload())] * 2
    finally:
        announcer.stop()
        t.join(5)
    assert not t.is_alive()
    assert announcer._operation[1].close.called

    periodic = Announcer(client(), artifact(tmp_path / "b"), "1.0.0", every_s=0.01)
    t = threading.Thread(target=periodic.run)
    t.start()
    assert _wait(lambda: periodic.sent >= 3)
    periodic.stop()
    t.join(5)


def test_a_failed_publish_is_tried_again_not_fatal(tmp_path):
    ipc = client()
    ipc.publish_to_topic.side_effect = [RuntimeError("nucleus restarting"), None, None]
    announcer = Announcer(ipc, artifact(tmp_path), "1.0.0", every_s=0.01)
    t = threading.Thread(target=announcer.run)
    t.start()
    assert _wait(lambda: announcer.sent >= 1)
    announcer.stop()
    t.join(5)
    assert ipc.publish_to_topic.call_count >= 2


def test_main_reads_announce_every_s_from_the_component_configuration(tmp_path):
    ipc = client()
    ipc.get_configuration.return_value = GetConfigurationResponse(value={"announce_every_s": 0})
    with pytest.raises(ModelError, match=r"^announce_every_s: 0 must be a number > 0$"):
        announce.main(ipc, artifact(tmp_path), "1.0.0")
    ipc.get_configuration.assert_called_once_with(key_path=[])


def _wait(predicate, timeout: float = 10.0) -> bool:
    tick = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        tick.wait(0.01)
    return predicate()

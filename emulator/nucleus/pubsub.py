"""Local publish/subscribe: PublishToTopic and SubscribeToTopic between components.

A message is JSON (``jsonMessage``, any JSON value) or bytes (``binaryMessage``); subscribers
get it as published, with ``context.topic`` set to the topic it was published on.
Subscriptions take MQTT wildcards (``+`` one level, ``#`` the rest), as the nucleus's since 2.6.
``receiveMode: RECEIVE_MESSAGES_FROM_OTHERS`` leaves out the subscriber's own messages.

Both operations are authorized against ``aws.greengrass.ipc.pubsub`` policies with ``*`` glob
resources (not MQTT-style: a policy ``a/+`` covers only the literal topic ``a/+``); a denial is
``UnauthorizedError`` "Principal P is not authorized to perform aws.greengrass.ipc.pubsub:
aws.greengrass#PublishToTopic on resource T".

The runner and tests take part without IPC: :meth:`PubSub.publish` and :meth:`PubSub.subscribe`.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from awsiot.greengrasscoreipc import model

from emulator.nucleus.accesscontrol import AccessControl


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching: ``+`` is one level, a final ``#`` this level and below."""
    if topic_filter == topic:
        return True
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#" and i == len(f_levels) - 1:
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


Listener = Callable[[str, Any, str | None], None]  # (topic, message: JSON value or bytes, publisher)


class PubSub:
    def __init__(self, acl: AccessControl) -> None:
        self.acl = acl
        self._subs: dict[int, tuple[str, Listener]] = {}
        self._next = 0
        self._lock = threading.Lock()

    def operations(self) -> dict:
        from emulator.nucleus.ipc import Operation
        return {"aws.greengrass#PublishToTopic": Operation(self._publish_op),
                "aws.greengrass#SubscribeToTopic": Operation(self._subscribe_op)}

    # -- Python API
    def publish(self, topic: str, message: Any, publisher: str | None = None) -> int:
        """Deliver ``message`` (a JSON value, or bytes) to every matching subscription; how many."""
        with self._lock:
            targets = [cb for f, cb in self._subs.values() if topic_matches(f, topic)]
        for cb in targets:
            cb(topic, message, publisher)
        return len(targets)

    def subscribe(self, topic_filter: str, listener: Listener) -> Callable[[], None]:
        """Call ``listener(topic, message, publisher)`` for each match; returns the unsubscribe."""
        with self._lock:
            self._next += 1
            key = self._next
            self._subs[key] = (topic_filter, listener)
        return lambda: self._remove(key)

    def _remove(self, key: int) -> None:
        with self._lock:
            self._subs.pop(key, None)

    # -- IPC
    def _publish_op(self, call) -> model.PublishToTopicResponse:
        r: model.PublishToTopicRequest = call.request
        if not r.topic:
            raise model.InvalidArgumentsError(message="Publish topic must not be null")
        call.authorize(r.topic, self.acl)
        pm = r.publish_message
        if pm is None or (pm.json_message is None) == (pm.binary_message is None):
            raise model.InvalidArgumentsError(message="Publish message must have exactly one of jsonMessage or binaryMessage")
        message = pm.json_message.message if pm.json_message is not None else pm.binary_message.message
        if pm.binary_message is not None and message is None:
            message = b""
        self.publish(r.topic, message, call.component.name)
        return model.PublishToTopicResponse()

    def _subscribe_op(self, call) -> model.SubscribeToTopicResponse:
        r: model.SubscribeToTopicRequest = call.request
        if not r.topic:
            raise model.InvalidArgumentsError(message="Subscribe topic must not be null")
        call.authorize(r.topic, self.acl)
        me = call.component.name
        others_only = r.receive_mode == model.ReceiveMode.RECEIVE_MESSAGES_FROM_OTHERS
        stream = call.stream

        def deliver(topic: str, message: Any, publisher: str | None) -> None:
            if others_only and publisher == me:
                return
            context = model.MessageContext(topic=topic)
            if isinstance(message, (bytes, bytearray)):
                event = model.SubscriptionResponseMessage(
                    binary_message=model.BinaryMessage(message=bytes(message), context=context))
            else:
                event = model.SubscriptionResponseMessage(
                    json_message=model.JsonMessage(message=message, context=context))
            stream.send_event(event)

        stream.on_close(self.subscribe(r.topic, deliver))
        return model.SubscribeToTopicResponse(topic_name=r.topic)

"""Edge gateway for building energy meters.

The library behind the ``gateway`` command and the Greengrass components. It imports
without Greengrass: every piece that talks to the outside world sits behind a small seam.

- :mod:`gateway.readings`: what a reading is, and the checks every reading passes.
- :mod:`gateway.sources`: readings in (replay, simulator).
- :mod:`gateway.buffer`: the durable SQLite buffer (put / claim / acknowledge).
- :mod:`gateway.publishers`: messages out (MQTT5 with mutual TLS, in-memory twin).
- :mod:`gateway.forwarder`: buffer → batched, acknowledged messages.
- :mod:`gateway.config`: the YAML configuration and its validation.
- :mod:`gateway.model`: features, training, ONNX scoring, online per-meter learning.
"""

__version__ = "0.1.0"

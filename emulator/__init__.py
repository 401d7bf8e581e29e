"""The local emulation of the cloud and the device's surroundings, for development and the demo.

It runs on a developer's machine, never on a gateway: the gateway component's artifact ships
``gateway/`` only.

- :mod:`emulator.broker`: mosquitto with generated certificates, standing in for AWS IoT Core.
- :mod:`emulator.demo`: ``gateway demo``, the whole path on one machine.
"""

"""A local Greengrass nucleus, enough for our components to run unmodified on a developer's machine.

- :mod:`emulator.nucleus.eventstream`: the Amazon Event Stream framing (the codec).
- :mod:`emulator.nucleus.ipc`: the IPC server (eventstream RPC on a Unix socket) and the
  component registry; start here.
- :mod:`emulator.nucleus.accesscontrol`: recipes' ``accessControl``, matched as the nucleus does.
- Services, one module each: :mod:`~emulator.nucleus.mqttproxy` (IoT Core, through a bridge),
  :mod:`~emulator.nucleus.pubsub`, :mod:`~emulator.nucleus.config`,
  :mod:`~emulator.nucleus.lifecycle`, :mod:`~emulator.nucleus.localcli` (the runner's callbacks).
"""

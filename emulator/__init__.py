"""The local emulation of the cloud and the device's surroundings, for development and the demo.

It runs on a developer's machine, never on a gateway: the gateway component's artifact ships
``gateway/`` only.

- :mod:`emulator.broker`: mosquitto with generated certificates, standing in for AWS IoT Core.
- :mod:`emulator.nucleus`: a local Greengrass nucleus (IPC server, IoT Core bridge and spooler,
  component lifecycles, local deployments).
- :mod:`emulator.components`: the two components built and run on it (the demo and tests share it).
- :mod:`emulator.modbus_fleet`: simulated Modbus meters.
- :mod:`emulator.cfn`: the CloudFormation templates of ``cloud/``, read as the one source of truth.
- :mod:`emulator.rules`: the IoT rules engine; :mod:`emulator.receipts`: its receipt rule alone.
- :mod:`emulator.firehose`, :mod:`emulator.s3`, :mod:`emulator.athena`: Firehose → S3 → Athena.
- :mod:`emulator.iotanalytics`: IoT Analytics, from the legacy template.
- :mod:`emulator.dashboard`: the dashboard.
- :mod:`emulator.demo`: ``gateway demo``, the whole chain on one machine.
- :mod:`emulator.docker`: the same stack in Docker.
"""

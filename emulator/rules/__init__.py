"""The emulated AWS IoT rules engine: the topic rules of ``cloud/*.yaml``, run locally.

- :mod:`emulator.rules.sql`: the IoT SQL (2016-03-23), parsed by hand, Undefined semantics;
- :mod:`emulator.rules.actions`: republish, Firehose, IoT Analytics, CloudWatch Logs, S3, and
  the error action's message;
- :mod:`emulator.rules.engine`: :class:`~emulator.rules.engine.RulesEngine`, the rules of the
  templates and ``handle(topic, payload, client_id)``;
- :mod:`emulator.rules.binding`: the engine as a client of the local mosquitto;
- :mod:`emulator.rules.bench`: its rate on the raw-reading rule (``gateway bench``).

Importing this package loads nothing; import the module you need.
"""

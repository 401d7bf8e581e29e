"""Release tooling, run from a checkout (never shipped to a device).

- :mod:`release.wheelhouse`: the wheels a component installs on the device (pinned runtime deps,
  the meter-gateway wheel, pip's own wheel), for this machine's platform or another one.
- :mod:`release.build`: ``gateway build``, what ``gdk component build`` (GDK 1.6.2, zip build
  system) makes, without GDK: ``greengrass-build/recipes`` and ``greengrass-build/artifacts``.
"""

"""The simulated network: host engines (engines.py) and host behaviours, honest and not,
served on loopback (simulator.py) — one catalogue that the demo, the tests, calibration
and the benchmarks build on."""

from validator.network import deviations  # noqa: E402,F401 - registers the settings-bending strategies

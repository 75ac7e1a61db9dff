"""Per-sandbox Prometheus metrics: recorded as things happen, served by each shim.

- :mod:`shim.metrics.recorder`: histograms the agent client and the device
  manager feed (agent round trips, hot-plug durations); no dependencies, so
  recording costs nothing at import;
- :mod:`shim.metrics.snapshot`: what a scrape reads from the sandbox (the VMM's
  ``/proc``, the agent's guest figures and each container's cgroup);
- :mod:`shim.metrics.exposition`: the text, formatted by ``prometheus_client``;
- :mod:`shim.metrics.server`: ``GET /metrics`` over HTTP/1.1 on the sandbox's
  root-only ``metrics.sock``;
- :mod:`shim.metrics.scrape`: the reading side, for ``husk metrics``.
"""

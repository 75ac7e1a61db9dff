"""The reading side of the shims' metrics sockets, for ``husk metrics``.

Each sandbox's text is fetched over its ``metrics.sock``, parsed, labelled with
``sandbox_id`` (as kata-monitor does when it gathers Kata's shims) and merged
into one exposition, so the output for many sandboxes is still valid text.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

from shim.errors import FailedPreconditionError, HuskError, NotFoundError
from shim.sandbox.state import RECORD, SandboxState, sandboxes

TIMEOUT = 15.0
RESPONSE_LIMIT = 16 * 1024 * 1024


def fetch(path: Path, timeout: float = TIMEOUT) -> str:
    """``GET /metrics`` on the unix socket ``path``; the body of a 200 answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: husk\r\nConnection: close\r\n\r\n")
        chunks = []
        size = 0
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > RESPONSE_LIMIT:
                raise OSError(f"more than {RESPONSE_LIMIT} bytes from {path}")
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if status.split()[1:2] != ["200"]:
        raise OSError(f"{path} answered {status!r}")
    return body.decode()


def sandbox_text(state: SandboxState) -> str:
    """One sandbox's metrics; a one-line error naming it when its shim does not answer."""
    if not state.shim_alive():
        raise FailedPreconditionError(
            f"sandbox {state.id}: its shim is not running (`husk cleanup` reclaims it)"
        )
    try:
        return fetch(state.metrics_socket)
    except OSError as e:
        raise FailedPreconditionError(
            f"sandbox {state.id}: no metrics from {state.metrics_socket}: {e}"
        ) from None


def merge(texts: Iterable[tuple[str, str]]) -> bytes:
    """Parse each ``(sandbox_id, text)``, label its samples and format them as one text."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import Metric
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import Collector

    families: dict[str, Metric] = {}
    for sandbox_id, text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            for s in family.samples:
                labels = {"sandbox_id": sandbox_id, **s.labels}
                merged.add_sample(s.name, labels, s.value, s.timestamp, s.exemplar)

    class Merged(Collector):
        def collect(self) -> Iterator[Metric]:
            return iter(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


def collect(root: Path, sandbox_id: str | None) -> tuple[bytes, list[str]]:
    """The merged text of one sandbox (errors raise) or of all (errors are returned)."""
    if sandbox_id is not None:
        directory = root / sandbox_id
        if not (directory / RECORD).exists():
            raise NotFoundError(f"sandbox {sandbox_id} not found under {root}")
        state = SandboxState.load(directory)
        return merge([(state.id, sandbox_text(state))]), []
    texts: list[tuple[str, str]] = []
    problems: list[str] = []
    for state in sandboxes(root):
        try:
            texts.append((state.id, sandbox_text(state)))
        except HuskError as e:
            problems.append(str(e))
    return merge(texts), problems

"""Unary ttrpc round-trips per second: husk's Python ttrpc against Go's, same run.

    python3 -m bench.ttrpc_roundtrip [--seconds 2] [--rounds 3] [--callers 1,16] [--json] [--check]

Each row is one client process and one server process on one unix-socket
connection, with N concurrent callers each doing ``husk.test.Echo/Echo`` with a
16-byte payload back to back. Like is compared with like: every pair runs its
client and its server as two separate processes, so each side may use its own
core. The baseline is Go client + Go server, built offline from Debian's
golang-github-containerd-ttrpc-dev (the ttrpc containerd links), each process
with Go's default GOMAXPROCS (all CPUs); the measured pair is husk's Client +
husk's Server, each process one trio thread (``--serve`` runs the server). The
mixed pairs show which side limits. Pairs run interleaved for
``--rounds`` rounds and the best round of each counts, which damps the noise of
a shared machine. The ratio is husk/Go for each
caller count; the target is >= 0.5 with 16 callers (``--check`` exits 1 below it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import trio
from google.protobuf import wrappers_pb2

from tests.conformance import echo_service, gopeer
from ttrpc import Client, Server

REPO = Path(__file__).resolve().parent.parent
PAYLOAD_SIZE = 16
WARMUP = 0.3
TARGET_RATIO = 0.5
TARGET_CALLERS = 16


@dataclass
class Row:
    client: str
    server: str
    callers: int
    calls: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


# ---------------------------------------------------------------- husk side


async def _serve(path: str) -> None:
    server = Server()
    server.register(echo_service.DESCRIPTOR, echo_service.EchoService())
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_unix, path)
        print(json.dumps({"listening": path, "pid": os.getpid()}), flush=True)


def serve_main(path: str) -> None:
    """``--serve PATH``: a husk ttrpc server process for the benchmark."""
    trio.run(_serve, path)


@contextmanager
def husk_server(socket: Path, startup_timeout: float = 20) -> Iterator[None]:
    """Run husk's server in its own process, as the shim and its peer would be."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.ttrpc_roundtrip", "--serve", str(socket)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the server prints one line when it listens
        if not line:
            raise RuntimeError(f"husk bench server exited ({proc.wait(startup_timeout)})")
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def _husk_client(socket: Path, callers: int, seconds: float) -> tuple[int, float]:
    payload = wrappers_pb2.BytesValue(value=bytes(range(PAYLOAD_SIZE)))
    running, counting = True, False
    calls = 0
    failures: list[BaseException] = []
    stream = await trio.open_unix_socket(str(socket))
    async with Client.open(stream) as client:

        async def caller() -> None:
            nonlocal calls
            try:
                while running:
                    await client.call(
                        echo_service.SERVICE, "Echo", payload, wrappers_pb2.BytesValue
                    )
                    if counting:
                        calls += 1
            except Exception as exc:  # recorded and raised outside Client.open
                failures.append(exc)

        # callers stop at a flag, not by cancellation: the figure counts only
        # completed calls, and no call is started inside a cancelled scope
        async with trio.open_nursery() as nursery:
            for _ in range(callers):
                nursery.start_soon(caller)
            await trio.sleep(WARMUP)
            counting, start = True, trio.current_time()
            await trio.sleep(seconds)
            measured, elapsed = calls, trio.current_time() - start
            running = counting = False
    if failures:
        raise RuntimeError(f"husk bench client failed: {failures[0]!r}") from failures[0]
    return measured, elapsed


def husk_client(socket: Path, callers: int, seconds: float) -> tuple[int, float]:
    return trio.run(_husk_client, socket, callers, seconds)


# ---------------------------------------------------------------- Go side


def go_client(binary: Path, socket: Path, callers: int, seconds: float) -> tuple[int, float]:
    result = gopeer.run_bench_client(binary, socket, callers, seconds, PAYLOAD_SIZE)
    return int(result["calls"]), float(result["seconds"])


# ---------------------------------------------------------------- the run


def measure(
    binary: Path, callers_list: list[int], seconds: float, rounds: int, mixed: bool
) -> list[Row]:
    """Every pair and caller count, ``rounds`` times, interleaved so noise hits all alike."""
    rows: list[Row] = []
    pairs = [("go", "go"), ("husk", "husk")]
    if mixed:
        pairs += [("husk", "go"), ("go", "husk")]
    with tempfile.TemporaryDirectory(prefix="husk-bench-") as tmp:
        go_sock, husk_sock = Path(tmp) / "go.sock", Path(tmp) / "husk.sock"
        with gopeer.go_server(binary, go_sock, mode="bench-server"), husk_server(husk_sock):
            for round_ in range(1, rounds + 1):
                for callers in callers_list:
                    for client, server in pairs:
                        sock = go_sock if server == "go" else husk_sock
                        if client == "go":
                            calls, elapsed = go_client(binary, sock, callers, seconds)
                        else:
                            calls, elapsed = husk_client(sock, callers, seconds)
                        row = Row(client, server, callers, calls, elapsed)
                        rows.append(row)
                        print(
                            f"  round {round_}: {client} client -> {server} server, "
                            f"{callers:>2} callers: {row.rate:>9.0f} calls/s",
                            file=sys.stderr,
                            flush=True,
                        )
    return rows


def best(rows: list[Row]) -> list[Row]:
    """The fastest round of each (client, server, callers): the least disturbed one."""
    out: dict[tuple[str, str, int], Row] = {}
    for r in rows:
        key = (r.client, r.server, r.callers)
        if key not in out or r.rate > out[key].rate:
            out[key] = r
    return sorted(out.values(), key=lambda r: (r.callers, r.client != "go", r.server != "go"))


def ratios(rows: list[Row]) -> dict[int, float]:
    """husk/Go rate for each caller count (husk client+server over Go client+server)."""
    out: dict[int, float] = {}
    for callers in sorted({r.callers for r in rows}):
        go = next(r for r in rows if (r.client, r.server, r.callers) == ("go", "go", callers))
        husk = next(r for r in rows if (r.client, r.server, r.callers) == ("husk", "husk", callers))
        out[callers] = husk.rate / go.rate if go.rate else 0.0
    return out


def setup() -> dict[str, str]:
    """How each side runs, printed with the figures."""
    gomaxprocs = os.environ.get("GOMAXPROCS", f"unset (= {os.cpu_count()} CPUs)")
    return {
        "go": f"ttrpcpeer client and server, one process each, GOMAXPROCS {gomaxprocs}",
        "husk": "Client and Server, one process each, one trio thread per process",
        "transport": "one unix-socket connection per row; callers share it",
    }


def render(all_rows: list[Row], rows: list[Row], by_callers: dict[int, float]) -> str:
    rounds = len(all_rows) // max(len(rows), 1)
    lines = [
        f"ttrpc unary round-trips, {PAYLOAD_SIZE}-byte payload, one connection, "
        f"{os.cpu_count()} CPUs; best of {rounds} round(s), range in brackets",
        *(f"  {side}: {how}" for side, how in setup().items()),
        "",
        f"{'client':<8}{'server':<8}{'callers':>8}{'calls/s':>11}   range",
    ]
    for r in rows:
        same = [
            x.rate
            for x in all_rows
            if (x.client, x.server, x.callers) == (r.client, r.server, r.callers)
        ]
        lines.append(
            f"{r.client:<8}{r.server:<8}{r.callers:>8}{r.rate:>11.0f}"
            f"   [{min(same):.0f} .. {max(same):.0f}]"
        )
    lines.append("")
    for callers, ratio in by_callers.items():
        note = ""
        if callers == TARGET_CALLERS:
            verdict = "meets" if ratio >= TARGET_RATIO else "BELOW"
            note = f"   ({verdict} the target of {TARGET_RATIO})"
        lines.append(f"husk/Go with {callers:>2} callers: {ratio:.2f}{note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.ttrpc_roundtrip", description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0, help="measured time per row")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best one counts")
    parser.add_argument("--callers", default="1,16", help="comma-separated caller counts")
    parser.add_argument("--no-mixed", action="store_true", help="skip husk<->Go pairs")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--check", action="store_true", help=f"exit 1 when husk/Go < {TARGET_RATIO}"
    )
    parser.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve_main(args.serve)
        return 0

    callers_list = [int(c) for c in args.callers.split(",")]
    started = time.monotonic()
    binary = gopeer.build_peer()
    all_rows = measure(binary, callers_list, args.seconds, args.rounds, mixed=not args.no_mixed)
    rows = best(all_rows)
    by_callers = ratios(rows)
    if args.json:
        report = {
            "rows": [asdict(r) | {"rate": r.rate} for r in rows],
            "all_rounds": [asdict(r) | {"rate": r.rate} for r in all_rows],
            "ratio_husk_over_go": {str(k): v for k, v in by_callers.items()},
            "target": {"callers": TARGET_CALLERS, "ratio": TARGET_RATIO},
            "setup": setup(),
            "wall_seconds": time.monotonic() - started,
        }
        print(json.dumps(report, indent=1))
    else:
        print(render(all_rows, rows, by_callers))
        print(f"\n(total {time.monotonic() - started:.0f}s)")
    below = by_callers.get(TARGET_CALLERS, 1.0) < TARGET_RATIO
    return 1 if args.check and below else 0


if __name__ == "__main__":
    sys.exit(main())

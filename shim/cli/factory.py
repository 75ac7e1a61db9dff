"""``husk factory init | status | destroy``: the VM template and the VM pool, by hand.

Sandboxes make the template themselves on first use when ``[factory]
enable_template`` is on; these commands make it ahead of time (so no
container pays for it), show whether it is ready, and remove it. With
``vm_cache_number`` above 0 they also start, show and stop the VM pool's
daemon (:mod:`shim.pool.daemon`).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from typing import Any

import trio

from shim import rotating_log
from shim.config import Config
from shim.errors import HuskError
from shim.pool import protocol
from shim.pool.daemon import LOG_NAME, child_env
from shim.sandbox.factory import vm_template
from shim.sandbox.state import make_private_dir

#: how long ``init`` waits for a detached daemon to answer
DAEMON_START_TIMEOUT = 20.0
#: how long ``destroy`` waits for the daemon to take its VMs down
DAEMON_STOP_TIMEOUT = 60.0


def init(config: Config, foreground: bool = False) -> int:
    """Make the template now (again, if stale or damaged); start the pool's daemon."""
    if config.factory.enable_template or config.factory.vm_cache_number == 0:
        template = vm_template(config)
        trio.run(template.ensure)
        status = template.status()
        print(f"template ready in {status.path} ({status.memory_mib} MiB)")
    if config.factory.vm_cache_number == 0:
        return 0
    if foreground:
        from shim.pool import daemon

        return daemon.main([str(config.source)])
    return _start_daemon(config)


def _pool_status(config: Config) -> dict[str, Any] | None:
    try:
        return protocol.request(config.factory.vm_cache_endpoint, {"op": "status"}, 5.0)
    except (OSError, HuskError):
        return None


def _start_daemon(config: Config) -> int:
    """Start the daemon detached, its stderr kept in a bounded log; wait until it answers."""
    endpoint = config.factory.vm_cache_endpoint
    if _pool_status(config) is not None:
        print(f"VM pool already serving at {endpoint}")
        return 0
    make_private_dir(config.runtime.state_dir)
    log_path = config.runtime.state_dir / LOG_NAME
    read_end, write_end = os.pipe()
    env = child_env()
    try:
        subprocess.Popen(
            [sys.executable, "-I", "-S", rotating_log.__file__, str(log_path), str(1 << 22)],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        daemon = subprocess.Popen(
            [sys.executable, "-m", "shim.pool.daemon", str(config.source)],
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=write_end,
            start_new_session=True,
            env=env,
        )
    finally:
        os.close(read_end)
        os.close(write_end)
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while time.monotonic() < deadline:
        if _pool_status(config) is not None:
            print(
                f"VM pool serving at {endpoint}: {config.factory.vm_cache_number} VMs "
                f"filling (log: {log_path})"
            )
            return 0
        if daemon.poll() is not None:
            break
        time.sleep(0.1)
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    tail = text.strip().splitlines()[-1:]
    print(
        f"husk: the VM pool daemon did not start: {tail[0] if tail else 'no answer'} "
        f"(see {log_path})",
        file=sys.stderr,
    )
    return 1


def status(config: Config, as_json: bool) -> int:
    """Whether the template is there and current, and the pool's figures; exit 1 if not ready."""
    template = vm_template(config)
    found = template.status()
    enabled = config.factory.enable_template
    pool_wanted = config.factory.vm_cache_number > 0
    pool = _pool_status(config) if pool_wanted else None
    # with a pool: ready when it runs (and the template is, if clones are wanted)
    ok = pool is not None and (found.ready or not enabled) if pool_wanted else found.ready
    if as_json:
        print(
            json.dumps(
                {
                    "path": str(found.path),
                    "enabled": enabled,
                    "ready": found.ready,
                    "detail": found.detail,
                    "memory_mib": found.memory_mib,
                    "created": found.created,
                    "pool": pool,
                }
            )
        )
    else:
        when = (
            datetime.datetime.fromtimestamp(found.created).isoformat(timespec="seconds")
            if found.created
            else "-"
        )
        print(f"template   {found.path}")
        print(f"enabled    {'yes' if enabled else 'no ([factory] enable_template = false)'}")
        print(f"state      {found.detail}")
        print(f"memory     {found.memory_mib} MiB")
        print(f"made       {when}")
        if pool_wanted:
            _print_pool(config, pool)
    return 0 if ok else 1


def _print_pool(config: Config, pool: dict[str, Any] | None) -> None:
    endpoint = config.factory.vm_cache_endpoint
    if pool is None:
        print(f"pool       not running at {endpoint} (`husk factory init` starts it)")
        return
    print(f"pool       {endpoint}")
    print(f"vms        {pool['ready']} ready, {pool['booting']} booting, of {pool['size']}")
    print(f"idle mem   {pool['idle_memory_bytes'] / 2**20:.0f} MiB")
    print(f"claims     {pool['hits']} hits, {pool['misses']} misses")
    print(
        f"refill     {pool['refill_seconds_last']:.2f} s last, "
        f"{pool['refill_seconds_mean']:.2f} s mean; {pool['failures']} failed"
    )


def _stop_daemon(config: Config) -> list[str]:
    """Ask the daemon to stop; wait until its endpoint is gone (its VMs went first)."""
    endpoint = config.factory.vm_cache_endpoint
    try:
        protocol.request(endpoint, {"op": "stop"}, 5.0)
    except (OSError, HuskError):
        return []
    deadline = time.monotonic() + DAEMON_STOP_TIMEOUT
    while time.monotonic() < deadline:
        if _pool_status(config) is None and not _members_left(config):
            print(f"VM pool at {endpoint} stopped")
            return []
        time.sleep(0.2)
    return [f"the VM pool at {endpoint} did not stop within {DAEMON_STOP_TIMEOUT:g} s"]


def _members_left(config: Config) -> bool:
    from shim.pool.member import PREFIX

    root = config.runtime.state_dir
    return root.is_dir() and any(p.name.startswith(PREFIX) for p in root.iterdir())


def destroy(config: Config) -> int:
    """Stop the pool (claimed VMs serve on); stop and remove the template (clones keep theirs)."""
    problems = _stop_daemon(config)
    problems += vm_template(config).destroy()
    for problem in problems:
        print(f"husk: {problem}", file=sys.stderr)
    if not problems:
        print(f"template removed from {config.factory.template_path}")
    return 1 if problems else 0

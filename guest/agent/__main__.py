"""``python3 -m guest.agent``: the husk guest agent.

In the guest (defaults)::

    python3 -m guest.agent

On a host, for tests (never touches the host's runc state, hostname or network)::

    python3 -m guest.agent --host-mode --listen unix:/tmp/a/agent.sock \\
        --secret-file /tmp/a/secret --state-dir /tmp/a/state --shared-dir /tmp/a/shared \\
        --cgroup-parent /husk-test-1

A unix or vsock peer is served only once it proves the secret in
``--secret-file`` (see ``common.channel_auth``); without one those channels
refuse every connection.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

import trio

from guest.agent import logs, power, server
from guest.agent.auth import FW_CFG_SECRET
from guest.agent.channel import parse_listen
from guest.agent.config import KATA_SHARED_DIR, AgentConfig

log = logging.getLogger("husk.agent")


def default_runtime() -> str:
    """crun where the image has it: it creates a container several times faster under TCG."""
    return "crun" if shutil.which("crun") else "runc"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python3 -m guest.agent", description=__doc__.splitlines()[0])
    p.add_argument(
        "--listen", default="auto", help="auto | vsock[:PORT] | serial[:PATH] | unix:PATH"
    )
    p.add_argument(
        "--host-mode", action="store_true", help="never change the machine; exit on DestroySandbox"
    )
    p.add_argument(
        "--secret-file",
        type=Path,
        default=FW_CFG_SECRET,
        help="the 32-byte secret a vsock or unix peer must prove (default: QEMU's fw_cfg file)",
    )
    p.add_argument("--state-dir", type=Path, default=Path("/run/husk-agent"))
    p.add_argument("--shared-dir", type=Path, default=KATA_SHARED_DIR)
    p.add_argument(
        "--runc",
        default=default_runtime(),
        help="the OCI runtime binary, runc-compatible (default: crun if present, else runc)",
    )
    p.add_argument("--runc-root", type=Path, help="runc's --root (default: STATE_DIR/runc)")
    p.add_argument("--cgroup-parent", default="/husk")
    p.add_argument("--cgroup-root", type=Path, default=Path("/sys/fs/cgroup"))
    p.add_argument("--copy-file-root", type=Path, help="CopyFile writes below this (default /run)")
    p.add_argument("--on-destroy", choices=power.ACTIONS, help="default: auto (exit in host mode)")
    p.add_argument(
        "--debug",
        action="store_true",
        help="debug log (also husk.debug=1 on the kernel command line)",
    )
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> AgentConfig:
    """Build the agent's configuration from parsed flags."""
    state = args.state_dir
    return AgentConfig(
        state_dir=state,
        shared_dir=args.shared_dir,
        runc=args.runc,
        runc_root=args.runc_root or state / "runc",
        cgroup_root=args.cgroup_root,
        cgroup_parent=args.cgroup_parent,
        copy_file_root=args.copy_file_root or (state / "files" if args.host_mode else Path("/run")),
        resolv_conf=state / "resolv.conf" if args.host_mode else Path("/etc/resolv.conf"),
        host_mode=args.host_mode,
        secret_file=args.secret_file,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the agent; as PID 1 it never returns (it powers off instead)."""
    args = parse_args(argv)
    logs.setup(args.debug or logs.debug_from_cmdline(logs.read_cmdline()))
    on_destroy = args.on_destroy or ("exit" if args.host_mode else "auto")
    try:
        addresses = parse_listen(args.listen)
        config = config_from(args)
        log.info("starting (pid %d, %s)", os.getpid(), "host mode" if config.host_mode else "guest")
        trio.run(server.run, config, addresses, on_destroy)
    except BaseException:
        log.exception("the agent failed")
        if os.getpid() == 1:
            power.power_off()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

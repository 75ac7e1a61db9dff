"""``containerd-shim-husk-v2``: the binary containerd runs for ``io.containerd.husk.v2``.

containerd (1.6, 1.7, 2.x) invokes it with Go-style flags and the bundle as cwd::

    containerd-shim-husk-v2 -namespace NS -address ADDR -publish-binary BIN -id ID [-debug] start
    containerd-shim-husk-v2 -namespace NS -address ADDR -publish-binary BIN -id ID \\
        -bundle BUNDLE [-debug] delete
    containerd-shim-husk-v2 -info

and ``TTRPC_ADDRESS`` in the environment. ``start`` reads the runtime options
or (2.3+) a ``BootstrapParams`` on stdin and prints the serving shim's address
in the form ``bootstrap`` decides; ``delete`` prints a ``DeleteResponse``
protobuf; ``-info`` prints a ``RuntimeInfo`` (``info``); with no action the
process is the serving shim itself (launched by ``start``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from shim.containerd.bootstrap import StartInput
from shim.containerd.launch import ShimArgs
from shim.errors import HuskError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="containerd-shim-husk-v2", allow_abbrev=False)
    p.add_argument("-namespace", default="default")
    p.add_argument("-address", default="")
    p.add_argument("-publish-binary", dest="publish_binary", default="")
    p.add_argument("-id", default="")
    p.add_argument("-bundle", default="")
    p.add_argument("-socket", default="")
    p.add_argument("-debug", action="store_true")
    p.add_argument("-v", "-version", dest="version", action="store_true")
    p.add_argument("-info", dest="info", action="store_true")
    p.add_argument("action", nargs="?", default="", choices=("", "start", "delete"))
    return p


def parse(argv: Sequence[str]) -> tuple[ShimArgs, str, bool]:
    """containerd's flags → (args, action, version wanted); unknown flags are ignored.

    ``-info`` is the action ``info`` (containerd passes it as a flag so that old
    shims fail on an unknown flag instead of a confusing unknown subcommand).
    """
    ns, _ = _parser().parse_known_args(list(argv))
    args = ShimArgs(
        namespace=ns.namespace,
        address=ns.address,
        publish_binary=ns.publish_binary,
        id=ns.id,
        bundle=ns.bundle or os.getcwd(),
        debug=ns.debug,
    )
    return args, "info" if ns.info else ns.action, ns.version


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``containerd-shim-husk-v2``."""
    from shim import config as config_mod

    args, action, version = parse(sys.argv[1:] if argv is None else argv)
    if version:
        from shim.version import configured_image_dir, version_line

        print(version_line(configured_image_dir()))
        return 0
    if action == "info":
        return _info()
    from shim.containerd import bootstrap, options

    start_input = bootstrap.StartInput(b"", bootstrap=False)
    try:
        # containerd hands a runtime handler's ConfigPath to `start` only
        if action == "start":
            start_input = bootstrap.parse(options.read(sys.stdin.buffer), args.id, args.namespace)
            config_path = options.parse(start_input.runtime_options)
            options.record(args.bundle, config_path)
        else:
            config_path = options.recorded(args.bundle)
        cfg: config_mod.Config | HuskError = config_mod.load(config_path)
    except HuskError as e:
        cfg = e
    except OSError as e:
        cfg = HuskError(f"bundle {args.bundle}: cannot record the runtime options: {e.strerror}")
    if action == "start":
        return _start(args, cfg, start_input)
    if action == "delete":
        return _delete(args, cfg)
    if not args.id:
        print("containerd-shim-husk-v2: -id is required", file=sys.stderr)
        return 2
    from shim.containerd import serve

    return serve.main(args, cfg)


def _info() -> int:
    from shim.containerd import info, options

    try:
        answer = info.runtime_info(options.read(sys.stdin.buffer))
    except HuskError as e:
        print(f"husk: {e}", file=sys.stderr, end="")
        return 1
    sys.stdout.buffer.write(answer.SerializeToString())
    sys.stdout.flush()
    return 0


def _start(args: ShimArgs, cfg: object, start_input: StartInput) -> int:
    from shim.config import Config
    from shim.containerd import bootstrap, launch

    # containerd quotes start's output in its error: no trailing newline keeps it one line
    if not isinstance(cfg, Config):
        print(f"husk: {cfg}", file=sys.stderr, end="")
        return 1
    if not args.id:
        print("husk: start needs -id", file=sys.stderr)
        return 2

    claim = None
    if cfg.factory.vm_cache_number > 0:
        from shim.pool.claim import PoolClaim

        claim = PoolClaim(cfg, args)

    def serve_forever() -> int:
        from shim.containerd import serve

        return serve.main(args, cfg, pool_miss=claim.miss if claim is not None else "")

    try:
        address = launch.start(
            args, cfg.runtime.state_dir, cfg.runtime.sandbox_model, serve_forever, claim
        )
    except (HuskError, OSError) as e:
        print(f"husk: cannot start the shim for {args.id}: {e}", file=sys.stderr, end="")
        return 1
    pods_share_a_shim = cfg.runtime.sandbox_model == "pod"
    sys.stdout.buffer.write(bootstrap.reply(address, start_input, pods_share_a_shim))
    sys.stdout.flush()
    return 0


def _delete(args: ShimArgs, cfg: object) -> int:
    from google.protobuf import timestamp_pb2

    from agent_proto import task_pb2
    from shim.config import RUNTIME_KEYS, Config
    from shim.containerd import launch

    if isinstance(cfg, Config):
        root = cfg.runtime.state_dir
    else:
        # a broken config must not stop the cleanup of what an older config made
        from pathlib import Path

        root = Path(next(k.default for k in RUNTIME_KEYS if k.name == "state_dir"))
    status, when, problems = launch.delete(args, root)
    for problem in problems:
        print(f"husk: {problem}", file=sys.stderr)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(when * 1e9))
    response = task_pb2.DeleteResponse(pid=0, exit_status=status, exited_at=stamp)
    sys.stdout.buffer.write(response.SerializeToString())
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

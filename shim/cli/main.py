"""The ``husk`` command: host check, config, guest image, sandboxes, cleanup, and debugging."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from shim import config
from shim.cli import check
from shim.errors import HuskError
from shim.host import HostFacts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="husk", description="Run containers in lightweight VMs (containerd shim helpers)."
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="configuration.toml to use (default: $HUSK_CONFIG, /etc/husk, packaged default)",
    )
    parser.add_argument(
        "--version", action="store_true", help="print the version line (and the guest kernel)"
    )
    sub = parser.add_subparsers(dest="command")

    p_check = sub.add_parser("check", help="what this host offers; exit 0 if a sandbox can start")
    p_check.add_argument("--json", action="store_true", help="machine-readable output")

    p_config = sub.add_parser("config", help="configuration")
    config_sub = p_config.add_subparsers(dest="config_command", required=True)
    p_show = config_sub.add_parser("show", help="print the effective configuration")
    p_show.add_argument("--json", action="store_true", help="as JSON instead of TOML")

    p_image = sub.add_parser("image", help="the guest kernel and initrd")
    image_sub = p_image.add_subparsers(dest="image_command", required=True)
    p_build = image_sub.add_parser("build", help="build the guest image from Debian packages")
    p_build.add_argument("--output", type=Path, help="image dir (default: [runtime] image_dir)")
    p_build.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p_build.add_argument(
        "--compression",
        choices=("none", "zstd", "gzip"),
        default="none",
        help="initrd compression (none boots fastest under TCG; zstd is ~3x smaller)",
    )

    p_pause = image_sub.add_parser(
        "pause", help="the CRI sandbox (pause) image, made locally from busybox-static"
    )
    p_pause.add_argument(
        "--output", type=Path, default=Path("/var/lib/husk/pause-oci.tar"), help="OCI tarball"
    )
    p_pause.add_argument(
        "--import",
        dest="import_to",
        metavar="ADDRESS",
        nargs="?",
        const="/run/containerd/containerd.sock",
        help="also import it into containerd's k8s.io namespace (default socket if no ADDRESS)",
    )

    p_ctd = sub.add_parser(
        "containerd-config", help="print (or --install) husk's CRI runtime handlers for containerd"
    )
    p_ctd.add_argument("--install", action="store_true", help="merge them into containerd's config")
    p_ctd.add_argument("--containerd-config", type=Path, default=None, help="containerd's config")
    p_ctd.add_argument("--template-config", type=Path, default=None, help="husk-template's config")
    p_ctd.add_argument(
        "--containerd-version",
        metavar="X.Y",
        default=None,
        help="the containerd to configure (default: ask `containerd --version`)",
    )

    p_sandbox = sub.add_parser("sandbox", help="the sandboxes on this host")
    sandbox_sub = p_sandbox.add_subparsers(dest="sandbox_command", required=True)
    p_ls = sandbox_sub.add_parser("ls", help="list sandboxes: hypervisor, age, size, state")
    p_ls.add_argument("--json", action="store_true", help="machine-readable output")

    p_exec = sub.add_parser(
        "exec", help="a root shell in a sandbox's guest (needs [agent.husk] debug_console)"
    )
    p_exec.add_argument("sandbox", help="the sandbox id (see `husk sandbox ls`)")

    p_metrics = sub.add_parser("metrics", help="Prometheus metrics of one sandbox, or of all")
    p_metrics.add_argument("sandbox", nargs="?", help="a sandbox id (default: every sandbox)")

    p_factory = sub.add_parser(
        "factory", help="the VM template sandboxes are cloned from, and the VM pool"
    )
    factory_sub = p_factory.add_subparsers(dest="factory_command", required=True)
    p_finit = factory_sub.add_parser(
        "init", help="make the template now (again if stale); start the VM pool daemon"
    )
    p_finit.add_argument(
        "--foreground", action="store_true", help="run the pool daemon here (for systemd)"
    )
    p_fstatus = factory_sub.add_parser("status", help="whether the template is ready")
    p_fstatus.add_argument("--json", action="store_true", help="machine-readable output")
    factory_sub.add_parser("destroy", help="stop the VM pool; stop and remove the template")

    p_cleanup = sub.add_parser("cleanup", help="list and reclaim sandboxes of dead shims")
    p_cleanup.add_argument("--dry-run", action="store_true", help="only list the orphans")
    return parser


def _cmd_check(args: argparse.Namespace) -> int:
    host = HostFacts.probe()
    cfg = config.load(args.config, host=host)
    findings = check.probe(cfg, host)
    print(check.render_json(findings) if args.json else check.render_text(findings))
    return 0 if check.can_start(findings) else 1


def _cmd_config_show(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    if args.json:
        print(json.dumps({"source": str(cfg.source), **cfg.as_dict()}, indent=2))
    else:
        print(config.to_toml(cfg), end="")
    return 0


def _cmd_image_pause(args: argparse.Namespace) -> int:
    import subprocess

    from shim.cli import local_images

    tarball = local_images.build_pause(args.output)
    print(f"{local_images.PAUSE_REFERENCE}: {tarball}")
    if args.import_to:
        command = ["ctr", "--address", args.import_to, "-n", "k8s.io", "image", "import"]
        done = subprocess.run([*command, str(tarball)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"husk: ctr image import: {done.stderr.strip()}", file=sys.stderr)
            return 1
        print(f"imported into {args.import_to} (namespace k8s.io)")
    return 0


def _cmd_containerd_config(args: argparse.Namespace) -> int:
    from shim.cli import containerd_config as ctd
    from shim.containerd import releases

    cfg = config.load(args.config)
    template = args.template_config or ctd.TEMPLATE_CONFIG
    if args.containerd_version:
        release = releases.parse(args.containerd_version)
    else:
        release = releases.detect()
    if not args.install:
        print(ctd.snippet(cfg.source, template, release), end="")
        return 0
    target = args.containerd_config or ctd.CONTAINERD_CONFIG
    changes = ctd.install(cfg, target, template, release)
    for change in changes:
        print(change)
    if changes:
        print("restart containerd to use them (systemctl restart containerd)")
    else:
        print(f"{target} already has husk's handlers")
    return 0


def _cmd_image_build(args: argparse.Namespace) -> int:
    from guest import image  # the image builder is heavy; load it only when asked

    out = args.output
    if out is None:
        out = config.load(args.config).runtime.image_dir
    image.build_image(out, force=args.force, compression=args.compression)
    return 0


def _cmd_sandbox_ls(args: argparse.Namespace) -> int:
    from shim.cli import sandboxes

    found = sandboxes.rows(config.load(args.config).runtime.state_dir)
    print(sandboxes.render_json(found) if args.json else sandboxes.render_text(found))
    return 0


def _cmd_exec(args: argparse.Namespace) -> int:
    from shim.cli import debug_console

    return debug_console.run(config.load(args.config).runtime.state_dir, args.sandbox)


def _cmd_metrics(args: argparse.Namespace) -> int:
    from shim.metrics import scrape

    root = config.load(args.config).runtime.state_dir
    text, problems = scrape.collect(root, args.sandbox)
    sys.stdout.buffer.write(text)
    sys.stdout.flush()
    for problem in problems:
        print(f"husk: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _cmd_factory(args: argparse.Namespace) -> int:
    from shim.cli import factory

    cfg = config.load(args.config)
    if args.factory_command == "init":
        return factory.init(cfg, foreground=args.foreground)
    if args.factory_command == "status":
        return factory.status(cfg, args.json)
    return factory.destroy(cfg)


def _cmd_cleanup(args: argparse.Namespace) -> int:
    from shim.sandbox import cleanup, ram_holder

    root = config.load(args.config).runtime.state_dir
    found, problems = cleanup.reclaim_orphans(root, dry_run=args.dry_run)
    verb = "orphan" if args.dry_run else "reclaimed"
    for state in found:
        things = ", ".join(r.describe() for r in state.resources) or "no recorded resources"
        print(f"{verb}: sandbox {state.id} (shim {state.shim_pid} gone): {things}")
    for pid, record in ram_holder.orphans():  # a template's RAM its record forgot
        print(f"{verb}: template RAM holder {pid} ({record} does not name it)")
        if not args.dry_run and cleanup.kill_and_wait([pid]):
            problems.append(f"template RAM holder {pid} survived SIGKILL")
    for problem in problems:
        print(f"husk: {problem}", file=sys.stderr)
    if not found:
        print(f"no orphaned sandboxes under {root}")
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``husk`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        from shim.version import configured_image_dir, version_line

        print(version_line(configured_image_dir(args.config)))
        return 0
    if args.command is None:
        parser.error("a command is required")
    try:
        if args.command == "check":
            return _cmd_check(args)
        if args.command == "config":
            return _cmd_config_show(args)
        if args.command == "image" and args.image_command == "pause":
            return _cmd_image_pause(args)
        if args.command == "image":
            return _cmd_image_build(args)
        if args.command == "containerd-config":
            return _cmd_containerd_config(args)
        if args.command == "cleanup":
            return _cmd_cleanup(args)
        if args.command == "sandbox":
            return _cmd_sandbox_ls(args)
        if args.command == "metrics":
            return _cmd_metrics(args)
        if args.command == "exec":
            return _cmd_exec(args)
        if args.command == "factory":
            return _cmd_factory(args)
    except HuskError as e:
        print(f"husk: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""``husk factory init | status | destroy``: the VM template, by hand.

Sandboxes make the template themselves on first use when ``[factory]
enable_template`` is on; these commands make it ahead of time (so no
container pays for it), show whether it is ready, and remove it.
"""

from __future__ import annotations

import datetime
import json
import sys

import trio

from shim.config import Config
from shim.sandbox.factory import vm_template


def init(config: Config) -> int:
    """Make the template now (again, if it exists but is stale or damaged)."""
    template = vm_template(config)
    trio.run(template.ensure)
    status = template.status()
    print(f"template ready in {status.path} ({status.memory_mib} MiB)")
    return 0


def status(config: Config, as_json: bool) -> int:
    """Whether the template is there and current; exit 1 if not."""
    template = vm_template(config)
    found = template.status()
    enabled = config.factory.enable_template
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
    return 0 if found.ready else 1


def destroy(config: Config) -> int:
    """Stop and remove the template (running clones keep their own mapping of it)."""
    problems = vm_template(config).destroy()
    for problem in problems:
        print(f"husk: {problem}", file=sys.stderr)
    if not problems:
        print(f"template removed from {config.factory.template_path}")
    return 1 if problems else 0

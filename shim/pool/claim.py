"""``start``'s side of the VM pool: claim a ready VM for a sandbox, or say why not."""

from __future__ import annotations

import os
from pathlib import Path

from shim.config import Config
from shim.containerd.launch import ShimArgs
from shim.errors import HuskError
from shim.pool import protocol

#: how long ``start`` waits for the pool's answer (a hand-over takes milliseconds)
CLAIM_TIMEOUT = 20.0


class PoolClaim:
    """One ``start``'s claim; ``miss`` says why it got no VM ("" after a hit)."""

    def __init__(self, config: Config, args: ShimArgs) -> None:
        self.config = config
        self.args = args
        self.miss = ""

    def __call__(self) -> Path | None:
        """The socket of the shim now serving the sandbox with a pool VM, or None."""
        endpoint = self.config.factory.vm_cache_endpoint
        args = self.args
        message = {
            "op": "claim",
            "id": args.id,
            "namespace": args.namespace,
            "bundle": os.path.abspath(args.bundle),
            "address": args.address,
            "publish_binary": args.publish_binary,
            "ttrpc_address": os.environ.get("TTRPC_ADDRESS", ""),
            "debug": args.debug,
            "config": str(self.config.source),
        }
        try:
            answer = protocol.request(endpoint, message, CLAIM_TIMEOUT)
        except (FileNotFoundError, ConnectionRefusedError):
            reason = f"no VM pool at {endpoint}"
        except (OSError, HuskError) as e:
            reason = f"the VM pool at {endpoint} failed: {e}"
        else:
            if answer.get("ok") and isinstance(answer.get("socket"), str):
                return Path(answer["socket"])
            reason = f"the VM pool at {endpoint} has no VM: {answer.get('reason')}"
        how = "from the VM template" if self.config.factory.enable_template else "booting cold"
        self.miss = f"{reason}; starting the VM {how}"
        return None

"""The husk guest agent: Kata's AgentService over ttrpc, containers run by runc.

Run inside the VM as ``python3 -m guest.agent``. Modules, from the wire inward:

- ``channel``   vsock / virtio-serial / unix listeners; ``auth``: the gate that serves
                a vsock or unix peer only once it proves the sandbox's secret
- ``server``    wiring: reaper, ttrpc server, shutdown and power-off (``power``)
- ``service``   ``AgentService`` RPC handlers; ``health``: ``grpc.Health``
- ``sandbox``   the sandbox and its containers; ``container``: one container
- ``process``   a process's stdio (pipes or pty) and exit; ``console``: pty hand-over
- ``runc``      the runc CLI; ``oci``: protobuf Spec → runc config.json
- ``spec_version``  the runtime-spec version the runtime is handed; ``sysctls``:
                the pod network's sysctls, set on the VM
- ``storage``   mounts and block devices; ``system``: the machine
- ``network``   links, addresses, routes, neighbours over ``rtnetlink``, whose
                messages ride ``netlink``'s framing and socket
- ``reaper``    SIGCHLD-driven waitpid; ``command``: child processes it waits for
- ``cgroups``   container statistics; ``config``: paths; ``logs``: the console log

Others import :class:`AgentService`, :class:`HealthService`, :class:`AgentConfig`
and :func:`build_server` from here.
"""

from guest.agent.config import AgentConfig
from guest.agent.health import HealthService
from guest.agent.server import build_server
from guest.agent.service import AgentService

__all__ = ["AgentConfig", "AgentService", "HealthService", "build_server"]

"""``grpc.Health``: the shim's liveness probe and version query."""

from __future__ import annotations

from agent_proto import health_pb2
from guest.agent.system import AGENT_VERSION, API_VERSION


class HealthService:
    """Answers ``/grpc.Health/Check`` and ``/grpc.Health/Version``."""

    async def Check(
        self, request: health_pb2.CheckRequest, ctx: object
    ) -> health_pb2.HealthCheckResponse:
        """The agent is serving whenever it can answer."""
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Version(
        self, request: health_pb2.CheckRequest, ctx: object
    ) -> health_pb2.VersionCheckResponse:
        """The agent's and the API's versions."""
        return health_pb2.VersionCheckResponse(
            grpc_version=API_VERSION, agent_version=f"husk-agent {AGENT_VERSION}"
        )

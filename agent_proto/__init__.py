"""Protobuf messages for ttrpc, containerd and the guest agent, with their generated modules.

Each ``agent_proto/<name>.proto`` has a checked-in ``<name>_pb2.py`` and ``<name>_pb2.pyi``.
The proto packages are upstream's, because ttrpc routes on the full service name:

- ``status_pb2``        ``google.rpc.Status``, carried in ttrpc responses.
- ``ttrpc_pb2``         ``ttrpc.Request`` / ``Response`` / ``KeyValue`` / ``StringList``: the
  envelope inside every ttrpc frame (containerd/ttrpc request.proto).
- ``mount_pb2``         ``containerd.types.Mount``.
- ``task_types_pb2``    ``containerd.v1.types``: ``Status`` enum, ``Process``, ``ProcessInfo``.
- ``task_pb2``          ``containerd.task.v2.Task``, the shim task service containerd calls
  (``/containerd.task.v2.Task/Create`` ...) and its request/response messages.
- ``events_pb2``        ``containerd.events.Task*`` events a shim publishes.
- ``events_ttrpc_pb2``  ``containerd.services.events.ttrpc.v1.Events/Forward`` with
  ``ForwardRequest`` / ``Envelope``, how a shim publishes them.
- ``agent_pb2``         ``grpc.AgentService``, Kata's guest agent API (``/grpc.AgentService/...``).
- ``health_pb2``        ``grpc.Health`` (``Check``, ``Version``).
- ``oci_pb2``           ``grpc.Spec`` and friends, Kata's protobuf form of the OCI runtime spec.
- ``types_pb2``         ``types.Interface``, ``Route``, ``ARPNeighbor``, ``IPAddress``.
- ``runtime_options_pb2`` ``runtimeoptions.v1.Options``: a runtime handler's ``ConfigPath``,
  which containerd hands to the shim's ``start`` on stdin.

``oci_json`` (hand-written) maps ``oci_pb2`` to and from the runtime-spec's JSON; the shim
and the guest agent both use it, so the mapping is kept once.

Import them as ``from agent_proto import task_pb2``. Never edit a generated file: change
the ``.proto`` and regenerate with::

    python -m agent_proto.generate

which runs the ``protoc`` bundled with the pinned ``grpcio-tools``. The unit tests
(``tests/unit/test_agent_proto.py``) fail when the checked-in modules are stale.
"""

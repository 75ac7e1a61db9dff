"""The shim's side of the guest agent: the typed client and the byte streams it runs on.

- ``shim.agent.client``: ``AgentClient`` (Kata's ``AgentService`` + ``Health`` over ttrpc)
  and ``wait_ready``;
- ``shim.agent.transport``: vsock, hybrid vsock and virtio-serial streams.
"""

"""What both sides of the VM boundary share: the shim on the host and the agent in the guest.

- ``common.errors``: the base of husk's exception tree; each class carries the
  gRPC status code a ttrpc server answers with.
- ``common.mounts``: mount(2) and umount2(2) through libc.
- ``common.console``: the debug console's framing (the guest's shell, ``husk exec``).
- ``common.channel_auth``: the handshake that proves a vsock connection comes from
  the sandbox's own shim (the agent's and the debug console's).

It imports nothing of ``shim`` or ``guest`` (both import it); the guest image
carries it as a package of its own.
"""

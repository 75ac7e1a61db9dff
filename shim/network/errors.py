"""Errors of sandbox networking, each a one-line message naming the object.

::

    NetworkError (HuskError)                 INTERNAL   a netlink or tun operation failed
     ├── NetworkNotFoundError (NotFoundError)     NOT_FOUND  netns path or interface missing
     ├── NetworkConflictError (FailedPrecondition) the netns holds something in the way
     └── UnsupportedInterfaceError (FailedPrecondition) a link kind husk cannot bridge
"""

from __future__ import annotations

from shim.errors import FailedPreconditionError, HuskError, NotFoundError


class NetworkError(HuskError):
    """Setting up or tearing down a sandbox's network failed."""


class NetworkNotFoundError(NetworkError, NotFoundError):
    """A network namespace path or an interface in it does not exist (any more)."""


class NetworkConflictError(NetworkError, FailedPreconditionError):
    """The namespace already holds what husk would create (a tap, an ingress qdisc)."""


class UnsupportedInterfaceError(NetworkError, FailedPreconditionError):
    """An addressed interface of a kind husk cannot connect to the VM."""

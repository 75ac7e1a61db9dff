"""containerd's shim v2 protocol: the ``containerd-shim-husk-v2`` binary.

The path of a request, in the order containerd drives it:

- ``main``: the binary's flags and its three modes (``start``, ``delete``, serve);
- ``launch``: ``start`` (fork the serving shim, or point at a pod's) and ``delete``;
- ``serve``: the long-lived process, its log, signals, and the sandbox it makes;
- ``task_service``: the ``containerd.task.v2.Task`` RPCs, mapped onto the sandbox;
- ``events``: task events forwarded to containerd; ``stdio``: the FIFOs' copy loops.
"""

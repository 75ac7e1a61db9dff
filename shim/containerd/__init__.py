"""containerd's shim v2 protocol: the ``containerd-shim-husk-v2`` binary.

The path of a request, in the order containerd drives it:

- ``main``: the binary's flags and its modes (``start``, ``delete``, ``-info``, serve);
- ``launch``: ``start`` (fork the serving shim, or point at a pod's) and ``delete``;
- ``serve``: the long-lived process, its log, signals, and the sandbox it makes;
- ``bootstrap``: what ``start`` reads on stdin and prints, per containerd release;
- ``info``: the ``RuntimeInfo`` that ``-info`` prints (containerd 2.x);
- ``task_service``: the task RPCs (served as ``containerd.task.v2.Task`` and v3);
- ``events``: task events forwarded to containerd; ``stdio``: the FIFOs' copy loops.
"""

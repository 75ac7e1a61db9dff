"""Test-side tools for driving containerd the way the kubelet does.

What other tests import:

- ``client``: ``CriClient`` (CRI v1 RuntimeService/ImageService) and
  ``TasksClient`` (containerd's Tasks ``Update``/``Metrics``), synchronous,
  over containerd's unix socket.
- ``cri_containerd``: ``CriContainerd``, a containerd with its CRI plugin, a
  CNI bridge and local images on a temp dir; ``RuntimeHandler``,
  ``husk_handler`` to add runtime handlers.
- ``pods``: ``pod_config`` and ``container_config``, kubelet-shaped CRI configs.
- the pause image is the product's own (``shim.cli.local_images.build_pause``).
- ``cri_api_pb2`` / ``containerd_tasks_pb2``: the messages; the ``.proto``
  sources keep upstream names and numbers, and ``python -m tests.kubelet.generate``
  rebuilds every generated module (``*_pb2.py``, ``*_pb2.pyi``, ``*_grpc.py``).
"""

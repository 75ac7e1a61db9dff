"""Test-side tools for driving containerd the way the kubelet does.

- ``cri_api.proto`` / ``containerd_tasks.proto``: the CRI v1 subset and
  containerd's Tasks Update/Metrics, with upstream names and numbers; the
  generated ``*_pb2`` / ``*_grpc`` modules are rebuilt by ``generate``.
"""

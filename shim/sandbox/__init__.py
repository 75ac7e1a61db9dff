"""The sandbox engine: one VM, its containers, and every host resource they hold.

- ``sandbox``: the VM's life (boot, agent, teardown) and the containers in it;
- ``container``: containers and processes as the task service sees them;
- ``rootfs``: getting a container's rootfs and bind mounts into the guest;
- ``pod_network``: the pod's network carried into the VM;
- ``devices``: device naming and hot-plug slots; ``annotations``: which sandbox a
  container runs in; ``oci``: the bundle's ``config.json``;
- ``state`` and ``cleanup``: the record of host resources and their reclaiming.
"""

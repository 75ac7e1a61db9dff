"""husk's host side: everything containerd's shim process runs.

Public surface for plugins: ``shim.hypervisor`` (the interface and device types),
``shim.errors`` (the exception tree), ``shim.config.schema`` (config-section keys) and
``shim.registry`` (``register``).
"""

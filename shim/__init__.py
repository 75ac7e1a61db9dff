"""husk's host side: everything containerd's shim process runs.

Public surface for plugins: ``shim.hypervisor`` (the interface and device types),
``shim.errors`` (the exception tree), ``shim.config.schema`` (config-section keys),
``shim.registry`` (``register``) and ``shim.rotating_log`` (a bounded log file, for
what a guest makes a VMM write).
"""

"""The VM pool (``[factory] vm_cache_number``): VMs booted and exercised ahead of time.

:mod:`~shim.pool.daemon` keeps them, each in a :mod:`~shim.pool.member`
process that becomes the shim of the sandbox that claims its VM
(:mod:`~shim.pool.claim`, over :mod:`~shim.pool.protocol`).
"""

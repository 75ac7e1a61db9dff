"""The Cloud Hypervisor plugin; registers as ``cloud-hypervisor``."""

from plugins.cloud_hypervisor.plugin import PLUGIN, CloudHypervisorPlugin
from shim.registry import register

register(PLUGIN)

__all__ = ["PLUGIN", "CloudHypervisorPlugin"]

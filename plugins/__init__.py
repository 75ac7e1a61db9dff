"""Hypervisor plugins shipped with husk."""

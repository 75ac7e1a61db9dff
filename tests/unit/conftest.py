"""Shared fixtures for unit tests: host facts without touching the real host."""

from __future__ import annotations

import pytest

from shim.host import HostFacts


@pytest.fixture
def tcg_host() -> HostFacts:
    """A host like the CI machine: /dev/kvm without vmx/svm, no vhost-vsock."""
    return HostFacts(kvm_device=True, kvm_hardware=False, vhost_vsock=False)


@pytest.fixture
def kvm_host() -> HostFacts:
    """A host with usable KVM and vhost-vsock."""
    return HostFacts(kvm_device=True, kvm_hardware=True, vhost_vsock=True)

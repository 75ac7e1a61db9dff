"""bench.memory's accounting: a pod is its shim and everything below it, charged by PSS."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from bench.memory import pod_processes, pss_bytes


def test_pss_of_a_live_process_is_positive_and_of_a_gone_one_zero() -> None:
    assert pss_bytes(os.getpid()) > 1024 * 1024
    assert pss_bytes(2**22 + 1) == 0


def test_a_pod_is_the_process_naming_it_and_all_below_it() -> None:
    marker = f"sandbox-{uuid.uuid4().hex}"
    # the "shim" names the sandbox; its child (the "VMM") does not
    script = "import subprocess, sys; subprocess.run(['sleep', '30']); sys.exit(0)"
    shim = subprocess.Popen([sys.executable, "-c", script, marker])
    try:
        for _ in range(200):
            found = pod_processes(marker)
            if len(found) == 2:
                break
            subprocess.run(["sleep", "0.05"], check=True)
        assert shim.pid in found and len(found) == 2
        assert os.getpid() not in found
    finally:
        for pid in pod_processes(marker):
            os.kill(pid, 9)
        shim.wait()

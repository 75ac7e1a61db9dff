"""Suite-wide policy: under the test command, a skipped test is a failure.

`tests/run` sets ``HUSK_NO_SKIPS=1``: it runs as root with every package
installed, so no test has a legitimate reason to skip there, and a skip would
only hide a feature that does not work. Run pytest directly (as a developer
without root, say) and skips keep their usual meaning.
"""

from __future__ import annotations

import os

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if (
        os.environ.get("HUSK_NO_SKIPS") == "1"
        and report.skipped
        and not hasattr(report, "wasxfail")
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under tests/run, which must run everything: {reason}"

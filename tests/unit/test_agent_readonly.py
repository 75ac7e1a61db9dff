"""Read-only paths keep the nosuid/nodev/noexec of the mount around them, as under runc."""

from __future__ import annotations

import os

from guest.agent.readonly import MS_NODEV, MS_NOEXEC, MS_NOSUID, kept_flags


def test_procs_flags_are_kept_and_nothing_else() -> None:
    proc = os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC | os.ST_RELATIME | os.ST_RDONLY
    assert kept_flags(proc) == MS_NOSUID | MS_NODEV | MS_NOEXEC


def test_a_mount_without_those_flags_keeps_none() -> None:
    assert kept_flags(os.ST_RELATIME) == 0

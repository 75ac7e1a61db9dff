"""The agent's OOM watcher: memory.events counters become GetOOMEvent answers.

The kernfs wake-ups themselves need a real cgroup; they are proven in a VM by
tests/integration/test_resources.py. Here regular files stand in for
``memory.events``: the watcher reads them when asked (``check``, ``unwatch``).
"""

from __future__ import annotations

from pathlib import Path

import trio

from guest.agent.oom import OomWatcher, oom_kills

EVENTS = "low 0\nhigh 0\nmax {max}\noom {oom}\noom_kill {kill}\noom_group_kill 0\n"


def events(directory: Path, *, kill: int, max: int = 0, oom: int = 0) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "memory.events").write_text(EVENTS.format(max=max, oom=oom, kill=kill))
    return directory


def test_only_the_kill_counter_counts() -> None:
    assert oom_kills(EVENTS.format(max=40, oom=1, kill=3)) == 3
    assert oom_kills("max 40\noom 5865\n") == 0
    assert oom_kills("") == 0


async def test_kills_before_watching_are_not_reported_and_new_ones_are(tmp_path: Path) -> None:
    watcher = OomWatcher()
    group = events(tmp_path / "c1", kill=2)
    watcher.watch("c1", group)
    watcher.check("c1")
    events(group, kill=2, max=9, oom=3)  # max and oom move first: no kill yet
    watcher.check("c1")
    events(group, kill=3, max=9, oom=3)
    watcher.check("c1")
    with trio.fail_after(1):
        assert await watcher.next_event() == "c1"
    with trio.move_on_after(0.05) as nothing:
        await watcher.next_event()
    assert nothing.cancelled_caught


async def test_the_last_count_is_read_when_the_container_goes(tmp_path: Path) -> None:
    watcher = OomWatcher()
    group = events(tmp_path / "c1", kill=0)
    watcher.watch("c1", group)
    events(group, kill=1)
    watcher.unwatch("c1")
    events(group, kill=5)
    watcher.check("c1")  # no longer watched: nothing more
    with trio.fail_after(1):
        assert await watcher.next_event() == "c1"
    with trio.move_on_after(0.05) as nothing:
        await watcher.next_event()
    assert nothing.cancelled_caught


def test_a_cgroup_without_memory_events_is_not_watched(tmp_path: Path) -> None:
    watcher = OomWatcher()
    watcher.watch("c1", tmp_path / "v1-or-no-memory-controller")
    watcher.check("c1")
    watcher.unwatch("c1")


async def test_events_nobody_reads_are_bounded(tmp_path: Path) -> None:
    watcher = OomWatcher(queue_limit=2)
    for n in range(4):
        group = events(tmp_path / f"c{n}", kill=0)
        watcher.watch(f"c{n}", group)
        events(group, kill=1)
        watcher.check(f"c{n}")
    with trio.fail_after(1):
        assert [await watcher.next_event() for _ in range(2)] == ["c0", "c1"]
    with trio.move_on_after(0.05) as nothing:
        await watcher.next_event()
    assert nothing.cancelled_caught

"""pytest plugin: a test marked `solo` has the machine to itself while pytest-xdist runs the suite in parallel.

CI runs two test processes on its two cores (`-n 2`): most tests wait on servers as much as they compute, and two
at once finish the suite in about two thirds of the time. A `solo` test asserts what depends on the cores' speed
holding while it runs (an admitted call answered within its deadline, turns measured in wall time): with another
test computing beside it the speed it was planned at is not the speed it gets. So tests share a readers-writer lock
on one file, each holding it for its whole protocol (fixture set-up and tear-down included): a `solo` test
exclusively, the others shared. A turnstile byte in front of it lets a waiting `solo` test stop new shared holders,
so it runs as soon as the test beside it ends. Without xdist nothing is locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator

import pytest

_LOCK_FILE = "genembed_solo_lock"
_FD = pytest.StashKey[int]()
_CREATED = pytest.StashKey[str]()
_TURNSTILE, _RUNNING = 0, 1  # the two bytes of the lock file that are locked (POSIX record locks)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "solo: runs with no other test beside it under pytest-xdist (tests/solo.py)")
    path = getattr(config, "workerinput", {}).get(_LOCK_FILE)
    if path:
        config.stash[_FD] = os.open(path, os.O_RDWR)


def pytest_unconfigure(config: pytest.Config) -> None:
    if (fd := config.stash.get(_FD, None)) is not None:
        os.close(fd)
    if (path := config.stash.get(_CREATED, None)) is not None:
        os.unlink(path)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist's controller, once per worker it starts: one lock file for all of them."""
    config = node.config
    if _CREATED not in config.stash:
        fd, config.stash[_CREATED] = tempfile.mkstemp(prefix="genembed-solo-", suffix=".lock")
        os.close(fd)
    node.workerinput[_LOCK_FILE] = config.stash[_CREATED]


def _lock(fd: int, byte: int, mode: int) -> None:
    fcntl.lockf(fd, mode, 1, byte)


@contextlib.contextmanager
def _turn(fd: int, solo: bool) -> Iterator[None]:
    _lock(fd, _TURNSTILE, fcntl.LOCK_EX)
    try:
        _lock(fd, _RUNNING, fcntl.LOCK_EX if solo else fcntl.LOCK_SH)
    except BaseException:
        _lock(fd, _TURNSTILE, fcntl.LOCK_UN)
        raise
    if not solo:  # a shared holder passes the turnstile at once; a solo test keeps it closed while it runs
        _lock(fd, _TURNSTILE, fcntl.LOCK_UN)
    try:
        yield
    finally:
        _lock(fd, _RUNNING, fcntl.LOCK_UN)
        if solo:
            _lock(fd, _TURNSTILE, fcntl.LOCK_UN)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    fd = item.config.stash.get(_FD, None)
    if fd is None:
        return (yield)
    with _turn(fd, item.get_closest_marker("solo") is not None):
        return (yield)

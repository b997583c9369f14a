"""Shared test fixtures: every test gets its own quinkgl state directory, never the user's, and leaves no daemon
log handler behind."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _isolated_quinkgl_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUINKGL_HOME", str(tmp_path_factory.mktemp("quinkgl-home")))


@pytest.fixture(autouse=True)
def _no_daemon_log_handlers_left() -> Iterator[None]:
    """A daemon run in this process (`quinkgl run` called in-process) installs root log handlers, as a daemon
    process should; none may outlive its test and write to that test's closed capture stream."""
    yield
    import logging

    from quinkgl_cli.node.logs import FlushingHandler, RotatingLogFile

    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, (FlushingHandler, RotatingLogFile)):
            root.removeHandler(handler)
            handler.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests that start real daemon processes (marked ``e2e``, then the NAT lab's, ``natlab``) run first, the
    rest after them, the largest modules first. Under the README's test command (`-n 4 --dist loadgroup
    --no-loadscope-reorder`: no test is grouped, so every test is its own unit, handed out in this order) the
    daemon tests, which mostly wait on their daemons' rounds, then overlap with each other and with the CPU-bound
    rest instead of arriving last: in alphabetical order a CI run took over 10 minutes.

    An earlier version put them in `xdist_group` queues to keep two loopback swarms from running at once; those
    markers came after xdist had read the groups and never took effect, and the daemon tests have always passed
    side by side (their timing checks poll with deadlines sized for a loaded machine)."""
    module_size: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        module_size[module] = module_size.get(module, 0) + 1

    def rank(item: pytest.Item) -> tuple[int, int, str]:
        if item.get_closest_marker("natlab") is not None:
            return (1, 0, "")
        if item.get_closest_marker("e2e") is not None:
            return (0, 0, "")
        module = item.nodeid.split("::")[0]
        return (2, -module_size[module], module)

    items.sort(key=rank)

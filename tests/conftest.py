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


QUEUES = ("daemons", "natlab")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`-n 3 --dist loadgroup --no-loadscope-reorder`, the README's test command), the tests
    that start real daemon processes on loopback run one after another on one worker: two loopback swarms at once on
    2 cores would turn their pacing and accuracy checks into load tests. The NAT lab's daemons, in their own
    namespaces and checking paths rather than accuracy, are a second such queue. Both queues mostly wait on their
    daemons' rounds and are the suite's longest units, so they are handed out first, each to its own worker, while
    a third worker starts on the rest, the largest modules first: left to xdist's own order (by test count) they
    started minutes late and a CI run took over 10 minutes."""
    queue_of: dict[str, str] = {}
    for item in items:
        if item.get_closest_marker("natlab") is not None:
            queue_of[item.nodeid] = "natlab"
        elif item.get_closest_marker("e2e") is not None:
            queue_of[item.nodeid] = "daemons"
        if item.nodeid in queue_of:
            item.add_marker(pytest.mark.xdist_group(queue_of[item.nodeid]))
    module_size: dict[str, int] = {}
    for item in items:
        module_size[item.nodeid.split("::")[0]] = module_size.get(item.nodeid.split("::")[0], 0) + 1

    def rank(item: pytest.Item) -> tuple[int, int, str]:
        queue = queue_of.get(item.nodeid)
        if queue is not None:
            return (QUEUES.index(queue), 0, "")
        module = item.nodeid.split("::")[0]
        return (len(QUEUES), -module_size[module], module)

    items.sort(key=rank)

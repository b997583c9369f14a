"""Shared test fixtures: every test gets its own quinkgl state directory, never the user's."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_quinkgl_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUINKGL_HOME", str(tmp_path_factory.mktemp("quinkgl-home")))

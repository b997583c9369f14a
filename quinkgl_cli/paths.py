"""Where per-user state (TOFU store, node keys) lives."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "QUINKGL_HOME"


def state_home(override: Path | None = None) -> Path:
    """The per-user state directory: ``override``, else ``$QUINKGL_HOME``, else ``$XDG_STATE_HOME/quinkgl``."""
    if override is not None:
        return Path(override)
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "quinkgl"


def ensure_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path

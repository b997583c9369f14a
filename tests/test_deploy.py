"""deploy/: the systemd unit and the container image, checked by the tools that run them where those exist."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from quinkgl_cli.errors import ExitCode

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNIT = DEPLOY / "quinkgl@.service"
DOCKERFILE = DEPLOY / "Dockerfile"
# Exit codes a restart cannot fix (README, "Exit codes"): everything but network trouble, OK and a requested stop,
# among those `run` exits with (8 and 9 are `quinkgl doctor`'s verdicts).
NO_RESTART = {int(c) for c in ExitCode} - {ExitCode.OK, ExitCode.NETWORK, ExitCode.INTERRUPTED, ExitCode.NOT_REACHABLE,
                                           ExitCode.NO_PEERS}


def _unit_settings() -> dict[str, str]:
    return dict(re.findall(r"^(\w+)=(.*)$", UNIT.read_text(), re.M))


def test_unit_restarts_on_failure_except_for_the_documented_fatal_codes() -> None:
    s = _unit_settings()
    assert s["Restart"] == "on-failure"
    assert {int(c) for c in s["RestartPreventExitStatus"].split()} == NO_RESTART
    assert s["SuccessExitStatus"] == str(int(ExitCode.INTERRUPTED))
    assert s["ExecStart"].split()[1:3] == ["run", "--config"]
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "DynamicUser"):
        assert s[hardening] in ("yes", "strict"), hardening
    assert "Environment=QUINKGL_HOME=/var/lib/quinkgl" in UNIT.read_text() and s["StateDirectory"] == "quinkgl"


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here (Debian package systemd)")
    # verify also checks that ExecStart's program exists: point it at this environment's quinkgl, nothing else.
    quinkgl = Path(sys.executable).parent / "quinkgl"
    if not quinkgl.exists():
        pytest.skip(f"no quinkgl console script beside {sys.executable} to stand in for /opt/quinkgl/venv/bin/quinkgl")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/quinkgl/venv/bin/quinkgl", str(quinkgl)))
    done = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    # Unknown keys or sections are only warnings (exit 0): any output at all is a defect of the unit.
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


def test_dockerfile_runs_as_non_root_with_cpu_torch_and_state_volume() -> None:
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"pip install .*-c /src/constraints\.txt", text)
    assert "torch==2.13.0+cpu" in (DOCKERFILE.parents[1] / "constraints.txt").read_text()
    assert re.search(r"whl/cpu", text)
    assert re.search(r"^VOLUME \[\"/var/lib/quinkgl\"\]", text, re.M) and "QUINKGL_HOME=/var/lib/quinkgl" in text


def _engine() -> str | None:
    for name in ("docker", "podman"):
        tool = shutil.which(name)
        if tool and subprocess.run([tool, "info"], capture_output=True, timeout=60).returncode == 0:
            return tool
    return None


@pytest.mark.timeout(3600)
def test_container_builds_and_runs_as_non_root() -> None:
    engine = _engine()
    if engine is None:
        pytest.skip("no container engine answers here (`docker info` / `podman info` failed)")
    tag = f"quinkgl-test:{uuid.uuid4().hex[:8]}"
    root = DOCKERFILE.parents[1]
    subprocess.run([engine, "build", "-f", str(DOCKERFILE), "-t", tag, str(root)], check=True, timeout=3500)
    try:
        version = subprocess.run([engine, "run", "--rm", tag, "--version"], capture_output=True, text=True, check=True,
                                 timeout=300).stdout
        uid = subprocess.run([engine, "run", "--rm", "--entrypoint", "id", tag, "-u"], capture_output=True, text=True,
                             check=True, timeout=300).stdout
    finally:
        subprocess.run([engine, "rmi", "-f", tag], capture_output=True, timeout=300)
    assert version.startswith("quinkgl ") and uid.strip() != "0"

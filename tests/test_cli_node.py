"""`quinkgl info`, and the flag checks of `quinkgl run` / `quinkgl demo` that need no daemon."""

from __future__ import annotations

import json

import pytest

from quinkgl_cli.cli.app import main
from quinkgl_cli.strategies import registry


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code or 0)


def test_info_lists_registry_and_versions(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data["aggregation"]) == registry.names("aggregation")
    assert list(data["topology"]) == registry.names("topology")
    assert data["dependencies"]["torch"] and data["dependencies"]["pyipv8"] and data["python"]
    assert run_cli(["info"]) == 0
    text = capsys.readouterr().out
    assert "FedAvg" in text and "RandomTopology" in text and "torch " in text and "pyipv8" in text


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--script-arg", "novalue"], "--script-arg"),
        (["--strict-manifest", "perhaps"], "--strict-manifest"),
        (["--node-id", "bad id"], "--node-id"),
        (["--listen", "localhost"], "--listen"),
        (["--bootstrap-peer", "127.0.0.1"], "--bootstrap-peer"),
        (["--rounds", "0"], "--rounds"),
        (["--gossip-interval", "0"], "--gossip-interval"),
        (["--log-format", "xml"], "--log-format"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints"),
    ],
)
def test_run_flag_errors_are_usage_errors(args: list[str], needle: str, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["run", "--manifest", str(tmp_path / "m.qgl"), "--script", str(tmp_path / "s.py")]
    assert run_cli([*base, *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


def test_demo_flag_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["demo", "--peers", "1"]) == 1
    assert "--peers" in capsys.readouterr().err

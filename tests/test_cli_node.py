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
        (["--listen", "::1"], "--listen"),
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


def test_demo_prints_streamed_lines_as_plain_text() -> None:
    import io

    from rich.console import Console

    from quinkgl_cli.cli.demo import print_peer_line

    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    for line in ("[peer-discovered] peer-3", "[aggregated] peers=['peer-2'] samples=719", "odd [/x] [bold]text"):
        print_peer_line(console, "peer-1", line)
    assert out.getvalue().splitlines() == [
        " peer-1 | [peer-discovered] peer-3",
        " peer-1 | [aggregated] peers=['peer-2'] samples=719",
        " peer-1 | odd [/x] [bold]text",
    ]


def test_log_follower_reports_its_failure(tmp_path) -> None:
    import threading
    import time

    from quinkgl_cli.node import localswarm as ls

    log = tmp_path / "peer-1.log"
    log.write_text("one\ntwo\n")
    peer = ls.PeerProcess("peer-1", 0, log, None, {})  # type: ignore[arg-type]
    got: list[str] = []
    failures: list[BaseException] = []

    def emit(name: str, line: str) -> None:
        got.append(line)
        if line == "two":
            raise ValueError("printer broke")

    stop = threading.Event()
    thread = ls.follow([peer], emit, stop, failures.append, poll=0.01)
    deadline = time.monotonic() + 10
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(0.05)
    stop.set()
    assert got == ["one", "two"]
    assert len(failures) == 1 and str(failures[0]) == "printer broke"


def cli_options(args: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path) -> object:
    """The DaemonOptions `quinkgl run ARGS` hands to the daemon (which is not started)."""
    import quinkgl_cli.node.daemon as daemon

    captured: list[object] = []
    monkeypatch.setattr(daemon, "run_daemon", lambda options: captured.append(options) or 0)
    (tmp_path / "s.py").touch()  # only read by the daemon, which is not started
    assert run_cli(["run", "--manifest", str(tmp_path / "m.qgl"), "--script", str(tmp_path / "s.py"), *args]) == 0
    (options,) = captured
    return options


def test_run_flags_reach_the_daemon(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    (tmp_path / "out").mkdir()
    o = cli_options(["--local-epochs", "2", "--local-steps", "7", "--checkpoint-every", "3", "--final-model",
                     str(tmp_path / "out" / "model.safetensors"), "--bootstrap-peer", "127.0.0.1:7002",
                     "--script-arg", "shard=1", "--keep-checkpoints", "4"], monkeypatch, tmp_path)
    assert (o.schedule.local_epochs, o.schedule.local_steps) == (2, 7)  # type: ignore[attr-defined]
    assert (o.checkpoints.checkpoint_every, o.checkpoints.keep_checkpoints) == (3, 4)  # type: ignore[attr-defined]
    assert o.checkpoints.final_model == tmp_path / "out" / "model.safetensors"  # type: ignore[attr-defined]
    assert o.network.bootstrap_peers == ["127.0.0.1:7002"] and o.script_args == {"shard": "1"}  # type: ignore[attr-defined]
    assert o.network.transport_options == {"enable_public_bootstrap": False, "enable_lan_discovery": False,  # type: ignore[attr-defined]
                                           "relay": False}
    on = cli_options(["--public-bootstrap", "--lan-discovery", "--relay", "--listen", "0.0.0.0"], monkeypatch, tmp_path)
    assert on.network.transport_options == {"enable_public_bootstrap": True, "enable_lan_discovery": True,  # type: ignore[attr-defined]
                                            "relay": True, "relay_rate": 50_000_000}
    defaults = cli_options([], monkeypatch, tmp_path)
    assert (defaults.schedule.local_epochs, defaults.schedule.local_steps, defaults.checkpoints.checkpoint_every,  # type: ignore[attr-defined]
            defaults.checkpoints.final_model) == (None, None, 1, None)  # type: ignore[attr-defined]


@pytest.mark.parametrize("flag", ["--local-epochs", "--local-steps", "--checkpoint-every"])
def test_run_count_flags_must_be_positive(flag: str, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["run", "--manifest", str(tmp_path / "m.qgl"), "--script", str(tmp_path / "s.py"), flag, "0"]) == 1
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--listen", "::1"], "not IPv4"),
        (["--node-id", "x" * 65], "--node-id"),
        (["--bootstrap-peer", "10.0.0.1:7001"], "not on loopback"),
        (["--lan-discovery"], "non-loopback listen"),
        (["--relay"], "--relay needs a reachable listen address"),
        (["--relay-rate", "0"], "--relay-rate 0.0 must be positive"),
    ],
)
def test_run_refuses_what_the_transport_would_refuse_before_loading_anything(
    args: list[str], needle: str, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The manifest and script do not exist: the flags are refused first, as usage errors (1), not network errors (6).
    base = ["run", "--manifest", str(tmp_path / "m.qgl"), "--script", str(tmp_path / "s.py"), "--dry-run"]
    assert run_cli([*base, *args]) == 1
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--final-model", "--metrics-file", "--trace", "--log-file"])
def test_run_refuses_an_output_file_in_a_missing_directory_before_loading_anything(
    flag: str, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    """All four alike: exit 2 at start-up, naming the directory and how to make it; none creates it (a run used to
    create --final-model's and --trace's directories and refuse the others, the final model's only at its end)."""
    base = ["run", "--manifest", str(tmp_path / "m.qgl"), "--script", str(tmp_path / "s.py"), "--dry-run"]
    missing = tmp_path / "no" / "such"
    assert run_cli([*base, flag, str(missing / "out.file")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} {missing / 'out.file'}: directory {missing} does not exist")
    assert f"mkdir -p {missing}" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "no").exists()
    assert run_cli([*base, flag, str(tmp_path)]) == 2
    assert f"{flag} {tmp_path} is a directory" in capsys.readouterr().err
    # The checkpoint directory is the run's own to create: an output inside it passes this check (the manifest,
    # which does not exist, is what is refused next); not the log, which opens before that directory is made.
    assert run_cli([*base, "--checkpoint-dir", str(missing), flag, str(missing / "out.file")]) == 2
    assert (flag in capsys.readouterr().err) == (flag == "--log-file")


def test_run_refuses_a_missing_script_before_trusting_the_manifest(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A missing --script was only reported once the manifest had been trusted and torch loaded (about 3 s)."""
    import quinkgl_cli.manifest.trust as trust

    def no_trust_yet(*args: object, **kwargs: object) -> None:
        raise AssertionError("the manifest was read before the script was checked")

    monkeypatch.setattr(trust, "load_trusted", no_trust_yet)
    script = tmp_path / "missing.py"
    assert run_cli(["run", "--manifest", str(tmp_path / "m.qgl"), "--script", str(script), "--trust-policy", "open"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: peer script {script} not found") and len(err.strip().splitlines()) == 1, err
    assert run_cli(["run", "--manifest", str(tmp_path / "m.qgl"), "--script", str(tmp_path), "--trust-policy", "open"]) == 2
    assert f"peer script {tmp_path} is a directory" in capsys.readouterr().err

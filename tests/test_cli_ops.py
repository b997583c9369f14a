"""The operations commands as users type them: status, report, init, and `run --config`."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quinkgl_cli.cli.app import main
from quinkgl_cli.ops.status_server import StatusServer
from tests.test_ops import snap


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        main(args)
    out, err = capsys.readouterr()
    return int(done.value.code or 0), out, err


@pytest.fixture()
def state_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qgl") as d:  # short: the status socket's path must fit 107 bytes
        yield Path(d)


# ---------------------------------------------------------------- status
def test_status_without_daemons(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["status", "--state-dir", str(state_dir)], capsys)
    assert code == 0 and out.startswith("no quinkgl daemon is running") and "--state-dir" in out
    code, out, _ = run_cli(["status", "--state-dir", str(state_dir), "--json"], capsys)
    assert code == 0 and json.loads(out) == []


def test_status_table_json_and_watch(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = StatusServer(state_dir / "run", "peer-7")
    server.start()
    try:
        code, out, _ = run_cli(["status", "--state-dir", str(state_dir)], capsys)
        assert out.splitlines()[1].split() == ["peer-7", "starting"]  # no snapshot yet, but its node id
        code, out, _ = run_cli(["status", "--state-dir", str(state_dir), "peer-7"], capsys)
        assert out.splitlines()[1].split() == ["peer-7", "starting"]  # asked for by name too
        code, out, _ = run_cli(["status", "--state-dir", str(state_dir), "--json"], capsys)
        assert json.loads(out) == [{"socket": str(server.path), "error": "starting", "node_id": "peer-7"}]
        server.update(snap(4, dp_epsilon_spent=0.25, round_metrics={"own_accuracy": 0.9375}))
        code, out, _ = run_cli(["status", "--state-dir", str(state_dir)], capsys)
        assert code == 0
        header, row, peer = out.splitlines()
        assert header.split()[:4] == ["NODE", "STATE", "ROUND", "PEERS"] and "OWN ACC" in header
        assert row.split()[:4] == ["peer-1", "running", "4/10", "1"]
        assert "round 4," in row and "0.7900" in row and "4.0 kB" in row and "0.2500" in row and "127.0.0.1:7001" in row
        assert row.index("0.9375") == header.index("OWN ACC")
        assert peer.strip().startswith("peer peer-2 at 127.0.0.1:7002, heard from")
        code, out, _ = run_cli(["status", "--state-dir", str(state_dir), "--json"], capsys)
        assert json.loads(out) == [snap(4, dp_epsilon_spent=0.25, round_metrics={"own_accuracy": 0.9375}).to_json()]
        code, out, _ = run_cli(["status", "--state-dir", str(state_dir), "--json", "--watch", "--count", "2",
                                "--interval", "0.01"], capsys)
        frames = [json.loads(line) for line in out.splitlines()]
        assert code == 0 and len(frames) == 2 and frames[0][0]["round"] == 4
        code, out, _ = run_cli(["status", "--state-dir", str(state_dir), "other-node"], capsys)
        # Not "no daemon is running": one is, under another name.
        assert out.strip() == "no quinkgl daemon named other-node is running (running here: peer-1)", out
    finally:
        server.close()


def test_status_count_needs_watch(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["status", "--state-dir", str(state_dir), "--count", "2"], capsys)
    assert code == 1 and err.startswith("error: --count needs --watch")


# ---------------------------------------------------------------- report
def test_report_summary_plot_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = tmp_path / "m.jsonl"
    metrics.write_text("".join(json.dumps({"node": "peer-1", "swarm": "sha256:ab", "round": r, "val_accuracy": r / 10,
                                           "own_accuracy": r / 4, "bytes_sent": 10}) + "\n" for r in range(1, 4)))
    code, out, _ = run_cli(["report", str(metrics), "--plot", str(tmp_path / "c.png")], capsys)
    assert code == 0 and out.splitlines()[0].startswith("peer-1: rounds 1-3 (3 on file), val_accuracy final 0.3000")
    assert "own_accuracy final 0.7500" in out.splitlines()[0]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    code, out, _ = run_cli(["report", str(metrics), "--json"], capsys)
    assert json.loads(out)[0]["best_val_accuracy"] == pytest.approx(0.3)
    code, _, err = run_cli(["report", str(metrics), "--plot", str(tmp_path / "no" / "c.png")], capsys)
    assert code == 2 and "is not a directory" in err
    (tmp_path / "bad.jsonl").write_text("hello\nworld\n")
    code, _, err = run_cli(["report", str(tmp_path / "bad.jsonl")], capsys)
    assert code == 1 and "bad.jsonl:1 is not a JSON line" in err


# ---------------------------------------------------------------- run --config
def _captured_options(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    from quinkgl_cli.node import daemon

    seen: list[Any] = []
    monkeypatch.setattr(daemon, "run_daemon", lambda options: seen.append(options) or 0)
    return seen


def test_config_supplies_flags_and_given_flags_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    seen = _captured_options(monkeypatch)
    conf = tmp_path / "conf" / "peer.toml"
    (conf.parent / "traces").mkdir(parents=True)
    (tmp_path / "peer.py").write_text("")  # run checks that the script exists before anything else
    conf.write_text('manifest = "swarm.qgl"\nscript = "../peer.py"\nnode-id = "from-file"\nport = 7005\n'
                    'gossip-interval = 2\nscript-arg = ["shard=0", "num_shards=2"]\nresume = false\n'
                    'strict-manifest = false\ntrusted-pubkey = ["keys/creator.pub", "ed25519:' + "ab" * 32 + '"]\n'
                    'trace = "traces/peer.trace"\n')
    code, _, err = run_cli(["run", "--config", str(conf), "--port", "7006", "--script-arg", "shard=1"], capsys)
    assert code == 0, err
    (o,) = seen
    assert o.manifest == tmp_path / "conf" / "swarm.qgl" and o.script == tmp_path / "conf" / ".." / "peer.py"
    assert (o.node_id, o.network.port, o.schedule.gossip_interval, o.checkpoints.resume, o.trust.strict_manifest) == (
        "from-file", 7006, 2.0, False, False)
    assert o.script_args == {"shard": "1"}  # a repeatable flag given replaces the file's list
    assert o.trust.trusted_pubkeys == [str(tmp_path / "conf" / "keys" / "creator.pub"), "ed25519:" + "ab" * 32]
    assert o.trust.trust_policy == "pinned"
    assert o.trace == tmp_path / "conf" / "traces" / "peer.trace"


@pytest.mark.parametrize(("text", "code", "message"), [
    ('manifest = "m"\nscript = "s"\nrounds_ = 3\n', 1, "unknown key 'rounds_'"),
    ('manifest = "m"\nscript = "s"\nconfig = "other.toml"\n', 1, "unknown key 'config'"),
    ('manifest = "m"\nscript = "s"\nport = "7001"\n', 1, "port must be an integer, not str"),
    ('manifest = "m"\nscript = "s"\nresume = "no"\n', 1, "resume must be true or false"),
    ('manifest = "m"\nscript = "s"\nscript-arg = [1]\n', 1, "script-arg must be an array of strings"),
    ("manifest = \n", 1, "is not TOML"),
    (None, 2, "cannot read --config"),
])
def test_bad_config_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                        text: str | None, code: int, message: str) -> None:
    seen = _captured_options(monkeypatch)
    conf = tmp_path / "peer.toml"
    if text is not None:
        conf.write_text(text)
    got, out, err = run_cli(["run", "--config", str(conf)], capsys)
    assert (got, seen) == (code, [])
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1 and out == ""


def test_every_run_flag_has_a_config_key() -> None:
    import typer

    from quinkgl_cli.cli.app import build_app
    from quinkgl_cli.cli.config_file import flags_of
    from quinkgl_cli.cli.run import run

    command = typer.main.get_command(build_app(("run",))).commands["run"]  # type: ignore[attr-defined]
    keys = flags_of(command.params, run)
    longs = {opt[2:] for p in command.params for opt in p.opts if opt.startswith("--") and p.name != "help"}
    assert set(keys) == longs and {"node-id", "script-arg", "resume", "metrics-port", "log-file"} <= set(keys)


def test_doctor_reads_the_run_config_and_leaves_run_only_keys_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from quinkgl_cli.errors import UsageError
    from quinkgl_cli.node import doctor

    seen: list[Any] = []

    def fake_diagnose(options: Any) -> Any:
        seen.append(options)
        raise UsageError("diagnosed")  # stands in for the transport: the options are what is tested

    monkeypatch.setattr(doctor, "diagnose", fake_diagnose)
    conf = tmp_path / "conf" / "peer.toml"
    (conf.parent / "traces").mkdir(parents=True)
    conf.write_text('manifest = "swarm.qgl"\nscript = "peer.py"\nrounds = 5\nnode-id = "from-file"\nport = 7005\n'
                    'rendezvous = false\nbootstrap-peer = ["localhost:7001"]\ncertificate = "node.cert"\n')
    code, _, err = run_cli(["doctor", "--config", str(conf), "--port", "7006"], capsys)
    assert (code, err) == (1, "error: diagnosed\n")
    (o,) = seen
    assert (o.manifest, o.node_id, o.network.port, o.network.rendezvous, o.network.bootstrap_peers) == (
        tmp_path / "conf" / "swarm.qgl", "from-file", 7006, False, ["127.0.0.1:7001"])
    assert o.trust.certificate == tmp_path / "conf" / "node.cert"
    conf.write_text('manifest = "swarm.qgl"\ntimeout = 3\n')  # a doctor flag, but not run's: not a run config
    code, _, err = run_cli(["doctor", "--config", str(conf)], capsys)
    assert code == 1 and "unknown key 'timeout'" in err and len(seen) == 1


# ---------------------------------------------------------------- init
def test_init_scaffolds_a_swarm_that_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "my-swarm"
    code, out, err = run_cli(["init", str(target)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in target.iterdir()) == ["creator.key", "peer.py", "peer.toml", "swarm.qgl"]
    assert (target / "creator.key").stat().st_mode & 0o777 == 0o600
    assert f"quinkgl run --config {target / 'peer.toml'}" in out
    assert f"quinkgl run --config {target / 'peer.toml'} --node-id peer-2 --port 7002" in out  # 7001 is the first's
    code, _, err = run_cli(["init", str(target)], capsys)
    assert code == 2 and "already exists" in err
    monkeypatch.chdir(tmp_path.parent)  # the config's paths are relative to the config, not to the working directory
    code, out, err = run_cli(["run", "--config", str(target / "peer.toml"), "--node-id", "p1", "--dry-run",
                              "--state-dir", str(tmp_path / "state")], capsys)
    assert code == 0, err
    assert "dry-run-ok manifest=my-swarm" in out and "policy=pinned" in out and "arch_match=true" in out


def test_busy_metrics_port_stops_start_up_with_exit_6(tmp_path: Path, state_dir: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from quinkgl_cli.node import localswarm as ls
    from quinkgl_cli.ops.registry import runtime_dir, sockets

    manifest, _key, _pub, _swarm = ls.digits_manifest(tmp_path / "m")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, _, err = run_cli(["run", "--manifest", str(manifest), "--script", str(ls.DIGITS_SCRIPT), "--trust-policy",
                                "open", "--state-dir", str(state_dir), "--checkpoint-dir", str(tmp_path / "ck"),
                                "--port", str(ls.free_port()), "--metrics-port", str(busy.getsockname()[1])], capsys)
    assert code == 6 and "--metrics-port" in err and len(err.splitlines()) == 1
    assert sockets(runtime_dir(state_dir)) == [] and not (tmp_path / "ck").exists()

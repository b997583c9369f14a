"""keygen -> manifest create -> verify/show through the real `quinkgl` console script, with exit codes."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from quinkgl_cli import keys
from quinkgl_cli.manifest.io import MAX_MANIFEST_BYTES
from quinkgl_cli.manifest.trust import load_trusted
from tests.helpers_manifest import expired_manifest, make_manifest, write

REPO = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).with_name("quinkgl")
QUINKGL = [str(_SCRIPT)] if _SCRIPT.exists() else [shutil.which("quinkgl") or "quinkgl"]

GUIDE_FLAGS = [
    "--task-type", "class", "--input-shape", "1,28,28", "--output-shape", "10", "--label-type", "integer",
    "--model-framework", "pytorch",
    "--model-arch-hash", "sha256:40f4a106862aa557fdbeb62a0daaa87f2b031acf93a2f9d2028e481c9607b3a5",
    "--aggregation", "EntropyWeightedAvg", "--topology", "AffinityTopology",
]  # fmt: skip


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*QUINKGL, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120)


def test_round_trip_through_console_script(tmp_path: Path) -> None:
    gen = cli("keygen", "--output", "creator.key", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr
    assert gen.stderr.startswith("Private key written with 0600 permissions. Treat this file as a secret")
    (pub,) = gen.stdout.splitlines()  # the key alone: `keygen -o creator.key > creator.pub` is a public key file
    assert pub.startswith("ed25519:") and len(pub) == 8 + 64
    (tmp_path / "creator.pub").write_text(gen.stdout)
    key_file = tmp_path / "creator.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    shown = cli("keygen", "--show-public", "creator.key", cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout.strip() == pub

    again = cli("keygen", "--output", "creator.key", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr
    assert keys.public_key_text(keys.load_private_key(key_file)) == pub

    created = cli(
        "manifest", "create", "--name", "demo-5peer", *GUIDE_FLAGS, "--sign-with", "creator.key", "--output", "demo.qgl",
        "--round-limit", "100", "--byzantine-f", "1", "--expires-at", "2099-12-31", "--bootstrap-peer", "127.0.0.1:7001",
        "--aggregation-param", "entropy_floor=0.2", "--topology-param", "fanout=4", "--compression-param", "top_k_ratio=0.1",
        "--dp-epsilon", "4", "--training-param", "local_epochs=2", "--description", "guide demo",
        cwd=tmp_path,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    swarm = next(line for line in created.stdout.splitlines() if line.startswith("Swarm ID: "))

    verified = cli("manifest", "verify", "demo.qgl", "--trusted-pubkey", pub, cwd=tmp_path)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.splitlines()[:3] == ["Manifest valid.", swarm, "Signature: valid"]
    assert "Trust: pinned" in verified.stdout
    from_file = cli("manifest", "verify", "demo.qgl", "--trusted-pubkey", "creator.pub", cwd=tmp_path)
    assert from_file.returncode == 0 and "Trust: pinned" in from_file.stdout, from_file.stderr

    # verify's default policy is run's (tofu), and verify only reads the store: a new key is reported, not learned.
    state = tmp_path / "state"
    first = cli("manifest", "verify", "demo.qgl", "--state-dir", str(state), cwd=tmp_path)
    assert first.returncode == 0 and "Trust: tofu (creator key not seen before: `run` will remember it)" in first.stdout
    assert not state.exists()
    load_trusted(tmp_path / "demo.qgl", "tofu", state_dir=state)  # what `run` does on first use
    assert stat.S_IMODE((state / "tofu.json").stat().st_mode) == 0o600
    stored = (state / "tofu.json").read_bytes()
    again = cli("manifest", "verify", "demo.qgl", "--trust-policy", "tofu", "--state-dir", str(state), cwd=tmp_path)
    assert again.returncode == 0 and "matches the one first seen" in again.stdout
    assert (state / "tofu.json").read_bytes() == stored

    shown_json = cli("manifest", "show", "demo.qgl", "--json", cwd=tmp_path)
    doc = json.loads(shown_json.stdout)
    assert doc["swarm_id"] == swarm.removeprefix("Swarm ID: ") and doc["signature_status"] == "valid"
    m = doc["manifest"]
    assert m["aggregation"] == {"name": "EntropyWeightedAvg", "params": {"entropy_floor": 0.2}}
    assert m["topology"] == {"name": "AffinityTopology", "params": {"fanout": 4}}
    assert (m["round_limit"], m["byzantine_f"], m["bootstrap_peers"]) == (100, 1, ["127.0.0.1:7001"])
    assert m["expires_at"] == "2099-12-31T23:59:59Z" and m["compression"]["top_k_ratio"] == 0.1
    assert m["privacy"]["dp_epsilon"] == 4.0 and m["training"]["local_epochs"] == 2
    assert m["creator_pubkey"] == pub and m["task"]["type"] == "classification"

    human = cli("manifest", "show", "demo.qgl", cwd=tmp_path)
    assert human.returncode == 0 and "EntropyWeightedAvg" in human.stdout and pub in human.stdout

    # Re-signed by someone else under the same name: tofu (after first sight) and pinned refuse it.
    assert cli("keygen", "--output", "attacker.key", cwd=tmp_path).returncode == 0
    forged = cli("manifest", "create", "--name", "demo-5peer", *GUIDE_FLAGS, "--sign-with", "attacker.key", "--output", "forged.qgl", cwd=tmp_path)
    assert forged.returncode == 0, forged.stderr
    tofu = cli("manifest", "verify", "forged.qgl", "--trust-policy", "tofu", "--state-dir", str(state), cwd=tmp_path)
    assert tofu.returncode == 4 and tofu.stderr.startswith("error: ") and "first seen" in tofu.stderr
    pinned = cli("manifest", "verify", "forged.qgl", "--trusted-pubkey", pub, cwd=tmp_path)
    assert pinned.returncode == 4 and "not a trusted key" in pinned.stderr

    # Tampered content: exit 3, one line.
    obj = json.loads((tmp_path / "demo.qgl").read_text())
    obj["round_limit"] = 101
    (tmp_path / "tampered.qgl").write_text(json.dumps(obj))
    tampered = cli("manifest", "verify", "tampered.qgl", cwd=tmp_path)
    assert tampered.returncode == 3 and len(tampered.stderr.strip().splitlines()) == 1


def test_unsigned_expired_malformed_oversized_missing(tmp_path: Path) -> None:
    write(tmp_path / "unsigned.qgl", make_manifest())
    # Refused under the default (tofu, as for run), with the reason and both ways out in one line.
    default = cli("manifest", "verify", "unsigned.qgl", "--state-dir", str(tmp_path / "st"), cwd=tmp_path)
    assert default.returncode == 4 and len(default.stderr.strip().splitlines()) == 1
    assert "unsigned" in default.stderr and "--sign-with" in default.stderr and "--trust-policy open" in default.stderr
    plain = cli("manifest", "verify", "unsigned.qgl", "--trust-policy", "open", cwd=tmp_path)
    assert plain.returncode == 0 and "Signature: none (unsigned manifest)" in plain.stdout
    pub = keys.public_key_text(keys.generate())
    required = cli("manifest", "verify", "unsigned.qgl", "--trusted-pubkey", pub, cwd=tmp_path)
    assert required.returncode == 4 and "unsigned" in required.stderr

    key = keys.generate()
    write(tmp_path / "expired.qgl", expired_manifest(key))
    expired = cli("manifest", "verify", "expired.qgl", "--trusted-pubkey", keys.public_key_text(key), cwd=tmp_path)
    assert expired.returncode == 4 and "expired" in expired.stderr
    write(tmp_path / "future.qgl", make_manifest(now=datetime(2999, 1, 1, tzinfo=UTC)))

    future = cli("manifest", "verify", "future.qgl", "--trust-policy", "open", cwd=tmp_path)
    assert future.returncode == 4 and "after this machine's clock" in future.stderr and "check this machine's clock" in future.stderr

    (tmp_path / "bad.qgl").write_text("{oops")
    assert cli("manifest", "verify", "bad.qgl", cwd=tmp_path).returncode == 1
    with open(tmp_path / "big.qgl", "wb") as fh:
        fh.truncate(MAX_MANIFEST_BYTES + 1)
    big = cli("manifest", "verify", "big.qgl", cwd=tmp_path)
    assert big.returncode == 1 and "1 MiB" in big.stderr
    assert cli("manifest", "verify", "missing.qgl", cwd=tmp_path).returncode == 2
    assert cli("manifest", "verify", "unsigned.qgl", "--no-such-flag", cwd=tmp_path).returncode == 1


def test_passphrase_protected_key(tmp_path: Path) -> None:
    env = dict(os.environ, QUINKGL_KEY_PASSPHRASE="s3cret words")
    gen = cli("keygen", "--output", "locked.key", cwd=tmp_path, env=env)
    assert gen.returncode == 0 and "passphrase-protected" in gen.stderr
    assert b"ENCRYPTED" in (tmp_path / "locked.key").read_bytes()
    no_pp = {k: v for k, v in os.environ.items() if k != "QUINKGL_KEY_PASSPHRASE"}
    args = ["manifest", "create", "--name", "locked", *GUIDE_FLAGS, "--sign-with", "locked.key", "--output", "l.qgl"]
    refused = cli(*args, cwd=tmp_path, env=no_pp)
    assert refused.returncode == 3 and "passphrase" in refused.stderr
    (tmp_path / "pp.txt").write_text("s3cret words\n")
    assert cli(*args, "--passphrase-file", "pp.txt", cwd=tmp_path, env=no_pp).returncode == 0


_PEER_SCRIPT = """
import torch.nn as nn

def build_model(manifest, **kwargs):
    assert manifest is None
    act = nn.Tanh if kwargs.get("act") == "tanh" else nn.ReLU
    return nn.Sequential(nn.Linear(64, 16), act(), nn.Linear(16, 10))

def build_loaders(manifest, **kwargs):
    return [], []
"""


def test_from_script_and_arch_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from quinkgl_cli.cli.app import main
    from quinkgl_cli.errors import ArchMismatch

    (tmp_path / "peer_script.py").write_text(_PEER_SCRIPT)
    # One real process (torch import is the slow part); the other checks run the same CLI code in-process.
    created = cli(
        "manifest", "create", "--name", "digits", "--task-type", "class", "--label-type", "integer",
        "--aggregation", "fedavg", "--topology", "randomtopology", "--from-script", "peer_script.py",
        "--script-arg", "act=tanh", "--output", "digits.qgl", cwd=tmp_path,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    m = json.loads((tmp_path / "digits.qgl").read_text())
    assert (m["task"]["input_shape"], m["task"]["output_shape"]) == ([64], [10])
    assert (m["aggregation"]["name"], m["topology"]["name"]) == ("FedAvg", "RandomTopology")

    monkeypatch.chdir(tmp_path)
    hashes = {}
    for act in ("tanh", "relu"):
        with pytest.raises(SystemExit) as done:
            main(["manifest", "arch-hash", "--script", "peer_script.py", "--script-arg", f"act={act}"])
        assert done.value.code in (0, None)
        hashes[act] = capsys.readouterr().out.strip()
    assert hashes["tanh"].startswith("sha256:") and hashes["tanh"] != hashes["relu"]
    assert m["model"]["arch_hash"] == hashes["tanh"]
    with pytest.raises(SystemExit) as refused:
        main([
            "manifest", "create", "--name", "digits", "--task-type", "class", "--label-type", "integer",
            "--aggregation", "fedavg", "--topology", "randomtopology", "--from-script", "peer_script.py",
            "--model-arch-hash", hashes["relu"], "--script-arg", "act=tanh", "--output", "d2.qgl",
        ])  # fmt: skip
    assert refused.value.code == int(ArchMismatch.code) == 5
    assert "differs from the hash" in capsys.readouterr().err
    assert not (tmp_path / "d2.qgl").exists()


_PROBE = """
import os, sys
from quinkgl_cli.cli.app import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in os.environ.get("PROBE_MODULES", "torch,ipv8,numpy,rich").split(",") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), "CODE=" + str(code))
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["keygen", "--output", "k.key"],
        ["manifest", "verify", "m.qgl", "--state-dir", "state"],
        ["manifest", "create", "--name", "n", *GUIDE_FLAGS, "--output", "n.qgl"],
    ],
)
def test_light_commands_import_no_heavy_modules(tmp_path: Path, args: list[str]) -> None:
    write(tmp_path / "m.qgl", make_manifest(key=keys.generate()))  # signed: verify's default policy is tofu
    out = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    last = out.stdout.strip().splitlines()[-1]
    assert last.endswith("CODE=0") or last.endswith("CODE=None"), out.stdout + out.stderr
    assert last.startswith("HEAVY= "), last


@pytest.mark.parametrize(
    "args, modules",
    [
        # Start-up time (benchmarks/bench_cli.py): what each light command does not need is not imported.
        (["--help"], "importlib.metadata,pydantic,json"),
        (["keygen", "--output", "k.key"], "logging,rfc8785,json"),
        (["manifest", "verify", "m.qgl", "--state-dir", "state"], "cryptography.hazmat.primitives.serialization,filelock"),
    ],
)
def test_light_commands_import_only_what_they_use(tmp_path: Path, args: list[str], modules: str) -> None:
    write(tmp_path / "m.qgl", make_manifest(key=keys.generate()))
    env = dict(os.environ, PROBE_MODULES=modules)
    out = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("HEAVY= ") and last.endswith(("CODE=0", "CODE=None")), out.stdout + out.stderr


def test_python_dash_m(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "quinkgl_cli", "manifest", "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0 and "verify" in out.stdout


def test_in_process_edges(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from quinkgl_cli.cli.app import main

    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> int:
        with pytest.raises(SystemExit) as done:
            main(list(args))
        return int(done.value.code or 0)

    assert run("keygen") == 1 and "needs --output" in capsys.readouterr().err
    assert run("keygen", "--output", "a.key", "--show-public", "a.key") == 1
    capsys.readouterr()
    key = keys.generate()
    obj = json.loads(write(tmp_path / "m.qgl", make_manifest(key=key)).read_text())
    obj["byzantine_f"] = 3
    (tmp_path / "t.qgl").write_text(json.dumps(obj))
    assert run("manifest", "show", "t.qgl", "--json") == 0
    assert json.loads(capsys.readouterr().out)["signature_status"] == "INVALID"
    assert run("manifest", "show", "t.qgl") == 0
    assert "INVALID" in capsys.readouterr().out
    assert run("manifest", "verify", "m.qgl", "--trust-policy", "pinned") == 1
    assert "needs at least one --trusted-pubkey" in capsys.readouterr().err


def _main(*args: str) -> int:
    from quinkgl_cli.cli.app import main

    with pytest.raises(SystemExit) as done:
        main(list(args))
    return int(done.value.code or 0)


def _create(output: str, *extra: str) -> list[str]:
    return ["manifest", "create", "--name", "n", *GUIDE_FLAGS, "--output", output, *extra]


@pytest.mark.parametrize(
    "extra",
    [
        ["--input-shape", "99999999999999999999"],
        ["--input-shape", "9007199254740993"],
        ["--round-limit", "99999999999999999999"],
        ["--compression-param", "top_k_ratio=0.1", "--compression-param", "residual_norm_cap=inf"],
        ["--aggregation-param", "max_weight_ratio=inf"],
        ["--dp-epsilon", "inf"],
    ],
)
def test_numbers_json_cannot_hold_are_one_line_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, extra: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _main(*_create("n.qgl", *extra)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "n.qgl").exists()


def test_create_writes_nothing_when_canonicalization_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import quinkgl_cli.manifest.canonical as canonical
    from quinkgl_cli.errors import UsageError

    def refuse(manifest: object) -> str:
        raise UsageError("manifest cannot be canonicalized: test")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(canonical, "swarm_id", refuse)
    assert _main(*_create("n.qgl")) == 1
    assert "cannot be canonicalized" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_create_refuses_an_existing_output_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "n.qgl").write_text("keep me")
    assert _main(*_create("n.qgl")) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "n.qgl").read_text() == "keep me"
    assert _main(*_create("n.qgl", "--force")) == 0
    assert json.loads((tmp_path / "n.qgl").read_text())["name"] == "n"


@pytest.mark.parametrize(
    "args, needle, command",
    [
        (["manifest", "create", "--name", "n", "--round-limit", "abc"], "'--round-limit'", "quinkgl manifest create"),
        (["manifest", "verify"], "Missing argument 'FILE'", "quinkgl manifest verify"),
        (["manifest", "verify", "a.qgl", "b.qgl"], "unexpected extra argument", "quinkgl manifest verify"),
        (["keygen", "--bogus"], "No such option: --bogus", "quinkgl keygen"),
        (["kegen"], "No such command 'kegen'", "quinkgl"),
    ],
)
def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str], args: list[str], needle: str, command: str) -> None:
    assert _main(*args) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], captured.err
    assert lines[0].endswith(f"(see `{command} --help`)") and captured.out == ""


def test_help_is_intact(capsys: pytest.CaptureFixture[str]) -> None:
    assert _main("manifest", "create", "--help") == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: quinkgl manifest create [OPTIONS]") and "--dp-total-epsilon" in out and "--force" in out
    assert _main("--help") == 0
    out = capsys.readouterr().out
    assert "--version" in out and all(c in out for c in ("keygen", "manifest", "run", "simulate", "demo", "info"))
    # A group without its command prints its help (on stderr: a command was expected) and is a usage error.
    assert _main("manifest") == 1
    assert "verify" in capsys.readouterr().err


def test_version(tmp_path: Path) -> None:
    from importlib.metadata import version

    import quinkgl_cli

    out = cli("--version", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout == f"quinkgl {quinkgl_cli.__version__} (implements the QuinkGL guide 0.3.4)\n" and out.stderr == ""
    assert quinkgl_cli.__version__ == version("quinkgl-cli")  # the package and its metadata agree


def test_create_with_every_dp_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    dp = ["--dp-epsilon", "2.5", "--dp-delta", "1e-6", "--dp-clip-norm", "0.5", "--dp-total-epsilon", "40"]
    assert _main(*_create("dp.qgl", *dp)) == 0, capsys.readouterr().err
    privacy = json.loads((tmp_path / "dp.qgl").read_text())["privacy"]
    assert (privacy["dp_epsilon"], privacy["dp_delta"], privacy["dp_clip_norm"], privacy["dp_total_epsilon"]) == (2.5, 1e-6, 0.5, 40.0)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--dp-delta", "1e-6"], "--dp-delta needs --dp-epsilon"),
        (["--dp-clip-norm", "1.0"], "--dp-clip-norm needs --dp-epsilon"),
        (["--dp-total-epsilon", "40", "--dp-delta", "1e-6"], "--dp-delta, --dp-total-epsilon need --dp-epsilon"),
        (["--privacy-param", "dp_total_epsilon=40"], "--dp-total-epsilon needs --dp-epsilon"),
        (["--compression-param", "error_feedback=false"], "error_feedback does nothing while compression is off"),
        (["--compression-param", "ef21_momentum=0.5"], "ef21_momentum does nothing while compression is off"),
        (["--compression-param", "residual_norm_cap=2"], "residual_norm_cap does nothing while compression is off"),
        (["--aggregation", "Scaffold", "--dp-epsilon", "4"], "Scaffold cannot be combined with local DP"),
    ],
)
def test_create_refuses_settings_that_do_nothing_or_break_privacy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _main(*_create("n.qgl", *extra)) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "n.qgl").exists()

"""What a user of the guide meets first: exit codes of unreadable inputs, -h, plain help, completion, version."""

from __future__ import annotations

import builtins
import re
from pathlib import Path
from typing import Any

import pytest
import typer

from quinkgl_cli import keys
from quinkgl_cli.cli.app import build_app, main
from tests.helpers_manifest import make_manifest, write


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as done:
        main(list(args))
    return int(done.value.code or 0)


def _deny(monkeypatch: pytest.MonkeyPatch, module: Any, denied: Path) -> None:
    """``open`` in ``module`` refuses ``denied`` as a file without read permission would (tests may run as root)."""
    real = builtins.open

    def fake_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(file).resolve() == denied.resolve():
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(module, "open", fake_open, raising=False)


def test_unreadable_manifest_script_and_key_are_io_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import quinkgl_cli.manifest.io as manifest_io
    import quinkgl_cli.node.script as script_module

    manifest = write(tmp_path / "m.qgl", make_manifest())
    script = tmp_path / "s.py"
    script.write_text("def build_model(m, **k): pass\ndef build_loaders(m, **k): pass\n")
    key = tmp_path / "k.key"
    keys.save_private_key(key, keys.generate())

    _deny(monkeypatch, manifest_io, manifest)
    assert run_cli("manifest", "verify", str(manifest), "--trust-policy", "open") == 2
    assert "cannot read manifest" in capsys.readouterr().err
    monkeypatch.undo()

    _deny(monkeypatch, script_module, script)
    assert run_cli("run", "--manifest", str(manifest), "--script", str(script), "--trust-policy", "open", "--dry-run") == 2
    assert "cannot read peer script" in capsys.readouterr().err
    monkeypatch.undo()

    _deny(monkeypatch, keys, key)
    created = ["manifest", "create", "--name", "n", "--task-type", "class", "--label-type", "integer", "--input-shape", "4",
               "--output-shape", "2", "--model-arch-hash", "sha256:" + "0" * 64, "--aggregation", "FedAvg",
               "--topology", "RandomTopology", "--sign-with", str(key), "--output", str(tmp_path / "o.qgl")]
    assert run_cli(*created) == 2
    assert "cannot read key file" in capsys.readouterr().err


def test_a_directory_given_as_script_is_named_as_such(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write(tmp_path / "m.qgl", make_manifest())
    assert run_cli("run", "--manifest", str(manifest), "--script", str(tmp_path), "--trust-policy", "open", "--dry-run") == 2
    assert "is a directory" in capsys.readouterr().err


def _commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [path]
    if hasattr(group, "commands"):  # a group (typer bundles its own click: no isinstance against click's)
        for name, sub in group.commands.items():
            out += _commands(sub, (*path, name))
    return out


ALL_COMMANDS = _commands(typer.main.get_command(build_app()))
assert len(ALL_COMMANDS) >= 11


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: " ".join(c) or "quinkgl")
def test_dash_h_everywhere_and_plain_metavars(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(*command, "-h") == 0
    short = capsys.readouterr().out
    assert run_cli(*command, "--help") == 0
    assert capsys.readouterr().out == short and short.startswith("Usage: quinkgl")
    options = [line for line in short.splitlines() if line.lstrip().startswith("-")]
    # typer's fallback shows Python types (`<int>`, `<list[str]>`): every option names its value in words.
    assert not [line for line in options if re.search(r"<(str|int|float|path|bool|list\[)", line)]


def test_shell_completion(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("--help") == 0
    assert "--install-completion" in capsys.readouterr().out
    monkeypatch.setenv("_QUINKGL_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", "quinkgl run --log")
    monkeypatch.setenv("COMP_CWORD", "2")
    with pytest.raises(SystemExit):
        main([])
    assert capsys.readouterr().out.split() == ["--log-format", "--log-level", "--log-file", "--log-max-bytes", "--log-backups"]


def test_version_names_the_guide_it_implements(capsys: pytest.CaptureFixture[str]) -> None:
    import quinkgl_cli

    assert run_cli("--version") == 0
    assert capsys.readouterr().out == f"quinkgl {quinkgl_cli.__version__} (implements the QuinkGL guide 0.3.4)\n"
    assert quinkgl_cli.__version__ == "0.4.0" and quinkgl_cli.GUIDE_VERSION == "0.3.4"


@pytest.mark.parametrize("dry_run", [["--dry-run"], []])
def test_run_refuses_a_manifest_for_a_tensorflow_model(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       dry_run: list[str]) -> None:
    """`manifest create --model-framework tensorflow --model-arch-hash ...` makes such a manifest, and run (its dry
    run too) accepted it when the hash matched a PyTorch model: quinkgl trains PyTorch models only."""
    manifest = write(tmp_path / "m.qgl", make_manifest(framework="tensorflow"))
    script = tmp_path / "s.py"
    script.write_text("raise SystemExit('the script is not loaded for a manifest refused before it')\n")
    assert run_cli("run", "--manifest", str(manifest), "--script", str(script), "--trust-policy", "open",
                   "--checkpoint-dir", str(tmp_path / "ck"), *dry_run) == 5
    err = capsys.readouterr().err
    assert err.startswith(f"error: manifest {manifest} is for a tensorflow model: quinkgl trains PyTorch models only")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "ck").exists()


def test_simulate_refuses_a_manifest_for_a_tensorflow_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write(tmp_path / "m.qgl", make_manifest(framework="tensorflow"))
    script = tmp_path / "s.py"
    script.write_text("raise SystemExit('the script is not loaded for a manifest refused before it')\n")
    assert run_cli("simulate", "--manifest", str(manifest), "--script", str(script), "--trust-policy", "open",
                   "--peers", "2", "--rounds", "1") == 5
    err = capsys.readouterr().err
    assert err.startswith(f"error: manifest {manifest} is for a tensorflow model: quinkgl trains PyTorch models only")


def test_simulate_checks_its_script_before_the_manifests_trust(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An unsigned manifest under tofu is refused (4); a missing script is said first (2), before trust, which may
    # remember a creator key for a run that cannot start.
    manifest = write(tmp_path / "m.qgl", make_manifest())
    assert run_cli("simulate", "--manifest", str(manifest), "--script", str(tmp_path / "nope.py"), "--trust-policy",
                   "tofu", "--peers", "2", "--rounds", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: peer script {tmp_path / 'nope.py'} not found"), err

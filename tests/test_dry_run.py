"""`quinkgl run --dry-run`: checks what a run would start with and changes nothing on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from quinkgl_cli.cli.app import main
from quinkgl_cli.node import localswarm as ls


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as done:
        main(list(args))
    return int(done.value.code or 0)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    manifest, _key, pub, _swarm = ls.digits_manifest(tmp_path_factory.mktemp("m"), name="dry-test")
    return manifest, pub


def _tree(root: Path) -> list[str]:
    return sorted(str(Path(d, f).relative_to(root)) for d, _dirs, files in os.walk(root) for f in [*files, *_dirs])


def test_dry_run_under_tofu_pins_nothing_and_writes_no_file(signed: tuple[Path, str], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # as Python runs by default (PYTHONDONTWRITEBYTECODE unset)
    manifest, pub = signed
    work = tmp_path / "work"
    work.mkdir()
    script = work / "peer.py"
    script.write_text(ls.DIGITS_SCRIPT.read_text())
    state = tmp_path / "state"
    outputs = ["--checkpoint-dir", str(work / "ckpt"), "--final-model", str(work / "final.safetensors"),
               "--metrics-file", str(work / "metrics.jsonl"), "--trace", str(work / "trace.jsonl")]
    base = ["run", "--manifest", str(manifest), "--script", str(script), "--node-id", "p1", "--state-dir",
            str(state), "--trust-policy", "tofu"]
    assert run_cli(*base, *outputs, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "dry-run-ok" in out and "tofu=would-pin" in out and f"creator={pub}" in out
    assert sys.dont_write_bytecode is False  # given back
    # Neither the TOFU store nor the state directory, nor any of the run's outputs, nor a bytecode cache.
    assert not state.exists() and _tree(work) == ["peer.py"]

    # A real run's trust step pins the key; the next dry run says so, and still writes nothing more.
    from quinkgl_cli.manifest.trust import TofuStore, load_trusted

    load_trusted(manifest, "tofu", (), state)
    assert TofuStore(state).lookup("dry-test") == pub
    before = {p: p.stat().st_mtime_ns for p in state.rglob("*")}
    assert run_cli(*base, *outputs, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "tofu=known" in out and "would-pin" not in out
    assert {p: p.stat().st_mtime_ns for p in state.rglob("*")} == before and _tree(work) == ["peer.py"]


def test_a_dry_run_creates_no_node_key(tmp_path: Path) -> None:
    """A certified swarm's dry run derives this node's key to check its certificate: a missing key is an error
    naming what to do, not a key created on the spot (which no certificate could be for anyway)."""
    from quinkgl_cli.errors import IOFailure
    from quinkgl_cli.transport.ipv8.identity import swarm_identity

    state = tmp_path / "nodes" / "p1"
    with pytest.raises(IOFailure, match="no transport key yet") as refused:
        swarm_identity(state, "sha256:" + "a" * 64, create=False)
    assert "quinkgl node-key" in (refused.value.hint or "") and not state.exists()
    made = swarm_identity(state, "sha256:" + "a" * 64)
    assert swarm_identity(state, "sha256:" + "a" * 64, create=False).key_to_bin() == made.key_to_bin()


def test_dry_run_line_counts_training_batches_as_a_number(signed: tuple[Path, str], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`train_batches` was a string ("19" in the text line, a JSON string): a count reads back as a number."""
    import json

    manifest, _pub = signed
    assert run_cli("run", "--manifest", str(manifest), "--script", str(ls.DIGITS_SCRIPT), "--node-id", "p1",
                   "--state-dir", str(tmp_path / "state"), "--trust-policy", "open", "--log-format", "json",
                   "--dry-run") == 0  # fmt: skip
    (line,) = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if '"dry-run-ok"' in ln]
    assert isinstance(line["train_batches"], int) and line["train_batches"] > 0

"""A swarm of real daemon processes on loopback, and the same peers trained alone: what `quinkgl demo` shows.

Used by `quinkgl demo`, the end-to-end tests and the daemon benchmark, so all three exercise the product the
way a user runs it (`quinkgl run` processes talking IPv8 over 127.0.0.1), not a shortcut.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quinkgl_cli.errors import ExitCode, NodeConfigError

# Inside the package (quinkgl_cli/peer_scripts), so the demo runs from an installed wheel, not only a checkout.
DIGITS_SCRIPT = Path(__file__).resolve().parents[1] / "peer_scripts" / "digits_peer_script.py"
# The summary event only: not `already-finished`, whose word boundary `\b` would also match.
_FINISHED = re.compile(r"(?:^|\s)finished rounds=(\d+)\b.*\bval_accuracy=([0-9.]+|-)", re.M)
# The daemon's line once its port is bound, in text or JSON log format.
_STARTED = re.compile(r'(?:^|\s)started swarm=|"event": ?"started"', re.M)
_FINAL_MODEL = re.compile(r'(?:^|\s)finished rounds=.*?\bfinal_model=("(?:[^"\\]|\\.)*"|\S+)', re.M)
BIND_RETRIES = 3
START_POLL = 0.1  # seconds between looks at the peers' logs while they start
_OWN_PORTS = 12000  # free_port picks from this many ports just below the ephemeral range


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP (IPv8) and TCP (model transfers use the same number), chosen below the kernel's
    ephemeral range: a port the kernel handed out for the probe can go to any process's outgoing connection before
    the daemon binds it (seen in CI: a daemon exiting 6 with four test workers making connections)."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(low - _OWN_PORTS, low) if low - _OWN_PORTS >= 1024 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind((host, port))
            except OSError:
                continue
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return int(port)
    raise OSError("no free port pair found on loopback")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; elsewhere (macOS: 49152) a lower pick is still outside the range


def digits_manifest(workdir: Path, name: str = "digits-demo", rounds: int | None = None,
                    training: dict[str, str] | None = None, script: Path = DIGITS_SCRIPT,
                    membership: str = "open") -> tuple[Path, Path, str, str]:
    """Key + signed manifest for the digits script in ``workdir``: (manifest, key, public key, swarm id)."""
    from quinkgl_cli import keys
    from quinkgl_cli.manifest.arch_hash import compute_arch_hash
    from quinkgl_cli.manifest.create import build_manifest
    from quinkgl_cli.manifest.io import write_manifest
    from quinkgl_cli.manifest.signing import sign_manifest
    from quinkgl_cli.manifest.trust import load_trusted
    from quinkgl_cli.node.script import load_script

    workdir.mkdir(parents=True, exist_ok=True)
    key_path = workdir / "creator.key"
    key = keys.generate()
    keys.save_private_key(key_path, key, None, force=True)
    pub = keys.public_key_text(key)
    model = load_script(script).build_model(None)
    manifest = build_manifest(
        name=name,
        task_type="classification",
        input_shape=(64,),
        output_shape=(10,),
        label_type="integer",
        framework="pytorch",
        arch_hash=compute_arch_hash(model),
        aggregation="FedAvg",
        topology="FullTopology",
        round_limit=rounds,
        training_params=training or {"local_epochs": "1", "final_consensus_steps": "1"},
        description="handwritten digits (scikit-learn), MLP 64-32-10",
        membership=membership,
    )
    path = workdir / f"{name}.qgl"
    write_manifest(path, sign_manifest(manifest, key), overwrite=True)
    trusted = load_trusted(path, "pinned", [pub], state_dir=workdir / "verify-state")
    return path, key_path, pub, trusted.swarm_id


@dataclass
class SoloResult:
    val_accuracy: float | None
    labels: list[int]
    history: list[dict[str, Any]] = field(default_factory=list)


def train_alone(manifest_path: Path, script: Path, script_args: dict[str, str], rounds: int,
                node_id: str = "solo", seed: int | None = None) -> SoloResult:
    """The same peer (script, shard, seed, rounds) trained with no peers at all: the baseline a swarm must beat.

    Runs the daemon's own start-up (`prepare`) and `Node` over a transport with nobody else on it.
    """
    import torch

    from quinkgl_cli.node.core import NodeConfig
    from quinkgl_cli.node.daemon import DaemonOptions, prepare
    from quinkgl_cli.node.wiring import build_node
    from quinkgl_cli.transport.memory import MemoryNetwork, MemoryTransport

    opts = DaemonOptions.from_flags(manifest=manifest_path, script=script, node_id=node_id, rounds=rounds,
                                    trust_policy="open", script_args=dict(script_args), resume=False, dry_run=True,
                                    seed=seed)
    prepared = prepare(opts)
    transport = MemoryTransport(MemoryNetwork(auto_deliver=False), node_id)
    node = build_node(prepared.script, prepared.trusted.manifest, prepared.trusted.swarm_id,
                      NodeConfig(node_id, rounds=rounds), prepared.model, prepared.train_loader, prepared.val_loader,
                      transport, own_loader=prepared.own_loader)
    transport.start_sync(node)
    while not node.finished():
        node.begin_round()
        node.train_round()
        node.evaluate()
        node.end_round()
    labels: set[int] = set()
    for batch in prepared.train_loader:
        y = batch[1]
        if isinstance(y, torch.Tensor):
            labels.update(int(v) for v in y.unique())
    return SoloResult(node.history[-1]["val_accuracy"] if node.history else None, sorted(labels), node.history)


@dataclass
class PeerProcess:
    name: str
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes]
    script_args: dict[str, str]
    # How it was launched, so that `ensure_started` can launch it again on another port.
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    cwd: Path | None = None

    def started(self) -> bool:
        """Whether the daemon has bound its port (its `started` line is in the log)."""
        return _STARTED.search(self.text()) is not None

    def relaunch(self, port: int) -> None:
        """Start the same peer again on ``port``; the log file is appended to, so followers keep their place."""
        at = self.cmd.index("--port") + 1
        self.cmd[at] = str(port)
        self.port = port
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def final_model_path(self) -> Path | None:
        """Where the daemon wrote its final model, as its `finished` line says (None before it finished)."""
        m = _last(_FINAL_MODEL, self.text())
        if m is None:
            return None
        value = m.group(1)
        # The log quotes a value with spaces or quotes as a JSON string.
        return Path(json.loads(value) if value.startswith('"') else value)

    def finished_accuracy(self) -> float | None:
        m = _last(_FINISHED, self.text())
        if m is None or m.group(2) == "-":
            return None
        return float(m.group(2))


def _last(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    """The last match of ``pattern`` in ``text`` (a restarted daemon logs a second summary)."""
    found = None
    for found in pattern.finditer(text):  # noqa: B007 (the loop only moves to the last match)
        pass
    return found


def run_command(manifest: Path, script: Path, node_id: str, port: int, rounds: int, interval: float,
                bootstrap: Sequence[int], checkpoint_dir: Path, script_args: dict[str, str],
                extra: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "quinkgl_cli", "run", "--manifest", str(manifest), "--script", str(script),
           "--node-id", node_id, "--port", str(port), "--rounds", str(rounds), "--gossip-interval", str(interval),
           "--trust-policy", "tofu", "--checkpoint-dir", str(checkpoint_dir), "--torch-threads", "1"]
    for b in bootstrap:
        cmd += ["--bootstrap-peer", f"127.0.0.1:{b}"]
    for k, v in script_args.items():
        cmd += ["--script-arg", f"{k}={v}"]
    return cmd + list(extra)


def child_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    if env.get("PYTHONPATH"):
        # The peers run in their own working directories: a relative entry would name another directory there.
        env["PYTHONPATH"] = os.pathsep.join(str(Path(entry or ".").resolve()) for entry in env["PYTHONPATH"].split(os.pathsep))
    env["QUINKGL_HOME"] = str(home)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_swarm(workdir: Path, manifest: Path, n: int, rounds: int, interval: float, partition: str,
                script: Path = DIGITS_SCRIPT, extra: Sequence[str] = (), home: Path | None = None,
                extra_for: Callable[[str], Sequence[str]] = lambda name: ()) -> list[PeerProcess]:
    """Start ``n`` `quinkgl run` processes on loopback, each with its own non-IID shard; logs go to files.
    ``extra`` flags go to every peer, ``extra_for(name)`` to that one (its own ``--trace`` file, say)."""
    ports = [free_port() for _ in range(n)]
    peers: list[PeerProcess] = []
    env = child_env(home or workdir / "home")
    for i in range(n):
        name = f"peer-{i + 1}"
        args = {"shard": str(i), "num_shards": str(n), "partition": partition}
        log_path = workdir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = run_command(manifest, script, name, ports[i], rounds, interval, [p for p in ports if p != ports[i]],
                          workdir / "ckpt" / name, args, ["--min-peers", str(n - 1), "--min-peers-timeout", "60", *extra, *extra_for(name)])
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
        peers.append(PeerProcess(name, ports[i], log_path, proc, args, cmd, env, workdir))
    return peers


def ensure_started(peers: Sequence[PeerProcess], timeout: float = 120.0, retries: int = BIND_RETRIES,
                   on_relaunch: Callable[[PeerProcess, int], None] | None = None) -> None:
    """Wait until every peer has bound its port. The ports `start_swarm` picked were free when picked, not
    reserved: a peer that finds its port taken by then exits with the network code (6) before `started`, and is
    launched again on another free port (its seeds still name the others, so the swarm finds it). A peer that
    fails otherwise, or runs out of retries, is left for `wait_all` to report; ``on_relaunch(peer, old_port)`` is
    told of every relaunch."""
    deadline = time.monotonic() + timeout
    left = {p.name: retries for p in peers}
    pending = list(peers)
    while pending and time.monotonic() < deadline:
        for p in list(pending):
            code = p.proc.poll()
            if p.started() or (code is not None and (code != ExitCode.NETWORK or left[p.name] == 0)):
                pending.remove(p)
            elif code is not None:
                left[p.name] -= 1
                old = p.port
                p.relaunch(free_port())
                if on_relaunch is not None:
                    on_relaunch(p, old)
        if pending:
            time.sleep(START_POLL)


def follow(peers: Sequence[PeerProcess], emit: Callable[[str, str], None], stop: threading.Event,
           on_error: Callable[[BaseException], None], poll: float = 0.1) -> threading.Thread:
    """Stream each peer's new log lines to ``emit(peer, line)`` until ``stop`` is set and the logs are drained.

    If streaming fails (``emit`` raising, say), ``on_error`` gets the exception and streaming ends: the peers run on
    and their logs stay in their files, but the caller must say so instead of going quiet."""

    def loop() -> None:
        offsets = {p.name: 0 for p in peers}
        partial = {p.name: b"" for p in peers}
        while True:
            stopping = stop.is_set()
            for p in peers:
                try:
                    with open(p.log_path, "rb") as fh:
                        fh.seek(offsets[p.name])
                        chunk = fh.read()
                except OSError:
                    continue  # not created yet
                offsets[p.name] += len(chunk)
                data = partial[p.name] + chunk
                *lines, partial[p.name] = data.split(b"\n")
                for line in lines:
                    emit(p.name, line.decode("utf-8", "replace"))
            if stopping:
                return
            stop.wait(poll)

    def guarded() -> None:
        try:
            loop()
        except Exception as exc:  # reported through on_error, never lost with the thread
            on_error(exc)

    thread = threading.Thread(target=guarded, name="follow-logs", daemon=True)
    thread.start()
    return thread


def wait_all(peers: Sequence[PeerProcess], timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for p in peers:
        left = max(deadline - time.monotonic(), 0.1)
        try:
            codes.append(p.proc.wait(timeout=left))
        except subprocess.TimeoutExpired:
            codes.append(None)
    return codes


def stop_all(peers: Sequence[PeerProcess]) -> None:
    for p in peers:
        if p.proc.poll() is None:
            p.proc.terminate()
    for p in peers:
        try:
            p.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()


def check_script(script: Path) -> None:
    if not script.is_file():
        raise NodeConfigError(f"demo script {script} is missing", "reinstall quinkgl-cli (the script ships in the package)")

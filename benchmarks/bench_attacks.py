"""Issue 12's attacks, each re-run as a scripted scenario against real daemons on loopback: one command.

For every scenario, three honest `quinkgl run` daemons (the demo's digits manifest: MLP, FedAvg, full topology, one local epoch; shards:3)
train together while `benchmarks/attacker.py` plays one attack; a scenario ``none`` is the same swarm unattacked.
Reported per scenario: the honest models each honest peer aggregates per round, their final accuracy and their
accuracy over the last third of the rounds (less sensitive to one update more or less) against the unattacked run,
their peak RSS against it, their exit codes and wall time. Goal (issue 12): every scenario within 2 points of the
unattacked accuracy, peak RSS within +50 MB, no honest exit other than 0.

    python benchmarks/bench_attacks.py                 # every scenario, JSON to benchmarks/results/attacks.json
    python benchmarks/bench_attacks.py --scenarios none,poison --rounds 8
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quinkgl_cli.node import localswarm as ls

ROOT = Path(__file__).resolve().parent
SCENARIOS = ("none", "poison", "round-claim", "offer-flood", "idle-tcp", "slow-serve", "hello-flood", "round-zero",
             "observer", "squatter", "squatter-live", "junk", "boost", "pace-stretch", "rejoin-flood", "stale-copy", "drift", "none-certified",
             "hello-flood-certified")
CERTIFIED = ("observer", "none-certified", "hello-flood-certified")  # run in the certified twin of the swarm
PEERS = 3


@dataclass
class PeerOutcome:
    name: str
    exit_code: int | None
    rounds: int
    aggregations: int
    honest_models: int  # honest peers' models in those aggregations
    caught_up: int
    accuracy: float | None
    late_accuracy: float | None  # mean validation accuracy over the last third of the rounds
    peak_rss_mb: float


@dataclass
class Outcome:
    scenario: str
    wall_s: float
    attacker: str
    peers: list[PeerOutcome] = field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        accs = [p.accuracy for p in self.peers if p.accuracy is not None]
        return sum(accs) / len(accs) if len(accs) == len(self.peers) else None

    @property
    def late_accuracy(self) -> float | None:
        accs = [p.late_accuracy for p in self.peers if p.late_accuracy is not None]
        return sum(accs) / len(accs) if len(accs) == len(self.peers) else None

    @property
    def peak_rss_mb(self) -> float:
        return max(p.peak_rss_mb for p in self.peers)


class RssWatch:
    """Peak resident memory of each process, read from /proc until it exits (VmHWM is gone with the process)."""

    def __init__(self) -> None:
        self.peak: dict[int, float] = {}
        self._stop = threading.Event()
        self._pids: list[int] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def watch(self, pid: int) -> None:
        self._pids.append(pid)
        self.peak.setdefault(pid, 0.0)

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            for pid in list(self._pids):
                try:
                    text = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                for line in text.splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak[pid] = max(self.peak[pid], int(line.split()[1]) / 1024)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def own_key(text: str) -> str:
    """The key a daemon says it runs with (last 16 hex, as its log lines name keys)."""
    found = re.search(r" transport-started .*?\bkey=([0-9a-f]+)", text)
    return found.group(1) if found else ""


def honest_models(text: str, honest_keys: set[str]) -> int:
    """Models from honest peers in this peer's aggregations: senders named as it discovered them, told apart by key
    (a squatter may hold an honest peer's node id, and the honest peer an alias)."""
    keys = {name.strip('"'): key for name, key in re.findall(r" peer-discovered peer=(\S+) .*?\bkey=([0-9a-f]+)", text)}
    return sum(keys.get(name.strip('"')) in honest_keys
               for m in re.findall(r"aggregated models .*?from=\[([^\]]*)\]", text) for name in m.split(",") if name)


def late_accuracy(text: str, rounds: int) -> float | None:
    """The served model's validation accuracy averaged over the last third of the rounds: one update more or less
    in the last round moves a 3-peer swarm's final number by several points, this much less."""
    accs = {int(r): float(a) for r, a in re.findall(r"round=(\d+) round-end .*?\bval_accuracy=([0-9.]+)", text)}
    late = [a for r, a in accs.items() if r > rounds - max(rounds // 3, 1)]
    return sum(late) / len(late) if late else None


def start_peer(workdir: Path, manifest: Path, index: int, ports: list[int], rounds: int, interval: float,
               rss: RssWatch, extra: tuple[str, ...] = (), log_level: str = "info") -> ls.PeerProcess:
    name = f"peer-{index + 1}"
    args = {"shard": str(index), "num_shards": str(PEERS), "partition": "shards:3"}
    log_path = workdir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = ls.run_command(manifest, ls.DIGITS_SCRIPT, name, ports[index], rounds, interval,
                         [p for p in ports if p != ports[index]], workdir / "ckpt" / name, args,
                         ["--min-peers", str(PEERS - 1), "--min-peers-timeout", "120", "--log-level", log_level, *extra])
    env = ls.child_env(workdir / "home")
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    rss.watch(proc.pid)
    return ls.PeerProcess(name, ports[index], log_path, proc, args, cmd, env, workdir)


def start_attacker(scenario: str, workdir: Path, manifest: Path, ports: list[int]) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(ROOT / "attacker.py"), scenario, "--manifest", str(manifest), "--script",
           str(ls.DIGITS_SCRIPT), "--workdir", str(workdir / "attacker")]
    for p in ports:
        cmd += ["--seed-port", str(p)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ls.child_env(workdir / "attacker-home"))


def wait_ready(attacker: subprocess.Popen[str], timeout: float) -> list[str]:
    """The attacker's lines up to its ``ready`` (it reads them on a thread: the pipe must not block it)."""
    seen: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert attacker.stdout is not None
        for line in attacker.stdout:
            seen.append(line.rstrip())
            if line.strip() == "ready":
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout):
        raise RuntimeError("attacker not ready in time: " + " | ".join(seen[-10:]))
    return seen


def certify(workdir: Path, manifest: Path, creator: Path) -> list[tuple[str, ...]]:
    """``--certificate`` flags for each honest peer of a certified swarm: its node key made where its daemon will
    look for it, a certificate issued by the creator (as `quinkgl node-key` and `quinkgl admit` would)."""
    from datetime import UTC, datetime

    from quinkgl_cli import keys
    from quinkgl_cli.manifest import admission as docs
    from quinkgl_cli.manifest import swarmkey
    from quinkgl_cli.manifest.io import load_manifest
    from quinkgl_cli.transport.ipv8.identity import swarm_identity

    swarm = load_manifest(manifest).swarm_id
    key = keys.load_private_key(creator)
    flags = []
    for i in range(PEERS):
        name = f"peer-{i + 1}"
        node_key = swarm_identity(workdir / "home" / "nodes" / name, swarm).pub().key_to_bin().hex()
        cert = docs.sign(docs.Certificate(swarm_id=swarm, node_id=name, node_key=node_key,
                                          issued_at=datetime.now(UTC).replace(microsecond=0)), key)
        path = workdir / f"{name}.cert"
        path.touch(mode=0o600)  # it holds the swarm key, as `admit`'s does
        path.write_bytes(docs.certificate_file(cert, swarmkey.certified(key, swarm)))
        flags.append(("--certificate", str(path)))
    return flags


def run_scenario(scenario: str, workdir: Path, manifest: Path, rounds: int, interval: float,
                 certified: tuple[Path, Path] | None = None, log_level: str = "info") -> Outcome:
    """``certified``: (manifest, creator key) of the certified twin of ``manifest``, for the scenarios in CERTIFIED."""
    ports = [ls.free_port() for _ in range(PEERS)]
    extra: list[tuple[str, ...]] = [()] * PEERS
    if scenario in CERTIFIED and certified is not None:
        manifest = certified[0]
        extra = certify(workdir, manifest, certified[1])
    late = scenario.startswith("hello-flood")  # the honest peer that arrives after the flood
    started = time.monotonic()
    attacker = None
    lines: list[str] = []
    with RssWatch() as rss:
        # The attacker first, pointed at the honest ports picked above: it is in place before their first round.
        if not scenario.startswith("none"):
            attacker = start_attacker(scenario.removesuffix("-certified"), workdir, manifest, ports[:PEERS - late])
        peers = [start_peer(workdir, manifest, i, ports, rounds, interval, rss, extra[i], log_level)
                 for i in range(PEERS - late)]
        try:
            ls.ensure_started(peers, retries=0)
            if attacker is not None:
                lines = wait_ready(attacker, timeout=300)
            if late:
                peers.append(start_peer(workdir, manifest, PEERS - 1, ports, rounds, interval, rss, extra[PEERS - 1],
                                        log_level))
            codes = ls.wait_all(peers, timeout=60 + rounds * interval * 10)
        finally:
            ls.stop_all(peers)
            if attacker is not None:
                attacker.terminate()
                try:
                    attacker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    attacker.kill()
    wall = time.monotonic() - started
    stats = next((ln for ln in reversed(lines) if ln.startswith("attack-stats")), "")
    outcome = Outcome(scenario, round(wall, 1), stats)
    honest_keys = {own_key(p.text()) for p in peers}
    for p, code in zip(peers, codes, strict=True):
        text = p.text()
        outcome.peers.append(PeerOutcome(
            name=p.name, exit_code=code, rounds=text.count(" round-end "),
            aggregations=text.count("aggregated models"), honest_models=honest_models(text, honest_keys), caught_up=text.count("caught-up"),
            accuracy=p.finished_accuracy(), late_accuracy=late_accuracy(text, rounds), peak_rss_mb=round(rss.peak[p.proc.pid], 1)))
    return outcome


def report(outcomes: list[Outcome], rounds: int) -> list[dict[str, object]]:
    # A second ``none`` shows run-to-run noise; certified scenarios compare with ``none-certified`` when it ran.
    plain = next((o for o in outcomes if o.scenario == "none"), None)
    certified = next((o for o in outcomes if o.scenario == "none-certified"), plain)
    rows = []
    print(f"{'scenario':<12} {'acc':>6} {'d_acc':>6} {'late':>6} {'d_late':>6} {'honest/rd':>10} {'rss MB':>7} {'d_rss':>6} {'exits':>8} "
          f"{'wall s':>7}  attacker")
    for o in outcomes:
        base = certified if o.scenario in CERTIFIED else plain
        acc = o.accuracy
        d_acc = None if acc is None or base is None or base.accuracy is None else round(100 * (acc - base.accuracy), 1)
        late = o.late_accuracy
        d_late = (None if late is None or base is None or base.late_accuracy is None
                  else round(100 * (late - base.late_accuracy), 1))
        d_rss = None if base is None else round(o.peak_rss_mb - base.peak_rss_mb, 1)
        per_round = round(sum(p.honest_models for p in o.peers) / (len(o.peers) * rounds), 2)
        exits = ",".join(str(p.exit_code) for p in o.peers)
        ok = d_late is not None and d_late >= -2 and (d_rss is None or d_rss <= 50) and all(
            p.exit_code == 0 for p in o.peers)
        print(f"{o.scenario:<12} {'-' if acc is None else f'{100 * acc:.1f}':>6} {'-' if d_acc is None else d_acc:>6} "
              f"{'-' if late is None else f'{100 * late:.1f}':>6} {'-' if d_late is None else d_late:>6} {per_round:>10} {o.peak_rss_mb:>7.0f} {'-' if d_rss is None else d_rss:>6} {exits:>8} {o.wall_s:>7}  "
              f"{o.attacker}", flush=True)
        rows.append({**asdict(o), "accuracy": acc, "delta_accuracy_points": d_acc,
                     "late_accuracy": late, "delta_late_accuracy_points": d_late, "aggregations_per_round": per_round,
                     "peak_rss_mb": o.peak_rss_mb, "delta_rss_mb": d_rss, "meets_goal": ok if not o.scenario.startswith("none") else None})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "attacks.json")
    p.add_argument("--workdir", type=Path, default=None, help="keep every daemon's log here (default: a temp dir)")
    p.add_argument("--log-level", default="info", choices=("debug", "info"), help="the honest daemons' log level")
    args = p.parse_args()
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        p.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    with tempfile.TemporaryDirectory(prefix="qgl-attacks-") as tmp:
        root = args.workdir or Path(tmp)
        manifest, _key, _pub, _swarm = ls.digits_manifest(root / "manifest", rounds=args.rounds)
        certified = None
        if set(chosen) & set(CERTIFIED):  # the same swarm, certified: only the honest peers hold certificates
            cert_manifest, cert_key, _p, _s = ls.digits_manifest(root / "manifest-certified", rounds=args.rounds,
                                                                 membership="certified")
            certified = (cert_manifest, cert_key)
        outcomes = []
        for i, scenario in enumerate(chosen):
            outcomes.append(run_scenario(scenario, root / f"{i}-{scenario}", manifest, args.rounds, args.interval,
                                         certified, args.log_level))
            print(f"scenario={scenario} done wall_s={outcomes[-1].wall_s}", flush=True)
    rows = report(outcomes, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rounds": args.rounds, "interval": args.interval, "peers": PEERS,
                                    "scenarios": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

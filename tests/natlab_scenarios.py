"""NAT lab scenarios: transport probes (`quinkgl_cli.transport.probe`) in namespaces behind NATs (`natlab`).

    python tests/natlab_scenarios.py SCENARIO RESULT.json      (re-executes itself inside unshare --net --mount)

Each scenario builds its network, runs probes bootstrapping from a public seed, drives them, writes what it
observed to RESULT.json and raises AssertionError (exit 1) when an expectation fails. The tests in
`test_natlab_e2e.py` run one scenario each; `benchmarks/bench_nat.py` runs the figures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import natlab  # noqa: E402

SWARM = "sha256:" + "4e" * 32
PORT = 7001


class Probe:
    """One transport peer in a lab namespace; its JSON lines are collected by a reader thread."""

    def __init__(self, lab: natlab.Lab, host: natlab.Host, workdir: Path, *extra: str,
                 bootstrap: natlab.Host | None = None) -> None:
        self.name = host.name
        self.host = host
        cmd = [sys.executable, "-m", "quinkgl_cli.transport.probe", "--node-id", host.name, "--swarm", SWARM,
               "--state-dir", str(workdir / host.name), "--listen", host.address, "--port", str(PORT),
               "--audit", "--audit-allow", natlab.TEST_RANGE, "--log-level", "DEBUG", *extra]
        if bootstrap is not None:
            cmd += ["--bootstrap", f"{bootstrap.address}:{PORT}"]
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([natlab._tool("ip") or "ip", "netns", "exec", host.name, *cmd], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
        lab.procs.append(self.proc)  # type: ignore[arg-type]
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self.wait_for(lambda e: e["event"] in ("ready", "fatal"), 30, "ready")
        assert ready["event"] == "ready", ready

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "garbage", "line": line.rstrip()}
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str, start: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events[start:]:
                    if pred(e):
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"{self.name}: no {what} within {timeout}s; last: {self.events[-12:]}")
                self._cond.wait(min(left, 0.2))

    def poll(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> bool:
        try:
            self.wait_for(pred, timeout, "-")
            return True
        except AssertionError:
            return False

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def ask(self, cmd: dict[str, Any], reply: str, timeout: float = 10.0) -> dict[str, Any]:
        start = len(self.events)
        self.send(cmd)
        return self.wait_for(lambda e: e["event"] == reply, timeout, reply, start=start)

    def discovered(self) -> set[str]:
        return {e["peer"] for e in self.events if e["event"] == "discovered"}

    def logs(self, word: str) -> list[str]:
        return [e["msg"] for e in self.events if e["event"] == "log" and word in e["msg"]]

    def models_from(self, sender: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "model" and e["sender"] == sender]

    def stop(self) -> dict[str, Any]:
        audit = self.ask({"cmd": "audit"}, "audit")
        self.send({"cmd": "stop"})
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return audit


def _meet(probes: list[Probe], pairs: list[tuple[str, str]], timeout: float) -> dict[str, bool]:
    """Whether each pair discovered each other (both ways) within ``timeout`` overall."""
    by = {p.name: p for p in probes}
    deadline = time.monotonic() + timeout
    met: dict[str, bool] = {}
    for a, b in pairs:
        left = max(0.1, deadline - time.monotonic())
        ok = by[a].poll(lambda e, b=b: e["event"] == "discovered" and e["peer"] == b, left)
        ok = ok and by[b].poll(lambda e, a=a: e["event"] == "discovered" and e["peer"] == a, max(0.1, deadline - time.monotonic()))
        met[f"{a}-{b}"] = ok
    return met


def _exchange(sender: Probe, receiver: Probe, size: int, seed: int, timeout: float) -> dict[str, Any]:
    """``sender`` offers one model of ``size`` bytes to ``receiver``: did it arrive, how fast, which path."""
    start = len(receiver.events)
    sent = sender.ask({"cmd": "send", "to": receiver.name, "size": size, "seed": seed, "round": seed}, "sent")
    def settled(e: dict[str, Any]) -> bool:  # the model came, or the receiver gave up on it
        return (e["event"] == "model" and e["sender"] == sender.name and e["round"] == seed) or (
            e["event"] == "log" and "fetch-failed" in e["msg"] and f"peer={sender.name}" in e["msg"]
            and f"offer_round={seed}" in e["msg"])

    receiver.poll(settled, timeout)
    got = next((e for e in receiver.events[start:] if e["event"] == "model" and e["sender"] == sender.name and e["round"] == seed), None)
    paths = [m for m in receiver.logs("transfer ") + sender.logs("transfer ") if f"peer={sender.name}" in m or f"peer={receiver.name}" in m]
    return {"from": sender.name, "to": receiver.name, "arrived": got is not None, "size": size,
            "seconds": round(got["t"] - sent["t"], 4) if got else None,
            "fetch_failed": [m for m in receiver.logs("fetch-failed") if f"peer={sender.name}" in m],
            "paths": paths[-2:]}


def _finish(lab: natlab.Lab, probes: list[Probe], result: dict[str, Any]) -> None:
    result["audit"] = {p.name: p.stop() for p in probes}
    result["leaks"] = lab.leaks()
    assert all(v == 0 for v in result["leaks"].values()), result["leaks"]
    assert all(not a.get("non_loopback") for a in result["audit"].values()), result["audit"]


# -- scenarios ----------------------------------------------------------------------------------------------------
def discovery(lab: natlab.Lab, work: Path) -> dict[str, Any]:
    """Without a relay: introductions through the seed punch UDP ways through cone NATs (not from a restricted NAT
    to a symmetric one); a NATed sender's model still reaches a public peer (reverse), and two NATed peers with a
    punched way, no TCP way and no relay trade models over that UDP way (once the TCP attempts failed)."""
    seed = lab.public("seed")
    hosts = [lab.natted("full1", "full", PORT), lab.natted("rest1", "restricted"), lab.natted("rest2", "restricted"),
             lab.natted("sym1", "symmetric")]
    probes = [Probe(lab, seed, work)] + [Probe(lab, h, work, bootstrap=seed) for h in hosts]
    names = [h.name for h in hosts]
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]] + [("seed", n) for n in names]
    result: dict[str, Any] = {"met": _meet(probes, pairs, 12)}
    by = {p.name: p for p in probes}
    result["transfers"] = [_exchange(by[a], by[b], 200_000, i + 1, 15) for i, (a, b) in
                           enumerate([("seed", "rest1"), ("rest1", "seed"), ("rest1", "rest2"), ("full1", "sym1")])]
    _finish(lab, probes, result)
    arrived = [t["arrived"] for t in result["transfers"]]
    assert arrived == [True, True, True, True], result["transfers"]
    for t in result["transfers"][2:]:
        assert any("path=udp" in line for line in t["paths"]), t
    return result


def _path_of(receiver: Probe, sender: str) -> str | None:
    return receiver.ask({"cmd": "paths"}, "paths")["paths"].get(sender)


def paths(lab: natlab.Lab, work: Path) -> dict[str, Any]:
    """Transfers between every kind of peer: each arrives, by the way the NATs leave open, and the way is kept."""
    seed = lab.public("seed")
    hosts = [lab.public("blocked", tcp_blocked=True), lab.natted("rest1", "restricted"), lab.natted("rest2", "restricted"),
             lab.natted("full1", "full", PORT), lab.natted("sym1", "symmetric")]
    probes = [Probe(lab, seed, work, "--relay")] + [Probe(lab, h, work, bootstrap=seed) for h in hosts]
    by = {p.name: p for p in probes}
    cases = [("seed", "rest1", "direct"), ("rest1", "seed", "reverse"), ("blocked", "seed", "reverse"),
             ("seed", "blocked", "direct"), ("rest1", "rest2", "relay:seed"), ("full1", "sym1", "relay:seed")]
    result: dict[str, Any] = {"met": _meet(probes, [(a, b) for a, b, _ in cases], 30), "transfers": [], "again": []}
    for i, (a, b, _want) in enumerate(cases):
        result["transfers"].append({**_exchange(by[a], by[b], 1_000_000, i + 1, 20), "path": _path_of(by[b], a)})
    for i, (a, b, _want) in enumerate(cases):  # a second model takes the remembered way at once
        result["again"].append({**_exchange(by[a], by[b], 1_000_000, 100 + i, 20), "path": _path_of(by[b], a)})
    _finish(lab, probes, result)
    for (a, b, want), first, again in zip(cases, result["transfers"], result["again"], strict=True):
        assert first["arrived"] and first["path"] == want, (a, b, want, first)
        assert again["arrived"] and again["path"] == want, (a, b, want, again)
    return result


def relay_leaves(lab: natlab.Lab, work: Path) -> dict[str, Any]:
    """A relay that goes away mid-transfer: the recipient's fetch fails at once, says so, and the next model
    comes through the other relay."""
    seed = lab.public("seed")
    relays = [lab.public("relay1"), lab.public("relay2")]
    sender_host, receiver_host = lab.natted("rest1", "restricted"), lab.natted("rest2", "restricted")
    probes = [Probe(lab, seed, work)] + [Probe(lab, h, work, "--relay", bootstrap=seed) for h in relays]
    sender = Probe(lab, sender_host, work, "--serve-rate", "2000000", bootstrap=seed)
    receiver = Probe(lab, receiver_host, work, bootstrap=seed)
    probes += [sender, receiver]
    by = {p.name: p for p in probes}
    pairs = [("rest1", "rest2"), ("rest1", "relay1"), ("rest1", "relay2"), ("rest2", "relay1"), ("rest2", "relay2")]
    result: dict[str, Any] = {"met": _meet(probes, pairs, 30)}
    assert all(result["met"].values()), result["met"]
    deadline = time.monotonic() + 20
    while len(receiver.ask({"cmd": "paths"}, "paths")["relays"]) < 2:  # each relay has told it that it relays
        assert time.monotonic() < deadline, "the relays never said they relay"
        time.sleep(0.2)
    start = len(receiver.events)
    sender.send({"cmd": "send", "to": "rest2", "size": 6_000_000, "seed": 1, "round": 1})
    carrier = None
    deadline = time.monotonic() + 15
    while carrier is None:
        assert time.monotonic() < deadline, "no relay started carrying the transfer"
        carrier = next((r.name for r in relays if by[r.name].logs("relay-started")), None)
        time.sleep(0.05)
    sender.wait_for(lambda e: e["event"] == "serving", 10, "the transfer under way")
    time.sleep(0.5)  # half a second into a three-second transfer
    killed = time.monotonic()
    by[carrier].proc.kill()
    failed = receiver.wait_for(lambda e: e["event"] == "log" and "fetch-failed" in e["msg"] and "path=relay" in e["msg"],
                               15, "the failed fetch reported", start=start)
    result["failure"] = {"relay": carrier, "after_s": round(time.monotonic() - killed, 2), "log": failed["msg"]}
    result["first_arrived"] = bool(receiver.models_from("rest1"))
    probes.remove(by[carrier])
    retry = _exchange(sender, receiver, 2_000_000, 2, 25)
    retry["path"] = _path_of(receiver, "rest1")
    result["retry"] = retry
    _finish(lab, probes, result)
    other = next(r.name for r in relays if r.name != carrier)
    assert not result["first_arrived"], "the relay was killed too late: the test proves nothing"
    assert result["failure"]["after_s"] < 10, result["failure"]
    assert retry["arrived"] and retry["path"] == f"relay:{other}", retry
    return result


def _daemons(lab: natlab.Lab, work: Path, script: Path | None, natted: bool, rounds: int, interval: float,
             min_peers: int = 2) -> dict[str, Any]:
    """Four real `quinkgl run` daemons, the seed public and relaying, the others behind a port-restricted, a
    full-cone and a symmetric NAT (``natted``) or all public; what each logged."""
    seed = lab.public("seed")
    if natted:
        hosts = [seed, lab.natted("rest1", "restricted"), lab.natted("full1", "full", PORT), lab.natted("sym1", "symmetric")]
    else:
        hosts = [seed, lab.public("rest1"), lab.public("full1"), lab.public("sym1")]
    return _run_daemons(lab, work, script, [(h.name, h, h.address, PORT) for h in hosts], rounds, interval,
                        {"partition": "shards:3"}, min_peers=min_peers, timeout=150)


Place = tuple[str, natlab.Host, str, int]  # node id, the lab host it runs in, where it listens, its port


def _run_daemons(lab: natlab.Lab, work: Path, script: Path | None, places: list[Place], rounds: int, interval: float,
                 script_args: dict[str, str], min_peers: int, timeout: float, relay: bool = True) -> dict[str, Any]:
    """Real `quinkgl run` daemons, one per place, the first one the seed the others bootstrap from (relaying, unless
    on loopback or not ``relay``), each with its shard of the script's data; what each logged."""
    sys.path.insert(0, str(ROOT))
    from datetime import datetime

    from quinkgl_cli.node import localswarm as ls
    from quinkgl_cli.node.trace import Transfer, read_trace
    from quinkgl_cli.validation import is_loopback

    script = script or ls.DIGITS_SCRIPT
    manifest, _key, _pub, _swarm = ls.digits_manifest(work / "m", script=script)
    env = ls.child_env(work / "home")
    env["PYTHONPATH"] = str(ROOT)
    logs, procs = {}, {}
    spawned = time.time()
    seed_at = f"{places[0][2]}:{places[0][3]}"
    for i, (name, host, listen, port) in enumerate(places):
        extra = ["--listen", listen, "--no-rendezvous", "--min-peers", str(min_peers), "--min-peers-timeout", "40",
                 "--log-format", "json", "--trace", str(work / f"{name}.trace")]
        if i > 0:
            extra += ["--bootstrap-peer", seed_at]
        elif relay and not is_loopback(listen):  # on loopback there is no NAT, and nothing to relay for
            extra += ["--relay"]
        cmd = ls.run_command(manifest, script, name, port, rounds, interval, [], work / f"ck-{name}",
                             {"shard": str(i), "num_shards": str(len(places)), **script_args}, extra)
        logs[name] = work / f"{name}.log"
        procs[name] = lab.spawn(host.name, cmd, logs[name], env)
    deadline = time.monotonic() + timeout
    for proc in procs.values():
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    result: dict[str, Any] = {"exit": {name: p.returncode for name, p in procs.items()}, "peers": {}}

    def since_spawn(e: dict[str, Any]) -> float:
        return round(datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).timestamp() - spawned, 2)

    for name, path in logs.items():
        events = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
        finished = next((e for e in events if e.get("event") == "finished"), {})
        aggregated = [e for e in events if e.get("event") == "aggregated models"]
        result["peers"][name] = {
            "peers_met": finished.get("peers_met"),
            "val_accuracy": finished.get("val_accuracy"),
            "val_accuracy_by_round": [e.get("val_accuracy") for e in events if e.get("event") == "round-end"],
            "aggregations": len(aggregated),
            "first_aggregation_s": since_spawn(aggregated[0]) if aggregated else None,
            "started_s": next((since_spawn(e) for e in events if e.get("event") == "started"), None),
            "paths": sorted({f"{e.get('peer')}={e.get('path')}" + (f":{e['relay']}" if e.get("relay") else "")
                             for e in events if e.get("event") == "transfer"}),
            "fetch_failed": [e for e in events if e.get("event") == "fetch-failed"][:3],
            # The ways its own trace recorded (`run --trace`): direction:peer=path of each transfer that went through.
            "traced": sorted({f"{r.direction}:{r.peer}={r.path}" for r in read_trace(work / f"{name}.trace")
                              if isinstance(r, Transfer) and r.ok}),
            "reachability": [{k: e.get(k) for k in ("nat", "tcp", "relays", "advice")}
                             for e in events if e.get("event") == "reachability"],
        }
    result["leaks"] = lab.leaks()
    assert all(v == 0 for v in result["leaks"].values()), result["leaks"]
    assert all(code == 0 for code in result["exit"].values()), result
    return result


LEARNERS = ("seed", "pub2", "a1", "a2", "s1", "s2")
LAST = 5  # rounds whose validation accuracy the learning comparison averages


def learning(lab: natlab.Lab, work: Path) -> dict[str, Any]:
    """Figures (benchmarks/bench_nat.py --learning): six real daemons learning digits, non-IID (``shards:2``),
    either in the lab, two public (the seed relaying) and four behind two NATs, two behind a port-restricted one
    (a1, a2) and two behind a symmetric one (s1, s2), or (QGL_LAB_NAT=0) the same six on loopback in one namespace.
    QGL_LAB_SEED sets the data split's seed, QGL_LAB_ROUNDS the rounds (20, 1 s apart)."""
    rounds = int(os.environ.get("QGL_LAB_ROUNDS", "20"))
    args = {"partition": "shards:2", "seed": os.environ.get("QGL_LAB_SEED", "0")}
    if os.environ.get("QGL_LAB_NAT", "1") == "1":
        seed, pub2 = lab.public("seed"), lab.public("pub2")
        a1, s1 = lab.natted("a1", "restricted"), lab.natted("s1", "symmetric")
        a2, s2 = lab.behind("a2", "a1"), lab.behind("s2", "s1")
        places = [(h.name, h, h.address, PORT) for h in (seed, pub2, a1, a2, s1, s2)]
    else:
        lo = lab.public("lo")
        places = [(name, lo, "127.0.0.1", PORT + i) for i, name in enumerate(LEARNERS)]
    result = _run_daemons(lab, work, None, places, rounds, 1.0, args, min_peers=len(places) - 1, timeout=400)
    finals = [p["val_accuracy"] for p in result["peers"].values()]
    # A non-IID swarm's accuracy swings from round to round: the mean of the last LAST rounds says more than the last.
    lasts = [p["val_accuracy_by_round"][-LAST:] for p in result["peers"].values()]
    assert None not in finals and all(len(x) == LAST and None not in x for x in lasts), result["peers"]
    result["mean_val_accuracy"] = round(sum(finals) / len(finals), 4)
    result["mean_val_accuracy_last"] = round(sum(sum(x) / LAST for x in lasts) / len(lasts), 4)
    result["settings"] = {"rounds": rounds, "last": LAST, **args}
    return result


def daemons(lab: natlab.Lab, work: Path) -> dict[str, Any]:
    """Real `quinkgl run` daemons: a public seed that relays and three peers behind NATs form one swarm, and every
    peer aggregates models from the others. The symmetric NAT and the port-restricted one cannot punch a way to each
    other: they meet through the relay (its roster, then their control messages through it) and their models come
    through it too. Each starts its rounds once it met the three others (those two meet a few seconds after the
    rest), so that all of them overlap whatever the order they started in."""
    result = _daemons(lab, work, None, True, 6, 1.0, min_peers=3)
    for name, peer in result["peers"].items():
        assert peer["aggregations"] > 0 and peer["peers_met"] == 3, (name, peer)
    nat = {name: peer["reachability"][-1]["nat"] for name, peer in result["peers"].items()}
    assert nat == {"seed": "none", "rest1": "mapped", "full1": "mapped", "sym1": "symmetric"}, result["peers"]
    assert result["peers"]["seed"]["reachability"][0]["nat"] == "unknown"  # the line at start, before any report
    return result


def udp_daemons(lab: natlab.Lab, work: Path) -> dict[str, Any]:
    """Real `quinkgl run` daemons: a public seed (no relay) and two peers behind port-restricted NATs whose
    firewalls drop all TCP. No TCP way and no relay exists between any two of them: every model travels over the
    UDP way their datagrams already take (punched between the two NATed peers), logged ``path=udp``, and every
    peer aggregates models from both others."""
    seed = lab.public("seed")
    hosts = [seed, lab.natted("rest1", "restricted", tcp_blocked=True), lab.natted("rest2", "restricted", tcp_blocked=True)]
    result = _run_daemons(lab, work, None, [(h.name, h, h.address, PORT) for h in hosts], 8, 1.0, {"partition": "shards:3"},
                          min_peers=2, timeout=150, relay=False)
    for name, peer in result["peers"].items():
        others = {h.name for h in hosts} - {name}
        assert peer["aggregations"] > 0 and peer["peers_met"] == 2, (name, peer)
        assert set(peer["paths"]) == {f"{o}=udp" for o in others}, (name, peer["paths"])
        assert {f"receive:{o}=udp" for o in others} <= set(peer["traced"]), (name, peer["traced"])
        assert {f"send:{o}=udp" for o in others} <= set(peer["traced"]), (name, peer["traced"])
    return result


def daemons_bench(lab: natlab.Lab, work: Path) -> dict[str, Any]:
    """Figures: the daemons with 10 MB models (benchmarks/scripts/digits_wide.py), behind NATs or all public
    (QGL_LAB_NAT=0), for the time from start to each peer's first aggregated model."""
    script = ROOT / "benchmarks" / "scripts" / "digits_wide.py"
    return _daemons(lab, work, script, os.environ.get("QGL_LAB_NAT", "1") == "1", 4, 3.0)


def bench(lab: natlab.Lab, work: Path) -> dict[str, Any]:
    """Figures (benchmarks/bench_nat.py): 10 MB models by each way; the first transfer of each pair includes
    finding the way (a direct attempt that times out), the next ones take the remembered way at once. ``udp``: two
    peers behind port-restricted NATs whose firewalls drop all TCP (the relay cannot help them either)."""
    size, repeats = int(os.environ.get("QGL_BENCH_BYTES", 10_000_000)), int(os.environ.get("QGL_BENCH_REPEATS", 5))
    started = time.monotonic()
    seed = lab.public("seed")
    hosts = [lab.public("pub"), lab.natted("rest1", "restricted"), lab.natted("rest2", "restricted"),
             lab.natted("udp1", "restricted", tcp_blocked=True), lab.natted("udp2", "restricted", tcp_blocked=True)]
    rate = os.environ.get("QGL_BENCH_RELAY_RATE")
    probes = [Probe(lab, seed, work, "--relay", *(["--relay-rate", rate] if rate else []))]
    probes += [Probe(lab, h, work, bootstrap=seed) for h in hosts]
    by = {p.name: p for p in probes}
    cases = {"direct": ("pub", "seed"), "direct_via_nat": ("seed", "rest1"), "reverse": ("rest1", "seed"),
             "relay": ("rest1", "rest2"), "udp": ("udp1", "udp2")}
    result: dict[str, Any] = {"bytes": size, "repeats": repeats, "relay_rate": rate or "default", "met": _meet(probes, list(cases.values()), 30)}
    result["met_after_s"] = round(time.monotonic() - started, 2)
    counter = 0
    for name, (a, b) in cases.items():
        counter += 1
        first = _exchange(by[a], by[b], size, counter, 60)
        assert first["arrived"], first
        runs = []
        for _ in range(repeats):
            counter += 1
            again = _exchange(by[a], by[b], size, counter, 60)
            assert again["arrived"], again
            runs.append(again["seconds"])
        runs.sort()
        median = runs[len(runs) // 2]
        result[name] = {"from": a, "to": b, "path": _path_of(by[b], a), "first_s": first["seconds"],
                        "first_after_start_s": round(time.monotonic() - started, 2) if counter == 1 + repeats else None,
                        "median_s": median, "runs_s": runs, "mb_per_s": round(size / median / 1e6, 1)}
        if name == "udp":  # how the window behaved: datagrams, resent, final window, per transfer
            result[name]["sends"] = [m.split("udp-sent ", 1)[-1] for m in by[a].logs("udp-sent")]
    for name in ("direct_via_nat", "reverse", "relay", "udp"):
        result[name]["ratio_to_direct"] = round(result["direct"]["median_s"] / result[name]["median_s"], 3)
    _finish(lab, probes, result)
    return result


def _run_doctor(lab: natlab.Lab, host: natlab.Host, manifest: Path, env: dict[str, str], seeds: list[natlab.Host]) -> dict[str, Any]:
    """`quinkgl doctor --json` in ``host``'s namespace, as its operator would run it there: its exit code and report."""
    cmd = [natlab._tool("ip") or "ip", "netns", "exec", host.name, sys.executable, "-m", "quinkgl_cli", "doctor",
           "--manifest", str(manifest), "--node-id", host.name, "--listen", host.address, "--port", str(PORT),
           "--trust-policy", "tofu", "--no-rendezvous", "--json", "--timeout", "25"]
    for seed in seeds:
        cmd += ["--bootstrap-peer", f"{seed.address}:{PORT}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=90, cwd=ROOT)
    report = json.loads(done.stdout) if done.stdout.strip() else {"stderr": done.stderr[-3000:]}
    return {"exit": done.returncode, **report}


def doctor(lab: natlab.Lab, work: Path) -> dict[str, Any]:
    """`quinkgl doctor` behind a symmetric NAT, among two public peers: it sees two mappings, says relay is
    needed and, with no relay among its peers, to run one; once a relay joins, it names it. Behind a port-restricted
    NAT it sees one mapping and says which ports to forward."""
    sys.path.insert(0, str(ROOT))
    from quinkgl_cli.manifest import swarmkey
    from quinkgl_cli.manifest.io import load_manifest
    from quinkgl_cli.node import localswarm as ls

    manifest, _key, _pub, swarm = ls.digits_manifest(work / "m")
    loaded = load_manifest(manifest)
    arch = loaded.manifest.model.arch_hash
    env = ls.child_env(work / "home")
    env["PYTHONPATH"] = str(ROOT)
    seed, pub2 = lab.public("seed"), lab.public("pub2")
    sym, rest = lab.natted("sym1", "symmetric"), lab.natted("rest1", "restricted")
    # The probes hold the manifest's key, as its daemons do (`manifest.swarmkey`), so doctor meets them.
    swarm_args = ("--swarm", swarm, "--arch", arch, "--swarm-key",
                  swarmkey.open_swarm(loaded.canonical, loaded.manifest.signature).hex())
    probes = [Probe(lab, seed, work, *swarm_args), Probe(lab, pub2, work, *swarm_args, bootstrap=seed)]
    result: dict[str, Any] = {"without_relay": _run_doctor(lab, sym, manifest, env, [seed, pub2])}
    probes.append(Probe(lab, lab.public("relay1"), work, *swarm_args, "--relay", bootstrap=seed))
    deadline = time.monotonic() + 20
    while "relay1" not in probes[0].ask({"cmd": "paths"}, "paths")["relays"]:  # the seed has heard it relays
        assert time.monotonic() < deadline, "the relay never said it relays"
        time.sleep(0.2)
    result["with_relay"] = _run_doctor(lab, sym, manifest, env, [seed, pub2])
    result["restricted"] = _run_doctor(lab, rest, manifest, env, [seed, pub2])
    _finish(lab, probes, result)
    return result


def _log_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(errors="replace").splitlines() if line.startswith("{")]


def _await_event(path: Path, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str, start: int = 0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = next((e for e in _log_events(path)[start:] if pred(e)), None)
        if found is not None:
            return found
        assert time.monotonic() < deadline, f"no {what} within {timeout}s in {path.name}: {path.read_text()[-3000:]}"
        time.sleep(0.2)


def split(lab: natlab.Lab, work: Path) -> dict[str, Any]:
    """Real daemons, all public: p2 is cut off from the seed and p1 (iptables in its namespace), each side says
    ``swarm-split``; the seed stops while the network is apart (p2 never hears its goodbye); the network heals.
    With its only seed gone, p2 finds p1 again only by knocking at the peer it lost: each says ``swarm-healed``
    and models flow between them again."""
    sys.path.insert(0, str(ROOT))
    from quinkgl_cli.node import localswarm as ls

    manifest, _key, _pub, _swarm = ls.digits_manifest(work / "m")
    seed, p1, p2 = lab.public("seed"), lab.public("p1"), lab.public("p2")
    env = ls.child_env(work / "home")
    env["PYTHONPATH"] = str(ROOT)
    logs, procs = {}, {}
    for i, host in enumerate((seed, p1, p2)):
        extra = ["--listen", host.address, "--no-rendezvous", "--min-peers", "2", "--min-peers-timeout", "60",
                 "--log-format", "json", "--checkpoint-every", "1000"]
        extra += [] if host is seed else ["--bootstrap-peer", f"{seed.address}:{PORT}"]
        cmd = ls.run_command(manifest, ls.DIGITS_SCRIPT, host.name, PORT, 1000, 1.0, [], work / f"ck-{host.name}",
                             {"shard": str(i), "num_shards": "3"}, extra)
        logs[host.name] = work / f"{host.name}.log"
        procs[host.name] = lab.spawn(host.name, cmd, logs[host.name], env)
    aggregated = lambda e: e.get("event") == "aggregated models" and e.get("peers", 0) >= 2  # noqa: E731
    for name in logs:
        _await_event(logs[name], aggregated, 100, "aggregation with both peers")
    others = (seed.address, p1.address)
    rules = [(chain, flag, addr) for addr in others for chain, flag in (("INPUT", "-s"), ("OUTPUT", "-d"))]
    for chain, flag, addr in rules:
        natlab.sh("iptables", "-I", chain, flag, addr, "-j", "DROP", ns="p2")
    cut_at = time.monotonic()
    result: dict[str, Any] = {}
    result["p2_split"] = _await_event(logs["p2"], lambda e: e.get("event") == "swarm-split", 40, "p2's swarm-split")
    result["p1_split"] = _await_event(logs["p1"], lambda e: e.get("event") == "swarm-split", 40, "p1's swarm-split")
    result["split_after_s"] = round(time.monotonic() - cut_at, 1)
    procs["seed"].send_signal(signal.SIGTERM)
    procs["seed"].wait(timeout=30)
    for chain, flag, addr in rules:
        natlab.sh("iptables", "-D", chain, flag, addr, "-j", "DROP", ns="p2")
    healed_at = time.monotonic()
    result["p2_healed"] = _await_event(logs["p2"], lambda e: e.get("event") == "swarm-healed", 40, "p2's swarm-healed")
    result["p1_healed"] = _await_event(logs["p1"], lambda e: e.get("event") == "swarm-healed", 40, "p1's swarm-healed")
    result["healed_after_s"] = round(time.monotonic() - healed_at, 1)
    since = len(_log_events(logs["p2"]))
    _await_event(logs["p2"], lambda e: e.get("event") == "aggregated models" and "p1" in (e.get("from") or []), 30,
                 "a model from p1 after the heal", start=since)
    result["models_after_heal"] = True
    for name in ("p1", "p2"):
        procs[name].send_signal(signal.SIGTERM)
        procs[name].wait(timeout=30)
    result["exit"] = {name: proc.returncode for name, proc in procs.items()}
    result["leaks"] = lab.leaks()
    assert all(v == 0 for v in result["leaks"].values()), result["leaks"]
    return result


def lan(lab: natlab.Lab, work: Path) -> dict[str, Any]:
    """Three peers on one segment with --lan-discovery and no seed find each other through multicast beacons; a
    fourth without it, on the same bridge, is found by nobody and finds nobody."""
    lab.lan_beacon = True
    hosts = [lab.public(f"lan{i}") for i in (1, 2, 3)]
    allow = ("--audit-allow", f"{natlab.LAN_GROUP}/32")
    probes = [Probe(lab, h, work, "--lan-discovery", *allow) for h in hosts]
    quiet = Probe(lab, lab.public("quiet"), work)
    names = [h.name for h in hosts]
    started = time.monotonic()
    result: dict[str, Any] = {"met": _meet(probes, [(a, b) for i, a in enumerate(names) for b in names[i + 1:]], 30)}
    result["met_after_s"] = round(time.monotonic() - started, 2)
    time.sleep(6)  # a beacon interval more: time for anyone to find the quiet peer, if anything could
    result["quiet_met"] = sorted(quiet.discovered())
    result["met_quiet"] = sorted(p.name for p in probes if "quiet" in p.discovered())
    _finish(lab, [*probes, quiet], result)
    assert all(result["met"].values()), result["met"]
    assert result["quiet_met"] == [] and result["met_quiet"] == [], result
    return result


SCENARIOS: dict[str, Callable[[natlab.Lab, Path], dict[str, Any]]] = {
    "bench": bench, "daemons_bench": daemons_bench, "doctor": doctor, "split": split, "lan": lan,
    "discovery": discovery, "paths": paths, "relay_leaves": relay_leaves, "daemons": daemons, "learning": learning,
    "udp_daemons": udp_daemons}
LONG = {"learning": 480}  # a scenario's time in its sandbox, when more than the default


def main(argv: list[str]) -> int:
    name, out = argv[0], Path(argv[1])
    if os.environ.get("QGL_NATLAB") != "1":
        done = natlab.sandbox([sys.executable, __file__, *argv], LONG.get(name, 170), env={**os.environ, "QGL_NATLAB": "1"})
        sys.stdout.write(done.stdout[-20000:])
        sys.stderr.write(done.stderr[-20000:])
        return done.returncode
    lab = natlab.Lab()
    keep = os.environ.get("QGL_NATLAB_KEEP")  # a directory to keep the probes' state and the daemons' logs in
    try:
        with tempfile.TemporaryDirectory(prefix="natlab-") as tmp:
            result = SCENARIOS[name](lab, Path(keep or tmp))
    finally:
        lab.close()
    natlab.write_result(out, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

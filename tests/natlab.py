"""A NAT lab built from Linux network namespaces, for tests and benchmarks of peers that cannot reach each other.

Independent of quinkgl: it builds the network and runs commands in it. Everything happens inside a private network
and mount namespace (`unshare --net --mount`), so no packet can reach the machine's real interfaces; the test
range 10.201.0.0/16 exists only in there.

Layout (``Lab``)::

    sandbox namespace (from unshare): bridge "inet0", the lab's internet, 10.201.0.0/24
      public host  NAME   10.201.0.<10+i>      on the bridge; reachable by everyone
      router       r-NAME 10.201.0.<100+i>     wan on the bridge; lan 10.201.<i+1>.1/24; does the NAT
      NATed host   NAME   10.201.<i+1>.2       behind its router, default route through it
      (`behind`)   NAME2  10.201.<i+1>.3, ...  more hosts on that router's home network

NAT kinds (iptables in the router's namespace; filtering is conntrack's, so an inbound packet passes only when
it answers what went out, unless a forward says otherwise):

- ``full``: endpoint-independent mapping (MASQUERADE keeps the source port) and, for the given UDP port,
  endpoint-independent filtering (a DNAT forward): a full cone for UDP, TCP still closed;
- ``restricted``: endpoint-independent mapping, address-and-port-dependent filtering (port-restricted cone);
- ``symmetric``: a new random source port per destination (``--random-fully``): punching cannot work.

Inbound connections that nothing forwards are dropped (a connect times out, as behind a home router). Every
namespace counts, in its OUTPUT chain, packets towards anything outside 10.201.0.0/16 and loopback, and drops
them: `Lab.leaks` reads the counters (the proof that nothing else was contacted).

`sandbox(argv)` re-executes a worker inside ``unshare --net --mount``; `unavailable()` says why that cannot be
done here (not root, no unshare, no ip or iptables), for a test to skip with that reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

TEST_RANGE = "10.201.0.0/16"
BRIDGE = "inet0"
NAT_KINDS = ("full", "restricted", "symmetric")
LEAK_CHAIN = "QGL_LEAK"
LAN_GROUP, LAN_PORT = "239.255.70.71", 47001  # quinkgl_cli.transport.ipv8.lan (the lab stays independent of quinkgl)


def _tool(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)), None)


def unavailable() -> str | None:
    """Why a lab cannot be built on this machine, or None when it can (checked by building a namespace)."""
    missing = [t for t in ("unshare", "ip", "iptables") if _tool(t) is None]
    if missing:
        return f"NAT lab needs {', '.join(missing)} (apt-get install -y iproute2 iptables util-linux)"
    probe = [_tool("unshare") or "unshare", "--net", "--mount", "sh", "-c",
             f"mount -t tmpfs tmpfs /run && mkdir /run/netns && {_tool('ip')} netns add probe && "
             f"{_tool('ip')} netns exec probe {_tool('iptables')} -t nat -L >/dev/null"]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create network namespaces: {exc}"
    if done.returncode != 0:
        return f"cannot create network namespaces (needs root or user namespaces): {done.stderr.strip()[-300:]}"
    return None


def sandbox(argv: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (a Python worker that builds a `Lab`) in fresh network and mount namespaces."""
    return subprocess.run([_tool("unshare") or "unshare", "--net", "--mount", "--kill-child", *argv],
                          capture_output=True, text=True, timeout=timeout, env=env)


def sh(*cmd: str, ns: str | None = None, check: bool = True) -> str:
    full = [_tool("ip") or "ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    done = subprocess.run(full, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(full)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Host:
    name: str  # its namespace
    address: str  # where it listens
    kind: str  # public | full | restricted | symmetric
    router: str | None = None
    public_address: str | None = None  # the router's wan address for NATed hosts


@dataclass
class Lab:
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    lan_beacon: bool = False  # let LAN discovery's multicast beacons (and IGMP) through the leak guard of hosts made after
    _count: int = 0

    def __post_init__(self) -> None:
        if os.getpid() == 1 or os.environ.get("QGL_NATLAB") != "1":
            raise RuntimeError("a Lab is built only inside natlab.sandbox (QGL_NATLAB=1)")
        # A private /run (this mount namespace's own) holds the named namespaces: nothing outside sees them.
        sh("mount", "-t", "tmpfs", "tmpfs", "/run")
        os.makedirs("/run/netns", exist_ok=True)
        sh("ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "link", "set", BRIDGE, "up")

    def _ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        sh("ip", "link", "set", "lo", "up", ns=name)
        _guard_leaks(name, self.lan_beacon)

    def _wire_to_bridge(self, ns: str, address: str) -> None:
        self._count += 1
        outer = f"v{self._count}"
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", "wan", "netns", ns)
        sh("ip", "link", "set", outer, "master", BRIDGE, "up")
        sh("ip", "addr", "add", f"{address}/24", "dev", "wan", ns=ns)
        sh("ip", "link", "set", "wan", "up", ns=ns)

    def public(self, name: str, tcp_blocked: bool = False) -> Host:
        """A host on the lab's internet; ``tcp_blocked``: its firewall drops inbound TCP connections."""
        index = len(self.hosts)
        address = f"10.201.0.{10 + index}"
        self._ns(name)
        self._wire_to_bridge(name, address)
        sh("ip", "route", "add", "default", "dev", "wan", ns=name)  # so a stray send reaches the leak counter
        if tcp_blocked:
            sh("iptables", "-A", "INPUT", "-p", "tcp", "--syn", "-j", "DROP", ns=name)
        host = Host(name, address, "public-tcp-blocked" if tcp_blocked else "public")
        self.hosts[name] = host
        return host

    def natted(self, name: str, kind: str, udp_port: int = 0, tcp_blocked: bool = False) -> Host:
        """A host behind its own router doing ``kind`` NAT (``full`` forwards ``udp_port`` to it); ``tcp_blocked``:
        its firewall drops every TCP packet in and out (off loopback), so only UDP gets through."""
        if kind not in NAT_KINDS:
            raise ValueError(f"NAT kind {kind!r}: one of {NAT_KINDS}")
        if kind == "full" and not udp_port:
            raise ValueError("a full-cone NAT needs the host's UDP port to forward")
        index = len(self.hosts)
        router, wan, lan = f"r-{name}", f"10.201.0.{100 + index}", f"10.201.{index + 1}"
        self._ns(router)
        self._wire_to_bridge(router, wan)
        # The home network, one or more hosts. Without snooping the bridge sends no IGMP of its own (off the range).
        sh("ip", "link", "add", "lan", "type", "bridge", "mcast_snooping", "0", ns=router)
        sh("ip", "addr", "add", f"{lan}.1/24", "dev", "lan", ns=router)
        sh("ip", "link", "set", "lan", "up", ns=router)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=router)
        masquerade = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"]
        sh(*masquerade, *(["--random-fully"] if kind == "symmetric" else []), ns=router)
        if kind == "full":
            sh("iptables", "-t", "nat", "-A", "PREROUTING", "-i", "wan", "-p", "udp", "--dport", str(udp_port),
               "-j", "DNAT", "--to-destination", f"{lan}.2:{udp_port}", ns=router)
        # Unsolicited inbound traffic is dropped, as a home router does: connections to it time out.
        for chain in ("INPUT", "FORWARD"):
            sh("iptables", "-A", chain, "-i", "wan", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED,DNAT",
               "-j", "ACCEPT", ns=router)
            sh("iptables", "-A", chain, "-i", "wan", "-j", "DROP", ns=router)
        host = self._home(name, kind, router, wan, lan)
        if tcp_blocked:
            sh("iptables", "-A", "OUTPUT", "-p", "tcp", "!", "-o", "lo", "-j", "DROP", ns=name)
            sh("iptables", "-A", "INPUT", "-p", "tcp", "!", "-i", "lo", "-j", "DROP", ns=name)
        return host

    def behind(self, name: str, other: str) -> Host:
        """Another host on ``other``'s home network, behind the same router (no hairpinning: the two reach each
        other only by their own addresses, which nobody outside knows)."""
        first = self.hosts[other]
        if first.router is None or first.public_address is None:
            raise ValueError(f"{other} is not behind a NAT")
        return self._home(name, first.kind, first.router, first.public_address, first.address.rsplit(".", 1)[0])

    def _home(self, name: str, kind: str, router: str, wan: str, lan: str) -> Host:
        """Host ``name`` on ``router``'s home network ``lan``.0/24, at the next free address from .2 up."""
        address = f"{lan}.{2 + sum(h.router == router for h in self.hosts.values())}"
        self._ns(name)
        self._count += 1
        leg = f"h{self._count}"
        sh("ip", "link", "add", leg, "netns", router, "type", "veth", "peer", "name", "eth0", "netns", name)
        sh("ip", "link", "set", leg, "master", "lan", "up", ns=router)
        sh("ip", "addr", "add", f"{address}/24", "dev", "eth0", ns=name)
        sh("ip", "link", "set", "eth0", "up", ns=name)
        sh("ip", "route", "add", "default", "via", f"{lan}.1", ns=name)
        host = Host(name, address, kind, router=router, public_address=wan)
        self.hosts[name] = host
        return host

    def spawn(self, host: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(log, "wb")  # the child writes it until it ends
        proc = subprocess.Popen([_tool("ip") or "ip", "netns", "exec", host, *argv], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def leaks(self) -> dict[str, int]:
        """Packets each namespace tried to send outside the test range and loopback (all dropped)."""
        out: dict[str, int] = {}
        for ns in dict.fromkeys([*self.hosts, *(h.router for h in self.hosts.values() if h.router)]):
            assert ns is not None
            text = sh("iptables", "-L", LEAK_CHAIN, "-v", "-n", "-x", ns=ns)
            out[ns] = sum(int(line.split()[0]) for line in text.splitlines()[2:] if "DROP" in line)
        return out

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _guard_leaks(ns: str, lan_beacon: bool = False) -> None:
    sh("iptables", "-N", LEAK_CHAIN, ns=ns)
    sh("iptables", "-A", LEAK_CHAIN, "-d", TEST_RANGE, "-j", "RETURN", ns=ns)
    if lan_beacon:  # quinkgl's LAN discovery group, and the IGMP reports that join it: on the lab's bridge only
        sh("iptables", "-A", LEAK_CHAIN, "-d", LAN_GROUP, "-p", "udp", "--dport", str(LAN_PORT), "-o", "wan", "-j", "RETURN", ns=ns)
        sh("iptables", "-A", LEAK_CHAIN, "-p", "igmp", "-o", "wan", "-j", "RETURN", ns=ns)
    sh("iptables", "-A", LEAK_CHAIN, "-o", "lo", "-j", "RETURN", ns=ns)
    sh("iptables", "-A", LEAK_CHAIN, "-j", "DROP", ns=ns)
    sh("iptables", "-A", "OUTPUT", "-j", LEAK_CHAIN, ns=ns)
    sh("iptables", "-A", "FORWARD", "-j", LEAK_CHAIN, ns=ns)


def write_result(path: Path, result: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    tmp.replace(path)


if __name__ == "__main__":  # a smoke check, as root: python tests/natlab.py
    if os.environ.get("QGL_NATLAB") != "1":
        done = sandbox([sys.executable, __file__], 60, env={**os.environ, "QGL_NATLAB": "1"})
        print(done.stdout, done.stderr, sep="")
        raise SystemExit(done.returncode)
    lab = Lab()
    seed = lab.public("seed")
    a = lab.natted("a", "symmetric")
    echo = ("import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('0.0.0.0',9000));"
            "d,a=s.recvfrom(99);s.sendto(repr(a).encode(),a)")
    server = subprocess.Popen([_tool("ip") or "ip", "netns", "exec", "seed", sys.executable, "-c", echo])
    ask = ("import socket,time;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(2);time.sleep(0.3);"
           f"s.sendto(b'x',('{seed.address}',9000));print('seen as',s.recvfrom(99)[0].decode())")
    print(sh(sys.executable, "-c", ask, ns="a"), end="")
    server.wait(5)
    print("leaks", lab.leaks())

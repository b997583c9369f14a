"""`quinkgl_cli.validation`: the one set of rules for node ids, listen addresses, ports and peer addresses."""

from __future__ import annotations

import pytest

from quinkgl_cli import validation
from quinkgl_cli.errors import ExitCode, UsageError
from quinkgl_cli.manifest.create import build_manifest


@pytest.mark.parametrize("value", ["peer-1", "a", "A.b_c-9", "x" * validation.MAX_NODE_ID])
def test_valid_node_ids(value: str) -> None:
    assert validation.node_id(value) == value and validation.is_node_id(value)


@pytest.mark.parametrize("value", ["", "-peer", "bad id", "a=b", "tab\tid", "é", "x" * (validation.MAX_NODE_ID + 1)])
def test_invalid_node_ids(value: str) -> None:
    assert not validation.is_node_id(value)
    with pytest.raises(UsageError, match="--node-id") as exc:
        validation.node_id(value)
    assert exc.value.code == ExitCode.USAGE


def test_listen_address_is_ipv4() -> None:
    assert validation.listen_address(" 0.0.0.0 ") == "0.0.0.0"
    assert validation.listen_address("localhost") == validation.listen_address("LocalHost.") == "127.0.0.1"
    for bad, why in (("::1", "not IPv4"), ("localhost6", "not an IP address"), ("127.0.0.256", "not an IP address")):
        with pytest.raises(UsageError, match=why):
            validation.listen_address(bad)


def test_ports() -> None:
    assert validation.listen_port(0) == 0 and validation.listen_port(65535) == 65535
    for bad in (-1, 65536):
        with pytest.raises(UsageError, match="0-65535"):
            validation.listen_port(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:7001", ("127.0.0.1", 7001)), ("localhost:7001", ("127.0.0.1", 7001)), (" peer.example.org:9 ", ("peer.example.org", 9)), ("host-1:65535", ("host-1", 65535))],
)
def test_peer_addresses(text: str, expected: tuple[str, int]) -> None:
    assert validation.peer_address(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", ":7001", "[::1]:7001", "a b:1", "1.2.3:7001", "h:x"])
def test_bad_peer_addresses(text: str) -> None:
    with pytest.raises(UsageError, match="--bootstrap-peer"):
        validation.peer_address(text)


def test_loopback_rule() -> None:
    validation.reachable_peers("127.0.0.1", [("127.0.0.2", 1)])
    validation.reachable_peers("0.0.0.0", [("10.0.0.1", 1)], lan_discovery=True, public_bootstrap=True)
    with pytest.raises(UsageError, match="not on loopback"):
        validation.reachable_peers("127.0.0.1", [("10.0.0.1", 7001)])
    with pytest.raises(UsageError, match="not on loopback"):
        validation.reachable_peers("127.0.0.1", [("peer.example.org", 7001)])  # names are not resolved to decide
    with pytest.raises(UsageError, match="non-loopback listen"):
        validation.reachable_peers("127.0.0.1", [], lan_discovery=True)


def test_manifest_bootstrap_peers_follow_the_same_rule() -> None:
    common = dict(name="s", task_type="class", input_shape="4", output_shape="2", label_type="integer",
                  framework="pytorch", arch_hash="sha256:" + "0" * 64, aggregation="FedAvg", topology="RandomTopology")
    assert build_manifest(**common, bootstrap_peers=["10.0.0.5:7001"]).bootstrap_peers == ("10.0.0.5:7001",)
    with pytest.raises(UsageError, match="bootstrap"):
        build_manifest(**common, bootstrap_peers=["[::1]:7001"])

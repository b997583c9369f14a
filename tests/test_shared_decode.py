"""One payload object that several recipients in one process received (the memory transport's sends) is decoded
once (`ModelReceived.shared`, `Exchange._decoded`), and no recipient's decoded update is another's."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
from torch import nn

from quinkgl_cli import wire
from quinkgl_cli.node.core import Node, NodeConfig
from quinkgl_cli.tensors import flatten
from quinkgl_cli.transport.base import DecodeSlot, ModelReceived
from quinkgl_cli.transport.memory import MemoryNetwork, MemoryTransport
from tests.test_node_core import H, data, manifest
from tests.test_transport_memory import _swarm, _upd


def _node(net: MemoryNetwork, node_id: str, seed: int, model: nn.Module | None = None,
          max_update_bytes: int | None = None) -> Node:
    torch.manual_seed(seed)
    model = model or nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    train, val = data(seed, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    transport = MemoryTransport(net, node_id, swarm_id="s", arch_hash=H)
    node = Node(NodeConfig(node_id, rounds=3, seed=seed, max_update_bytes=max_update_bytes), manifest(), "sha256:swarm",
                model, train, val, opt, transport, clock=lambda: 0.0)
    transport.start_sync(node)
    return node


def _payload(node: Node, extra: torch.Tensor | None = None) -> bytes:
    state = node.model.state_dict()
    tensors = {s.name: state[s.name] for s in node.specs}
    if extra is not None:
        tensors["extra.control"] = extra
    return wire.encode(tensors, meta={"step": 0, "tags": ["a", "b"]})


def _received(payload: bytes, slot: DecodeSlot | None, sender: str = "a") -> ModelReceived:
    return ModelReceived(sender, 1, payload, 10, "qgl-tensors/1", {"step": 0}, 0.0, shared=slot)


def test_every_recipient_of_one_send_gets_the_same_slot_and_a_new_payload_a_new_one() -> None:
    net, nodes, _ = _swarm(3)
    net.deliver_all()
    sender = nodes["p0"][0]
    first = _upd(1)
    for peer in ("p1", "p2"):
        sender.send_model(peer, first)
    net.deliver_all()
    sender.send_model("p1", _upd(2, payload=b"y" * 100))
    net.deliver_all()
    (one, later), (two,) = nodes["p1"][1].models, nodes["p2"][1].models
    assert one.shared is not None and one.shared is two.shared
    assert later.shared is not None and later.shared is not one.shared


def test_the_sender_does_not_keep_the_slot_alive_once_its_recipients_let_go() -> None:
    # What the first recipient decoded is freed with the last recipient's update, not at the sender's next send.
    net, nodes, _ = _swarm(3)
    net.deliver_all()
    update = _upd(1)
    for peer in ("p1", "p2"):
        nodes["p0"][0].send_model(peer, update)
    net.deliver_all()
    slot = weakref.ref(nodes["p1"][1].models[0].shared)
    nodes["p1"][1].models.clear()
    gc.collect()
    assert slot() is not None  # p2 still holds its update
    nodes["p2"][1].models.clear()
    gc.collect()
    assert slot() is None


def test_recipients_of_one_send_decode_it_once_to_the_senders_values(monkeypatch: pytest.MonkeyPatch) -> None:
    net = MemoryNetwork(auto_deliver=False)
    a, b, c = (_node(net, name, i) for i, name in enumerate("abc"))
    net.deliver_all()
    for n in (a, b, c):
        n.begin_round()
    calls: list[Any] = []
    decode = wire.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return decode(*args, **kwargs)

    monkeypatch.setattr(wire, "decode", counting)
    a.share(0)
    net.deliver_all()
    (got_b,), (got_c,) = b.inbox.take_all(), c.inbox.take_all()
    ub, uc = b.decode_update(got_b), c.decode_update(got_c)
    assert len(calls) == 1
    assert torch.equal(ub.flat, flatten(a.model)) and torch.equal(uc.flat, flatten(a.model))


def test_a_recipient_changing_its_update_changes_no_other_recipients() -> None:
    net = MemoryNetwork(auto_deliver=False)
    a, b, c = (_node(net, name, i) for i, name in enumerate("abc"))
    control = torch.arange(5, dtype=torch.float32)
    slot = DecodeSlot()
    payload = _payload(a, control)
    first = b.decode_update(_received(payload, slot))
    first.flat.add_(1.0)
    first.extras["control"].mul_(-1.0)
    first.meta["step"] = 99
    first.meta["tags"].append("changed")
    second = c.decode_update(_received(payload, slot))
    assert slot.key is not None  # decoded once, for both
    assert torch.equal(second.flat, flatten(a.model)) and torch.equal(second.extras["control"], control)
    assert second.meta["step"] == 0 and second.meta["tags"] == ["a", "b"]
    second.flat.zero_()
    assert torch.equal(first.flat, flatten(a.model) + 1.0)  # nor does the second change the first's


def test_a_slot_filled_under_other_decode_settings_is_decoded_again() -> None:
    # A recipient whose model or size limit differs may refuse what another accepted: it never takes its result.
    net = MemoryNetwork(auto_deliver=False)
    a, b = _node(net, "a", 0), _node(net, "b", 1)
    narrow = _node(net, "n", 2, model=nn.Sequential(nn.Linear(4, 3)))
    tight = _node(net, "t", 3, max_update_bytes=64)
    slot = DecodeSlot()
    payload = _payload(a)
    assert torch.equal(b.decode_update(_received(payload, slot)).flat, flatten(a.model))
    for other in (narrow, tight):
        with pytest.raises(wire.WireError):
            other.decode_update(_received(payload, slot))


def test_bytes_that_fail_a_check_are_refused_by_every_recipient_and_not_kept() -> None:
    net = MemoryNetwork(auto_deliver=False)
    a, b, c = (_node(net, name, i) for i, name in enumerate("abc"))
    bad = flatten(a.model)
    bad[0] = float("nan")
    nan_model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    torch.nn.utils.vector_to_parameters(bad, nan_model.parameters())
    state = nan_model.state_dict()
    payload = wire.encode({s.name: state[s.name] for s in a.specs}, meta={"step": 0})
    slot = DecodeSlot()
    for node in (b, c):
        with pytest.raises(wire.WireError, match="NaN"):
            node.decode_update(_received(payload, slot))
    assert slot.key is None and slot.value is None

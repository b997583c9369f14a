"""Manifest building, canonical bytes, signatures and strict loading (no trust policy: see test_trust.py)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from quinkgl_cli import keys
from quinkgl_cli.errors import CryptoError, QuinkglError, UsageError
from quinkgl_cli.manifest.canonical import canonical_bytes, data_schema_hash, swarm_id
from quinkgl_cli.manifest.create import build_manifest, parse_expires, parse_shape
from quinkgl_cli.manifest.io import MAX_MANIFEST_BYTES, load_manifest, manifest_bytes, parse_manifest
from quinkgl_cli.manifest.signing import verify_signature
from quinkgl_cli.manifest.trust import load_trusted
from tests.helpers_manifest import ARCH, NOW, make_manifest, write, write_obj


def test_build_normalizes_inputs() -> None:
    m = make_manifest(
        aggregation="krum",
        topology="cyclontopology",
        aggregation_params={"f": "1"},
        topology_params={"view_size": "5"},
        task_type="regr",
        label_type="float",
        arch_hash=ARCH.upper().replace("SHA256", "sha256"),
        expires_at="2030-01-01",
        compression_params={"quantize_bits": "8", "lossless": "zstd", "top_k_ratio": "0.25"},
        training_params={"local_epochs": "3"},
        privacy_params={"dp_epsilon": 2.0},
        bootstrap_peers=["127.0.0.1:7001"],
        round_limit=50,
        byzantine_f=1,
    )
    assert (m.aggregation.name, m.aggregation.params) == ("Krum", {"f": 1})
    assert (m.topology.name, m.topology.params) == ("CyclonTopology", {"view_size": 5})
    assert m.task.type == "regression" and m.task.input_shape == (1, 8, 8)
    assert m.model.arch_hash == ARCH
    assert m.expires_at is not None and m.expires_at.isoformat() == "2030-01-01T23:59:59+00:00"
    assert m.compression.quantize_bits == 8 and m.compression.lossless == "zstd" and m.compression.top_k_ratio == 0.25
    assert m.training.local_epochs == 3 and m.privacy.dp_epsilon == 2.0
    assert m.created_at == NOW and m.data_schema_hash == data_schema_hash(m.task)
    assert m.signature is None and m.creator_pubkey is None


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"aggregation": "NoSuchAgg"}, "valid: FedAvg"),
        ({"topology": "Star"}, "RandomTopology"),
        ({"aggregation_params": {"bogus": "1"}}, "bogus"),
        ({"aggregation_params": {"max_weight_ratio": "abc"}}, "max_weight_ratio"),
        ({"task_type": "clustering"}, "--task-type"),
        ({"label_type": "str"}, "--label-type"),
        ({"framework": "jax"}, "--model-framework"),
        ({"arch_hash": "sha256:1234"}, "--model-arch-hash"),
        ({"input_shape": "1,0,28"}, "--input-shape"),
        ({"output_shape": "ten"}, "--output-shape"),
        ({"name": "has space"}, "--name"),
        ({"round_limit": 0}, "--round-limit"),
        ({"byzantine_f": -1}, "--byzantine-f"),
        ({"bootstrap_peers": ["nohost"]}, "--bootstrap-peer"),
        ({"expires_at": "2020-01-01"}, "in the past"),
        ({"expires_at": "soon"}, "--expires-at"),
        ({"compression_params": {"quantize_bits": "4"}}, "--compression-param quantize_bits"),
        ({"training_params": {"nope": "1"}}, "--training-param nope"),
        ({"privacy_params": {"dp_epsilon": -1.0}}, "dp_epsilon"),
        # Numbers JSON (RFC 8785) cannot hold exactly, or at all: refused with the flag, never a traceback.
        ({"input_shape": "99999999999999999999"}, "--input-shape"),
        ({"input_shape": "9007199254740993"}, "--input-shape"),
        ({"output_shape": "10,9007199254740993"}, "--output-shape"),
        ({"round_limit": 99999999999999999999}, "--round-limit"),
        ({"training_params": {"local_steps": "9007199254740993"}}, "--training-param local_steps"),
        ({"aggregation": "Krum", "aggregation_params": {"f": "99999999999999999999"}}, "Krum parameter f"),
        ({"aggregation_params": {"max_weight_ratio": "inf"}}, "finite"),
        ({"aggregation_params": {"max_weight_ratio": "nan"}}, "finite"),
        ({"topology": "AffinityTopology", "topology_params": {"edge_ttl": "9007199254740993"}}, "edge_ttl"),
        ({"compression_params": {"top_k_ratio": "0.1", "residual_norm_cap": "inf"}}, "residual_norm_cap"),
        ({"privacy_params": {"dp_epsilon": float("inf")}}, "finite"),
        ({"privacy_params": {"dp_epsilon": 1.0, "dp_clip_norm": "inf"}}, "finite"),
    ],
)
def test_build_rejects_bad_input_with_one_line(override: dict[str, Any], needle: str) -> None:
    with pytest.raises(UsageError) as info:
        make_manifest(**override)
    assert needle in info.value.one_line()
    assert "\n" not in info.value.one_line()


@pytest.mark.parametrize(
    "override, needle",
    [
        # Settings that would do nothing: refused even when given with their default value.
        ({"privacy_params": {"dp_delta": "1e-4"}}, "--dp-delta needs --dp-epsilon"),
        ({"privacy_params": {"dp_clip_norm": 1.0}}, "--dp-clip-norm needs --dp-epsilon"),
        ({"privacy_params": {"dp_total_epsilon": 8.0}}, "--dp-total-epsilon needs --dp-epsilon"),
        ({"privacy_params": {"dp_delta": 1e-6, "dp_total_epsilon": 8.0}}, "--dp-delta, --dp-total-epsilon need --dp-epsilon"),
        ({"compression_params": {"error_feedback": "true"}}, "error_feedback does nothing while compression is off"),
        ({"compression_params": {"error_feedback": "false"}}, "error_feedback does nothing while compression is off"),
        ({"compression_params": {"ef21_momentum": "0.5"}}, "ef21_momentum does nothing"),
        ({"compression_params": {"residual_norm_cap": "2", "block_size": "64"}}, "residual_norm_cap, block_size do nothing"),
        ({"compression_params": {"delta": "false"}}, "delta does nothing"),
        # A setting that would break privacy.
        ({"aggregation": "scaffold", "privacy_params": {"dp_epsilon": 4.0}}, "Scaffold cannot be combined with local DP"),
    ],
)
def test_settings_that_do_nothing_or_break_privacy_are_refused(override: dict[str, Any], needle: str) -> None:
    with pytest.raises(UsageError) as info:
        make_manifest(**override)
    assert needle in info.value.one_line() and "\n" not in info.value.one_line()
    assert "Value error" not in info.value.one_line()


def test_tuning_of_stages_that_are_on_is_accepted() -> None:
    m = make_manifest(
        aggregation="Scaffold",
        compression_params={"top_k_ratio": "0.1", "error_feedback": "true", "ef21_momentum": "0.5", "residual_norm_cap": "2", "block_size": "64"},
    )
    assert m.compression.ef21_momentum == 0.5 and m.aggregation.name == "Scaffold"
    m = make_manifest(compression_params={"lossless": "zstd", "delta": "false"},
                      privacy_params={"dp_epsilon": 2.0, "dp_delta": 1e-6, "dp_clip_norm": 0.5, "dp_total_epsilon": 20.0})
    assert (m.privacy.dp_delta, m.privacy.dp_clip_norm, m.privacy.dp_total_epsilon) == (1e-6, 0.5, 20.0)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda o: o["compression"].update(error_feedback=False), "field compression: error_feedback does nothing"),
        (lambda o: o["compression"].update(residual_norm_cap=2.0), "field compression: residual_norm_cap does nothing"),
        (lambda o: o["privacy"].update(dp_total_epsilon=8.0), "field privacy: dp_total_epsilon needs dp_epsilon"),
        (lambda o: (o["privacy"].update(dp_epsilon=4.0), o.update(aggregation={"name": "Scaffold", "params": {}})),
         "Scaffold cannot be combined with local DP"),
    ],
)
def test_files_with_such_settings_are_refused(tmp_path: Path, edit: Any, needle: str) -> None:
    obj = json.loads(manifest_bytes(make_manifest(key=keys.generate())))
    edit(obj)
    with pytest.raises(UsageError) as info:
        load_manifest(write_obj(tmp_path / "x.qgl", obj))
    assert needle in info.value.one_line() and "Value error" not in info.value.one_line()


def test_parse_helpers() -> None:
    assert parse_shape("1,28,28", "--input-shape") == (1, 28, 28)
    assert parse_shape("(3, 32, 32)", "--input-shape") == (3, 32, 32)
    assert parse_shape("10", "--output-shape") == (10,)
    assert parse_expires("2026-12-31T10:00:00+02:00", NOW).isoformat() == "2026-12-31T08:00:00+00:00"
    assert parse_expires("2026-12-31T10:00", NOW).isoformat() == "2026-12-31T10:00:00+00:00"


def test_canonical_bytes_ignore_layout_and_order(tmp_path: Path) -> None:
    key = keys.generate()
    m = make_manifest(key=key)
    obj = json.loads(manifest_bytes(m))
    reordered = dict(reversed(list(obj.items())))
    compact = tmp_path / "compact.qgl"
    compact.write_text(json.dumps(reordered, separators=(",", ":"), sort_keys=True))
    pretty = write(tmp_path / "pretty.qgl", m)
    a, b = load_manifest(compact), load_manifest(pretty)
    assert a.canonical == b.canonical == canonical_bytes(m)
    assert a.swarm_id == b.swarm_id == swarm_id(m)
    assert verify_signature(a.canonical, a.manifest.creator_pubkey, a.manifest.signature)
    # Number spelling is not content: 1.0 and 1 are the same JSON number under RFC 8785.
    obj["privacy"]["dp_clip_norm"] = 1
    assert load_manifest(write_obj(tmp_path / "int.qgl", obj)).swarm_id == a.swarm_id
    # The signature is not part of what it signs, and the swarm id does not depend on who signed.
    assert swarm_id(m) != swarm_id(make_manifest(key=keys.generate()))
    assert canonical_bytes(m) == canonical_bytes(m.model_copy(update={"signature": "00" * 64}))


def _leaves(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(obj, dict) and obj:
        return [leaf for k, v in obj.items() for leaf in _leaves(v, path + (k,))]
    if isinstance(obj, list) and obj:
        return [leaf for i, v in enumerate(obj) for leaf in _leaves(v, path + (i,))]
    return [path]


def _mutated(value: Any, path: tuple[Any, ...]) -> Any:
    """A different value of the same kind, valid for the schema wherever that is possible."""
    replacements = {
        "expires_at": "2031-01-01T00:00:00Z",
        "created_at": "2026-06-01T12:00:01Z",
        "round_limit": 7,
        "bootstrap_peers": ["127.0.0.1:7009"],
        "params": {"fanout": 4} if "topology" in path else {"max_weight_ratio": 3.0},
        "quantize_bits": 16 if value == 8 else 8,
        "lossless": "zlib",
        "membership": "certified",
        "arch_hash": "sha256:" + "cd" * 32,
        "type": "regression",
        "label_type": "float",
        "framework": "custom",
        "name": {"aggregation": "FedProx", "topology": "CyclonTopology"}.get(path[0], "demo2"),
    }
    if path[0] == "bootstrap_peers":
        return "127.0.0.1:7009"
    if path[-1] in replacements:
        return replacements[path[-1]]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2
    if isinstance(value, str):
        if value.startswith(("sha256:", "ed25519:")) or path[-1] == "signature":
            return value[:-1] + ("0" if value[-1] != "0" else "1")
        return value + "x"
    if value is None:
        return {"dp_epsilon": 1.0, "dp_total_epsilon": 8.0, "local_steps": 5, "top_k_ratio": 0.1, "qsgd_levels": 4,
                "ef21_momentum": 0.5, "residual_norm_cap": 2.0}.get(path[-1], 1)
    raise AssertionError(f"no mutation for {path}={value!r}")


def _set(obj: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    for part in path[:-1]:
        obj = obj[part]
    obj[path[-1]] = value


def test_every_field_tampered_in_turn_is_refused(tmp_path: Path) -> None:
    key = keys.generate()
    # Compression and DP on, so that changing any one of their settings still gives a schema-valid manifest.
    m = make_manifest(key=key, aggregation_params={"max_weight_ratio": "2.5"}, bootstrap_peers=["127.0.0.1:7001"],
                      expires_at="2030-01-01", round_limit=10, description="swarm",
                      compression_params={"lossless": "zstd"}, privacy_params={"dp_epsilon": 4.0})
    original = json.loads(manifest_bytes(m))
    pub = keys.public_key_text(key)
    leaves = _leaves(original)
    assert len(leaves) > 35
    by_signature = 0
    for leaf in leaves:
        obj = copy.deepcopy(original)
        current = obj
        for part in leaf:
            current = current[part]
        _set(obj, leaf, _mutated(current, leaf))
        assert obj != original, leaf
        path = write_obj(tmp_path / "t.qgl", obj)
        for policy, trusted in (("open", ()), ("pinned", (pub,)), ("tofu", ())):
            with pytest.raises(QuinkglError) as info:
                load_trusted(path, policy, trusted, tmp_path / "state", now=NOW)
            err = info.value
            # The privacy mode and its dp_sgd section only change together (test_dpsgd tampers with a signed
            # dp_sgd section): changed alone, either is a schema error before the signature is looked at.
            if leaf in (("schema_version",), ("privacy", "mode"), ("privacy", "dp_sgd")):
                assert isinstance(err, UsageError), (leaf, err.one_line())
            else:
                assert isinstance(err, CryptoError), (leaf, policy, err.one_line())
        by_signature += 1
    assert by_signature == len(leaves)
    # Untouched, the same file passes, so the refusals above came from the tampering.
    assert load_trusted(write_obj(tmp_path / "ok.qgl", original), "pinned", (pub,), now=NOW).signed


def test_added_field_is_refused(tmp_path: Path) -> None:
    obj = json.loads(manifest_bytes(make_manifest(key=keys.generate())))
    obj["task"]["extra"] = 1
    with pytest.raises(UsageError, match=r"field task\.extra"):
        load_manifest(write_obj(tmp_path / "x.qgl", obj))


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"{not json", "not valid JSON"),
        (b'{\n  "name": "trunc', "Unterminated string starting at (line 2, column 11)"),
        (b"[]", "not a JSON object"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"name": "a", "name": "b"}', "duplicate member"),
        (b'{"x": NaN}', "NaN"),
        (b"{}", "field"),
    ],
)
def test_malformed_files(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "bad.qgl"
    path.write_bytes(content)
    with pytest.raises(UsageError) as info:
        load_manifest(path)
    assert needle in info.value.one_line()


@pytest.mark.parametrize(
    "path, value",
    [
        (("task", "input_shape"), [99999999999999999999]),
        (("round_limit",), 2**53),
        (("aggregation", "params"), {"max_weight_ratio": 2**64}),
        (("aggregation", "params"), {"max_weight_ratio": -(2**60)}),
    ],
)
def test_numbers_outside_json_range_in_a_file_are_one_line_errors(tmp_path: Path, path: tuple[str, ...], value: Any) -> None:
    obj = json.loads(manifest_bytes(make_manifest()))
    _set(obj, path, value)
    with pytest.raises(UsageError) as info:
        load_trusted(write_obj(tmp_path / "n.qgl", obj), "open", now=NOW)
    assert "\n" not in info.value.one_line()


def test_canonicalization_failure_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="cannot be canonicalized"):
        canonical_bytes({"round_limit": 2**64})


def test_strict_types_no_string_numbers(tmp_path: Path) -> None:
    obj = json.loads(manifest_bytes(make_manifest()))
    obj["byzantine_f"] = "1"
    with pytest.raises(UsageError, match="byzantine_f"):
        load_manifest(write_obj(tmp_path / "s.qgl", obj))


def test_oversized_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.qgl"
    with open(path, "wb") as fh:
        fh.truncate(MAX_MANIFEST_BYTES + 1)
    with pytest.raises(UsageError, match="larger than 1 MiB"):
        load_manifest(path)
    if sys.platform.startswith("linux"):
        # A device reports size 0 and never ends: the read is bounded all the same.
        with pytest.raises(UsageError, match="larger than 1 MiB"):
            load_manifest(Path("/dev/zero"))


def test_missing_and_directory_are_io_errors(tmp_path: Path) -> None:
    from quinkgl_cli.errors import IOFailure

    with pytest.raises(IOFailure):
        load_manifest(tmp_path / "nope.qgl")
    with pytest.raises(IOFailure):
        load_manifest(tmp_path)


def test_inconsistent_data_schema_hash_is_refused(tmp_path: Path) -> None:
    m = make_manifest()
    bad = m.model_copy(update={"data_schema_hash": "sha256:" + "00" * 32})
    loaded = parse_manifest(manifest_bytes(bad))
    with pytest.raises(UsageError, match="data_schema_hash"):
        loaded.check_consistency()
    with pytest.raises(UsageError, match="data_schema_hash"):
        load_trusted(write(tmp_path / "d.qgl", bad), "open", now=NOW)


def test_data_schema_hash_covers_shapes_and_labels() -> None:
    base = make_manifest().data_schema_hash
    assert make_manifest(name="other", arch_hash="sha256:" + "11" * 32).data_schema_hash == base
    assert make_manifest(input_shape="1,8,9").data_schema_hash != base
    assert make_manifest(output_shape="9").data_schema_hash != base
    assert make_manifest(label_type="one_hot").data_schema_hash != base
    assert make_manifest(task_type="seg").data_schema_hash != base


def test_build_manifest_exported_lazily() -> None:
    import quinkgl_cli.manifest as pkg

    assert pkg.build_manifest is build_manifest
    with pytest.raises(AttributeError):
        pkg.no_such_name  # noqa: B018


def test_unknown_strategy_in_file_is_refused(tmp_path: Path) -> None:
    obj = json.loads(manifest_bytes(make_manifest()))
    obj["aggregation"]["name"] = "FedMagic"
    with pytest.raises(UsageError, match="unknown aggregation strategy"):
        load_trusted(write_obj(tmp_path / "u.qgl", obj), "open", now=NOW)
    obj["aggregation"] = {"name": "Krum", "params": {"f": "one"}}
    with pytest.raises(UsageError, match="Krum parameter f"):
        load_trusted(write_obj(tmp_path / "u.qgl", obj), "open", now=NOW)

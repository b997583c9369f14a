"""`quinkgl_cli.jsonsafe.loads_strict`: nesting bounded, whatever the brackets inside strings."""

import json

import pytest

from quinkgl_cli.jsonsafe import MAX_DEPTH, loads_strict


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


def test_nesting_up_to_the_bound_parses_and_one_level_more_is_refused() -> None:
    assert loads_strict(nested(MAX_DEPTH)) is not None
    with pytest.raises(ValueError, match="nested deeper"):
        loads_strict(nested(MAX_DEPTH + 1))
    with pytest.raises(ValueError, match="nested deeper"):
        loads_strict(json.dumps({"a": [{"b": json.loads(nested(MAX_DEPTH))}]}))


def test_many_brackets_inside_strings_or_side_by_side_are_not_depth() -> None:
    text = json.dumps({"name": "[" * 100, "rows": [[i] for i in range(100)]})
    assert loads_strict(text)["name"] == "[" * 100


def test_non_finite_numbers_are_still_refused() -> None:
    for text in ('{"x": NaN}', "[Infinity]", "1e400"):
        with pytest.raises(ValueError):
            loads_strict(text)

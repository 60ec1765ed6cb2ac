"""The one type rule of config values read from YAML (TrainingConfig and StudyConfig both use it)."""

from __future__ import annotations

import pytest

from moce_model.common.field_values import conformed


@pytest.mark.parametrize(
    ("value", "hint", "expected"),
    [
        (3, "int", 3),
        (3, "float", 3.0),
        (None, "int | None", None),
        ([1, 2], "tuple[int, ...]", (1, 2)),
        ([1, 2.5], "tuple[float, ...]", (1.0, 2.5)),
        (("a",), "tuple[str, ...]", ("a",)),
    ],
)
def test_values_of_the_hinted_type_are_kept_or_widened(value, hint, expected):
    result = conformed(value, eval(hint))
    assert result == expected and type(result) is type(expected)
    if isinstance(result, tuple):
        assert [type(item) for item in result] == [type(item) for item in expected]


@pytest.mark.parametrize(
    ("value", "hint", "message"),
    [
        (True, "int", "expected int"),  # a YAML `yes` is not a count
        ("3", "int", "expected int"),  # no string parsing: a quoted number is a mistake in the file
        (2.5, "int | None", "expected int or None"),
        ("q_proj", "tuple[str, ...]", "expected a list of str"),
        ([0, "a"], "tuple[int, ...]", "expected a list of int"),
        ([True], "tuple[int, ...]", "expected a list of int"),
    ],
)
def test_values_of_another_type_are_refused_saying_what_was_expected(value, hint, message):
    with pytest.raises(TypeError, match=f"^{message}$"):
        conformed(value, eval(hint))

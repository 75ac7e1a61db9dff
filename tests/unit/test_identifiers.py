"""Ids become host paths only when they follow containerd's identifier rules."""

from __future__ import annotations

import pytest

from shim import identifiers
from shim.errors import InvalidArgumentError


@pytest.mark.parametrize("value", ["abc", "a.b-c_d", "0", "x" * 76, "t-1a2b3c"])
def test_valid_ids_pass(value: str) -> None:
    assert identifiers.validate("container", value) == value


@pytest.mark.parametrize(
    "value", ["", "..", ".", "a/b", "../etc", "a..b", "-a", "a-", "a b", "x" * 77, "a\x00b"]
)
def test_ids_that_could_leave_a_directory_are_refused(value: str) -> None:
    with pytest.raises(InvalidArgumentError, match="container id"):
        identifiers.validate("container", value)

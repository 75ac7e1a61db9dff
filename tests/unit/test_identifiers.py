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


@pytest.mark.parametrize("value", ["abc\n", "a-b\n", "0\n"])
def test_an_id_with_a_trailing_newline_is_refused(value: str) -> None:
    with pytest.raises(InvalidArgumentError, match="sandbox id"):
        identifiers.validate("sandbox", value)


def test_the_guest_agent_refuses_an_id_with_a_trailing_newline() -> None:
    from guest.agent.config import check_id

    assert check_id("container", "abc") == "abc"
    with pytest.raises(InvalidArgumentError, match="container id"):
        check_id("container", "abc\n")

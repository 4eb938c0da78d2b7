"""The supplement's C_x{y} width notation: plain and LaTeX forms, round trips, and one-line errors that point
at the fault."""
from __future__ import annotations

import pytest

from simpnet_cli.errors import UserError
from simpnet_cli.nets.notation import NotationError, format_widths, parse_widths

EXPECTED = [41, 43, 70, 70, 70, 70, 85, 90]


def test_plain_form():
    assert parse_widths("C41, C43, C70{4}, C85, C90") == EXPECTED


def test_latex_form_equals_plain_form():
    latex = r"$C_{41}, C_{43}, C_{70}\{4\}, C_{85}, C_{90}$"
    assert parse_widths(latex) == EXPECTED
    assert parse_widths(latex) == parse_widths("C41, C43, C70{4}, C85, C90")


@pytest.mark.parametrize("text,want", [
    ("C_{41}", [41]),
    ("C_41", [41]),
    ("C{41}", [41]),
    ("C_{70}{3}", [70, 70, 70]),
    ("C_{70}\\{3\\}", [70, 70, 70]),
    ("C41,C43", [41, 43]),
    ("  C41 ,\tC43\n", [41, 43]),
    ("C5{1}", [5]),
])
def test_other_accepted_spellings(text, want):
    assert parse_widths(text) == want


@pytest.mark.parametrize("widths", [
    EXPECTED,
    [66, 64, 64, 64, 96, 96, 96, 96, 96, 144, 144, 178, 216],
    [7],
    [32, 32, 64, 32, 32],  # equal widths that are not adjacent stay separate terms
])
def test_format_round_trip(widths):
    text = format_widths(widths)
    assert parse_widths(text) == widths
    assert format_widths(parse_widths(text)) == text


def test_format_collapses_runs():
    assert format_widths(EXPECTED) == "C41, C43, C70{4}, C85, C90"
    assert format_widths([32, 32, 64, 32]) == "C32{2}, C64, C32"


@pytest.mark.parametrize("text", [
    "C70{4",        # unbalanced brace: never closed
    "C70}4",        # unbalanced brace: closed, never opened
    "C70{4}}",
    "C0",           # zero width
    "C-3",          # negative width
    "C70{0}",       # zero count
    "C70{-2}",      # negative count
    "C41; C43",     # stray characters
    "C41 x",
    "D41",
    "C41,,C43",
    "C41 C43",      # missing comma
    "C41,",         # trailing comma
    "C41, C43,",
    "",             # empty
    "   ",
    "$$",
])
def test_malformed_raises_notation_error_quoting_text(text):
    with pytest.raises(NotationError) as info:
        parse_widths(text)
    err = info.value
    assert isinstance(err, UserError)
    msg = str(err)
    assert repr(text) in msg, f"message does not quote the input: {msg}"
    assert f"position {err.pos + 1}" in msg, f"message does not name the (1-based) position: {msg}"
    assert 0 <= err.pos <= len(text)
    assert "\n" not in msg


@pytest.mark.parametrize("text,pos,why", [
    ("C70{4", 3, "unbalanced brace"),
    ("C70}4", 3, "unbalanced brace"),
    ("C0", 0, "width must be positive"),
    ("C-3", 0, "width must be positive"),
    ("C70{0}", 4, "repeat count must be positive"),
    ("C70{-2}", 4, "repeat count must be positive"),
    ("C41; C43", 3, "unexpected ';'"),
    ("C41 x", 4, "unexpected 'x'"),
    ("D41", 0, "unexpected 'D'"),
    ("C41, C43,", 8, "trailing comma"),
    ("", 0, "empty"),
])
def test_error_positions(text, pos, why):
    """``pos`` is 0-based into the user's text (LaTeX and spaces included); the message says ``pos + 1``."""
    with pytest.raises(NotationError) as info:
        parse_widths(text)
    assert info.value.pos == pos
    assert f"position {pos + 1}:" in str(info.value)
    assert why in str(info.value)


def test_error_position_counts_latex_characters():
    # The bad count sits at index 17 of the user's text, right after "$C_{41}, C_{70}\{".
    text = r"$C_{41}, C_{70}\{0\}$"
    with pytest.raises(NotationError) as info:
        parse_widths(text)
    assert info.value.pos == text.index(r"\{0") + 2 == 17
    assert "position 18:" in str(info.value)


def test_non_string_raises_notation_error():
    with pytest.raises(NotationError):
        parse_widths(None)  # type: ignore[arg-type]
    with pytest.raises(NotationError):
        parse_widths(41)  # type: ignore[arg-type]

"""The supplement's C_x{y} width notation.

``C41, C43, C70{4}`` and the LaTeX form ``$C_{41}, C_{43}, C_{70}\\{4\\}$`` both mean: a convolution
with 41 maps, one with 43, then four with 70. ``parse_widths`` turns either into ``[41, 43, 70, 70, 70, 70]``.
"""
from __future__ import annotations

import re

from simpnet_cli.errors import UserError


class NotationError(UserError):
    """A C_x{y} string that does not parse; the message quotes it and points at the fault."""

    def __init__(self, text: str, pos: int, why: str):
        self.text, self.pos = text, pos
        super().__init__(f"bad C_x{{y}} notation at position {pos + 1}: {why}: {text!r} (…{text[pos:pos + 8]!r})")


# One term after LaTeX has been stripped: C, optional "_", the width (optionally braced), optional {count}.
_TERM = re.compile(r"C_?(?:\{(?P<wb>-?\d+)\}|(?P<w>-?\d+))(?:\{(?P<n>-?\d+)\})?")


def _strip_latex(text: str) -> tuple[str, list[int]]:
    """Drop ``$``, ``\\`` before braces and whitespace; keep a map back to positions in ``text``."""
    out, where = [], []
    for i, ch in enumerate(text):
        if ch in "$ \t\n" or (ch == "\\" and text[i + 1:i + 2] in ("{", "}")):
            continue
        out.append(ch)
        where.append(i)
    return "".join(out), where


def parse_widths(text: str) -> list[int]:
    """Expand a C_x{y} string into one width per convolution layer."""
    if not isinstance(text, str):
        raise NotationError(str(text), 0, "expected a string such as 'C41, C70{4}'")
    split = re.search(r"\d\s+\d", text)
    if split:  # "C4 1" is not C41: spaces are allowed between terms only
        raise NotationError(text, split.start() + 1, "space inside a number")
    clean, where = _strip_latex(text)
    orig = lambda j: where[j] if j < len(where) else len(text)  # noqa: E731 - position in the user's text
    if not clean:
        raise NotationError(text, 0, "empty width list")
    widths: list[int] = []
    pos = 0
    while pos < len(clean):
        m = _TERM.match(clean, pos)
        if not m:
            if clean.count("{", 0, pos + 1) != clean.count("}", 0, pos + 1) or clean[pos] in "{}":
                raise NotationError(text, orig(pos), "unbalanced brace")
            raise NotationError(text, orig(pos), f"unexpected {clean[pos]!r}, expected a term like C64 or C64{{2}}")
        width = int(m["wb"] or m["w"])
        count = int(m["n"]) if m["n"] is not None else 1
        if width <= 0:
            raise NotationError(text, orig(m.start()), f"width must be positive, got {width}")
        if count <= 0:
            raise NotationError(text, orig(m.start("n")), f"repeat count must be positive, got {count}")
        widths += [width] * count
        pos = m.end()
        if pos < len(clean):
            if clean[pos] != ",":
                if clean[pos] in "{}":
                    raise NotationError(text, orig(pos), "unbalanced brace")
                raise NotationError(text, orig(pos), f"unexpected {clean[pos]!r} after a term, expected ','")
            pos += 1
            if pos == len(clean):
                raise NotationError(text, orig(pos - 1), "trailing comma")
    return widths


def format_widths(widths: list[int]) -> str:
    """The inverse of ``parse_widths``: runs of equal widths collapse into ``C{w}{n}``."""
    terms, i = [], 0
    while i < len(widths):
        j = i
        while j < len(widths) and widths[j] == widths[i]:
            j += 1
        terms.append(f"C{widths[i]}" + (f"{{{j - i}}}" if j - i > 1 else ""))
        i = j
    return ", ".join(terms)

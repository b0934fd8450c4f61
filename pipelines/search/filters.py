"""SQL metadata filters from clients, checked before they reach LanceDB.

A filter is a boolean SQL expression over the table's metadata columns (``category = 'sofa' AND
price < 300``). It is checked token by token: column names must be metadata columns, literals
strings or numbers, and only comparison, boolean, ``IN``, ``LIKE``, ``BETWEEN`` and ``IS [NOT] NULL``
syntax is allowed, so no client text can name the embedding or image columns, call functions or
smuggle a second statement. LanceDB then parses it; what it still refuses becomes a 400 as well.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pipelines.search.request import BadRequest

KEYWORDS = frozenset({"AND", "OR", "NOT", "IN", "IS", "NULL", "LIKE", "BETWEEN", "TRUE", "FALSE"})
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<comment>--|/\*)
      | (?P<string>'(?:[^']|'')*')
      | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
      | (?P<op><=|>=|<>|!=|=|<|>|\(|\)|,|-|\+)
      | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<quoted>`[A-Za-z_][A-Za-z0-9_]*`)
    )""",
    re.VERBOSE,
)


def check_filter(expr: str, columns: Iterable[str]) -> str:
    """Return ``expr`` when it only uses ``columns`` and the allowed syntax, else BadRequest."""
    allowed = set(columns)
    pos, depth, tokens = 0, 0, 0
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            raise BadRequest(
                f"`filter` has unexpected text at character {pos}: {expr[pos : pos + 20]!r}"
            )
        if m.group("comment"):
            raise BadRequest(f"`filter` may not contain comments (character {m.start('comment')})")
        pos, tokens = m.end(), tokens + 1
        if m.group("op") == "(":
            depth += 1
        elif m.group("op") == ")":
            depth -= 1
            if depth < 0:
                raise BadRequest("`filter` has an unmatched ')'")
        name = m.group("word") or (m.group("quoted") or "").strip("`")
        if name and name.upper() not in KEYWORDS or m.group("quoted"):
            if name not in allowed:
                raise BadRequest(
                    f"`filter` refers to {name!r}, which is not a metadata column; "
                    f"filterable columns: {sorted(allowed)}"
                )
    if depth:
        raise BadRequest("`filter` has an unmatched '('")
    if not tokens:
        raise BadRequest("`filter` is empty")
    return expr

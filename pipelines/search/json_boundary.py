"""The service's JSON boundary: a request body's bytes → plain Python values, or a
:class:`BadRequest` saying what was wrong and where, before any of it reaches a model or a table.

Python's ``json`` module accepts more than JSON and fails in ways that are not a client error: it
reads ``NaN`` and ``Infinity``, keeps the last of two equal keys, turns ``\\udc00`` into a lone
surrogate (which no UTF-8 encoder, tokenizer or LanceDB query takes), raises ``ValueError`` on an
integer of more than 4,300 digits and ``RecursionError`` on deep nesting (at a depth that depends
on the caller's stack). :func:`load_json` keeps to JSON as RFC 8259 and I-JSON (RFC 7493) define
it, within limits no search needs to approach:

- the body is UTF-8 (one leading byte order mark is ignored, as RFC 8259 allows);
- arrays and objects nest at most :data:`MAX_DEPTH` levels, and the body has at most
  :data:`MAX_TOKENS` strings, brackets and commas (checked on the bytes, before ``json`` builds
  anything);
- a number has at most :data:`MAX_NUMBER_DIGITS` digits and is finite (``1e999`` is refused);
- ``NaN``, ``Infinity`` and ``-Infinity`` are refused;
- no object repeats a key (parsers disagree on which one wins, so a proxy that checks a body
  could see another request than the service);
- no string, key included, holds a lone surrogate (``\\ud800``-``\\udfff`` unpaired).

Each refusal names the field as a path (``filter[0].a``) or the byte where it happened.
:func:`check_value` applies the same rules to a body that arrives already parsed (the export job's
query files). :func:`check_media_type` is the 415 for a body that is not declared as JSON.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 32
MAX_NUMBER_DIGITS = 64
# strings, brackets and commas: a search body has a few dozen; an 8 MB body of "[]," would make
# millions of lists (hundreds of MB) before anything could refuse it
MAX_TOKENS = 1000
# What a body may be declared as: JSON, a JSON-based type (application/problem+json), or nothing
# at all (FastAPI reads an undeclared body as JSON too).
JSON_MEDIA = re.compile(r"^application/(?:[\w.+-]+\+)?json$")
_SURROGATE = re.compile("[\ud800-\udfff]")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")
_BOM = b"\xef\xbb\xbf"
# a whole string, a run of openers, a run of closers, a comma, or an unterminated string's quote
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[{]+|[\]}]+|,|"', re.DOTALL)
_MAX_PATH_CHARS = 80


class BadRequest(ValueError):
    """A client error; ``str(err)`` is the message the client gets (status 400 unless set)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------ the media type
def check_media_type(content_type: str | None) -> None:
    """415 unless the body is declared as JSON (in UTF-8) or not declared at all."""
    if not content_type or not content_type.strip():
        return
    media, *params = (part.strip() for part in content_type.split(";"))
    if not JSON_MEDIA.match(media.lower()):
        raise BadRequest(
            f"Content-Type {content_type[:100]!r} is not JSON; send the body as application/json "
            "(with curl: -H 'Content-Type: application/json')",
            status=415,
        )
    for param in params:
        name, _, value = param.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            raise BadRequest(
                f"Content-Type {content_type[:100]!r}: JSON bodies are UTF-8, not {charset!r}",
                status=415,
            )


# ------------------------------------------------------------------------------ parsing
class _Refused:
    """What a parse hook returns in place of a value it will not make: the walk that follows
    raises it with the value's path (the hooks themselves do not know where they are)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


class _RepeatedKey(dict):
    """An object that gave ``key`` more than once (reported by the walk, with its path)."""

    def __init__(self, pairs: list, key: str):
        super().__init__(pairs)
        self.key = key


def _digits(literal: str) -> int:
    return len(literal) - sum(map(literal.count, "+-.eE"))  # str.count: C speed on long ones


def _parse_int(literal: str) -> int | _Refused:
    # checked before int(): Python refuses over 4,300 digits with a ValueError, and converting
    # thousands of digits is quadratic
    digits = _digits(literal)
    if digits > MAX_NUMBER_DIGITS:
        return _Refused(f"is a number with {digits} digits; the limit is {MAX_NUMBER_DIGITS}")
    return int(literal)


def _parse_float(literal: str) -> float | _Refused:
    digits = _digits(literal)
    if digits > MAX_NUMBER_DIGITS:
        return _Refused(f"is a number with {digits} digits; the limit is {MAX_NUMBER_DIGITS}")
    value = float(literal)
    if not math.isfinite(value):
        return _Refused(f"is a number out of range ({literal})")
    return value


def _parse_constant(name: str) -> _Refused:
    return _Refused(f"is {name}, which is not a JSON number")


def _object(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
    return _RepeatedKey(pairs, repeated)


def _decoded(raw: bytes, offset: int) -> str:
    """The body as text: UTF-8, strictly (no replacement characters, no other encodings)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = raw[err.start : err.end].hex(" ")
        raise BadRequest(
            f"request body is not valid UTF-8: byte {offset + err.start} ({bad}): {err.reason}"
        ) from None


def _too_large(what: str, at: int) -> BadRequest:
    return BadRequest(f"request body {what} (at byte {at})")


def _check_shape(raw: bytes, offset: int) -> None:
    """Refuse nesting past MAX_DEPTH and more than MAX_TOKENS tokens before ``json`` builds
    anything: how deep ``json`` itself can go depends on the caller's stack (its RecursionError
    would make the answer depend on where the parser ran). Linear, and at most MAX_TOKENS steps:
    each string is matched once, runs of brackets at a time; the scan stops at an unterminated
    string or an unmatched closer (``json`` reports those)."""
    depth = tokens = 0
    for token in _TOKENS.finditer(raw):
        start, first, run = token.start(), raw[token.start()], token.end() - token.start()
        if first == ord('"'):
            if run == 1:
                return
            run = 1
        elif first in b"[{":
            if depth + run > MAX_DEPTH:
                at = offset + start + MAX_DEPTH - depth
                raise _too_large(f"nests deeper than {MAX_DEPTH} levels", at)
            depth += run
        elif first in b"]}":
            depth -= run
            if depth < 0:
                return
        tokens += run
        if tokens > MAX_TOKENS:
            what = f"has more than {MAX_TOKENS} strings, brackets and commas"
            raise _too_large(what, offset + start)


def load_json(raw: bytes | str) -> Any:
    """A request body → its value, by the rules in the module docstring; BadRequest if not."""
    if isinstance(raw, str):  # what the same text would be as a body
        raw = raw.encode("utf-8", "surrogatepass")
    offset = len(_BOM) if raw.startswith(_BOM) else 0
    raw = raw[offset:]
    if not raw.strip(b" \t\r\n"):
        raise BadRequest("request body is empty; send a JSON object")
    text = _decoded(raw, offset)
    _check_shape(raw, offset)
    try:
        value = json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
            object_pairs_hook=_object,
        )
    except json.JSONDecodeError as err:
        raise BadRequest(f"request body is not valid JSON: {err}") from None
    check_value(value)
    return value


# ------------------------------------------------------------------------------ the walk
def _where(path: tuple) -> str:
    """``filter[0].name`` for a location in the body; keys that are no identifier are quoted
    (ASCII only: a message quoting a lone surrogate could not be encoded)."""
    if not path:
        return "the request body"
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENTIFIER.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part[:40])}]"
        if len(out) > _MAX_PATH_CHARS:
            return f"`{out[:_MAX_PATH_CHARS]}…`"
    return f"`{out}`"


def _lone_surrogate(value: str) -> str | None:
    """What is wrong with a string that holds a lone surrogate (``json`` pairs valid escapes)."""
    found = _SURROGATE.search(value)
    if found is None:
        return None
    return (
        f"has a lone surrogate \\u{ord(found.group()):04x} at character {found.start()} "
        "(a \\ud800-\\udfff escape must pair a high and a low surrogate)"
    )


def _check_object(value: dict, path: tuple, depth: int) -> None:
    if isinstance(value, _RepeatedKey):
        where = _where((*path, value.key))
        raise BadRequest(f"{where} is given more than once (an object's keys must be unique)")
    for key, item in value.items():
        problem = _lone_surrogate(key)
        if problem is not None:
            raise BadRequest(f"a key in {_where(path)} {problem}")
        _walk(item, (*path, key), depth)


def _walk(value: Any, path: tuple, depth: int) -> None:
    if isinstance(value, str):
        problem = _lone_surrogate(value)
        if problem is not None:
            raise BadRequest(f"{_where(path)} {problem}")
    elif isinstance(value, _Refused):
        raise BadRequest(f"{_where(path)} {value.reason}")
    elif isinstance(value, float) and not math.isfinite(value):  # from an already parsed body
        raise BadRequest(f"{_where(path)} is {value}, which is not a JSON number")
    elif isinstance(value, (dict, list)):
        if depth >= MAX_DEPTH:
            raise BadRequest(f"{_where(path)} is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            _check_object(value, path, depth + 1)
        else:
            for index, item in enumerate(value):
                _walk(item, (*path, index), depth + 1)


def check_value(value: Any) -> None:
    """The rules of :func:`load_json` that apply to an already parsed value (depth, finite
    numbers, no lone surrogates); BadRequest naming the first value that breaks one."""
    _walk(value, (), 0)

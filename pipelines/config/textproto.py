"""Protocol-buffer text format, read and edited without the .proto files, losing nothing.

A pipeline.config is text that users edit: comments, field order and spacing are theirs. This
module parses the text into a tree of fields that remember where they stand in it; reading and
writing back an unchanged file gives the same bytes, and an edit splices only the characters of
the field it changes (then the text is parsed again: configs are small).

Accepted syntax (all of it occurs in the Object Detection API's own configs): `name: value`,
`name { ... }`, `name: { ... }`, `name < ... >`, list values `name: [1, 2]`, `,` or `;` after a
field, `#` comments, single- or double-quoted strings (adjacent strings concatenate), numbers
such as `.08`, `1e-8`, `-4.6`, `2f`, and identifiers (enum values, true/false).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pipelines.workspace import UserError

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")
  | (?P<number>[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?[fF]?|inf(?:inity)?\b|nan\b))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[{}<>\[\]:,;])
  | (?P<bad>.)
""", re.X | re.S)
MAX_DEPTH = 100  # nesting of messages; the Object Detection API's configs nest about 8 deep
MAX_BYTES = 1_000_000  # the templates are ~6 KB, the largest Object Detection API configs ~10 KB


@dataclass
class Scalar:
    text: str  # as written, quotes included
    start: int
    end: int

    @property
    def value(self):
        t = self.text
        if t[0] in "'\"":
            return _unquote(t)
        if t in ("true", "True", "t"):
            return True
        if t in ("false", "False", "f"):
            return False
        if re.fullmatch(r"[-+]?\d+", t):
            return int(t)
        try:
            return float(t.rstrip("fF"))
        except ValueError:
            return t  # an enum value


@dataclass
class Field:
    name: str
    start: int  # first character of the name
    end: int  # one past the value (or closing brace), before any trailing , or ;
    values: list[Scalar] = field(default_factory=list)  # one, or several for `name: [a, b]`
    message: Message | None = None

    @property
    def value(self):
        if self.message is not None:
            raise TypeError(f"{self.name} is a message")
        return self.values[0].value if len(self.values) == 1 else [v.value for v in self.values]


@dataclass
class Message:
    fields: list[Field]
    open: int  # position of "{" (-1 for the top level)
    close: int  # position of "}" (len(text) for the top level)

    def all(self, name: str) -> list[Field]:
        return [f for f in self.fields if f.name == name]

    def first(self, name: str) -> Field | None:
        found = self.all(name)
        return found[0] if found else None


def _unquote(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(x[0-9a-fA-F]{2}|[0-7]{1,3}|.)", _unescape, body)


def _unescape(match: re.Match) -> str:
    s = match.group(1)
    simple = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b",
              "f": "\f", "v": "\v", "?": "?"}
    if s in simple:
        return simple[s]
    if s[0] == "x":
        return chr(int(s[1:], 16))
    if s[0].isdigit():
        return chr(int(s, 8))
    return "\\" + s


def quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class _Parser:
    def __init__(self, text: str, source: str):
        self.text = text
        self.source = source
        if len(text) > MAX_BYTES:
            raise UserError(source, f"{len(text) / 1e6:.1f} MB: larger than any pipeline.config "
                                    f"(limit {MAX_BYTES / 1e6:.0f} MB)")
        self.tokens = []  # (kind, text, start)
        append = self.tokens.append
        for m in _TOKEN.finditer(text):  # one pass, linear in the text
            kind = m.lastgroup
            if kind == "bad":
                self.fail(m.start(), f"unexpected character {m.group()!r}")
            if kind != "space" and kind != "comment":
                append((kind, m.group(), m.start()))
        self.i = 0
        self.depth = 0

    def fail(self, pos: int, message: str):
        line = self.text.count("\n", 0, pos) + 1
        column = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        raise UserError(self.source, f"line {line} column {column}: {message}")

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else (None, "", len(self.text))

    def take(self, *texts):
        kind, text, pos = self.peek()
        if texts and text not in texts:
            self.fail(pos, f"expected {' or '.join(repr(t) for t in texts)}, found {text or 'end of file'!r}")
        self.i += 1
        return kind, text, pos

    def message(self, open_pos: int, closer: str | None) -> Message:
        fields = []
        tokens, n = self.tokens, len(self.tokens)
        while True:
            if self.i >= n:
                if closer is None:
                    return Message(fields, open_pos, len(self.text))
                self.fail(len(self.text), f"expected a field name, found 'end of file'")
            kind, text, pos = tokens[self.i]
            if text == closer and kind == "punct":
                self.i += 1
                return Message(fields, open_pos, pos)
            if kind != "ident":
                self.fail(pos, f"expected a field name, found {text!r}")
            fields.append(self.field())
            if self.i < n and tokens[self.i][1] in (",", ";") and tokens[self.i][0] == "punct":
                self.i += 1

    def field(self) -> Field:
        tokens = self.tokens
        _, name, start = tokens[self.i]
        self.i += 1
        colon = self.i < len(tokens) and tokens[self.i][1] == ":" and tokens[self.i][0] == "punct"
        if colon:
            self.i += 1
        kind, text, pos = self.peek()
        if kind == "punct" and text in ("{", "<"):
            self.i += 1
            self.depth += 1
            if self.depth > MAX_DEPTH:
                self.fail(pos, f"messages nested more than {MAX_DEPTH} deep")
            msg = self.message(pos, "}" if text == "{" else ">")
            self.depth -= 1
            return Field(name, start, msg.close + 1, message=msg)
        if not colon:
            self.fail(pos, f"expected ':' or '{{' after {name!r}")
        if kind == "punct" and text == "[":
            self.i += 1
            values = []
            while self.peek()[1] != "]":
                values.append(self.scalar())
                if self.peek()[1] == ",":
                    self.i += 1
            _, _, close = self.take("]")
            return Field(name, start, close + 1, values=values)
        value = self.scalar()
        return Field(name, start, value.end, values=[value])

    def scalar(self) -> Scalar:
        kind, text, pos = self.peek()
        if kind == "string":
            self.i += 1
            end = pos + len(text)
            pieces = [text]
            while self.peek()[0] == "string":  # "a" "b" is "ab"
                _, more, more_pos = self.take()
                pieces.append(more)
                end = more_pos + len(more)
            if len(pieces) > 1:
                joined = "".join(_unquote(p) for p in pieces)
                return _JoinedScalar(quote(joined), pos, end)
            return Scalar(text, pos, end)
        if kind in ("number", "ident"):
            self.i += 1
            return Scalar(text, pos, pos + len(text))
        self.fail(pos, f"expected a value, found {text or 'end of file'!r}")


class _JoinedScalar(Scalar):
    """Adjacent strings: `text` holds them joined, start/end span all of them."""


class TextProto:
    """A parsed text-format file. `text` is always the current text; edits keep the rest as is."""

    def __init__(self, text: str, source: str = "<text>"):
        self.source = source
        self.text = text
        self.root = _Parser(text, source).message(-1, None)

    # --- reading --------------------------------------------------------------------------
    def find(self, path: str) -> list[Field]:
        """Every field at a dotted path; a repeated message on the way is searched in order."""
        parts = path.split(".")
        messages = [self.root]
        found: list[Field] = []
        for n, part in enumerate(parts):
            found = [f for m in messages for f in m.all(part)]
            if n < len(parts) - 1:
                messages = [f.message for f in found if f.message is not None]
        return found

    def get(self, path: str, default=None):
        found = self.find(path)
        if not found:
            return default
        return found[0].message if found[0].message is not None else found[0].value

    def get_all(self, path: str) -> list:
        out = []
        for f in self.find(path):
            out.extend([f.value] if len(f.values) == 1 else f.value)
        return out

    def has(self, path: str) -> bool:
        return bool(self.find(path))

    def message_names(self, path: str) -> list[str]:
        """The names of the fields inside the message at `path` (e.g. which oneof is set)."""
        found = self.find(path)
        return [f.name for f in found[0].message.fields] if found and found[0].message else []

    # --- editing --------------------------------------------------------------------------
    def _splice(self, start: int, end: int, new: str) -> None:
        self.text = self.text[:start] + new + self.text[end:]
        self.root = _Parser(self.text, self.source).message(-1, None)

    def set(self, path: str, value, *, every: bool = True) -> bool:
        """Set a scalar field (all occurrences at the path, or the first); False if absent.

        Only the value's characters change; a string keeps its quote style.
        """
        found = [f for f in self.find(path) if f.message is None]
        if not found:
            return False
        targets = found if every else found[:1]
        for f in sorted(targets, key=lambda f: f.start, reverse=True):
            old = f.values[0].text if f.values else '"'
            if len(f.values) == 1:
                self._splice(f.values[0].start, f.values[0].end, format_value(value, old))
            else:  # a list value: write it as one value
                self._splice(f.values[0].start - 1, f.values[-1].end + 1, format_value(value, old))
            # positions after the edit moved, but targets are processed from the end
        return True

    def rename(self, path: str, name: str) -> bool:
        """Rename the first field at the path (e.g. which member of a oneof is set); False if absent."""
        found = self.find(path)
        if not found:
            return False
        old = path.rsplit(".", 1)[-1]
        self._splice(found[0].start, found[0].start + len(old), name)
        return True

    def remove(self, path: str) -> int:
        """Remove every field at the path, with its line when it stands alone on it."""
        found = sorted(self.find(path), key=lambda f: f.start, reverse=True)
        for f in found:
            start, end = f.start, f.end
            rest = self.text[end:]
            m = re.match(r"[ \t]*[,;]?[ \t]*(#[^\n]*)?\n?", rest)
            line_start = self.text.rfind("\n", 0, start) + 1
            if self.text[line_start:start].strip() == "" and m and (m.group(0).endswith("\n") or end + m.end() == len(self.text)):
                start, end = line_start, end + m.end()
            self._splice(start, end, "")
        return len(found)

    def add(self, parent_path: str, name: str, value, after: str | None = None) -> None:
        """Add `name: value` inside the message at parent_path ('' = top level), on its own line,
        after the field named `after` when present, else at the end of the message."""
        if parent_path:
            parents = [f.message for f in self.find(parent_path) if f.message is not None]
            if not parents:
                raise KeyError(parent_path)
            parent = parents[0]
        else:
            parent = self.root
        anchor = parent.first(after) if after else None
        if anchor is None and parent.fields:
            anchor = parent.fields[-1]
        if anchor is not None:
            line_start = self.text.rfind("\n", 0, anchor.start) + 1
            indent = re.match(r"[ \t]*", self.text[line_start:]).group(0)
            pos = anchor.end
            m = re.match(r"[ \t]*[,;]?", self.text[pos:])
            pos += m.end()
            self._splice(pos, pos, f"\n{indent}{name}: {format_value(value, '')}")
        else:
            close = parent.close
            line_start = self.text.rfind("\n", 0, close) + 1
            outer = re.match(r"[ \t]*", self.text[line_start:]).group(0)
            self._splice(close, close, f"  {name}: {format_value(value, '')}\n{outer}")


def format_value(value, old_text: str = "") -> str:
    """A Python value as text format, in the style of the text it replaces."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        return text
    if isinstance(value, Enum):
        return value.name
    text = str(value)
    if old_text[:1] == "'":
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return quote(text)


class Enum:
    """An enum value to write bare (`activation: RELU_6`), not quoted."""

    def __init__(self, name: str):
        self.name = name

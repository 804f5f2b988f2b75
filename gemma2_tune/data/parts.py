"""What a conversation is made of, whatever the family's turn format: turns of parts (text, reasoning, tool calls,
tool responses, tool declarations), the rendered text with its supervised spans, and the row errors. Pure data;
turns.py (Gemma 2/3) and gemma4.py (Gemma 4) render them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence, Union

ROLE_NAMES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "model",
    "model": "model",
    "gpt": "model",
    "bot": "model",
}

SystemPolicy = Literal["fold", "drop", "error"]
class BadRow(ValueError):
    """A row that can't become a valid Gemma conversation; the message says why."""


def _unencodable(text: str) -> int | None:
    """Index of the first character UTF-8 cannot encode (a lone UTF-16 surrogate: half of an emoji, left by a
    cut or mis-encoded file), or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        return exc.start


@dataclass(frozen=True)
class Text:
    """Text in a turn, as rendered (already trimmed the way the family's template trims it)."""

    text: str


@dataclass(frozen=True)
class Reasoning:
    """A model's thought, written in Gemma 4's thought channel before what it answers (verbatim: not trimmed)."""

    text: str


@dataclass(frozen=True)
class ToolCall:
    """A call the model makes: a function name and its arguments (a JSON object; None: no arguments)."""

    name: str
    arguments: Mapping[str, Any] | None


@dataclass(frozen=True)
class ToolResponse:
    """What a tool returned to the model (from the environment: never supervised), as text."""

    name: str
    response: str


@dataclass(frozen=True)
class ToolDeclaration:
    """A tool the model may call, declared in the system turn: an OpenAI-style function (name, description,
    parameters as JSON Schema)."""

    function: Mapping[str, Any]


# What a turn is made of. Images and audio become parts of their own when media are trained.
Part = Union[Text, Reasoning, ToolCall, ToolResponse, ToolDeclaration]


@dataclass(frozen=True, init=False)
class Turn:
    """One turn: a role ('user', 'model'; Gemma 4 also 'system') and its parts in the order they are rendered.

    Gemma 2/3 turns are one Text part (system text already folded in); `Turn("user", "hi")` is
    `Turn("user", (Text("hi"),))`. A Gemma 4 model turn holds everything the model writes and reads until its
    `<turn|>`: reasoning, tool calls, the tool responses it reads, text.
    """

    role: Literal["system", "user", "model"]
    parts: tuple[Part, ...]

    def __init__(self, role: str, parts: str | Sequence[Part]):
        object.__setattr__(self, "role", role)
        object.__setattr__(self, "parts", (Text(parts),) if isinstance(parts, str) else tuple(parts))

    @property
    def text(self) -> str:
        """The turn's text parts, joined."""
        return "".join(p.text for p in self.parts if isinstance(p, Text))


@dataclass(frozen=True)
class Rendered:
    """A conversation as text, and the character spans [start, end) that are learned: each model turn's
    text and its <end_of_turn>."""

    text: str
    supervised: tuple[tuple[int, int], ...]

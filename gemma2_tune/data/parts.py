"""What a conversation is made of, whatever the family's turn format: turns of parts (text, images, reasoning, tool
calls, tool responses, tool declarations), the rendered text with its supervised spans, and the row errors; the
content-part types and how a message's mixed text and image parts become parts. Pure data; turns.py (Gemma 2/3) and
gemma4.py (Gemma 4) render them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence, Union

if TYPE_CHECKING:
    from ..families import Family

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
# OpenAI-style content parts that carry text (chat completions' "text"; the Responses API's input/output_text).
TEXT_PART_TYPES = ("text", "input_text", "output_text")
# Content parts that carry an image: OpenAI's chat completions ("image_url") and Responses API ("input_image"),
# Hugging Face's processors ("image"). data/images.py reads where each points.
IMAGE_PART_TYPES = ("image_url", "image", "input_image")
AUDIO_PART_TYPES = ("input_audio", "audio")
# Why audio is refused: Gemma 4 E2B/E4B load with their audio tower (kept, frozen), but no audio row is made into
# features here: the feature extractor's mel frames and the audio soft tokens are not built, and no tiny checkpoint
# with an audio tower checks them.
AUDIO_NOT_TRAINED = ("which is not trained: Gemma 4 E2B/E4B keep their audio tower (frozen), but gemma2-tune does "
                     "not turn audio into the audio tower's input features")


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


@dataclass(frozen=True)
class Image:
    """An image in a user turn, read and checked (data/images.py): the SHA-256 of its bytes (64 hex digits), its
    size in pixels, and where its bytes are: a local file (`path`, absolute; re-read and re-checked against the
    digest when its pixels are needed) or inline (`data`, from a data: URL). Rendered as the family's image
    placeholder, which the checkpoint's processor expands into the image's soft tokens."""

    digest: str
    width: int
    height: int
    path: str | None = None
    data: bytes | None = field(default=None, repr=False, compare=False)

    def describe(self) -> str:
        """'photo.png, 640x480 px' (a data: URL: 'inline image, ...')."""
        return f"{Path(self.path).name if self.path else 'inline image'}, {self.width}x{self.height} px"


# Reads an image content part into an Image; `where` names the part in errors. Raises BadRow (missing, unreadable,
# oversized, remote). data/images.py's ImageReader is one.
ReadImage = Callable[[Mapping[str, Any], str], Image]

# What a turn is made of. Audio becomes a part of its own when it is trained.
Part = Union[Text, Image, Reasoning, ToolCall, ToolResponse, ToolDeclaration]


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


def image_refusal(family: Family, images: ReadImage | None) -> str:
    """Why an image part is refused: the family reads no images, or this command reads none."""
    if family.images is None:
        return (f"{family.display} takes text only (image + text checkpoints such as Gemma 3 4B/12B/27B and Gemma 4 "
                "read images)")
    return ("this command reads text only (images are trained by sft, evaluated by eval, and taken by chat --image "
            "and serve)")


def content_parts(content: Any, where: str, family: Family, images: ReadImage | None) -> list[Text | Image] | None:
    """A content list holding at least one image part -> its parts in order, as the official Gemma 3 template
    writes them: each text part trimmed, images read by `images`, nothing between them (empty texts left out).
    None for anything else (a string, text parts only: `content_text`) and for a family that reads no images
    (`content_text` refuses the part, as a text model's template does). Raises BadRow for an image part when
    `images` is None (`image_refusal`), for an unreadable image, and for a part that is neither text nor image."""
    if family.images is None or not isinstance(content, list) or not any(
            isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES for p in content):
        return None
    parts: list[Text | Image] = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        at = f"{where} content part {k}"
        if kind in IMAGE_PART_TYPES:
            if images is None:
                raise BadRow(f"{at} is an image; {image_refusal(family, images)}")
            parts.append(images(part, at))
        elif kind in TEXT_PART_TYPES:
            if not isinstance(part.get("text"), str):
                raise BadRow(f"{at} ({kind}) has no 'text' string")
            if part["text"].strip():
                parts.append(Text(part["text"].strip()))
        elif kind in AUDIO_PART_TYPES:
            raise BadRow(f"{at} is audio ({kind}), {AUDIO_NOT_TRAINED}")
        else:
            raise BadRow(f"{at} is " + (f"of type {kind!r}" if kind is not None else "not a typed part")
                         + f"; parts are text ({', '.join(TEXT_PART_TYPES)}) or images ({', '.join(IMAGE_PART_TYPES)})")
    return parts

"""Conversations as turns made of parts, rendered in the family's turn format, and the supervision mask. Pure
functions; no torch.

Gemma 2 and Gemma 3 (`Family.turn_format` "gemma"), here:

    <bos><start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n{text}<end_of_turn>\n...

Gemma 4 ("gemma4": a native system role, a thought channel, tool calls and responses) in gemma4.py; `normalise`
and `render` hand a Gemma 4 family's conversations to it.

The format is rendered here, never by a checkpoint's own chat template (base checkpoints and local
conversions may have none, or another). Content is trimmed, as Gemma's official templates do.
Gemma has no system role: one policy (fold, drop, error) decides what happens to system messages,
and every place that renders the format calls `normalise` with it. How `fold` joins system text to the
first user turn is the family's (`Family.system_fold`): Gemma 2 joins trimmed system texts with blank
lines; Gemma 3's template takes one first system message verbatim plus a blank line.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from ..families import GEMMA2, Family
from ..families.gemma4_format import TURN_END as GEMMA4_TURN_END
from .gemma4 import normalise as normalise_gemma4
from .gemma4 import render as render_gemma4
# The parts of a turn are parts.py's; importers of the format read them here too.
from .parts import (AUDIO_NOT_TRAINED, AUDIO_PART_TYPES, IMAGE_PART_TYPES, ROLE_NAMES,  # noqa: F401
                    TEXT_PART_TYPES, BadRow, Image, Part, ReadImage, Reasoning, Rendered, SystemPolicy, Text,
                    ToolCall, ToolDeclaration, ToolResponse, Turn, _unencodable, content_parts, image_refusal)

IGNORE_INDEX = -100  # label of a token that is not learned (PyTorch cross-entropy's ignore_index)
BOS = "<bos>"
START = "<start_of_turn>"
END = "<end_of_turn>"
# Strings a Gemma tokenizer (or a ChatML export) reads as control tokens: inside content they would turn text
# into structure (a turn boundary, an end of sequence, padding), so a row carrying one is refused. "<unused"
# covers Gemma's reserved tokens <unused0>...<unused98>.
CONTROL_MARKERS = (START, END, "<|im_start|>", "<|im_end|>", BOS, "<eos>", "<pad>", "<unk>", "<mask>",
                   "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<unused")

EMPTY_SYSTEM = "empty system message dropped"


def end_of_turn(family: Family) -> str:
    """The token that ends a model turn (the model learns to write it, generation stops at it): <end_of_turn>
    (Gemma 2/3) or <turn|> (Gemma 4)."""
    return GEMMA4_TURN_END if family.turn_format == "gemma4" else END


def content_text(content: Any, where: str) -> str:
    """A message's content as one string: a string as it is; a list of OpenAI-style text parts
    (`{"type": "text", "text": ...}`) joined by a space, as transformers' server joins them for a text model.

    `where` names the message in the error ("message 2 (user)"). Raises BadRow for any other content: a part
    of another type (an image, audio) names the type, since a text model cannot take it.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRow(f"{where} content is not text")
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PART_TYPES:
            raise BadRow(f"{where} content part {k} is " + (f"of type {kind!r}" if kind is not None else "not a typed part")
                         + f"; a text model takes only text parts ({', '.join(TEXT_PART_TYPES)})")
        if not isinstance(part.get("text"), str):
            raise BadRow(f"{where} content part {k} ({kind}) has no 'text' string")
        texts.append(part["text"])
    return " ".join(texts)


def normalise(messages: Sequence[Any], system_policy: SystemPolicy, *, allow_open_end: bool = False,
              family: Family = GEMMA2, notes: Counter | None = None, tools: Any = None, thinking: bool = False,
              preserve_thinking: bool = False, images: ReadImage | None = None) -> list[Turn]:
    """Role/content messages -> alternating user/model turns ending with the model's.

    `allow_open_end` accepts a conversation ending with a user turn (a prompt for generation); `family`
    decides the format and how system text is folded. Content is a string or a list of text parts
    (`content_text`). An empty system message carries nothing to fold: it is dropped and counted in `notes`
    ("empty system message dropped"). Raises BadRow saying why a conversation can't be rendered.
    `chat_template` (template.py) is this function written in Jinja.

    A Gemma 4 family (gemma4.normalise) also reads `tools`, reasoning, tool calls and tool messages; `thinking`
    (enable_thinking) and `preserve_thinking` are its template's switches. Gemma 2/3 refuse `tools` and thinking.

    `images` reads the image parts of user messages (`content_parts`) into Image parts, for a family that takes
    images; without it, or for a text family, an image part is a BadRow saying why.
    """
    if family.turn_format == "gemma4":
        return normalise_gemma4(messages, system_policy, tools=tools, allow_open_end=allow_open_end,
                                thinking=thinking, preserve_thinking=preserve_thinking, notes=notes, images=images,
                                family=family)
    if tools:
        raise BadRow("tool definitions (tools), which Gemma's turn format cannot express")
    if thinking:
        raise BadRow(f"thinking (enable_thinking): {family.display} has no thinking mode")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadRow("no messages")
    system_texts: list[str] = []
    turns: list[Turn] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRow(f"message {i} is not an object")
        raw_role = message.get("role")
        content = message.get("content")
        role = ROLE_NAMES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise BadRow(f"message {i} has unknown role {raw_role!r}")
        parts = content_parts(content, f"message {i} ({raw_role})", family, images)
        if parts is not None:
            turns.append(_image_turn(parts, i, raw_role, role, turns))
            continue
        content = content_text(content, f"message {i} ({raw_role})")
        bad_char = _unencodable(content)
        if bad_char is not None:
            raise BadRow(f"message {i} ({raw_role}) has a lone UTF-16 surrogate "
                         f"(U+{ord(content[bad_char]):04X}) at character {bad_char}: half of a character such as an "
                         "emoji, which no tokenizer can encode; the file was cut or mis-encoded there")
        text = content.strip()
        if not text:
            if role == "system":
                if notes is not None:
                    notes[EMPTY_SYSTEM] += 1
                continue
            raise BadRow(f"message {i} ({raw_role}) has empty content")
        marker = next((m for m in CONTROL_MARKERS if m in text), None)
        if marker:
            raise BadRow(f"message {i} ({raw_role}) contains the control marker {marker}")
        if role == "system":
            if turns:
                raise BadRow(f"message {i} is a system message after the conversation started")
            if system_policy == "error":
                raise BadRow(f"message {i} is a system message and data.system_policy is 'error'")
            if family.system_fold == "first_verbatim" and system_texts and system_policy == "fold":
                raise BadRow(f"message {i} is a second system message; {family.display}'s template takes one")
            system_texts.append(content if family.system_fold == "first_verbatim" else text)
            continue
        turns.append(Turn(role, text))

    if system_texts and system_policy == "fold" and turns:
        if any(isinstance(p, Image) for p in turns[0].parts):  # the official template: system text, a blank line
            turns[0] = Turn(turns[0].role, (Text("\n\n".join(system_texts) + "\n\n"),) + turns[0].parts)
        else:
            turns[0] = Turn(turns[0].role, "\n\n".join(system_texts + [turns[0].text]))
    if not turns:
        raise BadRow("no user or model messages")
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "model"
        if turn.role != expected:
            raise BadRow(f"turn {i} is '{turn.role}' where '{expected}' was expected (roles must alternate, user first)")
    if turns[-1].role != "model" and not allow_open_end:
        raise BadRow("the last turn is not the model's (nothing to learn)")
    return turns


def _image_turn(parts: list[Text | Image], i: int, raw_role: Any, role: str, turns: list[Turn]) -> Turn:
    """A user turn holding images (Gemma 2/3 format): its texts checked as every text is. Raises BadRow for images
    in a system or model message (the model writes text; Gemma 3's template reads a system message's text only)."""
    where = f"message {i} ({raw_role})"
    if role != "user":
        raise BadRow(f"{where} has an image; only user messages carry images (the model writes text, and a system "
                     "message is text)")
    run = ""  # texts between images are written one after the other: checked together
    for part in parts + [None]:
        if isinstance(part, Text):
            run += part.text
            continue
        bad_char = _unencodable(run)
        if bad_char is not None:
            raise BadRow(f"{where} has a lone UTF-16 surrogate (U+{ord(run[bad_char]):04X}) in its text: half of a "
                         "character such as an emoji, which no tokenizer can encode; the file was cut or mis-encoded "
                         "there")
        marker = next((m for m in CONTROL_MARKERS if m in run), None)
        if marker:
            raise BadRow(f"{where} contains the control marker {marker}")
        run = ""
    return Turn(role, parts)


def render(turns: Sequence[Turn], *, add_generation_prompt: bool = False, family: Family = GEMMA2,
           thinking: bool = False, empty_thought: bool = False) -> Rendered:
    """Turns -> `<bos><start_of_turn>role\ntext<end_of_turn>\n...`, plus `<start_of_turn>model\n` when
    `add_generation_prompt` (a prompt for the model's next turn).

    A Gemma 4 family's turns are rendered by gemma4.render (`thinking`: enable_thinking; `empty_thought`: the
    checkpoint size writes an empty thought block when thinking is off, `writes_empty_thought`). Raises
    ValueError for turns that only Gemma 4 has (a system turn, non-text parts) rendered in Gemma 2/3's format.
    """
    if family.turn_format == "gemma4":
        return render_gemma4(turns, add_generation_prompt=add_generation_prompt, thinking=thinking,
                             empty_thought=empty_thought)
    if any(t.role == "system" or any(not isinstance(p, (Text, Image)) for p in t.parts) for t in turns):
        raise ValueError(f"Gemma 4 turns (system turn, reasoning or tools) rendered in {family.display}'s format")
    if family.images is None and any(isinstance(p, Image) for t in turns for p in t.parts):
        raise ValueError(f"an image rendered for {family.display}, which takes text only")
    parts = [BOS]
    spans = []
    pos = len(BOS)
    for turn in turns:
        header = f"{START}{turn.role}\n"
        body = "".join(p.text if isinstance(p, Text) else family.images.placeholder for p in turn.parts) + END
        parts += [header, body, "\n"]
        start = pos + len(header)
        if turn.role == "model":
            spans.append((start, start + len(body)))
        pos = start + len(body) + 1
    if add_generation_prompt:
        parts.append(f"{START}model\n")
    return Rendered("".join(parts), tuple(spans))


def supervision_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Per token: does its character range lie inside a supervised span?

    A token that straddles a span's start (begins before it) is not supervised.
    """
    mask = []
    k = 0
    for start, end in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        inside = k < len(spans) and end > start and spans[k][0] <= start and end <= spans[k][1]
        mask.append(inside)
    return mask

"""Gemma 4's replies as OpenAI messages. What the model writes after its generation prompt, decoded with its special
tokens, is split into `reasoning_content` (its thought: `<|channel>thought\\n...\\n<channel|>`), `content` (its text)
and `tool_calls` (`<|tool_call>call:NAME{...}<tool_call|>`), up to where generation stops (<turn|>,
<|tool_response>, <eos>).

`ReplySplitter` does the thought and the text, as the pieces arrive: a streamed reply and a whole one are the same
text by construction, and neither carries a marker. The calls are read back by transformers' response parser
(`parse_response`) with TRL's Gemma 4 response template, the one TRL's trainers parse Gemma 4 with; a call it
cannot read is given back as text, never dropped. Gemma 2/3 replies are text only (engines.TextPieces).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Iterable

from ...families import gemma4_format as g4

THOUGHT_HEADER = g4.THOUGHT_OPEN[len(g4.CHANNEL_START):]  # "thought\n": written after <|channel> as text tokens


def special_strings(tokenizer: Any) -> list[str]:
    """The text of every special token of `tokenizer` (what `decode(skip_special_tokens=True)` leaves out)."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    found |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return sorted(found, key=len, reverse=True)


class ReplySplitter:
    """Raw generated text in (special tokens written out; each special token whole within one piece, as a decode
    stream emits it), OpenAI deltas out: [{"reasoning_content": str} | {"content": str}]. `calls` collects the
    raw text of each closed tool call. `special`: the strings stripped from the thought and the text (the
    tokenizer's special tokens, `special_strings`)."""

    def __init__(self, special: Iterable[str]):
        special = [s for s in special if s]
        self.strip = re.compile("|".join(map(re.escape, special))) if special else None
        self.state = "text"  # text | header | thought | call | done
        self.pending = ""
        self.calls: list[str] = []
        self.reasoning = ""
        self.content = ""

    def plain(self, text: str) -> str:
        """`text` without special tokens (as a client gets text)."""
        return self.strip.sub("", text) if self.strip else text

    def _out(self, kind: str, text: str, deltas: list[dict]) -> None:
        text = self.plain(text)
        if not text:
            return
        if kind == "reasoning_content":
            self.reasoning += text
        else:
            self.content += text
        if deltas and kind in deltas[-1]:
            deltas[-1][kind] += text
        else:
            deltas.append({kind: text})

    def feed(self, text: str) -> list[dict]:
        """The deltas `text` completes (a thought's last newline is held until its end marker shows)."""
        self.pending += text
        deltas: list[dict] = []
        while self.pending and self.state != "done":
            if self.state == "text":
                stops = {m: self.pending.find(m) for m in (g4.CHANNEL_START, g4.TOOL_CALL_START, *g4.STOP_TOKENS)}
                found = [(i, m) for m, i in stops.items() if i >= 0]
                if not found:
                    self._out("content", self.pending, deltas)
                    self.pending = ""
                    break
                i, marker = min(found)
                self._out("content", self.pending[:i], deltas)
                self.pending = self.pending[i:] if marker == g4.TOOL_CALL_START else self.pending[i + len(marker):]
                self.state = {g4.CHANNEL_START: "header", g4.TOOL_CALL_START: "call"}.get(marker, "done")
            elif self.state == "header":
                if THOUGHT_HEADER.startswith(self.pending) and len(self.pending) < len(THOUGHT_HEADER):
                    break  # "thought\n" not complete yet
                self.pending = self.pending.removeprefix(THOUGHT_HEADER)
                self.state = "thought"
            elif self.state == "thought":
                i = self.pending.find(g4.CHANNEL_END)
                if i < 0:
                    keep = 1 if self.pending.endswith("\n") else 0  # the newline before <channel|> is the marker's
                    self._out("reasoning_content", self.pending[:len(self.pending) - keep], deltas)
                    self.pending = self.pending[len(self.pending) - keep:]
                    break
                self._out("reasoning_content", self.pending[:i].removesuffix("\n"), deltas)
                self.pending, self.state = self.pending[i + len(g4.CHANNEL_END):], "text"
            elif self.state == "call":
                i = self.pending.find(g4.TOOL_CALL_END)
                if i < 0:
                    break
                self.calls.append(self.pending[:i + len(g4.TOOL_CALL_END)])
                self.pending, self.state = self.pending[i + len(g4.TOOL_CALL_END):], "text"
        if self.state == "done":
            self.pending = ""
        return deltas

    def finish(self) -> list[dict]:
        """What is held at the end: a thought the token limit cut (all thought), a call never closed (given back
        as text: it cannot be read as a call)."""
        deltas: list[dict] = []
        if self.state == "thought":
            self._out("reasoning_content", self.pending, deltas)
        elif self.state == "call":
            self._out("content", self.pending, deltas)
        self.pending, self.state = "", "done"
        return deltas


def read_calls(tokenizer: Any, calls: list[str], tools: list[dict] | None) -> tuple[list[dict], str]:
    """The raw tool calls of a reply as OpenAI tool calls ([{"id", "type": "function", "function": {"name",
    "arguments": a JSON string}}]), read by transformers' `parse_response` with TRL's Gemma 4 template (arguments
    typed by the request's `tools`); and the text of calls it could not read ("" when all were read)."""
    from trl.chat_template_utils import gemma4_template

    read, unread = [], ""
    for raw in calls:
        try:
            parsed = tokenizer.parse_response(raw, schema=gemma4_template, prefix="", tools=tools or None)
            found = (parsed or {}).get("tool_calls") or []
            if len(found) != 1:
                raise ValueError(f"{len(found)} calls read")
            function = found[0]["function"]
            arguments = function.get("arguments") or {}
            read.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                         "function": {"name": function["name"],
                                      "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
        except (ValueError, TypeError, KeyError, AttributeError):
            unread += raw
    return read, unread


def openai_tool_messages(messages: list[dict]) -> list[dict] | str:
    """A request's messages with each assistant tool call's `arguments` decoded (OpenAI clients send a JSON string;
    Gemma 4's template takes an object); or the problem ("messages[i]...: ...") when one is not a JSON object."""
    out = []
    for i, message in enumerate(messages):
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if isinstance(calls, list):
            fixed = []
            for k, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                arguments = function.get("arguments") if isinstance(function, dict) else None
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments) if arguments.strip() else {}
                    except ValueError:
                        return f"messages[{i}].tool_calls[{k}].function.arguments: not valid JSON"
                    if not isinstance(arguments, dict):
                        return f"messages[{i}].tool_calls[{k}].function.arguments: not a JSON object"
                    call = call | {"function": function | {"arguments": arguments}}
                fixed.append(call)
            message = message | {"tool_calls": fixed}
        out.append(message)
    return out

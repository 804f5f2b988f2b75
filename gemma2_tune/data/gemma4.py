"""Gemma 4's turn format: messages (with tools, reasoning, tool calls and tool messages) -> turns made of parts ->
text and its supervised spans. Pure functions; no torch. The markers and the tool syntax: families/gemma4_format.py.

    <bos><|turn>system\\n<|think|>\\nSYSTEM<|tool>declaration:...<tool|><turn|>\\n<|turn>user\\nHI<turn|>\\n
    <|turn>model\\n<|channel>thought\\nREASONING\\n<channel|><|tool_call>call:f{x:1}<tool_call|><|tool_response>
    response:f{value:<|"|>2<|"|>}<tool_response|>ANSWER<turn|>\\n

It renders what the official template (google/gemma-4-*-it, revision 8995379: TRL's gemma4_v5.jinja) renders, for
every conversation it accepts; template_gemma4.py is this module written in Jinja. What the official template
would render silently wrong is refused here (BadRow) and there (raise_exception) alike, saying why:
- a conversation must read user, model, user, model...: a model turn is one assistant message, or assistant
  messages with tool calls each answered by tool messages and continued by the next assistant message; the official
  template drops a tool message that follows no tool call, and joins two assistant messages without a separator.
- an assistant message with both tool calls and text: the official template writes the text after the tool
  responses, not where the model wrote it.
- a tool message whose name the template would take from another call (no matching tool_call_id), or could not
  name at all ('unknown'); tool call arguments given as a JSON string, a tool message whose content is a JSON
  object (the official template raises on the one, fails on the other).
- reasoning rendered while thinking is off (the model would learn to think without <|think|>), reasoning on a
  user or tool message (never rendered), `tool_responses` embedded in an assistant message.
- tool, function and parameter names that the response parsers cannot read back (`call:(\\w+)`), declarations
  whose syntax the template leaves unclosed (parameters without a type, an object parameter without properties
  but other keys), content parts other than text (images are trained in a later version), control markers.
Role aliases (human, gpt, ...) are read as in Gemma 2/3; the official template knows only system/user/assistant/tool.

Which reasoning is kept follows the official template: an assistant message's reasoning is rendered when it comes
after the last user message (the exchange being answered) or, with `preserve_thinking`, when it makes tool calls;
earlier reasoning is dropped and counted.

What is supervised: every part of a model turn the model writes (reasoning, tool calls, text), the `<|tool_response>`
it writes after its calls (it stops there, as at `<turn|>`) and its `<turn|>`; never headers, the system turn, the
empty thought block (the generation prompt writes it) or tool responses (the environment writes them).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..families import Family
from ..families import gemma4_format as g4
from .parts import (IMAGE_PART_TYPES, ROLE_NAMES, BadRow, Image, ReadImage, Reasoning, Rendered, SystemPolicy, Text,
                    ToolCall, ToolDeclaration, ToolResponse, Turn, _unencodable, content_parts)

ROLES = {**ROLE_NAMES, "tool": "tool"}
REASONING_DROPPED = "reasoning before the last user message dropped (Gemma 4's template keeps the last exchange's)"
# What the response parsers read back as a call's name (transformers' and TRL's Gemma 4 schemas: call:(?P<name>\w+)),
# in ASCII: a name outside it is written by the model but cannot be parsed out of its answer.
NAME = re.compile(r"[A-Za-z0-9_]+")
NAME_CHARS = string.ascii_letters + string.digits + "_"  # the same, for the template (Jinja has no regex)
D = g4.STRING_DELIMITER


def writes_empty_thought(family: Family, name_or_path: str) -> bool:
    """Does this checkpoint's -it template write an empty thought block when thinking is off (Gemma 4 12B,
    26B-A4B, 31B: `Family.empty_thought_sizes`)? The size comes from a local folder's config.json (its text
    config's width and depth, `Family.size_of_shape`), else from the name; unknown sizes (tiny test models, other
    shapes) write none, as E2B/E4B."""
    if family.turn_format != "gemma4" or not family.empty_thought_sizes:
        return False
    size = None
    try:
        config = json.loads((Path(name_or_path).expanduser() / "config.json").read_text())
        text = config.get("text_config") or config
        size = family.size_of_shape(text.get("hidden_size"), text.get("num_hidden_layers"))
    except (OSError, ValueError, AttributeError):
        size = family.size_from_name(name_or_path)
    return size in family.empty_thought_sizes


# --- the tool syntax -------------------------------------------------------------------------------------------

def _sorted_items(mapping: Mapping) -> list:
    """Jinja's dictsort: by key, case-insensitively."""
    return sorted(mapping.items(), key=lambda kv: kv[0].lower() if isinstance(kv[0], str) else kv[0])


def format_value(value: Any, escape_keys: bool = True) -> str:
    """A JSON value in Gemma 4's tool syntax (the official template's format_argument): strings between <|"|>,
    true/false, null, numbers as Python writes them, lists [a,b], objects {k:v} with keys sorted (between <|"|>
    when `escape_keys`)."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return D + value + D
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "{" + ",".join((D + k + D if escape_keys else k) + ":" + format_value(v, escape_keys)
                              for k, v in _sorted_items(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v, escape_keys) for v in value) + "]"
    return str(value)


def format_call(call: ToolCall) -> str:
    """`<|tool_call>call:NAME{key:value,...}<tool_call|>`: keys sorted and not quoted."""
    args = ",".join(f"{k}:{format_value(v, False)}" for k, v in _sorted_items(call.arguments or {}))
    return f"{g4.TOOL_CALL_START}call:{call.name}{{{args}}}{g4.TOOL_CALL_END}"


def format_response(response: ToolResponse) -> str:
    """`<|tool_response>response:NAME{value:<|"|>TEXT<|"|>}<tool_response|>` (a tool message's text, as the
    official template writes it)."""
    body = "value:" + format_value(response.response, False)
    return f"{g4.TOOL_RESPONSE_START}response:{response.name}{{{body}}}{g4.TOOL_RESPONSE_END}"


def _parameter(schema: Mapping) -> str:
    """One parameter's schema, as the official template's format_parameters writes it (fields in its order)."""
    kind = schema["type"].upper()
    fields = []
    if schema.get("description"):
        fields.append(f"description:{D}{schema['description']}{D}")
    if kind == "STRING" and schema.get("enum"):
        fields.append("enum:" + format_value(schema["enum"]))
    elif kind == "ARRAY" and isinstance(schema.get("items"), Mapping) and schema["items"]:
        fields.append("items:{" + _items(schema["items"]) + "}")
    if schema.get("nullable"):
        fields.append("nullable:true")
    if kind == "OBJECT":
        nested = schema.get("properties")
        fields.append("properties:{" + (_parameters(nested) if isinstance(nested, Mapping) else "") + "}")
        if schema.get("required"):
            fields.append("required:[" + ",".join(D + r + D for r in schema["required"]) + "]")
    fields.append(f"type:{D}{kind}{D}")
    return "{" + ",".join(fields) + "}"


def _items(items: Mapping) -> str:
    out = []
    for key, value in _sorted_items(items):
        if value is None:
            continue
        if key == "properties":
            out.append("properties:{" + (_parameters(value) if isinstance(value, Mapping) else "") + "}")
        elif key == "required":
            out.append("required:[" + ",".join(D + r + D for r in value) + "]")
        elif key == "type":
            out.append("type:" + format_value(value.upper() if isinstance(value, str) else [v.upper() for v in value]))
        else:
            out.append(f"{key}:{format_value(value)}")
    return ",".join(out)


def _parameters(properties: Mapping) -> str:
    return ",".join(f"{name}:{_parameter(schema)}" for name, schema in _sorted_items(properties))


def format_declaration(declaration: ToolDeclaration) -> str:
    """`<|tool>declaration:NAME{description:<|"|>...<|"|>,parameters:{...}}<tool|>` (a checked declaration)."""
    function = declaration.function
    out = f"declaration:{function['name']}{{description:{D}{function.get('description') or ''}{D}"
    params = function.get("parameters")
    if params:
        out += ",parameters:{"
        if params.get("properties"):
            out += "properties:{" + _parameters(params["properties"]) + "},"
        if params.get("required"):
            out += "required:[" + ",".join(D + r + D for r in params["required"]) + "],"
        out += f"type:{D}{params['type'].upper()}{D}}}"
    return g4.TOOL_START + out + "}" + g4.TOOL_END


# --- checks ----------------------------------------------------------------------------------------------------

def _check_text(text: str, where: str) -> None:
    bad_char = _unencodable(text)
    if bad_char is not None:
        raise BadRow(f"{where} has a lone UTF-16 surrogate (U+{ord(text[bad_char]):04X}) at character {bad_char}: half "
                     "of a character such as an emoji, which no tokenizer can encode; the file was cut or mis-encoded "
                     "there")
    marker = next((m for m in g4.CONTROL_MARKERS if m in text), None)
    if marker:
        raise BadRow(f"{where} contains the control marker {marker}")


def _check_strings(value: Any, where: str) -> None:
    """Every string in a JSON value (keys too): no control marker, nothing UTF-8 cannot encode."""
    if isinstance(value, str):
        _check_text(value, where)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _check_strings(k, where)
            _check_strings(v, where)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_strings(v, where)


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise BadRow(f"{where} name '{name}' is not letters, digits and underscores (the only names a Gemma 4 "
                     "tool call can be parsed back with)")
    return name


def _check_required(value: Any, where: str) -> None:
    if value and (not isinstance(value, list) or not all(isinstance(r, str) for r in value)):
        raise BadRow(f"{where} 'required' is not a list of names")


def _check_schema(schema: Any, where: str) -> None:
    """A parameter's JSON Schema, as far as Gemma 4's declaration syntax writes it."""
    if not isinstance(schema, Mapping):
        raise BadRow(f"{where} is not an object")
    if not isinstance(schema.get("type"), str):
        raise BadRow(f"{where} has no 'type' string (Gemma 4's declaration syntax writes one for every parameter)")
    if schema.get("description") and not isinstance(schema["description"], str):
        raise BadRow(f"{where} 'description' is not text")
    kind = schema["type"].upper()
    if kind == "ARRAY" and isinstance(schema.get("items"), Mapping) and schema["items"]:
        items = schema["items"]
        if "properties" in items and isinstance(items["properties"], Mapping):
            for name, nested in items["properties"].items():
                _check_schema(nested, f"{where} items property '{name}'")
        _check_required(items.get("required"), f"{where} items")
        kinds = items.get("type")
        if kinds is not None and not isinstance(kinds, str) and not (
                isinstance(kinds, list) and all(isinstance(k, str) for k in kinds)):
            raise BadRow(f"{where} items 'type' is not a type name or a list of them")
    if kind == "OBJECT":
        nested = schema.get("properties")
        if isinstance(nested, Mapping):
            for name, sub in nested.items():
                _check_schema(sub, f"{where} property '{name}'")
        else:
            other = sorted((k for k in schema if k not in g4.PARAMETER_KEYS), key=str.lower)  # as Jinja's sort
            if other:
                raise BadRow(f"{where} is an object without 'properties' and with {', '.join(other)}, which Gemma "
                             "4's template writes as if they were properties; give it 'properties'")
        _check_required(schema.get("required"), where)


def declarations(tools: Any) -> list[ToolDeclaration]:
    """A row's (or request's) `tools`, OpenAI-style ([{"type": "function", "function": {...}}]), checked.

    Raises BadRow naming the tool and what its declaration cannot be: a name the parsers cannot read back,
    parameters without a type or with properties that are not schemas, a `response` declaration (not trained)."""
    if not tools:
        return []
    if not isinstance(tools, (list, tuple)):
        raise BadRow("'tools' is not a list of tool definitions")
    out = []
    for k, tool in enumerate(tools):
        where = f"tools[{k}]"
        if not isinstance(tool, Mapping) or not isinstance(tool.get("function"), Mapping):
            raise BadRow(f"{where} is not a tool definition ({{\"type\": \"function\", \"function\": {{...}}}})")
        if tool.get("type", "function") != "function":
            raise BadRow(f"{where} has type '{tool.get('type')}'; Gemma 4 declares functions only")
        function = tool["function"]
        _check_name(function.get("name"), f"{where} function")
        where = f"tools[{k}] ({function['name']})"
        if "description" in function and not isinstance(function["description"], str):
            raise BadRow(f"{where} 'description' is not text")
        if "response" in function:
            raise BadRow(f"{where} declares a 'response'; response declarations are not trained")
        params = function.get("parameters")
        if params:
            if not isinstance(params, Mapping) or not isinstance(params.get("type"), str) or not params["type"]:
                raise BadRow(f"{where} 'parameters' has no 'type' string (Gemma 4's template leaves the declaration "
                             "unclosed without one; JSON Schema: \"type\": \"object\")")
            if params.get("properties"):
                if not isinstance(params["properties"], Mapping):
                    raise BadRow(f"{where} 'properties' is not an object")
                for name, schema in params["properties"].items():
                    _check_schema(schema, f"{where} parameter '{name}'")
            _check_required(params.get("required"), f"{where} parameters")
        _check_strings(function, where)
        out.append(ToolDeclaration(function))
    return out


# --- messages -> turns -----------------------------------------------------------------------------------------

def _parts_text(content: list, where: str) -> list[str]:
    """The texts of a content list, which may hold only OpenAI-style text parts ({"type": "text", "text": ...})."""
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text":
            raise BadRow(f"{where} content part {k} is " + (f"of type '{kind}'" if kind is not None else
                         "not a typed part") + "; Gemma 4 is trained on text parts only (type 'text')")
        if not isinstance(part.get("text"), str):
            raise BadRow(f"{where} content part {k} (text) has no 'text' string")
        texts.append(part["text"])
    return texts


def _image_parts(message: Mapping, role: str, where: str, images: ReadImage | None, family: Family | None) -> list | None:
    """A user message's content holding images -> its parts in order (text parts trimmed, joined without a
    separator, images between them: the official template's rendering), each run of text checked as one text. None
    when the content holds no image part. Raises BadRow for images in another role's message, or unreadable."""
    from ..families import GEMMA4

    family = family or GEMMA4
    content = message.get("content")
    if family.images is None or not isinstance(content, list) or not any(
            isinstance(p, Mapping) and p.get("type") in IMAGE_PART_TYPES for p in content):
        return None
    if role != "user":
        raise BadRow(f"{where} has an image; only user messages carry images here (the model writes text; images in "
                     "system and tool messages are not trained)")
    for k, part in enumerate(content):
        if isinstance(part, Mapping) and part.get("type") in ("input_text", "output_text"):
            raise BadRow(f"{where} content part {k} is of type '{part['type']}'; Gemma 4's template reads text parts "
                         "of type 'text'")
    parts = content_parts(content, where, family, images)
    run = ""
    for part in parts + [None]:
        if isinstance(part, Text):
            run += part.text
            continue
        _check_text(run, where)
        run = ""
    return parts


def _content(message: Mapping, role: str, where: str) -> Any:
    """A message's content as the official template writes it: system text trimmed (text parts: each trimmed and
    followed by a space); user and model text trimmed (parts: each trimmed, joined without a separator); a tool
    message's text (or text parts joined) as it is. None: no content (a model message making tool calls)."""
    content = message.get("content")
    if role == "tool":
        if isinstance(content, Mapping):  # the official template fails on one (it iterates it as content parts)
            raise BadRow(f"{where} content is a JSON object; Gemma 4's template reads a tool's result as text "
                         "(serialise it, e.g. as JSON)")
        if isinstance(content, list):
            content = "".join(_parts_text(content, where))
        if not isinstance(content, str):
            raise BadRow(f"{where} content is not text")
        _check_text(content, where)
        return content
    if content is None and role == "model":
        return None
    if isinstance(content, str):
        text = content.strip()
    elif isinstance(content, list):
        texts = _parts_text(content, where)
        text = "".join(t.strip() + " " for t in texts) if role == "system" else "".join(t.strip() for t in texts)
    else:
        raise BadRow(f"{where} content is not text")
    _check_text(text, where)
    return text


def _calls(message: Mapping, where: str) -> list[ToolCall]:
    calls = message.get("tool_calls")
    if not isinstance(calls, (list, tuple)):
        raise BadRow(f"{where} 'tool_calls' is not a list")
    out = []
    for k, call in enumerate(calls):
        at = f"{where} tool call {k}"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            raise BadRow(f"{at} has no 'function' object")
        name = _check_name(function.get("name"), f"{at} function")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            raise BadRow(f"{at} ({name}) has arguments as a JSON string; Gemma 4's template takes a JSON object "
                         "(decode it)")
        if arguments is not None and not isinstance(arguments, Mapping):
            raise BadRow(f"{at} ({name}) arguments are not a JSON object")
        _check_strings(arguments, f"{at} ({name})")
        out.append(ToolCall(name, arguments))
    return out


# transformers' apply_chat_template copies a message's reasoning into `reasoning_content` from the first of these
# that is set (utils/chat_template_utils.py, _alias_reasoning_fields); the template then reads `reasoning` first.
ALIASED_REASONING = ("reasoning_content", "thinking", "reasoning")


def _reasoning(message: Mapping, role: str, where: str) -> str | None:
    """The reasoning the template reads: `reasoning`, else the aliased `reasoning_content`."""
    aliased = next((message[k] for k in ALIASED_REASONING if message.get(k) is not None), None)
    key = "reasoning" if message.get("reasoning") else "reasoning_content"
    value = message.get("reasoning") or aliased
    if not value:
        return None
    if role != "model":
        raise BadRow(f"{where} has '{key}'; only the model's messages carry reasoning")
    if not isinstance(value, str):
        raise BadRow(f"{where} '{key}' is not text")
    _check_text(value, where)
    return value


def normalise(messages: Sequence[Any], system_policy: SystemPolicy, *, tools: Any = None,
              allow_open_end: bool = False, thinking: bool = False, preserve_thinking: bool = False,
              notes: Counter | None = None, images: ReadImage | None = None, family: Family | None = None
              ) -> list[Turn]:
    """Messages (+ `tools`) -> turns: an optional system turn (its text under system policy 'fold', the tool
    declarations), then user and model turns alternating, user first, ending with the model's (or, with
    `allow_open_end`, a user turn or tool responses: a prompt). Raises BadRow saying why a conversation can't be
    rendered (the module docstring lists the refusals). `thinking`: the template's enable_thinking;
    `preserve_thinking`: its preserve_thinking. Dropped reasoning is counted in `notes`. `images` reads the image
    parts of user messages (turns.content_parts); without it they are refused. `family`: the checkpoint's (Gemma 4
    by default), for whether it reads images."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadRow("no messages")
    declared = declarations(tools)
    read = []  # (index, raw role, role, content, reasoning, calls, message), in order
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRow(f"message {i} is not an object")
        raw = message.get("role")
        role = ROLES.get(str(raw).lower()) if raw is not None else None
        if role is None:
            raise BadRow(f"message {i} has unknown role '{raw}'")
        where = f"message {i} ({raw})"
        if message.get("tool_responses"):
            raise BadRow(f"{where} has 'tool_responses'; write each response as a tool message (role 'tool') after "
                         "the message making the calls")
        if message.get("tool_calls") and role != "model":
            raise BadRow(f"{where} has 'tool_calls'; only the model's messages make tool calls")
        reasoning = _reasoning(message, role, where)
        calls = _calls(message, where) if message.get("tool_calls") else []
        content = _image_parts(message, role, where, images, family)
        if content is None:
            content = _content(message, role, where)
        if calls and content:
            raise BadRow(f"{where} has both tool calls and text; Gemma 4's template writes the text after the tool "
                         "responses, not where the model wrote it: put it in the assistant message after them")
        if role in ("user", "model") and not content and not calls:
            raise BadRow(f"{where} has empty content")
        if role == "system":
            if i > 0:
                raise BadRow(f"message {i} is a second system message; Gemma 4's template takes one"
                             if all(r[2] == "system" for r in read) else
                             f"message {i} is a system message after the conversation started")
            if system_policy == "error":
                raise BadRow(f"message {i} is a system message and data.system_policy is 'error'")
        read.append((i, raw, role, content, reasoning, calls, message))

    system = [r for r in read if r[2] == "system"]
    rest = [r for r in read if r[2] != "system"]
    if not rest:
        raise BadRow("no user or model messages")
    _check_order(rest, allow_open_end)
    last_user = max(k for k, r in enumerate(rest) if r[2] == "user")

    turns: list[Turn] = []
    system_parts = ([Text(system[0][3])] if system and system_policy == "fold" else []) + declared
    if system_parts or thinking:
        turns.append(Turn("system", system_parts))
    answered: list = []  # the raw tool calls the tool messages being read answer
    for k, (i, raw, role, content, reasoning, calls, message) in enumerate(rest):
        if role == "user":
            turns.append(Turn("user", content if isinstance(content, list) else [Text(content)]))
            continue
        if role == "tool":
            response = ToolResponse(_tool_name(message, answered, i), content)
            turns[-1] = Turn("model", turns[-1].parts + (response,))
            continue
        parts = []
        if reasoning is not None:
            if k > last_user or (preserve_thinking and calls):
                if not thinking:
                    raise BadRow(f"message {i} ({raw}) has reasoning but thinking is off: the model would learn to "
                                 "think without <|think|> in the system turn; turn thinking on (data.enable_thinking)")
                parts.append(Reasoning(reasoning))
            elif notes is not None:
                notes[REASONING_DROPPED] += 1
        parts += calls
        if content:
            parts.append(Text(content))
        answered = message.get("tool_calls") or []
        if rest[k - 1][2] == "tool":  # the model goes on after the tool responses: the same turn
            turns[-1] = Turn("model", turns[-1].parts + tuple(parts))
        else:
            turns.append(Turn("model", parts))
    return turns


def _check_order(rest: list, allow_open_end: bool) -> None:
    """User first; then model turns and user turns alternating, where a model message making tool calls is
    answered by tool messages before anything else."""
    state = "start"
    for i, raw, role, content, reasoning, calls, message in rest:
        if role == "tool" and state not in ("calls", "tool"):
            raise BadRow(f"message {i} is a tool message that answers no tool call (it must follow the model "
                         "message making the calls)")
        if role != "tool" and state == "calls":
            raise BadRow(f"message {i} ({raw}) comes before any tool message answers the tool calls before it")
        if role == "user" and state not in ("start", "model", "tool"):
            raise BadRow(f"message {i} is 'user' where the model was expected (roles must alternate, user first)")
        if role == "model" and state not in ("user", "tool"):
            raise BadRow(f"message {i} is 'model' where the user was expected (roles must alternate, user first)")
        state = "tool" if role == "tool" else "calls" if calls else role
    if state in ("user", "tool") and not allow_open_end:
        raise BadRow("the last turn is not the model's (nothing to learn)")


def _tool_name(message: Mapping, calls: list, i: int) -> str:
    """The name the official template gives a tool message: the last of the answered message's calls whose id
    equals its tool_call_id (None equals None: calls and responses without ids match the last call), else its own
    `name`. Refused when that is none, or another than its own name."""
    own = message.get("name")
    name = own or None
    for call in calls:
        if call.get("id") == message.get("tool_call_id"):
            name = call["function"]["name"]
    where = f"message {i} (tool)"
    if name is None:
        raise BadRow(f"{where} names no tool: give it its call's tool_call_id (or a 'name')")
    if own and name != own:
        raise BadRow(f"{where} is named '{own}', but Gemma 4's template names it after the call '{name}' (the last "
                     f"call whose id equals its tool_call_id, '{message.get('tool_call_id')}'): give each call an "
                     "id and each tool message its call's tool_call_id")
    return _check_name(name, f"{where} tool")


# --- turns -> text ---------------------------------------------------------------------------------------------

def render(turns: Sequence[Turn], *, add_generation_prompt: bool = False, thinking: bool = False,
           empty_thought: bool = False) -> Rendered:
    """Turns -> Gemma 4 text and its supervised character spans (see the module docstring).

    `thinking` writes <|think|> first in the system turn (a system turn is written for it). `empty_thought` (12B,
    26B-A4B, 31B with thinking off) writes the empty thought block where the -it template's generation prompt does,
    after `<|turn>model\\n`, and also at the start of a final model turn that ends the text with what the model
    wrote: so a training row is its prompt's generation prompt followed by the answer, as the model sees it when it
    answers. (The official template, rendering that row as history, leaves the block out.)

    `add_generation_prompt` ends with what the model writes next after: `<|turn>model\\n` after a closed turn,
    nothing after tool calls (the tools answer first), `<|channel>thought\\n` after tool responses when thinking is
    on (the model continues its turn, thinking first).
    """
    out: list[str] = [g4.BOS]
    spans: list[tuple[int, int]] = []
    pos = len(g4.BOS)

    def emit(text: str, supervised: bool = False) -> None:
        nonlocal pos
        if supervised and text:
            if spans and spans[-1][1] == pos:
                spans[-1] = (spans[-1][0], pos + len(text))
            else:
                spans.append((pos, pos + len(text)))
        out.append(text)
        pos += len(text)

    turns = list(turns)
    if thinking or (turns and turns[0].role == "system"):
        emit(f"{g4.TURN_START}system\n" + (g4.THINK + "\n" if thinking else ""))
        for part in turns[0].parts if turns and turns[0].role == "system" else ():
            emit(part.text if isinstance(part, Text) else format_declaration(part))
        emit(g4.TURN_END + "\n")
    turns = [t for t in turns if t.role != "system"]
    for k, turn in enumerate(turns):
        emit(f"{g4.TURN_START}{turn.role}\n")
        if turn.role == "user":
            emit("".join(g4.IMAGE if isinstance(p, Image) else p.text for p in turn.parts))
            emit(g4.TURN_END + "\n")
            continue
        last = k == len(turns) - 1
        if empty_thought and not thinking and last and not add_generation_prompt and turn.parts \
                and not isinstance(turn.parts[-1], ToolResponse):
            emit(g4.EMPTY_THOUGHT)
        previous = None
        for part in turn.parts:
            if isinstance(part, Reasoning):
                emit(g4.THOUGHT_OPEN + part.text + g4.THOUGHT_CLOSE, True)
            elif isinstance(part, ToolCall):
                emit(format_call(part), True)
            elif isinstance(part, ToolResponse):
                text = format_response(part)
                if isinstance(previous, ToolCall):  # the model wrote <|tool_response> after its calls, and stopped
                    emit(g4.TOOL_RESPONSE_START, True)
                    text = text[len(g4.TOOL_RESPONSE_START):]
                emit(text)
            else:
                emit(part.text, True)
            previous = part
        if isinstance(previous, ToolCall):
            emit(g4.TOOL_RESPONSE_START, True)
        elif not (isinstance(previous, ToolResponse) and last):
            emit(g4.TURN_END, True)
            emit("\n")
    if add_generation_prompt:
        end = turns[-1].parts[-1] if turns and turns[-1].role == "model" and turns[-1].parts else None
        if isinstance(end, ToolResponse):
            if thinking:
                emit(g4.THOUGHT_OPEN)
        elif not isinstance(end, ToolCall):
            emit(f"{g4.TURN_START}model\n" + (g4.EMPTY_THOUGHT if empty_thought and not thinking else ""))
    return Rendered("".join(out), tuple(spans))


def split_answer(text: str) -> tuple[str | None, str]:
    """What a Gemma 4 model wrote after its generation prompt (decoded with its special tokens) -> (its thought, or
    None; the rest), up to where generation stops (<turn|>, <|tool_response>, <eos>). A thought left unclosed (the
    token limit came first) is all thought."""
    for stop in g4.STOP_TOKENS:
        text = text.split(stop)[0]
    if not text.startswith(g4.THOUGHT_OPEN):
        return None, text
    thought, closed, rest = text[len(g4.THOUGHT_OPEN):].partition(g4.CHANNEL_END)
    return (thought[:-1] if thought.endswith("\n") else thought), rest if closed else ""

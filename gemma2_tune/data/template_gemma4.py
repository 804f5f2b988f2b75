"""The chat template saved with a Gemma 4 run: gemma4.normalise + gemma4.render written in Jinja.

It renders every conversation training accepts exactly as the official template does (google/gemma-4-*-it at
8995379; tests/unit/test_template_gemma4.py compares them on a generated corpus, through transformers' own Jinja
environment), refuses with the same message every conversation training refuses, and reads the official
template's switches: `enable_thinking`, `preserve_thinking`, `tools`. Generated per system policy and per size
class: `empty_thought` (12B, 26B-A4B, 31B) writes the empty thought block where those sizes' templates write it,
and at the start of a final model turn when nothing follows it (a training row; see gemma4.render).

Whitespace is controlled on every tag, so the text is the same with or without trim_blocks/lstrip_blocks.
"""

from __future__ import annotations

from ..families import gemma4_format as g4
from .gemma4 import ALIASED_REASONING, NAME_CHARS, ROLES
from .turns import AUDIO_NOT_TRAINED, AUDIO_PART_TYPES, IMAGE_PART_TYPES, SystemPolicy


def _literal(text: str) -> str:
    """A Python string as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _list(items) -> str:
    return "[" + ", ".join(_literal(i) for i in items) + "]"


def chat_template(system_policy: SystemPolicy = "fold", unsupported: str = "bad_row", *,
                  empty_thought: bool = False, images: bool = True) -> str:
    """The Jinja chat template equivalent to `render(normalise(row_to_messages({"messages": messages}, unsupported,
    family=<Gemma 4>), system_policy, tools=tools, thinking=enable_thinking, preserve_thinking=preserve_thinking,
    allow_open_end=True), add_generation_prompt=..., empty_thought=empty_thought)` (gemma4.py): it raises
    (raise_exception) with the same message where those raise. `unsupported` 'bad_row' refuses messages with
    OpenAI's legacy `function_call`; 'ignore' ignores it. `images`: the checkpoint reads images (a user message's
    image parts are written <|image|>, where its processor puts the image's soft tokens); False: they are refused
    as parts of another type."""
    roles = "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in ROLES.items()) + "}"
    header = (
        f"{{#- gemma2-tune: Gemma 4 turns, system policy {system_policy}, empty thought block "
        f"{'yes' if empty_thought else 'no'}; generated, do not edit -#}}"
        f"{{%- set policy = {_literal(system_policy)} -%}}"
        f"{{%- set refuse_legacy = {'true' if unsupported != 'ignore' else 'false'} -%}}"
        f"{{%- set empty_thought = {'true' if empty_thought else 'false'} -%}}"
        f"{{%- set images_on = {'true' if images else 'false'} -%}}"
        f"{{%- set image_types = {_list(IMAGE_PART_TYPES)} -%}}"
        f"{{%- set IMAGE = {_literal(g4.IMAGE)} -%}}"
        f"{{%- set audio_types = {_list(AUDIO_PART_TYPES)} -%}}"
        f"{{%- set AUDIO_NOT_TRAINED = {_literal(AUDIO_NOT_TRAINED)} -%}}"
        f"{{%- set roles = {roles} -%}}"
        f"{{%- set markers = {_list(g4.CONTROL_MARKERS)} -%}}"
        f"{{%- set standard_keys = {_list(g4.PARAMETER_KEYS)} -%}}"
        f"{{%- set aliased = {_list(ALIASED_REASONING)} -%}}"
        f"{{%- set name_chars = {_literal(NAME_CHARS)} -%}}"
        f"{{%- set D = {_literal(g4.STRING_DELIMITER)} -%}}"
        f"{{%- set BOS = {_literal(g4.BOS)} -%}}"
        f"{{%- set TURN = {_literal(g4.TURN_START)} -%}}"
        f"{{%- set END = {_literal(g4.TURN_END)} -%}}"
        f"{{%- set THINK = {_literal(g4.THINK)} -%}}"
        f"{{%- set THOUGHT_OPEN = {_literal(g4.THOUGHT_OPEN)} -%}}"
        f"{{%- set THOUGHT_CLOSE = {_literal(g4.THOUGHT_CLOSE)} -%}}"
        f"{{%- set EMPTY_THOUGHT = {_literal(g4.EMPTY_THOUGHT)} -%}}"
        f"{{%- set TOOL = {_literal(g4.TOOL_START)} -%}}"
        f"{{%- set TOOL_END = {_literal(g4.TOOL_END)} -%}}"
        f"{{%- set CALL = {_literal(g4.TOOL_CALL_START)} -%}}"
        f"{{%- set CALL_END = {_literal(g4.TOOL_CALL_END)} -%}}"
        f"{{%- set RESPONSE = {_literal(g4.TOOL_RESPONSE_START)} -%}}"
        f"{{%- set RESPONSE_END = {_literal(g4.TOOL_RESPONSE_END)} -%}}"
    )
    return header + BODY


# The body: first every check gemma4.normalise makes, in its order (so the first refusal is the same), then the
# rendering. Macros that check raise; macros that format return text. Lists grow by concatenation (the sandbox
# forbids append).
BODY = r"""
{#- ===== checks: text, names, JSON values ===== -#}
{%- macro check_text(text, where) -%}
  {%- for m in markers -%}{%- if m in text -%}
    {{- raise_exception(where ~ ' contains the control marker ' ~ m) -}}
  {%- endif -%}{%- endfor -%}
{%- endmacro -%}
{%- macro check_strings(value, where) -%}
  {%- if value is string -%}{{- check_text(value, where) -}}
  {%- elif value is mapping -%}
    {%- for k, v in value.items() -%}{{- check_strings(k, where) -}}{{- check_strings(v, where) -}}{%- endfor -%}
  {%- elif value is sequence -%}
    {%- for v in value -%}{{- check_strings(v, where) -}}{%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- macro check_name(name, where) -%}
  {%- set ns_name = namespace(ok=(name is string and name | length > 0)) -%}
  {%- if ns_name.ok -%}{%- for c in name -%}{%- if c not in name_chars -%}{%- set ns_name.ok = false -%}{%- endif -%}
  {%- endfor -%}{%- endif -%}
  {%- if not ns_name.ok -%}
    {{- raise_exception(where ~ " name '" ~ name ~ "' is not letters, digits and underscores (the only names a "
        ~ "Gemma 4 tool call can be parsed back with)") -}}
  {%- endif -%}
{%- endmacro -%}
{%- macro check_required(value, where) -%}
  {%- if value -%}
    {%- set ns_req = namespace(ok=(value is sequence and value is not string and value is not mapping)) -%}
    {%- if ns_req.ok -%}{%- for r in value -%}{%- if r is not string -%}{%- set ns_req.ok = false -%}{%- endif -%}
    {%- endfor -%}{%- endif -%}
    {%- if not ns_req.ok -%}{{- raise_exception(where ~ " 'required' is not a list of names") -}}{%- endif -%}
  {%- endif -%}
{%- endmacro -%}
{%- macro check_schema(schema, where) -%}
  {%- if schema is not mapping -%}{{- raise_exception(where ~ ' is not an object') -}}{%- endif -%}
  {%- if schema.get('type') is not string -%}
    {{- raise_exception(where ~ " has no 'type' string (Gemma 4's declaration syntax writes one for every "
        ~ "parameter)") -}}
  {%- endif -%}
  {%- if schema.get('description') and schema.get('description') is not string -%}
    {{- raise_exception(where ~ " 'description' is not text") -}}
  {%- endif -%}
  {%- set kind = schema['type'] | upper -%}
  {%- set items = schema.get('items') -%}
  {%- if kind == 'ARRAY' and items is mapping and items -%}
    {%- if 'properties' in items and items['properties'] is mapping -%}
      {%- for name, nested in items['properties'].items() -%}
        {{- check_schema(nested, where ~ " items property '" ~ name ~ "'") -}}
      {%- endfor -%}
    {%- endif -%}
    {{- check_required(items.get('required'), where ~ ' items') -}}
    {%- set kinds = items.get('type') -%}
    {%- if kinds is not none and kinds is not string -%}
      {%- set ns_kinds = namespace(ok=(kinds is sequence and kinds is not mapping)) -%}
      {%- if ns_kinds.ok -%}{%- for k in kinds -%}{%- if k is not string -%}{%- set ns_kinds.ok = false -%}{%- endif -%}
      {%- endfor -%}{%- endif -%}
      {%- if not ns_kinds.ok -%}
        {{- raise_exception(where ~ " items 'type' is not a type name or a list of them") -}}
      {%- endif -%}
    {%- endif -%}
  {%- endif -%}
  {%- if kind == 'OBJECT' -%}
    {%- set nested = schema.get('properties') -%}
    {%- if nested is mapping -%}
      {%- for name, sub in nested.items() -%}{{- check_schema(sub, where ~ " property '" ~ name ~ "'") -}}{%- endfor -%}
    {%- else -%}
      {%- set ns_other = namespace(keys=[]) -%}
      {%- for k in schema | sort -%}{%- if k not in standard_keys -%}{%- set ns_other.keys = ns_other.keys + [k] -%}
      {%- endif -%}{%- endfor -%}
      {%- if ns_other.keys -%}
        {{- raise_exception(where ~ " is an object without 'properties' and with " ~ ns_other.keys | join(', ')
            ~ ", which Gemma 4's template writes as if they were properties; give it 'properties'") -}}
      {%- endif -%}
    {%- endif -%}
    {{- check_required(schema.get('required'), where) -}}
  {%- endif -%}
{%- endmacro -%}
{%- macro check_tools(tools) -%}
  {%- if tools is mapping or tools is string or tools is not sequence -%}
    {{- raise_exception("'tools' is not a list of tool definitions") -}}
  {%- endif -%}
  {%- for tool in tools -%}
    {%- set where = 'tools[' ~ loop.index0 ~ ']' -%}
    {%- if tool is not mapping or tool.get('function') is not mapping -%}
      {{- raise_exception(where ~ ' is not a tool definition ({"type": "function", "function": {...}})') -}}
    {%- endif -%}
    {%- if tool.get('type', 'function') != 'function' -%}
      {{- raise_exception(where ~ " has type '" ~ tool.get('type') ~ "'; Gemma 4 declares functions only") -}}
    {%- endif -%}
    {%- set function = tool['function'] -%}
    {{- check_name(function.get('name'), where ~ ' function') -}}
    {%- set where = where ~ ' (' ~ function['name'] ~ ')' -%}
    {%- if 'description' in function and function['description'] is not string -%}
      {{- raise_exception(where ~ " 'description' is not text") -}}
    {%- endif -%}
    {%- if 'response' in function -%}
      {{- raise_exception(where ~ " declares a 'response'; response declarations are not trained") -}}
    {%- endif -%}
    {%- set params = function.get('parameters') -%}
    {%- if params -%}
      {%- if params is not mapping or params.get('type') is not string or not params['type'] -%}
        {{- raise_exception(where ~ " 'parameters' has no 'type' string (Gemma 4's template leaves the declaration "
            ~ 'unclosed without one; JSON Schema: "type": "object")') -}}
      {%- endif -%}
      {%- if params.get('properties') -%}
        {%- if params['properties'] is not mapping -%}
          {{- raise_exception(where ~ " 'properties' is not an object") -}}
        {%- endif -%}
        {%- for name, schema in params['properties'].items() -%}
          {{- check_schema(schema, where ~ " parameter '" ~ name ~ "'") -}}
        {%- endfor -%}
      {%- endif -%}
      {{- check_required(params.get('required'), where ~ ' parameters') -}}
    {%- endif -%}
    {{- check_strings(function, where) -}}
  {%- endfor -%}
{%- endmacro -%}

{#- ===== formatting: the tool syntax ===== -#}
{%- macro value_text(value, escape_keys) -%}
  {%- if value is none -%}null
  {%- elif value is string -%}{{- D ~ value ~ D -}}
  {%- elif value is boolean -%}{{- 'true' if value else 'false' -}}
  {%- elif value is mapping -%}{{- '{' -}}
    {%- for k, v in value | dictsort -%}{{- (D ~ k ~ D if escape_keys else k) ~ ':' ~ value_text(v, escape_keys) -}}
    {{- ',' if not loop.last else '' -}}{%- endfor -%}{{- '}' -}}
  {%- elif value is sequence -%}{{- '[' -}}
    {%- for v in value -%}{{- value_text(v, escape_keys) -}}{{- ',' if not loop.last else '' -}}{%- endfor -%}
    {{- ']' -}}
  {%- else -%}{{- value -}}
  {%- endif -%}
{%- endmacro -%}
{%- macro names_text(names) -%}
  {%- for r in names -%}{{- D ~ r ~ D -}}{{- ',' if not loop.last else '' -}}{%- endfor -%}
{%- endmacro -%}
{%- macro parameters_text(properties) -%}
  {%- for name, schema in properties | dictsort -%}{{- name ~ ':' ~ parameter_text(schema) -}}
  {{- ',' if not loop.last else '' -}}{%- endfor -%}
{%- endmacro -%}
{%- macro items_text(items) -%}
  {%- set ns_items = namespace(fields=[]) -%}
  {%- for key, value in items | dictsort -%}{%- if value is not none -%}
    {%- if key == 'properties' -%}
      {%- set f = 'properties:{' ~ (parameters_text(value) if value is mapping else '') ~ '}' -%}
    {%- elif key == 'required' -%}{%- set f = 'required:[' ~ names_text(value) ~ ']' -%}
    {%- elif key == 'type' -%}
      {%- set f = 'type:' ~ value_text(value | upper if value is string else value | map('upper') | list, true) -%}
    {%- else -%}{%- set f = key ~ ':' ~ value_text(value, true) -%}
    {%- endif -%}
    {%- set ns_items.fields = ns_items.fields + [f] -%}
  {%- endif -%}{%- endfor -%}
  {{- ns_items.fields | join(',') -}}
{%- endmacro -%}
{%- macro parameter_text(schema) -%}
  {%- set kind = schema['type'] | upper -%}
  {%- set ns_p = namespace(fields=[]) -%}
  {%- if schema.get('description') -%}
    {%- set ns_p.fields = ns_p.fields + ['description:' ~ D ~ schema['description'] ~ D] -%}{%- endif -%}
  {%- if kind == 'STRING' and schema.get('enum') -%}
    {%- set ns_p.fields = ns_p.fields + ['enum:' ~ value_text(schema['enum'], true)] -%}
  {%- elif kind == 'ARRAY' and schema.get('items') is mapping and schema['items'] -%}
    {%- set ns_p.fields = ns_p.fields + ['items:{' ~ items_text(schema['items']) ~ '}'] -%}
  {%- endif -%}
  {%- if schema.get('nullable') -%}{%- set ns_p.fields = ns_p.fields + ['nullable:true'] -%}{%- endif -%}
  {%- if kind == 'OBJECT' -%}
    {%- set nested = schema.get('properties') -%}
    {%- set ns_p.fields = ns_p.fields + ['properties:{' ~ (parameters_text(nested) if nested is mapping else '')
        ~ '}'] -%}
    {%- if schema.get('required') -%}
      {%- set ns_p.fields = ns_p.fields + ['required:[' ~ names_text(schema['required']) ~ ']'] -%}{%- endif -%}
  {%- endif -%}
  {%- set ns_p.fields = ns_p.fields + ['type:' ~ D ~ kind ~ D] -%}
  {{- '{' ~ ns_p.fields | join(',') ~ '}' -}}
{%- endmacro -%}
{%- macro declaration_text(function) -%}
  {{- TOOL ~ 'declaration:' ~ function['name'] ~ '{description:' ~ D ~ (function.get('description') or '') ~ D -}}
  {%- set params = function.get('parameters') -%}
  {%- if params -%}
    {{- ',parameters:{' -}}
    {%- if params.get('properties') -%}{{- 'properties:{' ~ parameters_text(params['properties']) ~ '},' -}}
    {%- endif -%}
    {%- if params.get('required') -%}{{- 'required:[' ~ names_text(params['required']) ~ '],' -}}{%- endif -%}
    {{- 'type:' ~ D ~ params['type'] | upper ~ D ~ '}' -}}
  {%- endif -%}
  {{- '}' ~ TOOL_END -}}
{%- endmacro -%}
{%- macro call_text(call) -%}
  {%- set args = call['function'].get('arguments') -%}
  {{- CALL ~ 'call:' ~ call['function']['name'] ~ '{' -}}
  {%- if args is mapping -%}{%- for k, v in args | dictsort -%}{{- k ~ ':' ~ value_text(v, false) -}}
    {{- ',' if not loop.last else '' -}}{%- endfor -%}{%- endif -%}
  {{- '}' ~ CALL_END -}}
{%- endmacro -%}
{%- macro response_body(name, text) -%}
  {{- 'response:' ~ name ~ '{value:' ~ D ~ text ~ D ~ '}' ~ RESPONSE_END -}}
{%- endmacro -%}

{#- ===== messages: content, reasoning, tool calls ===== -#}
{%- macro parts_text(content, where, role) -%}
  {%- for part in content -%}
    {%- set kind = part.get('type') if part is mapping else none -%}
    {%- if kind != 'text' -%}
      {{- raise_exception(where ~ ' content part ' ~ loop.index0 ~ ' is ' ~ (("of type '" ~ kind ~ "'") if kind is not
          none else 'not a typed part') ~ "; Gemma 4 is trained on text parts only (type 'text')") -}}
    {%- endif -%}
    {%- if part.get('text') is not string -%}
      {{- raise_exception(where ~ ' content part ' ~ loop.index0 ~ " (text) has no 'text' string") -}}
    {%- endif -%}
    {%- if role == 'tool' -%}{{- part['text'] -}}
    {%- elif role == 'system' -%}{{- part['text'] | trim ~ ' ' -}}
    {%- else -%}{{- part['text'] | trim -}}
    {%- endif -%}
  {%- endfor -%}
{%- endmacro -%}
{#- A user message with image parts (gemma4._image_parts): checked in training's order, then written: texts
    trimmed, images as <|image|>, one after the other -#}
{%- macro has_image(content) -%}
  {%- if images_on and content is sequence and content is not string and content is not mapping -%}
    {%- for part in content -%}{%- if part is mapping and part.get('type') in image_types -%}1{%- endif -%}{%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- macro image_content(message, role, where) -%}
  {%- set content = message['content'] -%}
  {%- if role != 'user' -%}
    {{- raise_exception(where ~ " has an image; only user messages carry images here (the model writes text; images "
        ~ 'in system and tool messages are not trained)') -}}
  {%- endif -%}
  {%- for part in content -%}
    {%- if part is mapping and part.get('type') in ['input_text', 'output_text'] -%}
      {{- raise_exception(where ~ ' content part ' ~ loop.index0 ~ " is of type '" ~ part['type'] ~ "'; Gemma 4's "
          ~ "template reads text parts of type 'text'") -}}
    {%- endif -%}
  {%- endfor -%}
  {%- for part in content -%}
    {%- set kind = part.get('type') if part is mapping else none -%}
    {%- if kind not in image_types -%}
      {%- if kind in audio_types -%}
        {{- raise_exception(where ~ ' content part ' ~ loop.index0 ~ ' is audio (' ~ kind ~ '), ' ~ AUDIO_NOT_TRAINED) -}}
      {%- endif -%}
      {%- if kind != 'text' -%}
        {{- raise_exception(where ~ ' content part ' ~ loop.index0 ~ ' is ' ~ (("of type '" ~ kind ~ "'") if kind is
            not none else 'not a typed part') ~ '; parts are text (text, input_text, output_text) or images ('
            ~ image_types | join(', ') ~ ')') -}}
      {%- endif -%}
      {%- if part.get('text') is not string -%}
        {{- raise_exception(where ~ ' content part ' ~ loop.index0 ~ " (text) has no 'text' string") -}}
      {%- endif -%}
    {%- endif -%}
  {%- endfor -%}
  {%- set ns_run = namespace(text='') -%}
  {%- for part in content + [none] -%}
    {%- if part is not none and part.get('type') not in image_types -%}
      {%- set ns_run.text = ns_run.text ~ (part['text'] | trim) -%}
    {%- else -%}{{- check_text(ns_run.text, where) -}}{%- set ns_run.text = '' -%}
    {%- endif -%}
  {%- endfor -%}
  {%- for part in content -%}
    {%- if part.get('type') in image_types -%}{{- IMAGE -}}{%- else -%}{{- part['text'] | trim -}}{%- endif -%}
  {%- endfor -%}
{%- endmacro -%}
{#- A message's text (system, user, model), checked; tool messages' content is checked in check_tool_content -#}
{%- macro content_text(message, role, where) -%}
  {%- set content = message.get('content') -%}
  {%- if content is string -%}{%- set text = content | trim -%}
  {%- elif content is sequence and content is not mapping -%}{%- set text = parts_text(content, where, role) -%}
  {%- elif content is none and role == 'model' -%}{%- set text = '' -%}
  {%- else -%}{{- raise_exception(where ~ ' content is not text') -}}
  {%- endif -%}
  {{- check_text(text, where) -}}
  {{- text -}}
{%- endmacro -%}
{%- macro check_tool_content(message, where) -%}
  {%- set content = message.get('content') -%}
  {%- if content is mapping -%}
    {{- raise_exception(where ~ " content is a JSON object; Gemma 4's template reads a tool's result as text "
        ~ '(serialise it, e.g. as JSON)') -}}
  {%- endif -%}
  {%- if content is sequence and content is not string -%}{%- set content = parts_text(content, where, 'tool') -%}
  {%- endif -%}
  {%- if content is not string -%}{{- raise_exception(where ~ ' content is not text') -}}{%- endif -%}
  {{- check_text(content, where) -}}
{%- endmacro -%}
{%- macro tool_content(message) -%}
  {%- set content = message.get('content') -%}
  {%- if content is string -%}{{- content -}}
  {%- else -%}{%- for part in content -%}{{- part['text'] -}}{%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- macro reasoning_of(message) -%}
  {%- set ns_r = namespace(aliased=none) -%}
  {%- for k in aliased -%}{%- if ns_r.aliased is none and message.get(k) is not none -%}
    {%- set ns_r.aliased = message[k] -%}{%- endif -%}{%- endfor -%}
  {{- message.get('reasoning') or ns_r.aliased or '' -}}
{%- endmacro -%}
{%- macro check_reasoning(message, role, where) -%}
  {%- set ns_r = namespace(aliased=none) -%}
  {%- for k in aliased -%}{%- if ns_r.aliased is none and message.get(k) is not none -%}
    {%- set ns_r.aliased = message[k] -%}{%- endif -%}{%- endfor -%}
  {%- set key = 'reasoning' if message.get('reasoning') else 'reasoning_content' -%}
  {%- set value = message.get('reasoning') or ns_r.aliased -%}
  {%- if value -%}
    {%- if role != 'model' -%}
      {{- raise_exception(where ~ " has '" ~ key ~ "'; only the model's messages carry reasoning") -}}
    {%- endif -%}
    {%- if value is not string -%}{{- raise_exception(where ~ " '" ~ key ~ "' is not text") -}}{%- endif -%}
    {{- check_text(value, where) -}}
  {%- endif -%}
{%- endmacro -%}
{%- macro check_calls(calls, where) -%}
  {%- if calls is string or calls is mapping or calls is not sequence -%}
    {{- raise_exception(where ~ " 'tool_calls' is not a list") -}}
  {%- endif -%}
  {%- for call in calls -%}
    {%- set at = where ~ ' tool call ' ~ loop.index0 -%}
    {%- set function = call.get('function') if call is mapping else none -%}
    {%- if function is not mapping -%}{{- raise_exception(at ~ " has no 'function' object") -}}{%- endif -%}
    {{- check_name(function.get('name'), at ~ ' function') -}}
    {%- set args = function.get('arguments') -%}
    {%- if args is string -%}
      {{- raise_exception(at ~ ' (' ~ function['name'] ~ ") has arguments as a JSON string; Gemma 4's template "
          ~ 'takes a JSON object (decode it)') -}}
    {%- endif -%}
    {%- if args is not none and args is not mapping -%}
      {{- raise_exception(at ~ ' (' ~ function['name'] ~ ') arguments are not a JSON object') -}}
    {%- endif -%}
    {{- check_strings(args, at ~ ' (' ~ function['name'] ~ ')') -}}
  {%- endfor -%}
{%- endmacro -%}
{#- The name the official template gives a tool message (gemma4._tool_name), checked -#}
{%- macro tool_name(message, calls, i) -%}
  {%- set own = message.get('name') -%}
  {%- set ns_t = namespace(name=(own or none)) -%}
  {%- for call in calls -%}{%- if call.get('id') == message.get('tool_call_id') -%}
    {%- set ns_t.name = call['function']['name'] -%}{%- endif -%}{%- endfor -%}
  {%- set where = 'message ' ~ i ~ ' (tool)' -%}
  {%- if ns_t.name is none -%}
    {{- raise_exception(where ~ " names no tool: give it its call's tool_call_id (or a 'name')") -}}
  {%- endif -%}
  {%- if own and ns_t.name != own -%}
    {{- raise_exception(where ~ " is named '" ~ own ~ "', but Gemma 4's template names it after the call '"
        ~ ns_t.name ~ "' (the last call whose id equals its tool_call_id, '" ~ message.get('tool_call_id')
        ~ "'): give each call an id and each tool message its call's tool_call_id") -}}
  {%- endif -%}
  {{- check_name(ns_t.name, where ~ ' tool') -}}
  {{- ns_t.name -}}
{%- endmacro -%}

{#- ===== pass 1: what row_to_messages refuses, then each message as normalise checks it ===== -#}
{%- set thinking = enable_thinking | default(false) -%}
{%- set preserve = preserve_thinking | default(false) -%}
{%- set tool_list = tools if tools is defined and tools else [] -%}
{%- if refuse_legacy and messages is sequence and messages is not string -%}
  {%- for message in messages -%}
    {%- if message is mapping and message.get('function_call') -%}
      {{- raise_exception('message ' ~ loop.index0 ~ " has 'function_call' (OpenAI's legacy function call), which "
          ~ "Gemma 4's template does not read (write calls as 'tool_calls'); data.unsupported_fields=ignore trains "
          ~ 'on the text without it') -}}
    {%- endif -%}
  {%- endfor -%}
{%- endif -%}
{%- if messages is string or messages is not iterable or messages | length == 0 -%}
  {{- raise_exception('no messages') -}}
{%- endif -%}
{%- if tool_list -%}{{- check_tools(tool_list) -}}{%- endif -%}
{%- set ns = namespace(kinds=[], texts=[], nsys=0, all_system=true) -%}
{%- for message in messages -%}
  {%- set i = loop.index0 -%}
  {%- if message is not mapping -%}{{- raise_exception('message ' ~ i ~ ' is not an object') -}}{%- endif -%}
  {%- set raw = message.get('role') -%}
  {%- set key = (raw | string | lower) if raw is not none else '' -%}
  {%- if key not in roles -%}{{- raise_exception('message ' ~ i ~ " has unknown role '" ~ raw ~ "'") -}}{%- endif -%}
  {%- set role = roles[key] -%}
  {%- set where = 'message ' ~ i ~ ' (' ~ raw ~ ')' -%}
  {%- if message.get('tool_responses') -%}
    {{- raise_exception(where ~ " has 'tool_responses'; write each response as a tool message (role 'tool') after "
        ~ 'the message making the calls') -}}
  {%- endif -%}
  {%- if message.get('tool_calls') and role != 'model' -%}
    {{- raise_exception(where ~ " has 'tool_calls'; only the model's messages make tool calls") -}}
  {%- endif -%}
  {{- check_reasoning(message, role, where) -}}
  {%- set calls = message.get('tool_calls') or [] -%}
  {%- if calls -%}{{- check_calls(calls, where) -}}{%- endif -%}
  {%- if has_image(message.get('content')) -%}{%- set text = image_content(message, role, where) -%}
  {%- elif role == 'tool' -%}{{- check_tool_content(message, where) -}}{%- set text = '' -%}
  {%- else -%}{%- set text = content_text(message, role, where) -%}
  {%- endif -%}
  {%- if calls and text -%}
    {{- raise_exception(where ~ " has both tool calls and text; Gemma 4's template writes the text after the tool "
        ~ 'responses, not where the model wrote it: put it in the assistant message after them') -}}
  {%- endif -%}
  {%- if role in ['user', 'model'] and not text and not calls -%}
    {{- raise_exception(where ~ ' has empty content') -}}
  {%- endif -%}
  {%- if role == 'system' -%}
    {%- if i > 0 -%}
      {{- raise_exception(('message ' ~ i ~ " is a second system message; Gemma 4's template takes one")
          if ns.all_system else ('message ' ~ i ~ ' is a system message after the conversation started')) -}}
    {%- endif -%}
    {%- if policy == 'error' -%}
      {{- raise_exception('message ' ~ i ~ " is a system message and data.system_policy is 'error'") -}}
    {%- endif -%}
  {%- else -%}{%- set ns.all_system = false -%}
  {%- endif -%}
  {#- kinds: one per message: system, user, model, calls (a model message making tool calls), tool -#}
  {%- set ns.kinds = ns.kinds + [('calls' if calls else role)] -%}
  {%- set ns.texts = ns.texts + [text] -%}
{%- endfor -%}

{#- ===== pass 2: the order (gemma4._check_order); pass 3's reasoning and tool-name checks ===== -#}
{%- set first = 1 if ns.kinds[0] == 'system' else 0 -%}
{%- if ns.kinds | length == first -%}{{- raise_exception('no user or model messages') -}}{%- endif -%}
{%- set st = namespace(state='start', last_user=-1, k=0) -%}
{%- for kind in ns.kinds[first:] -%}
  {%- set i = loop.index0 + first -%}
  {%- set raw = messages[i].get('role') -%}
  {%- if kind == 'tool' and st.state not in ['calls', 'tool'] -%}
    {{- raise_exception('message ' ~ i ~ ' is a tool message that answers no tool call (it must follow the model '
        ~ 'message making the calls)') -}}
  {%- endif -%}
  {%- if kind != 'tool' and st.state == 'calls' -%}
    {{- raise_exception('message ' ~ i ~ ' (' ~ raw ~ ') comes before any tool message answers the tool calls '
        ~ 'before it') -}}
  {%- endif -%}
  {%- if kind == 'user' and st.state not in ['start', 'model', 'tool'] -%}
    {{- raise_exception('message ' ~ i ~ " is 'user' where the model was expected (roles must alternate, user "
        ~ 'first)') -}}
  {%- endif -%}
  {%- if kind in ['model', 'calls'] and st.state not in ['user', 'tool'] -%}
    {{- raise_exception('message ' ~ i ~ " is 'model' where the user was expected (roles must alternate, user "
        ~ 'first)') -}}
  {%- endif -%}
  {%- set st.state = kind -%}
  {%- if kind == 'user' -%}{%- set st.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- set ns3 = namespace(calls=[], reasoning=[], names=[]) -%}
{%- for kind in ns.kinds[first:] -%}
  {%- set k = loop.index0 -%}
  {%- set i = k + first -%}
  {%- set message = messages[i] -%}
  {%- set r = '' -%}
  {%- set n = '' -%}
  {%- if kind == 'tool' -%}{%- set n = tool_name(message, ns3.calls, i) -%}
  {%- elif kind in ['model', 'calls'] -%}
    {%- set value = reasoning_of(message) -%}
    {%- if value and (k > st.last_user or (preserve and kind == 'calls')) -%}
      {%- if not thinking -%}
        {{- raise_exception('message ' ~ i ~ ' (' ~ message.get('role') ~ ') has reasoning but thinking is off: the '
            ~ 'model would learn to think without <|think|> in the system turn; turn thinking on '
            ~ '(data.enable_thinking)') -}}
      {%- endif -%}
      {%- set r = value -%}
    {%- endif -%}
    {%- set ns3.calls = message.get('tool_calls') or [] -%}
  {%- endif -%}
  {%- set ns3.reasoning = ns3.reasoning + [r] -%}
  {%- set ns3.names = ns3.names + [n] -%}
{%- endfor -%}

{#- ===== rendering ===== -#}
{%- set kinds = ns.kinds[first:] -%}
{%- set keep_system = first == 1 and policy == 'fold' -%}
{{- BOS -}}
{%- if thinking or tool_list or keep_system -%}
  {{- TURN ~ 'system\n' ~ (THINK ~ '\n' if thinking else '') ~ (ns.texts[0] if keep_system else '') -}}
  {%- for tool in tool_list -%}{{- declaration_text(tool['function']) -}}{%- endfor -%}
  {{- END ~ '\n' -}}
{%- endif -%}
{%- set n_rest = kinds | length -%}
{%- for kind in kinds -%}
  {%- set k = loop.index0 -%}
  {%- set message = messages[k + first] -%}
  {%- if kind == 'user' -%}{{- TURN ~ 'user\n' ~ ns.texts[k + first] ~ END ~ '\n' -}}
  {%- elif kind == 'tool' -%}
    {{- RESPONSE ~ response_body(ns3.names[k], tool_content(message)) -}}
    {%- if not loop.last and kinds[k + 1] == 'user' -%}{{- END ~ '\n' -}}{%- endif -%}
  {%- else -%}
    {%- if k == 0 or kinds[k - 1] != 'tool' -%}
      {{- TURN ~ 'model\n' -}}
      {%- if empty_thought and not thinking and not add_generation_prompt and k > st.last_user
            and kinds[-1] != 'tool' -%}{{- EMPTY_THOUGHT -}}{%- endif -%}
    {%- endif -%}
    {%- if ns3.reasoning[k] -%}{{- THOUGHT_OPEN ~ ns3.reasoning[k] ~ THOUGHT_CLOSE -}}{%- endif -%}
    {%- if kind == 'calls' -%}
      {%- for call in message['tool_calls'] -%}{{- call_text(call) -}}{%- endfor -%}
      {%- if loop.last -%}{{- RESPONSE -}}{%- endif -%}
    {%- else -%}{{- ns.texts[k + first] ~ END ~ '\n' -}}
    {%- endif -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {%- if kinds[-1] == 'tool' -%}{%- if thinking -%}{{- THOUGHT_OPEN -}}{%- endif -%}
  {%- elif kinds[-1] != 'calls' -%}
    {{- TURN ~ 'model\n' ~ (EMPTY_THOUGHT if empty_thought and not thinking else '') -}}
  {%- endif -%}
{%- endif -%}
"""

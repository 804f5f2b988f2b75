"""The chat template saved with every run, checkpoint and merged folder: `normalise` + `render` in Jinja.

Generated from the family (how system text is folded) and the run's `data.system_policy`, so that
`apply_chat_template` (transformers, TGI, vLLM) gives exactly the ids training used, and refuses, with a
TemplateError naming why, every conversation training refuses. One difference by design: a template
accepts a conversation ending with a user turn (a prompt to answer), which training cannot learn from.

tests/unit/test_template.py renders a generated corpus through both paths for every policy.
"""

from __future__ import annotations

from ..families import GEMMA2, Family
from .sources import UNEXPRESSIBLE_MESSAGE_FIELDS
from .turns import (AUDIO_NOT_TRAINED, AUDIO_PART_TYPES, BOS, CONTROL_MARKERS, END, IMAGE_PART_TYPES, ROLE_NAMES,
                    START, TEXT_PART_TYPES, SystemPolicy)


def _literal(text: str) -> str:
    """A Python string as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def chat_template(family: Family = GEMMA2, system_policy: SystemPolicy = "fold", unsupported: str = "bad_row", *,
                  empty_thought: bool = False) -> str:
    """The Jinja chat template equivalent to `render(normalise(row_to_messages({"messages": messages},
    unsupported), system_policy, family=family, allow_open_end=True), add_generation_prompt=...)`: it raises
    (raise_exception) where those raise, including on `tools` and on messages with tool calls when
    `unsupported` is 'bad_row' (the format cannot express them), and ignores them when it is 'ignore'.

    A Gemma 4 family's template is template_gemma4.chat_template (tools, reasoning and enable_thinking read as the
    official template reads them; `empty_thought`: the checkpoint's size writes an empty thought block)."""
    if family.turn_format == "gemma4":
        from .template_gemma4 import chat_template as gemma4_template

        return gemma4_template(system_policy, unsupported, empty_thought=empty_thought,
                               images=family.images is not None)
    images = _image_macros(family)
    roles = "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in ROLE_NAMES.items()) + "}"
    markers = "[" + ", ".join(_literal(m) for m in CONTROL_MARKERS) + "]"
    part_types = "[" + ", ".join(_literal(t) for t in TEXT_PART_TYPES) + "]"
    verbatim = family.system_fold == "first_verbatim"
    keep_system = (
        "{%- set ns.system = content + '\\n\\n' -%}" if verbatim
        else "{%- set ns.system = ns.system + text + '\\n\\n' -%}"
    )
    second_system = (
        "{%- if ns.nsys > 0 -%}{{ raise_exception('message ' ~ i ~ ' is a second system message; "
        + family.display + "\\'s template takes one') }}{%- endif -%}" if verbatim and system_policy == "fold" else ""
    )
    on_system = {
        "fold": second_system + keep_system,
        "drop": "",
        "error": "{{ raise_exception('message ' ~ i ~ ' is a system message and the system policy is error') }}",
    }[system_policy]
    refuse_tools = unsupported != "ignore"
    tool_checks = (
        "{%- if tools is defined and tools -%}{{ raise_exception('tool definitions (tools), which Gemma\\'s turn "
        "format cannot express') }}{%- endif -%}" if refuse_tools else ""
    )
    call_checks = "".join(
        f"{{%- if message is mapping and '{field}' in message and message['{field}'] -%}}"
        f"{{{{ raise_exception('message ' ~ loop.index0 ~ ' has \\'{field}\\' ({what}), which Gemma\\'s turn format "
        "cannot express') }}{%- endif -%}"
        for field, what in UNEXPRESSIBLE_MESSAGE_FIELDS.items()) if refuse_tools else ""
    return (
        f"{{#- gemma2-tune: {family.display} turns, system policy {system_policy}; generated, do not edit -#}}"
        f"{{%- set roles = {roles} -%}}"
        f"{{%- set markers = {markers} -%}}"
        f"{{%- set text_types = {part_types} -%}}"
        # content_text: a string, or text parts joined by a space; any other part is refused naming its type
        "{%- macro content_text(content, where) -%}"
        "{%- if content is string -%}{{ content }}"
        "{%- elif content is sequence and content is not mapping -%}"
        "{%- for part in content -%}"
        "{%- set kind = part['type'] if part is mapping and 'type' in part else none -%}"
        "{%- if kind is none or kind not in text_types -%}{{ raise_exception(where ~ ' content part ' ~ loop.index0"
        " ~ ' is ' ~ (('of type \\'' ~ kind ~ '\\'') if kind is not none else 'not a typed part') ~ '; a text model"
        " takes only text parts (" + ", ".join(TEXT_PART_TYPES) + ")') }}{%- endif -%}"
        "{%- if 'text' not in part or part['text'] is not string -%}{{ raise_exception(where ~ ' content part ' ~"
        " loop.index0 ~ ' (' ~ kind ~ ') has no \\'text\\' string') }}{%- endif -%}"
        "{{ ' ' if not loop.first else '' }}{{ part['text'] }}"
        "{%- endfor -%}"
        "{%- else -%}{{ raise_exception(where ~ ' content is not text') }}{%- endif -%}"
        "{%- endmacro -%}"
        + images["macros"] +
        "{%- set ns = namespace(system='', nsys=0, nturns=0, fold=" + ("true" if system_policy == "fold" else "false")
        + ") -%}"
        "{%- if messages is string or messages is not iterable or messages | length == 0 -%}"
        "{{ raise_exception('no messages') }}{%- endif -%}"
        + tool_checks
        + "{%- for message in messages -%}" + call_checks + "{%- endfor -%}"
        # pass 1: each message as normalise checks it, in order; system text collected
        "{%- for message in messages -%}{%- set i = loop.index0 -%}"
        "{%- if message is not mapping -%}{{ raise_exception('message ' ~ i ~ ' is not an object') }}{%- endif -%}"
        "{%- set raw = message['role'] if 'role' in message else none -%}"
        "{%- set key = (raw | string | lower) if raw is not none else '' -%}"
        "{%- if key not in roles -%}{{ raise_exception('message ' ~ i ~ ' has unknown role ' ~ raw) }}{%- endif -%}"
        "{%- set role = roles[key] -%}"
        + images["pass1"] +
        "{%- set content = content_text(message['content'] if 'content' in message else none,"
        " 'message ' ~ i ~ ' (' ~ raw ~ ')') -%}"
        "{%- set text = content | trim -%}"
        "{%- if text == '' and role != 'system' -%}"
        "{{ raise_exception('message ' ~ i ~ ' (' ~ raw ~ ') has empty content') }}{%- endif -%}"
        "{%- if text != '' -%}"
        "{%- for marker in markers -%}{%- if marker in text -%}"
        "{{ raise_exception('message ' ~ i ~ ' (' ~ raw ~ ') contains the control marker ' ~ marker) }}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if role == 'system' -%}"
        "{%- if ns.nturns > 0 -%}"
        "{{ raise_exception('message ' ~ i ~ ' is a system message after the conversation started') }}{%- endif -%}"
        + on_system +
        "{%- set ns.nsys = ns.nsys + 1 -%}"
        "{%- else -%}{%- set ns.nturns = ns.nturns + 1 -%}{%- endif -%}"
        "{%- endif -%}"
        + images["pass1_end"] +
        "{%- endfor -%}"
        "{%- if ns.nturns == 0 -%}{{ raise_exception('no user or model messages') }}{%- endif -%}"
        # pass 2: roles alternate, user first
        "{%- set ns.nturns = 0 -%}"
        "{%- for message in messages -%}{%- set role = roles[message['role'] | string | lower] -%}"
        "{%- if role != 'system' -%}"
        "{%- set expected = 'user' if ns.nturns % 2 == 0 else 'model' -%}"
        "{%- if role != expected -%}{{ raise_exception('turn ' ~ ns.nturns ~ ' is ' ~ role ~ ' where ' ~ expected"
        " ~ ' was expected (roles must alternate, user first)') }}{%- endif -%}"
        "{%- set ns.nturns = ns.nturns + 1 -%}"
        "{%- endif -%}{%- endfor -%}"
        # pass 3: render
        f"{{{{ {_literal(BOS)} }}}}"
        "{%- set ns.nturns = 0 -%}"
        "{%- for message in messages -%}{%- set role = roles[message['role'] | string | lower] -%}"
        "{%- if role != 'system' -%}"
        + images["render"] +
        "{%- if ns.nturns == 0 and ns.fold -%}{%- set text = ns.system + text -%}{%- endif -%}"
        f"{{{{ {_literal(START)} ~ role ~ '\\n' ~ text ~ {_literal(END)} ~ '\\n' }}}}"
        "{%- set ns.nturns = ns.nturns + 1 -%}"
        "{%- endif -%}{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {_literal(START)} ~ 'model\\n' }}}}{{%- endif -%}}"
    )


def _literal_list(items) -> str:
    return "[" + ", ".join(_literal(i) for i in items) + "]"


def _image_macros(family: Family) -> dict[str, str]:
    """The template's pieces for image parts (turns.content_parts and _image_turn in Jinja), for a family that reads
    images: a user message whose content holds an image part renders each text part trimmed and each image as the
    family's placeholder, one after the other (the official Gemma 3 template's rendering); images elsewhere, parts
    of other types and control markers in the texts between images are refused with training's words. For a text
    family the content is rendered as text (content_text refuses image parts as a text model's template does)."""
    text_render = "{%- set text = content_text(message['content'], '') | trim -%}"
    if family.images is None:
        return {"macros": "", "pass1": "", "pass1_end": "", "render": text_render}
    image_types = "[" + ", ".join(_literal(t) for t in IMAGE_PART_TYPES) + "]"
    macros = (
        f"{{%- set image_types = {image_types} -%}}"
        "{%- macro has_image(content) -%}"
        "{%- if content is sequence and content is not string and content is not mapping -%}"
        "{%- for part in content -%}{%- if part is mapping and part.get('type') in image_types -%}1{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
        # the parts as rendered: texts trimmed, images as the placeholder
        "{%- macro image_content(content) -%}"
        "{%- for part in content -%}"
        "{%- if part['type'] in image_types -%}" f"{{{{ {_literal(family.images.placeholder)} }}}}"
        "{%- else -%}{{ part['text'] | trim }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- endmacro -%}"
        # training's checks, in its order: each part's type, the role, the texts between images
        "{%- macro check_image_content(content, where, role) -%}"
        "{%- for part in content -%}"
        "{%- set kind = part['type'] if part is mapping and 'type' in part else none -%}"
        "{%- if kind not in image_types -%}"
        f"{{%- if kind in {_literal_list(AUDIO_PART_TYPES)} -%}}{{{{ raise_exception(where ~ ' content part ' ~ "
        f"loop.index0 ~ ' is audio (' ~ kind ~ '), ' ~ {_literal(AUDIO_NOT_TRAINED)}) }}}}{{%- endif -%}}"
        "{%- if kind is none or kind not in text_types -%}{{ raise_exception(where ~ ' content part ' ~ loop.index0"
        " ~ ' is ' ~ (('of type \\'' ~ kind ~ '\\'') if kind is not none else 'not a typed part') ~ '; parts are text ("
        + ", ".join(TEXT_PART_TYPES) + ") or images (" + ", ".join(IMAGE_PART_TYPES) + ")') }}{%- endif -%}"
        "{%- if 'text' not in part or part['text'] is not string -%}{{ raise_exception(where ~ ' content part ' ~"
        " loop.index0 ~ ' (' ~ kind ~ ') has no \\'text\\' string') }}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if role != 'user' -%}{{ raise_exception(where ~ ' has an image; only user messages carry images (the "
        "model writes text, and a system message is text)') }}{%- endif -%}"
        "{%- set ns_run = namespace(text='') -%}"
        "{%- for part in content + [none] -%}"
        "{%- if part is not none and part['type'] not in image_types -%}"
        "{%- set ns_run.text = ns_run.text ~ (part['text'] | trim) -%}"
        "{%- else -%}"
        "{%- for marker in markers -%}{%- if marker in ns_run.text -%}"
        "{{ raise_exception(where ~ ' contains the control marker ' ~ marker) }}{%- endif -%}{%- endfor -%}"
        "{%- set ns_run.text = '' -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endmacro -%}"
    )
    pass1 = ("{%- set content_raw = message['content'] if 'content' in message else none -%}"
             "{%- if has_image(content_raw) -%}"
             "{{- check_image_content(content_raw, 'message ' ~ i ~ ' (' ~ raw ~ ')', role) -}}"
             "{%- set ns.nturns = ns.nturns + 1 -%}"
             "{%- else -%}")
    render = ("{%- if has_image(message['content']) -%}{%- set text = image_content(message['content']) -%}"
              "{%- else -%}" + text_render + "{%- endif -%}")
    return {"macros": macros, "pass1": pass1, "pass1_end": "{%- endif -%}", "render": render}


def is_generated(template: str | None) -> bool:
    """A chat template this package generated (chat_template above; its first line says so)."""
    return bool(template) and "gemma2-tune: " in template[:200] and "generated, do not edit" in template[:200]


def use_run_template(tokenizer, family: Family, system_policy: SystemPolicy, unsupported: str = "bad_row", *,
                     empty_thought: bool = False) -> str | None:
    """Give `tokenizer` the run's generated template. Returns the template it carried before when that one
    differs (a base or -it checkpoint's own, to keep beside the run as chat_template.base.jinja), else None."""
    ours = chat_template(family, system_policy, unsupported, empty_thought=empty_thought)
    before = getattr(tokenizer, "chat_template", None)
    tokenizer.chat_template = ours
    return before if before and before != ours else None


def template_record(family: Family, cfg, base_template: str | None, empty_thought: bool = False) -> dict:
    """What run.json says about the chat template saved with a run (`cfg`: its RunConfig): the family and system
    policy it was generated for, whether it replaced the checkpoint's own; Gemma 4 adds its two switches."""
    record = {"generated_for": family.key, "system_policy": cfg.data.system_policy,
              "replaced_base_template": base_template is not None}
    if family.turn_format == "gemma4":
        record.update(enable_thinking=cfg.data.enable_thinking, empty_thought=empty_thought)
    return record

"""The Ollama Modelfile of an exported GGUF: `TEMPLATE` is the training renderer written as a Go text/template.

Ollama renders a conversation with a Go `text/template` over `.Messages` (each `.Role`, `.Content`), after its
own preprocessing (server `template.Execute` -> `collate`): consecutive messages of one role are merged into one,
joined by a blank line. The template below then does what `normalise` + `render(add_generation_prompt=True)` do
(data/turns.py), under the run's family and system policy:

- roles as our renderer names them (user/human, assistant/model/gpt/bot, system), content trimmed as Python's
  `str.strip()` trims (the same whitespace set), a turn whose text is empty refused, an empty system message
  dropped, a control marker (`<start_of_turn>`, `<eos>`, `<unused…`) refused, system text folded into the first
  user turn as the family folds it (Gemma 2: trimmed texts joined by blank lines; Gemma 3: one system message,
  verbatim) or dropped or refused (policy `error`), roles alternating user first;
- the conversation must end with a user turn (the model answers it), as `serve` requires;
- no `<bos>`: llama.cpp adds it when it tokenizes (the GGUF says `add_bos_token`), as Ollama's own Gemma
  templates rely on; emitting it too would give two.

A refusal is an execution error naming the reason: `{{ template "refused: …" }}` names a template that does not
exist, which text/template reports when it is reached (Ollama answers the request with that error). The
template needs Go 1.22 or newer (`range` over an integer, to trim and scan content byte by byte: text/template
has no string functions and Ollama adds none but `json`).

tests/e2e/test_export.py renders a corpus with a real Go text/template (and Ollama's collate step) and compares it
byte for byte with our renderer.
"""

from __future__ import annotations

import json
import sys

from ..data.turns import CONTROL_MARKERS, END, ROLE_NAMES, START, SystemPolicy
from ..families import Family

# Python's str.strip() removes exactly the characters whose str.isspace() is true.
WHITESPACE = tuple(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())


def _go(text: str) -> str:
    """A Go string literal (JSON's escapes are valid Go escapes, except that Go has no \\/; json.dumps never
    writes it)."""
    return json.dumps(text, ensure_ascii=True)


def _refuse(reason: str) -> str:
    return "{{- template " + _go("refused: " + reason) + " -}}"


def _roles(kind: str) -> str:
    names = [_go(name) for name, role in ROLE_NAMES.items() if role == kind]
    return " ".join(names)


def _trim(src: str, dst: str) -> str:
    """Set variable `dst` to `src` without leading and trailing whitespace (Python's `str.strip()`). Byte by byte:
    a rune starts at a byte outside 0x80-0xBF; `printf "%.1s"` of the rest is that rune."""
    ws = " ".join(_go(c) for c in WHITESPACE)
    return (
        f"{{{{- $found := false -}}}}{{{{- $s := 0 -}}}}{{{{- $e := 0 -}}}}{{{{- $prev := false -}}}}"
        f"{{{{- range $k := len {src} -}}}}"
        f"{{{{- $r := printf \"%.1s\" (slice {src} $k) -}}}}"
        "{{- if or (lt $r \"\\x80\") (ge $r \"\\xc0\") -}}"
        "{{- if $prev -}}{{- $e = $k -}}{{- end -}}"
        f"{{{{- if eq $r {ws} -}}}}{{{{- $prev = false -}}}}"
        "{{- else -}}{{- $prev = true -}}{{- if not $found -}}{{- $s = $k -}}{{- $found = true -}}{{- end -}}{{- end -}}"
        "{{- end -}}"
        "{{- end -}}"
        f"{{{{- if $prev -}}}}{{{{- $e = len {src} -}}}}{{{{- end -}}}}"
        f"{{{{- {dst} = \"\" -}}}}{{{{- if $found -}}}}{{{{- {dst} = slice {src} $s $e -}}}}{{{{- end -}}}}"
    )


def _markers(src: str) -> str:
    """Refuse when `src` contains a control marker (each is ASCII, so `printf "%.Ns"` of the rest is N bytes
    when it matches)."""
    tests = " ".join(f"(eq (printf \"%.{len(m)}s\" (slice {src} $k)) {_go(m)})" for m in CONTROL_MARKERS)
    return (f"{{{{- range $k := len {src} -}}}}{{{{- if or {tests} -}}}}"
            + _refuse("a message contains a control marker (" + ", ".join(CONTROL_MARKERS) + ")")
            + "{{- end -}}{{- end -}}")


def ollama_template(family: Family, system_policy: SystemPolicy) -> str:
    """The Go text/template equal to our renderer's prompt (without its leading `<bos>`) for every conversation
    it accepts that ends with a user turn; an execution error for every one it refuses. Needs Go >= 1.22."""
    verbatim = family.system_fold == "first_verbatim"
    if system_policy == "error":
        on_system = _refuse("a system message, and the run's system policy is error")
    elif system_policy == "drop":
        on_system = ""
    elif verbatim:  # Gemma 3's template takes one system message, verbatim, then a blank line
        on_system = ("{{- if $hadsys -}}" + _refuse(f"a second system message; {family.display}'s template takes one")
                     + "{{- end -}}{{- $system = print $m.Content \"\\n\\n\" -}}")
    else:  # Gemma 2: trimmed system texts, each followed by a blank line
        on_system = "{{- $system = print $system $t \"\\n\\n\" -}}"
    fold = system_policy == "fold"
    return (
        f"{{{{- /* gemma2-tune: {family.display} turns, system policy {system_policy}; generated, do not edit. "
        "Go >= 1.22 */ -}}"
        "{{- if not .Messages -}}" + _refuse("no messages") + "{{- end -}}"
        "{{- $system := \"\" -}}{{- $hadsys := false -}}{{- $started := false -}}{{- $expect := \"user\" -}}"
        "{{- $out := \"\" -}}{{- $t := \"\" -}}"
        "{{- range $m := .Messages -}}"
        "{{- $role := \"\" -}}"
        f"{{{{- if eq $m.Role {_roles('user')} -}}}}{{{{- $role = \"user\" -}}}}"
        f"{{{{- else if eq $m.Role {_roles('model')} -}}}}{{{{- $role = \"model\" -}}}}"
        "{{- else if eq $m.Role \"system\" -}}{{- $role = \"system\" -}}"
        "{{- else -}}" + _refuse("a message has a role other than user, assistant or system") + "{{- end -}}"
        + _trim("$m.Content", "$t")
        + "{{- if eq $t \"\" -}}"
        "{{- if ne $role \"system\" -}}" + _refuse("a user or assistant message is empty") + "{{- end -}}"
        "{{- else -}}"
        + _markers("$t")
        + "{{- if eq $role \"system\" -}}"
        "{{- if $started -}}" + _refuse("a system message after the conversation started") + "{{- end -}}"
        + on_system + "{{- $hadsys = true -}}"
        "{{- else -}}"
        "{{- if ne $role $expect -}}" + _refuse("roles must alternate, user first") + "{{- end -}}"
        + ("{{- if not $started -}}{{- $t = print $system $t -}}{{- end -}}" if fold else "")
        + f"{{{{- $out = print $out {_go(START)} $role \"\\n\" $t {_go(END + chr(10))} -}}}}"
        "{{- $started = true -}}"
        "{{- if eq $expect \"user\" -}}{{- $expect = \"model\" -}}{{- else -}}{{- $expect = \"user\" -}}{{- end -}}"
        "{{- end -}}"
        "{{- end -}}"
        "{{- end -}}"
        "{{- if not $started -}}" + _refuse("no user or assistant messages") + "{{- end -}}"
        "{{- if ne $expect \"model\" -}}" + _refuse("the conversation must end with a user message") + "{{- end -}}"
        f"{{{{- $out -}}}}{{{{- {_go(START + 'model' + chr(10))} -}}}}"
    )


def modelfile(gguf_name: str, family: Family, system_policy: SystemPolicy, parameters: dict[str, object],
              license_text: str | None) -> str:
    """The Modelfile text: FROM the GGUF beside it (a relative path: Ollama resolves it from the Modelfile's
    folder), our TEMPLATE, `stop "<end_of_turn>"` and `parameters` (Ollama names), and LICENSE when the weights
    carry terms."""
    template = ollama_template(family, system_policy)
    assert '"""' not in template  # Modelfile's multi-line quoting
    lines = [f"# gemma2-tune export: {family.display}, system policy {system_policy}",
             "# ollama create NAME -f THIS_FILE", f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""',
             f'PARAMETER stop "{END}"']
    lines += [f"PARAMETER {key} {value}" for key, value in parameters.items()]
    if license_text:
        lines.append(f'LICENSE """{license_text}"""')
    return "\n".join(lines) + "\n"


def reference_prompt(messages: list, family: Family, system_policy: SystemPolicy) -> str:
    """What the Modelfile's template must produce for `messages` as Ollama's template sees them (after its
    collate step): our renderer's prompt without the leading `<bos>`. Raises BadRow where our renderer refuses,
    and when the conversation does not end with a user turn (as `serve` refuses it)."""
    from ..data.turns import BOS, BadRow, normalise, render

    turns = normalise(messages, system_policy, allow_open_end=True, family=family)
    if turns[-1].role != "user":
        raise BadRow("the conversation must end with a user message (the model answers it)")
    text = render(turns, add_generation_prompt=True).text
    return text[len(BOS):]

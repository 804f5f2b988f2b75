"""Gemma 4: the saved template renders what training renders, and what the official template renders.

A generated corpus (system text, multi-turn, tool declarations of every schema shape the syntax writes, tool calls
over one and two steps with and without ids, tool responses as text, objects and text parts, reasoning under all
three field names before and after the last user turn, thinking on and off, preserve_thinking, role aliases, and
rows carrying each thing training refuses) goes through three paths, with and without the generation prompt, for
both size classes and every system policy:
- training: row_to_messages + normalise + render (gemma2_tune/data/gemma4.py);
- our generated template, through a tokenizer's apply_chat_template (transformers' own Jinja environment);
- the official template: google/gemma-4-E2B-it at 8995379 as shipped in TRL (gemma4_v5.jinja), and for the
  12B/26B-A4B/31B class the same template with their generation prompt's empty thought block.
Training and our template give the same text (and ids), or refuse with the same message. Where training accepts,
the official template gives the same text, except by design: a 12B/26B-A4B/31B row ending with the model's answer
starts that answer with the empty thought block the generation prompt wrote (the official template, rendering the
row as history, leaves it out).
"""

import random
import re
from collections import Counter
from pathlib import Path

import pytest
import trl
from jinja2.exceptions import TemplateError

from gemma2_tune.data.gemma4 import ROLES
from gemma2_tune.data.sources import row_to_messages
from gemma2_tune.data.template import chat_template, use_run_template
from gemma2_tune.data.turns import BadRow, normalise, render
from gemma2_tune.families import gemma4_format as g4

OFFICIAL = (Path(trl.__file__).parent / "chat_templates" / "gemma4_v5.jinja").read_text()
GENERATION_HEADER = "        {{- '<|turn>model\\n' -}}\n"


def official_template(empty_thought: bool) -> str:
    """The official template of the E2B/E4B class, or of the 12B/26B-A4B/31B class: the same plus the empty thought
    block after the generation prompt's header when thinking is off (google/gemma-4-31B-it's template)."""
    assert OFFICIAL.count(GENERATION_HEADER) == 1
    if not empty_thought:
        return OFFICIAL
    return OFFICIAL.replace(GENERATION_HEADER, GENERATION_HEADER + "        {%- if not enable_thinking -%}\n"
                            "            {{- '<|channel>thought\\n<channel|>' -}}\n        {%- endif -%}\n")


# --- the corpus ------------------------------------------------------------------------------------------------

TEXTS = ["Hello.", "  padded both sides  ", "\n\nnewlines around\n", "Unicode: 日本語, emoji 🚢⚓, café",
         "```python\ndef f(x):\n    return x * 2\n```", "x", "Line one\nLine two\n\nLine four", "{\"json\": true}",
         "A " + "long turn " * 60]
REASONINGS = ["The user wants the weather.", "  spaces kept  ", "step 1\nstep 2\n", "Ünïcödé thought"]
SCHEMAS = {
    "city": {"type": "string", "description": "City name"},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Unit"},
    "days": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "points": {"type": "array", "description": "Points", "items": {
        "type": "object", "properties": {"x": {"type": "number"}, "Y": {"type": "number", "nullable": True}},
        "required": ["x"]}},
    "filters": {"type": "object", "properties": {"min": {"type": "number", "description": "lowest"},
                                                 "max": {"type": "number"}}, "required": ["min"]},
    "meta": {"type": "object", "description": "Free-form"},
    "Flag": {"type": "boolean", "nullable": True},
    "mixed": {"type": "array", "items": {"type": ["string", "null"], "description": "one", "enum": ["a", "b"]}},
}


def tool(name: str, rng: random.Random) -> dict:
    function = {"name": name, "description": rng.choice(["Gets data.", "", "  Trailing space "])}
    shape = rng.random()
    if shape < 0.15:
        pass  # no parameters
    elif shape < 0.25:
        function["parameters"] = {"type": "object", "properties": {}}
    else:
        names = rng.sample(sorted(SCHEMAS), rng.randint(1, 4))
        function["parameters"] = {"type": "object", "properties": {n: SCHEMAS[n] for n in names},
                                  "required": names[:rng.randint(0, len(names))]}
        if rng.random() < 0.2:
            function["parameters"]["additionalProperties"] = False
    if rng.random() < 0.3:
        function["strict"] = True
    return {"type": "function", "function": function}


def value(rng: random.Random, depth: int = 0):
    kinds = ["str", "int", "float", "bool", "none"] + (["list", "dict"] if depth < 2 else [])
    kind = rng.choice(kinds)
    return {"str": lambda: rng.choice(["Paris", "", " spaced ", "a,b:c{d}", "日本"]), "int": lambda: rng.randint(-5, 99),
            "float": lambda: rng.choice([2.5, -0.125, 1e20, 3.0]), "bool": lambda: rng.random() < 0.5,
            "none": lambda: None, "list": lambda: [value(rng, depth + 1) for _ in range(rng.randint(0, 3))],
            "dict": lambda: {rng.choice(["b", "A", "c", "zeta", "Alpha"]): value(rng, depth + 1)
                             for _ in range(rng.randint(0, 3))}}[kind]()


def reasoning(message: dict, rng: random.Random) -> None:
    message[rng.choice(["reasoning", "reasoning_content", "thinking"])] = rng.choice(REASONINGS)


def model_turn(rng: random.Random, names: list[str], last: bool, counter: list) -> list[dict]:
    """One model turn: an answer, or tool calls answered by tool messages (one or two steps) and an answer; the
    last turn may end after the calls or after the responses."""
    messages = []
    steps = rng.choice([0, 0, 1, 1, 2]) if names else 0
    with_ids = rng.random() < 0.6
    for _ in range(steps):
        calls = []
        for _ in range(rng.choice([1, 1, 2])):
            counter[0] += 1
            call = {"type": "function", "function": {"name": rng.choice(names),
                                                     "arguments": rng.choice([{}, None, {"city": "Paris"}, {
                                                         "q": value(rng), "B": value(rng), "a": value(rng)}])}}
            if with_ids:
                call["id"] = f"call_{counter[0]}"
            calls.append(call)
        message = {"role": "assistant", "tool_calls": calls}
        if rng.random() < 0.3:
            message["content"] = rng.choice(["", None])
        if rng.random() < 0.4:
            reasoning(message, rng)
        messages.append(message)
        if last and rng.random() < 0.15:
            return messages  # ends with the calls: the model stops at <|tool_response>
        for call in (calls[:1] if len(calls) > 1 and with_ids and rng.random() < 0.2 else calls):
            response = {"role": "tool", "content": rng.choice(
                ["Sunny, 21C", "", "  spaced result ", '{"temp": 21, "sky": "clear"}',
                 [{"type": "text", "text": "part one "}, {"type": "text", "text": "part two"}]])}
            if with_ids:
                response["tool_call_id"] = call["id"]
            if not with_ids or rng.random() < 0.3:
                response["name"] = call["function"]["name"]
            messages.append(response)
        if last and rng.random() < 0.15:
            return messages  # ends with the responses: a prompt the model continues
    answer = {"role": rng.choice(["assistant"] * 8 + ["model", "gpt"]), "content": rng.choice(TEXTS + [
        [{"type": "text", "text": " In "}, {"type": "text", "text": "Paris. "}]])}
    if rng.random() < 0.4:
        reasoning(answer, rng)
    return messages + [answer]


def conversation(rng: random.Random) -> tuple[list, list | None]:
    names = sorted(rng.sample(["get_weather", "search", "Lookup_2", "add"], rng.randint(1, 3))) \
        if rng.random() < 0.55 else []
    tools = [tool(n, rng) for n in names] or None
    messages = []
    roll = rng.random()
    if roll < 0.45:
        messages.append({"role": "system", "content": rng.choice(TEXTS + ["", "  ", [
            {"type": "text", "text": " Be brief. "}, {"type": "text", "text": "Be kind."}]])})
    exchanges = rng.randint(1, 3)
    counter = [0]
    for e in range(exchanges):
        messages.append({"role": rng.choice(["user"] * 8 + ["human", "User"]), "content": rng.choice(TEXTS + [
            [{"type": "text", "text": "Where "}, {"type": "text", "text": " is Rome?\n"}]])})
        if e < exchanges - 1 or rng.random() < 0.85:
            messages += model_turn(rng, names, e == exchanges - 1, counter)
    return messages, tools


def mutate(messages: list, tools: list | None, rng: random.Random) -> tuple[list, list | None, str]:
    """One thing training refuses (or that the official template would render wrong), named."""
    model = [m for m in messages if m.get("role") in ("assistant", "model", "gpt")]
    callers = [m for m in model if m.get("tool_calls")]
    toolmsgs = [m for m in messages if m.get("role") == "tool"]
    users = [m for m in messages if m.get("role") in ("user", "human", "User")]
    options = {
        "marker in text": lambda: users[0].update(content=f"what is {rng.choice(g4.CONTROL_MARKERS)}?"),
        "empty user": lambda: users[0].update(content=rng.choice(["", "  \n"])),
        "image part": lambda: users[0].update(content=[{"type": "text", "text": "see"},
                                                       {"type": "image_url", "image_url": {"url": "x"}}]),
        "input_text part": lambda: users[0].update(content=[{"type": "input_text", "text": "hi"}]),
        "untyped part": lambda: users[0].update(content=[{"text": "hi"}]),
        "no content": lambda: users[0].pop("content"),
        "unknown role": lambda: rng.choice(messages).update(role=rng.choice(["robot", "function", "developer"])),
        "user first": lambda: messages.insert(0 if messages[0]["role"] != "system" else 1,
                                              {"role": "assistant", "content": "Hi!"}),
        "two users": lambda: messages.insert(messages.index(users[0]), {"role": "user", "content": "and?"}),
        "second system": lambda: messages.insert(0, {"role": "system", "content": "One."}) if messages[0]["role"] ==
        "system" else messages.insert(0, {"role": "system", "content": "Two."}) or messages.insert(
            0, {"role": "system", "content": "One."}),
        "late system": lambda: messages.insert(len(messages), {"role": "system", "content": "Late."}),
        "reasoning on user": lambda: users[0].update(reasoning_content="hmm"),
        "tool_responses": lambda: (model or users)[0].update(tool_responses=[{"name": "x", "response": "y"}]),
        "function_call": lambda: (model or users)[0].update(function_call={"name": "x", "arguments": "{}"}),
        "non-string reasoning": lambda: (model or users)[0].update(reasoning=["a", "b"]),
        "stray tool": lambda: messages.insert(messages.index(users[0]) + 1, {"role": "tool", "content": "x",
                                                                             "name": "search"}),
        "tool_calls on user": lambda: users[0].update(tool_calls=[{"function": {"name": "f", "arguments": {}}}]),
    }
    if callers:
        call = callers[0]["tool_calls"][0]["function"]
        options.update({
            "string arguments": lambda: call.update(arguments='{"city": "Paris"}'),
            "list arguments": lambda: call.update(arguments=[1, 2]),
            "marker in arguments": lambda: call.update(arguments={"q": f"x{rng.choice(g4.CONTROL_MARKERS)}"}),
            "bad call name": lambda: call.update(name=rng.choice(["get-weather", "a.b", "", None, "名前"])),
            "calls and text": lambda: callers[0].update(content="Let me check."),
            "calls then user": lambda: messages.insert(messages.index(callers[0]) + 1,
                                                       {"role": "user", "content": "well?"}),
            "no function": lambda: callers[0]["tool_calls"].append({"id": "z"}),
            "tool_calls not a list": lambda: callers[0].update(tool_calls={"function": {"name": "f"}}),
        })
    if toolmsgs:
        options.update({
            "unnamed response": lambda: [toolmsgs[0].pop(k, None) for k in ("name",)] and toolmsgs[0].update(
                tool_call_id="nope"),
            "misnamed response": lambda: toolmsgs[0].update(name="someone_else"),
            "marker in response": lambda: toolmsgs[0].update(content=f"v{rng.choice(g4.CONTROL_MARKERS)}"),
            "response content not text": lambda: toolmsgs[0].update(content=rng.choice([7, None, [1, 2]])),
            "response object": lambda: toolmsgs[0].update(content={"temp": 21}),
        })
    if tools:
        function = tools[0]["function"]
        options.update({
            "tool name": lambda: function.update(name="get weather"),
            "parameters without type": lambda: function.update(parameters={"properties": {"a": {"type": "string"}}}),
            "parameter without type": lambda: function.update(parameters={"type": "object", "properties": {
                "a": {"description": "no type"}}}),
            "object with other keys": lambda: function.update(parameters={"type": "object", "properties": {
                "a": {"type": "object", "additionalProperties": {"type": "string"}}}}),
            "response declaration": lambda: function.update(response={"type": "object"}),
            "null description": lambda: function.update(description=None),
            "tool type": lambda: tools[0].update(type="retrieval"),
            "marker in description": lambda: function.update(description=f"a {rng.choice(g4.CONTROL_MARKERS)}"),
            "required not names": lambda: function.update(parameters={"type": "object", "properties": {
                "a": {"type": "string"}}, "required": "a"}),
            "not a tool": lambda: tools.append("get_weather"),
        })
    if not tools and rng.random() < 0.3:
        return messages, {"type": "function"}, "tools not a list"
    name = rng.choice(sorted(options))
    options[name]()
    return messages, tools, name


def corpus(seed: int = 0, n: int = 420) -> list[tuple[list, list | None, dict, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages, tools = conversation(rng)
        what = "ok"
        if rng.random() < 0.35:
            messages, tools, what = mutate(messages, tools, rng)
        settings = {"enable_thinking": rng.random() < 0.5, "preserve_thinking": rng.random() < 0.15}
        out.append((messages, tools, settings, what))
    return out


# --- the three paths -------------------------------------------------------------------------------------------

def training(family, messages, tools, settings, policy, generation_prompt, empty_thought, unsupported="bad_row"):
    """What training renders for a row holding this conversation (and its tools)."""
    rows = row_to_messages({"messages": messages, "tools": tools}, unsupported, family=family)
    turns = normalise(rows, policy, family=family, tools=tools, allow_open_end=True,
                      thinking=settings["enable_thinking"], preserve_thinking=settings["preserve_thinking"])
    return render(turns, family=family, thinking=settings["enable_thinking"], empty_thought=empty_thought,
                  add_generation_prompt=generation_prompt).text


def transformers_refusal(messages: list, tools) -> type | None:
    """What apply_chat_template refuses before any template runs: tools that are not JSON schemas (dicts)."""
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        return ValueError
    return None


def canonical(messages: list, policy: str) -> list:
    """The conversation as the official template reads it: canonical roles; no system message under 'drop'."""
    out = [dict(m, role={"model": "assistant"}.get(ROLES[str(m["role"]).lower()], ROLES[str(m["role"]).lower()]))
           for m in messages]
    return out[1:] if policy == "drop" and out[0]["role"] == "system" else out


def with_empty_thought(text: str) -> str:
    """The official text with the empty thought block where our rows carry it: after the last model header."""
    at = text.rindex("<|turn>model\n") + len("<|turn>model\n")
    return text[:at] + g4.EMPTY_THOUGHT + text[at:]


@pytest.mark.parametrize("empty_thought", [False, True], ids=["E2B-E4B", "12B-26B-31B"])
@pytest.mark.parametrize("policy", ["fold", "drop", "error"])
def test_template_equals_training_and_the_official_template_on_a_generated_corpus(gemma4, gemma4_tokenizer, policy,
                                                                                   empty_thought):
    tokenizer = gemma4_tokenizer
    use_run_template(tokenizer, gemma4, policy, empty_thought=empty_thought)
    official = official_template(empty_thought)
    seen = Counter()
    for messages, tools, settings, what in corpus():
        try:
            expected = {g: training(gemma4, messages, tools, settings, policy, g, empty_thought) for g in (False, True)}
        except BadRow as exc:
            error = transformers_refusal(messages, tools)
            with pytest.raises(error or TemplateError) as refused:
                tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **settings)
            assert error or str(refused.value) == str(exc), what
            seen["refused"] += 1
            seen[f"refused: {what}"] += 1
            continue
        assert what == "ok" or what in ("late system",) and policy != "fold", (what, messages)
        for g, text in expected.items():
            ours = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=g,
                                                 **settings)
            assert ours == text
            theirs = tokenizer.apply_chat_template(canonical(messages, policy), tools=tools, tokenize=False,
                                                   add_generation_prompt=g, chat_template=official, **settings)
            ends_with_answer = ROLES[str(messages[-1]["role"]).lower()] == "model"
            if empty_thought and not g and not settings["enable_thinking"] and ends_with_answer:
                theirs = with_empty_thought(theirs)
                seen["empty thought inserted"] += 1
            assert ours == theirs, (what, messages, tools, settings, g)
        seen["accepted"] += 1
        seen["tools"] += bool(tools)
        seen["tool responses"] += "<tool_response|>" in expected[False]
        seen["two tool steps"] += expected[False].count("<|tool_call>") > 1 and "<|tool_response>response" in expected[
            False]
        seen["ends with calls"] += expected[False].endswith("<tool_call|><|tool_response>")
        seen["ends with responses"] += expected[False].endswith("<tool_response|>")
        seen["reasoning"] += "<|channel>thought\n" in expected[False].replace(g4.EMPTY_THOUGHT, "")
        seen["reasoning dropped"] += any(m.get(k) for m in messages for k in ("reasoning", "reasoning_content",
                                                                              "thinking")) and \
            expected[False].count("<|channel>thought") < sum(bool(m.get("reasoning") or m.get("reasoning_content")
                                                                  or m.get("thinking")) for m in messages)
        seen["thinking on"] += settings["enable_thinking"]
        seen["system"] += expected[False].startswith("<bos><|turn>system\n")
        seen["multi-turn"] += expected[False].count("<|turn>user") > 1
    coverage = ["tools", "tool responses", "two tool steps", "ends with calls", "ends with responses", "reasoning",
                "reasoning dropped", "thinking on", "system", "multi-turn"] + (
        ["empty thought inserted"] if empty_thought else [])
    assert seen["accepted"] >= (100 if policy == "error" else 150) and seen["refused"] >= 100, seen
    assert all(seen[c] >= 5 for c in coverage), seen
    refusals = {k for k in seen if k.startswith("refused: ")}
    assert len(refusals) >= 30, sorted(refusals)


def test_template_ids_are_the_training_ids(gemma4, gemma4_tokenizer):
    """For conversations training accepts, apply_chat_template's ids are the ids of the text training renders."""
    tokenizer = gemma4_tokenizer
    use_run_template(tokenizer, gemma4, "fold")
    checked = 0
    for messages, tools, settings, what in corpus(seed=1, n=80):
        try:
            text = training(gemma4, messages, tools, settings, "fold", False, False)
        except BadRow:
            continue
        ids = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False, **settings)
        assert list(ids) == tokenizer(text, add_special_tokens=False).input_ids
        checked += 1
    assert checked >= 30


def test_legacy_function_fields_follow_the_runs_setting(gemma4, gemma4_tokenizer):
    tokenizer = gemma4_tokenizer
    call = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Let me check.", "function_call": {"name": "w", "arguments": "{}"}}]
    use_run_template(tokenizer, gemma4, "fold", "bad_row")
    with pytest.raises(BadRow, match="legacy function call") as exc:
        training(gemma4, call, None, {"enable_thinking": False, "preserve_thinking": False}, "fold", False, False)
    with pytest.raises(TemplateError, match=re.escape(str(exc.value))):
        tokenizer.apply_chat_template(call, tokenize=False)
    use_run_template(tokenizer, gemma4, "fold", "ignore")
    assert tokenizer.apply_chat_template(call, tokenize=False) == training(
        gemma4, call, None, {"enable_thinking": False, "preserve_thinking": False}, "fold", False, False, "ignore")


def test_the_template_is_generated_per_policy_and_size_class(gemma4):
    templates = {chat_template(gemma4, p, empty_thought=e) for p in ("fold", "drop", "error") for e in (False, True)}
    assert len(templates) == 6
    assert all("generated, do not edit" in t[:200] for t in templates)

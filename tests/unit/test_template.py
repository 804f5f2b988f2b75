"""One renderer: the chat template saved with a run is the training renderer, written in Jinja.

A generated corpus (whitespace and newlines at the edges, unicode, code, very long turns, role aliases,
system messages at every position, empty content, markers, non-text content, multi-turn) goes through
both paths for every system policy and family, and through a tokenizer that carried an -it-style
template of its own: the same ids where training accepts a conversation, a TemplateError naming the
same reason where it refuses one.
"""

import random
import re
import shutil
from collections import Counter

import pytest
from jinja2.exceptions import TemplateError

from gemma2_tune.data.template import chat_template, use_run_template
from gemma2_tune.data.sources import row_to_messages
from gemma2_tune.data.turns import BadRow, normalise, render
from gemma2_tune.families import GEMMA2, GEMMA3_TEXT

# A base template like the -it checkpoints' (Gemma 2's refuses system messages), written here.
IT_STYLE_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
REASONS = ["no messages", "tool_calls", "function_call", "not an object", "unknown role", "content is not text",
           "a text model takes only text parts", "has no 'text' string",
           "empty content",
           "control marker", "after the conversation started", "is a system message and", "second system message",
           "no user or model messages", "roles must alternate"]
TEXTS = ["Hello.", "  padded both sides  ", "\n\nnewlines around\n", "Tabs\tinside\tand trailing\t",
         "Unicode: 日本語, עברית, emoji 🚢⚓, café", "```python\ndef f(x):\n    return x * 2\n```",
         "A " + "very long turn " * 300, "x", "Line one\nLine two\n\nLine four", "  <b>html</b> & ampersands "]
BAD_TEXTS = ["", "   \n\t ", "what does <start_of_turn> mean?", "ends with <end_of_turn>", "<|im_start|>user",
             "text <|im_end|>"]
ROLES_USER = ["user", "human", "User"]
ROLES_MODEL = ["assistant", "model", "gpt", "bot", "ASSISTANT"]
ODD_ROLES = ["tool", "function", "robot", None, 3]


def corpus(seed: int = 0, n: int = 260) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        turns = rng.randint(1, 6)
        messages = []
        for t in range(turns):
            role = rng.choice(ROLES_USER if t % 2 == 0 else ROLES_MODEL)
            messages.append({"role": role, "content": rng.choice(TEXTS)})
        roll = rng.random()
        if roll < 0.35:  # system at the start (sometimes two)
            for _ in range(rng.choice([1, 1, 2])):
                messages.insert(0, {"role": "system", "content": rng.choice(TEXTS + ["", "  "])})
        elif roll < 0.45:  # system anywhere
            messages.insert(rng.randint(0, len(messages)), {"role": "system", "content": rng.choice(TEXTS)})
        if rng.random() < 0.15:
            messages[rng.randrange(len(messages))]["content"] = rng.choice(BAD_TEXTS)
        if rng.random() < 0.05:
            messages[rng.randrange(len(messages))]["role"] = rng.choice(ODD_ROLES)
        if rng.random() < 0.05:
            messages[rng.randrange(len(messages))]["content"] = rng.choice(
                [None, 7, [{"type": "text", "text": "hi"}], {"text": "hi"}, [{"type": "text", "text": " Where"},
                 {"type": "input_text", "text": "is Rome?\n"}], [{"type": "text", "text": "see"},
                 {"type": "image_url", "image_url": {"url": "x"}}], [{"text": "untyped"}], [{"type": "text"}], []])
        if rng.random() < 0.05:
            rng.shuffle(messages)
        if rng.random() < 0.06:  # what the format cannot express: a tool call on a model turn
            model_turns = [m for m in messages if isinstance(m, dict) and m.get("role") in ROLES_MODEL]
            if model_turns:
                model_turns[0][rng.choice(["tool_calls", "function_call"])] = [{"name": "get_weather"}]
        out.append(messages)
    out += [[], [{"role": "system", "content": "only a system message"}], ["not a dict"],
            [{"role": "user"}], [{"content": "no role"}]]
    return out


def refusal(conversation, reason):
    """The exception apply_chat_template raises: transformers itself refuses an empty conversation and
    non-dict messages before any template runs; everything else is our template's TemplateError."""
    if not conversation:
        return ValueError, "empty conversation"
    if any(not isinstance(m, dict) for m in conversation):
        return TypeError, "should be dicts"
    return TemplateError, reason


def python_path(conversation, policy, family, generation_prompt, unsupported="bad_row"):
    """What training renders for a row holding this conversation (its fields checked as training checks them)."""
    messages = row_to_messages({"messages": conversation}, unsupported)
    return render(normalise(messages, policy, allow_open_end=True, family=family),
                  add_generation_prompt=generation_prompt).text


def template_ids(tokenizer, conversation, generation_prompt):
    ids = tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=generation_prompt,
                                        return_dict=False)
    return list(ids)


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir, tmp_path_factory, tune_home):
    """Tiny Gemma 2 and Gemma 3 tokenizers, and one whose checkpoint carried an -it-style template."""
    from gemma2_tune.models.builtin import builtin_path
    from gemma2_tune.models.loading import load_tokenizer

    it_dir = tmp_path_factory.mktemp("it-style")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, it_dir / name)
    (it_dir / "chat_template.jinja").write_text(IT_STYLE_TEMPLATE)
    it = load_tokenizer(str(it_dir))
    assert it.chat_template == IT_STYLE_TEMPLATE
    return {"gemma2": (load_tokenizer(str(tiny_model_dir)), GEMMA2),
            "gemma2 -it-style base": (it, GEMMA2),
            "gemma3": (load_tokenizer(str(builtin_path("builtin:tiny-gemma3"))), GEMMA3_TEXT)}


@pytest.mark.parametrize("policy", ["fold", "drop", "error"])
@pytest.mark.parametrize("which", ["gemma2", "gemma2 -it-style base", "gemma3"])
def test_template_equals_training_renderer_on_a_generated_corpus(tokenizers, which, policy):
    tokenizer, family = tokenizers[which]
    if which.endswith("base"):
        tokenizer.chat_template = IT_STYLE_TEMPLATE  # as loaded from its checkpoint
        assert use_run_template(tokenizer, family, policy) == IT_STYLE_TEMPLATE  # replaced, and kept by the caller
    else:
        use_run_template(tokenizer, family, policy)
    outcome = Counter()
    for conversation in corpus():
        try:
            expected = {g: python_path(conversation, policy, family, g) for g in (False, True)}
        except BadRow as exc:
            reason = next(r for r in REASONS if r in str(exc))
            error, match = refusal(conversation, reason)
            with pytest.raises(error, match=match):
                tokenizer.apply_chat_template(conversation, tokenize=False)
            outcome["refused"] += 1
            continue
        for g, text in expected.items():
            assert tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=g) == text
            assert template_ids(tokenizer, conversation, g) == tokenizer(text, add_special_tokens=False).input_ids
        outcome["accepted"] += 1
    assert outcome["accepted"] >= 100 and outcome["refused"] >= 40, outcome
    assert sum(outcome.values()) >= 200


def test_training_ids_are_the_templates_ids(tokenizers):
    """For a conversation training learns from, the ids it trains on are apply_chat_template's."""
    from gemma2_tune.data.examples import TurnTokenizer

    tokenizer, family = tokenizers["gemma2"]
    use_run_template(tokenizer, family, "fold")
    conversation = [{"role": "system", "content": " Be brief. "}, {"role": "human", "content": "Hi ☀"},
                    {"role": "gpt", "content": "Hello!\n"}]
    encoded = TurnTokenizer(tokenizer).encode(normalise(conversation, "fold"))
    assert encoded.ids == template_ids(tokenizer, conversation, False)


@pytest.mark.parametrize("which", ["gemma2", "gemma3"])
def test_text_parts_are_joined_and_other_parts_refused_alike_in_training_and_template(tokenizers, which):
    """OpenAI-style content: text parts joined by a space (as serve joins them), an image part refused naming
    its type, by the training renderer and by the template alike."""
    tokenizer, family = tokenizers[which]
    use_run_template(tokenizer, family, "fold")
    parts = [{"role": "system", "content": [{"type": "text", "text": " Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Where"}, {"type": "input_text", "text": "is Rome?"}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": "In Italy."}]}]
    plain = [{"role": "system", "content": " Be brief."}, {"role": "user", "content": "Where is Rome?"},
             {"role": "assistant", "content": "In Italy."}]
    expected = python_path(plain, "fold", family, False)
    assert python_path(parts, "fold", family, False) == expected
    assert tokenizer.apply_chat_template(parts, tokenize=False) == expected
    image = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                          {"type": "image_url", "image_url": {"url": "cat.png"}}]}]
    reason = "message 0 (user) content part 1 is of type 'image_url'; a text model takes only text parts"
    with pytest.raises(BadRow, match=re.escape(reason)):
        python_path(image, "fold", family, True)
    with pytest.raises(TemplateError, match=re.escape(reason)):
        tokenizer.apply_chat_template(image, tokenize=False)


@pytest.mark.parametrize("unsupported", ["bad_row", "ignore"])
def test_tools_and_tool_calls_follow_the_runs_setting(tokenizers, unsupported):
    tokenizer, family = tokenizers["gemma2"]
    use_run_template(tokenizer, family, "fold", unsupported)
    call = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [{"name": "w"}]}]
    plain = [{"role": "user", "content": "Weather?"}]
    if unsupported == "bad_row":
        with pytest.raises(TemplateError, match="tool_calls"):
            tokenizer.apply_chat_template(call, tokenize=False)
        with pytest.raises(TemplateError, match="tool definitions"):
            tokenizer.apply_chat_template(plain, tools=[{"type": "function", "function": {"name": "w"}}], tokenize=False)
    else:  # trained on the text without them, so served the same way
        assert tokenizer.apply_chat_template(call, tokenize=False) == python_path(call, "fold", family, False, "ignore")


def test_the_template_is_generated_per_policy_and_family():
    assert len({chat_template(f, p) for f in (GEMMA2, GEMMA3_TEXT) for p in ("fold", "drop", "error")}) == 6


@pytest.mark.slow
def test_a_run_serves_what_it_trained_even_from_an_it_checkpoint(tiny_model_dir, tmp_path):
    """Base template replaced (and kept), the run's policy baked into run, checkpoint and merged folder."""
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from gemma2_tune.cli import app

    base = tmp_path / "tiny-it"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").write_text(IT_STYLE_TEMPLATE)
    out, merged = tmp_path / "run", tmp_path / "merged"
    runner = CliRunner()
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "--model", str(base), "-o", str(out),
                            "--max-steps", "2", "--set", "training.save_steps=2", "--set", "data.system_policy=drop"])
    assert r.exit_code == 0, r.output
    assert "replaces the checkpoint's own template (kept as chat_template.base.jinja)" in r.output
    assert (out / "chat_template.base.jinja").read_text() == IT_STYLE_TEMPLATE
    r = runner.invoke(app, ["merge", "--adapter", str(out), "--output", str(merged)])
    assert r.exit_code == 0, r.output
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = python_path(conversation, "drop", GEMMA2, True)  # the system text is dropped, as in training
    for folder in (out, out / "checkpoint-2", merged):
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == expected, folder
    import json

    assert json.loads((out / "run.json").read_text())["chat_template"] == {
        "generated_for": "gemma2", "system_policy": "drop", "replaced_base_template": True}

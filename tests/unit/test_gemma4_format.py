"""Gemma 4's turn format in training: golden strings, what is supervised, the empty thought block, refusals,
the tiny tokenizer's special tokens, stop tokens and preview."""

import json
import re
from collections import Counter

import pytest

from gemma2_tune.config.schema import SftDataSection
from gemma2_tune.data.examples import TurnTokenizer, build_examples, mark_supervised
from gemma2_tune.data.gemma4 import REASONING_DROPPED, split_answer, writes_empty_thought
from gemma2_tune.data.sources import Row
from gemma2_tune.data.turns import BadRow, Text, Turn, normalise, render
from gemma2_tune.families import GEMMA2, gemma4_format as g4

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
DECLARATION = ('<|tool>declaration:get_weather{description:<|"|>Current weather.<|"|>,parameters:{properties:{'
               'city:{description:<|"|>City<|"|>,type:<|"|>STRING<|"|>},unit:{enum:[<|"|>c<|"|>,<|"|>f<|"|>],'
               'type:<|"|>STRING<|"|>}},required:[<|"|>city<|"|>],type:<|"|>OBJECT<|"|>}}<tool|>')
AGENT = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "reasoning_content": "I need the weather.",
          "tool_calls": [{"id": "c1", "type": "function",
                          "function": {"name": "get_weather", "arguments": {"unit": "c", "city": "Paris"}}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "21C, sunny"},
         {"role": "assistant", "content": "Sunny, 21°C."}]


def rendered(family, messages, tools=None, *, thinking=False, empty_thought=False, generation_prompt=False,
             notes=None):
    turns = normalise(messages, "fold", family=family, tools=tools, thinking=thinking,
                      allow_open_end=generation_prompt, notes=notes)
    return render(turns, family=family, thinking=thinking, empty_thought=empty_thought,
                  add_generation_prompt=generation_prompt)


def supervised(r):
    return [r.text[a:b] for a, b in r.supervised]


def test_an_agentic_row_renders_in_gemma4s_syntax(gemma4):
    r = rendered(gemma4, AGENT, [WEATHER], thinking=True)
    assert r.text == (
        "<bos><|turn>system\n<|think|>\nBe brief." + DECLARATION + "<turn|>\n"
        "<|turn>user\nWeather in Paris?<turn|>\n"
        "<|turn>model\n<|channel>thought\nI need the weather.\n<channel|>"
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,unit:<|"|>c<|"|>}<tool_call|>'
        '<|tool_response>response:get_weather{value:<|"|>21C, sunny<|"|>}<tool_response|>'
        "Sunny, 21°C.<turn|>\n")
    # what the model writes: its thought, its call and the <|tool_response> it stops at, its answer and <turn|>;
    # never the headers, the system turn or the tool's response
    assert supervised(r) == ['<|channel>thought\nI need the weather.\n<channel|><|tool_call>call:get_weather{city:'
                             '<|"|>Paris<|"|>,unit:<|"|>c<|"|>}<tool_call|><|tool_response>', "Sunny, 21°C.<turn|>"]


def test_the_mask_on_tokens(gemma4, gemma4_tokenizer):
    """Token by token: <turn|> and the first <|tool_response> learned; headers, <tool_response|> and the response
    body not."""
    turns = normalise(AGENT, "fold", family=gemma4, tools=[WEATHER], thinking=True)
    encoded = TurnTokenizer(gemma4_tokenizer, gemma4, thinking=True).encode(turns)
    tokens = gemma4_tokenizer.convert_ids_to_tokens(encoded.ids)
    learned = Counter(t for t, m in zip(tokens, encoded.mask) if m)
    unlearned = Counter(t for t, m in zip(tokens, encoded.mask) if not m)
    assert learned["<turn|>"] == 1 and unlearned["<turn|>"] == 2  # the answer's; the system's and user's
    assert learned["<|tool_response>"] == 1 and learned["<tool_response|>"] == 0
    assert learned["<|channel>"] == 1 and learned["<channel|>"] == 1 and learned["<|tool_call>"] == 1
    assert learned["<|turn>"] == 0 and learned["<|think|>"] == 0 and learned["<|tool>"] == 0
    marked = mark_supervised(encoded, 10_000)
    assert "⟦Sunny, 21°C.<turn|>⟧" in marked and "<|tool_response>⟧response:get_weather" in marked


def test_two_calls_the_model_stops_once(gemma4):
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": c}}} for c in "AB"]
    messages = [{"role": "user", "content": "A and B?"}, {"role": "assistant", "tool_calls": calls},
                {"role": "tool", "name": "get_weather", "content": "1"},
                {"role": "tool", "name": "get_weather", "content": "2"},
                {"role": "assistant", "content": "Both fine."}]
    r = rendered(gemma4, messages)
    assert r.text.count("<|tool_response>") == 2
    assert supervised(r) == ['<|tool_call>call:get_weather{city:<|"|>A<|"|>}<tool_call|><|tool_call>call:get_weather'
                             '{city:<|"|>B<|"|>}<tool_call|><|tool_response>', "Both fine.<turn|>"]


def test_a_row_ending_with_calls_learns_to_stop_at_tool_response(gemma4):
    messages = AGENT[1:3]
    r = rendered(gemma4, messages, thinking=True)
    assert r.text.endswith("<tool_call|><|tool_response>") and supervised(r)[-1].endswith("<|tool_response>")
    with pytest.raises(BadRow, match=re.escape("the last turn is not the model's")):
        normalise(AGENT[1:4], "fold", family=gemma4, thinking=True)  # ends with the tool's response


@pytest.mark.parametrize("thinking", [False, True])
def test_the_empty_thought_block_is_the_generation_prompts(gemma4, thinking):
    """12B/26B-A4B/31B with thinking off: the generation prompt ends with the empty thought block, and a training
    row is that prompt followed by the answer (the block not learned)."""
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    prompt = rendered(gemma4, chat[:1], thinking=thinking, empty_thought=True, generation_prompt=True).text
    row = rendered(gemma4, chat, thinking=thinking, empty_thought=True)
    assert prompt.endswith("<|turn>model\n" + ("" if thinking else "<|channel>thought\n<channel|>"))
    assert row.text == prompt + "Hello.<turn|>\n" and supervised(row) == ["Hello.<turn|>"]
    small = rendered(gemma4, chat, thinking=thinking).text  # E2B/E4B: no block
    assert small == "<bos>" + ("<|turn>system\n<|think|>\n<turn|>\n" if thinking else "") + \
        "<|turn>user\nHi<turn|>\n<|turn>model\nHello.<turn|>\n"


def test_only_the_last_exchanges_reasoning_is_kept(gemma4):
    notes = Counter()
    chat = [{"role": "user", "content": "1?"}, {"role": "assistant", "content": "One.", "reasoning": "easy"},
            {"role": "user", "content": "2?"}, {"role": "assistant", "content": "Two.", "reasoning": "also easy"}]
    r = rendered(gemma4, chat, thinking=True, notes=notes)
    assert "easy\n" not in r.text.split("<|turn>user\n2?")[0] and "<|channel>thought\nalso easy\n<channel|>" in r.text
    assert notes == {REASONING_DROPPED: 1}


@pytest.mark.parametrize("messages, tools, thinking, reason", [
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning": "R"}], None, False,
     "message 1 (assistant) has reasoning but thinking is off"),
    ([{"role": "user", "content": "see <|turn>"}, {"role": "assistant", "content": "A"}], None, False,
     "message 0 (user) contains the control marker <|turn>"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"function": {"name": "f", "arguments": {}}}]}], None, False, "has both tool calls and text"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": '{"a": 1}'}}]}], None, False, "arguments as a JSON string"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "tool_calls": [
        {"id": "1", "function": {"name": "f", "arguments": {}}}]}, {"role": "tool", "content": "x"},
      {"role": "assistant", "content": "A"}], None, False, "message 2 (tool) names no tool"),
    ([{"role": "user", "content": "Q"}, {"role": "tool", "name": "f", "content": "x"}], None, False,
     "message 1 is a tool message that answers no tool call"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], [
        {"type": "function", "function": {"name": "get-weather"}}], False, "name 'get-weather' is not letters"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], [
        {"type": "function", "function": {"name": "f", "parameters": {"properties": {}}}}], False,
     "'parameters' has no 'type' string"),
])
def test_refusals_name_the_message_and_why(gemma4, messages, tools, thinking, reason):
    with pytest.raises(BadRow, match=re.escape(reason)):
        normalise(messages, "fold", family=gemma4, tools=tools, thinking=thinking)


def test_gemma2_refuses_what_only_gemma4_has(gemma4):
    with pytest.raises(BadRow, match="tool definitions"):
        normalise([{"role": "user", "content": "Q"}], "fold", tools=[WEATHER], allow_open_end=True)
    with pytest.raises(BadRow, match="no thinking mode"):
        normalise([{"role": "user", "content": "Q"}], "fold", thinking=True, allow_open_end=True)
    with pytest.raises(ValueError, match="rendered in Gemma 2's format"):
        render([Turn("system", [Text("S")]), Turn("user", "Q")], family=GEMMA2)


def test_the_tiny_tokenizer_has_gemma4s_special_tokens_at_their_ids(gemma4_tokenizer):
    tok = gemma4_tokenizer
    for token, i in g4.SPECIAL_TOKEN_IDS.items():
        if i < len(tok):
            assert tok.convert_tokens_to_ids(token) == i, token
            assert tok(token, add_special_tokens=False).input_ids == [i], token
    assert tok("Hi").input_ids[0] == g4.SPECIAL_TOKEN_IDS["<bos>"]  # adds <bos>, as Gemma's tokenizers do


def test_generation_stops_where_gemma4s_published_config_does(gemma4_tokenizer, tokenizer):
    from gemma2_tune.models.serving import stop_ids

    assert stop_ids(gemma4_tokenizer) == [1, 106, 50]  # <eos>, <turn|>, <|tool_response>
    assert stop_ids(tokenizer) == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]


def test_split_answer():
    assert split_answer("<|channel>thought\nLet me see.\n<channel|>Four.<turn|>") == ("Let me see.", "Four.")
    assert split_answer("Four.<turn|>junk") == (None, "Four.")
    assert split_answer("<|channel>thought\nstill thinking") == ("still thinking", "")


def test_the_empty_thought_size_comes_from_the_checkpoint(gemma4, tmp_path):
    assert writes_empty_thought(gemma4, "google/gemma-4-31B-it") and writes_empty_thought(gemma4, "google/gemma-4-26B-A4B")
    assert not writes_empty_thought(gemma4, "google/gemma-4-E4B-it") and not writes_empty_thought(GEMMA2, "gemma-2-27b")
    shape = next(iter(gemma4.shapes.values()))
    size = next(iter(gemma4.shapes))
    sized = __import__("dataclasses").replace(gemma4, empty_thought_sizes=(size,))
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"hidden_size": shape.hidden,
                                                                      "num_hidden_layers": shape.layers}}))
    assert writes_empty_thought(sized, str(tmp_path)) and not writes_empty_thought(gemma4, str(tmp_path))


def test_examples_and_preview_show_turn_end_learned(gemma4, gemma4_tokenizer, tmp_path):
    from gemma2_tune.data.preview import preview

    rows = [{"messages": AGENT, "tools": [WEATHER]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = SftDataSection(dataset=str(path), enable_thinking=True)
    examples, report = build_examples([Row(f"row {i}", r) for i, r in enumerate(rows)], gemma4_tokenizer, data,
                                      gemma4)
    assert report.rows_kept == 2 and report.rows_bad == 0
    shown = list(preview(data, gemma4_tokenizer, gemma4, 2))
    assert "⟦Hello.<turn|>⟧" in shown[1][1] and "<|tool_response>⟧response:get_weather" in shown[0][1]
    off = SftDataSection(dataset=str(path))  # the agent row has reasoning: thinking must be on
    _, report = build_examples([Row(f"row {i}", r) for i, r in enumerate(rows)], gemma4_tokenizer, off, gemma4)
    assert report.rows_bad == 1 and "has reasoning but thinking is off" in report.bad_rows[0]


def test_preference_pairs_answer_after_the_generation_prompt(gemma4, gemma4_tokenizer):
    """dpo/reward: the prompt is Gemma 4's generation prompt (with the size's empty thought block), each answer
    what follows it; a side whose messages carry reasoning or tools is refused (a side is read as text turns)."""
    from gemma2_tune.config.schema import PreferenceDataSection
    from gemma2_tune.data.preferences import build_pairs

    tok = gemma4_tokenizer
    rows = [Row("r0", {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}),
            Row("r1", {"chosen": [{"role": "user", "content": "Q"},
                                  {"role": "assistant", "content": "A", "reasoning": "r"}],
                       "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "B"}]})]
    pairs, report = build_pairs(rows, tok, PreferenceDataSection(dataset="x"), gemma4, empty_thought=True)
    assert tok.decode(pairs[0].prompt_ids) == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    assert tok.decode(pairs[0].chosen_ids) == "Hello.<turn|>\n"
    assert report.bad_rows == ["r1: chosen: message 1 has 'reasoning': preference pairs carry text turns only (no "
                               "reasoning or tools yet)"]

"""serve for Gemma 4 without a model: a reply's thought, text and tool calls come apart as OpenAI's
`reasoning_content`, `content` and `tool_calls` (streamed and whole alike), and a request may declare tools, send
tool calls and their answers back, and turn thinking on or off; everything else stays refused as for Gemma 2/3."""

import json
from pathlib import Path

import pytest

from gemma2_tune.after.serve import Checked, Served, check_request
from gemma2_tune.after.serve.replies import ReplySplitter, read_calls, special_strings
from gemma2_tune.families import GEMMA2, GEMMA4

pytest.importorskip("fastapi")
HI = [{"role": "user", "content": "Hi"}]
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                             "parameters": {"type": "object", "properties": {
                                                 "city": {"type": "string"}, "days": {"type": "integer"}},
                                                 "required": ["city"]}}}]
# what a Gemma 4 model writes when it thinks, says something and calls a tool (then stops at <|tool_response>)
REPLY = ['<|channel>', 'thought', '\n', 'The user', ' wants', ' weather.', '\n', '<channel|>', 'Checking', '.',
         '<|tool_call>', 'call', ':get_weather{', 'city:', '<|"|>', 'Paris', '<|"|>', ',days:', '3', '}',
         '<tool_call|>', '<|tool_response>']


@pytest.fixture(scope="module")
def tokenizer(gemma4_tokenizer):
    return gemma4_tokenizer


@pytest.fixture(scope="module")
def served(tokenizer):
    return Served(Path("/nonexistent"), "tiny-g4", "fold", GEMMA4, "tiny-g4", tokenizer=tokenizer, context=4096,
                  vocab_size=len(tokenizer), max_token_chars=16)


def split(pieces, tokenizer):
    splitter = ReplySplitter(special_strings(tokenizer))
    deltas = [d for p in pieces for d in splitter.feed(p)] + splitter.finish()
    return splitter, deltas


@pytest.mark.parametrize("chunking", ["token", "whole", "pairs"])
def test_a_reply_splits_into_thought_text_and_calls_however_it_arrives(tokenizer, chunking):
    pieces = {"token": REPLY, "whole": ["".join(REPLY)],
              "pairs": ["".join(REPLY[i:i + 2]) for i in range(0, len(REPLY), 2)]}[chunking]
    splitter, deltas = split(pieces, tokenizer)
    assert splitter.reasoning == "The user wants weather." and splitter.content == "Checking."
    assert "".join(d.get("reasoning_content", "") for d in deltas) == splitter.reasoning
    assert "".join(d.get("content", "") for d in deltas) == splitter.content
    assert splitter.calls == ['<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>']
    calls, unread = read_calls(tokenizer, splitter.calls, WEATHER)
    assert unread == "" and len(calls) == 1 and calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 3}


def test_a_plain_reply_is_its_text_and_what_follows_a_stop_is_dropped(tokenizer):
    splitter, _ = split(["Hello", " there", "<pad>", "!", "<turn|>", "more"], tokenizer)
    assert splitter.content == "Hello there!" and splitter.reasoning == "" and splitter.calls == []


def test_a_thought_cut_by_the_limit_is_all_thought_and_a_call_never_closed_is_text(tokenizer):
    splitter, _ = split(["<|channel>", "thought\nstill", " going\n"], tokenizer)
    assert splitter.reasoning == "still going\n" and splitter.content == ""
    splitter, _ = split(["ok", "<|tool_call>", "call:get_weather{city:"], tokenizer)
    assert splitter.content == "okcall:get_weather{city:" and splitter.calls == []
    calls, unread = read_calls(tokenizer, ["<|tool_call>call:get_weather{city:<tool_call|>"], WEATHER)
    assert calls == [] and "get_weather" in unread  # unreadable: given back as text, not dropped


def test_tools_thinking_and_tool_answers_render_as_training_renders_them(served, tokenizer):
    from gemma2_tune.after.inference import prompt_ids

    checked = check_request({"messages": HI, "tools": WEATHER, "chat_template_kwargs": {"enable_thinking": True}},
                            served)
    assert isinstance(checked, Checked), checked
    expected = prompt_ids(HI, tokenizer, "fold", GEMMA4, thinking=True, tools=WEATHER)[0].tolist()
    assert checked.ids == expected and checked.thinking and checked.tools == WEATHER
    text = tokenizer.decode(checked.ids)
    assert "<|think|>" in text and "get_weather" in text and text.endswith("<|turn>model\n")
    plain = check_request({"messages": HI}, served)
    assert "<|think|>" not in tokenizer.decode(plain.ids) and not plain.thinking
    none = check_request({"messages": HI, "tools": WEATHER, "tool_choice": "none"}, served)
    assert none.ids == plain.ids  # "none": the model is not shown the tools
    # an OpenAI client sends the call back with arguments as a JSON string, then the tool's answer
    history = HI + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    answered = check_request({"messages": history, "tools": WEATHER}, served)
    assert isinstance(answered, Checked), answered
    text = tokenizer.decode(answered.ids)
    assert 'call:get_weather{city:<|"|>Paris<|"|>}' in text and "sunny" in text


GEMMA4_BAD = [
    ({"messages": HI, "chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
    ({"messages": HI, "chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs"),
    ({"messages": HI, "tools": WEATHER, "tool_choice": "required"}, "tool_choice"),
    ({"messages": HI, "tools": WEATHER, "parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"messages": HI, "reasoning_effort": "high"}, "reasoning_effort"),
    ({"messages": HI, "functions": [{"name": "f"}]}, "functions"),
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": "bad name"}}]}, "messages"),
    ({"messages": HI + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "x"}], "tools": WEATHER}, "messages"),
    ({"messages": [{"role": "user", "content": "a <turn|> b"}]}, "messages"),
]


@pytest.mark.parametrize("body,param", GEMMA4_BAD, ids=[p + str(i) for i, (_, p) in enumerate(GEMMA4_BAD)])
def test_what_gemma4_cannot_honour_is_a_400_naming_the_field(served, body, param):
    problem = check_request(json.loads(json.dumps(body)), served)
    assert not isinstance(problem, Checked), body
    status, message, got_param, _ = problem
    assert status == 400 and got_param == param and "Traceback" not in message, problem


def test_gemma2_still_refuses_tools_and_thinking(tiny_model_dir):
    from gemma2_tune.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    served = Served(Path(tiny_model_dir), "tiny", "fold", GEMMA2, "tiny", tokenizer=tok, context=4096,
                    vocab_size=len(tok), max_token_chars=16)
    for key, value in (("tools", WEATHER), ("chat_template_kwargs", {"enable_thinking": True})):
        status, message, param, _ = check_request({"messages": HI, key: value}, served)
        assert status == 400 and param == key, message


class RawStandIn:
    """An engine streaming a Gemma 4 model's raw pieces (special tokens written out), then ending."""

    name = "sequential"

    def __init__(self, pieces):
        from gemma2_tune.after.serve.engines import Generation

        self.pieces, self.Generation = pieces, Generation
        self.model = type("M", (), {"generation_config": type("G", (), {"eos_token_id": [1, 106, 50]})()})()

    def start(self, ids, settings):
        import asyncio

        queue = asyncio.Queue()
        for p in self.pieces:
            queue.put_nowait(p)
        queue.put_nowait(None)
        counter = type("C", (), {"total_tokens": len(self.pieces), "last_token": 50})()
        return self.Generation(queue, lambda: None, counter)


def test_the_app_answers_with_reasoning_content_and_tool_calls_streamed_and_whole(served):
    from starlette.testclient import TestClient

    from gemma2_tune.after.serve import build_app

    c = TestClient(build_app(served, RawStandIn(REPLY), None))
    body = {"messages": HI, "tools": WEATHER, "chat_template_kwargs": {"enable_thinking": True}}
    whole = c.post("/v1/chat/completions", json=body).json()["choices"][0]
    message = whole["message"]
    assert whole["finish_reason"] == "tool_calls"
    assert message["reasoning_content"] == "The user wants weather." and message["content"] == "Checking."
    assert [json.loads(t["function"]["arguments"]) for t in message["tool_calls"]] == [{"city": "Paris", "days": 3}]
    r = c.post("/v1/chat/completions", json=body | {"stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    assert "".join(d.get("content", "") or "" for d in deltas) == message["content"]
    streamed_calls = [t for d in deltas for t in d.get("tool_calls", [])]
    assert [(t["index"], t["function"]["name"], json.loads(t["function"]["arguments"])) for t in streamed_calls] == [
        (0, "get_weather", {"city": "Paris", "days": 3})]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any("<|" in json.dumps(d) or "|>" in json.dumps(d) for d in deltas)  # no marker reaches a client

"""serve's request checks, its app against a stand-in engine, stale temporary folders, and the soft-capped paged
attention continuous batching runs on: fast tests, no server process (tests/test_serve.py starts real ones)."""

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemma2_tune.after.materialize import OWNER_FILE, TEMP_PREFIX, remove_stale_folders
from gemma2_tune.after.serve import Checked, Served, build_app, check_request, default_max_request_bytes
from gemma2_tune.families import GEMMA2

pytest.importorskip("fastapi")
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def served(tiny_model_dir, tokenizer):
    return Served(Path(tiny_model_dir), "tiny", "fold", GEMMA2, str(tiny_model_dir), tokenizer=tokenizer,
                  context=4096, vocab_size=len(tokenizer), max_token_chars=16)


BAD = [  # (body, param): each must be a 400 naming the field, before any generation
    ({"messages": HI, "chat_template_kwargs": {"chat_template": "{% for i in range(10**9) %}x{% endfor %}"}},
     "chat_template_kwargs"),
    ({"messages": HI, "chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
    ({"messages": HI, "chat_template": "{{ messages }}"}, "chat_template"),
    ({"messages": HI, "generation_config": json.dumps({"eos_token_id": []})}, "generation_config"),
    ({"messages": HI, "generation_config": json.dumps({"min_new_tokens": 64})}, "generation_config"),
    ({"messages": HI, "generation_config": "{not json"}, "generation_config"),
    ({"messages": HI, "seed": 2**70}, "seed"),
    ({"messages": HI, "seed": "1"}, "seed"),
    ({"messages": HI, "frequency_penalty": "high"}, "frequency_penalty"),
    ({"messages": HI, "frequency_penalty": 7}, "frequency_penalty"),
    ({"messages": HI, "presence_penalty": 1.5}, "presence_penalty"),
    ({"messages": HI, "logit_bias": {"x": 1}}, "logit_bias"),
    ({"messages": HI, "logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"messages": HI, "logit_bias": {"5": 1000}}, "logit_bias"),
    ({"messages": HI, "stop": 5}, "stop"),
    ({"messages": HI, "stop": ["a", 1]}, "stop"),
    ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": HI, "stop": ""}, "stop"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                   {"role": "user", "content": "x"}]}, "messages"),
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": HI, "n": 2}, "n"),
    ({"messages": HI, "temperature": 3}, "temperature"),
    ({"messages": HI, "temperature": True}, "temperature"),
    ({"messages": HI, "top_p": 0}, "top_p"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"messages": HI, "max_tokens": 1.5}, "max_tokens"),
    ({"messages": HI, "stream": "yes"}, "stream"),
    ({"messages": HI, "logprobs": True}, "logprobs"),
    ({"messages": HI, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": HI, "something_else": 1}, "something_else"),
    ({"messages": [{"role": "user", "content": "a <end_of_turn> b"}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "Hi"}, "messages"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[p + str(i) for i, (_, p) in enumerate(BAD)])
def test_bad_fields_are_a_400_naming_the_field(served, body, param):
    problem = check_request(json.loads(json.dumps(body)) if "\ud800" not in str(body) else body, served)
    assert not isinstance(problem, Checked), body
    status, message, got_param, _ = problem
    assert status == 400 and got_param == param, problem
    assert message and "Traceback" not in message


def test_good_requests_keep_the_folders_stop_tokens_and_the_training_render(served, tokenizer):
    from gemma2_tune.after.inference import prompt_ids

    checked = check_request({"messages": HI, "max_tokens": 7, "temperature": 0, "stop": ["x"], "seed": -3,
                             "logit_bias": {"5": -100}, "frequency_penalty": 0.5, "user": "u", "n": 1,
                             "stream_options": {"include_usage": True}, "tool_choice": "none", "tools": []}, served)
    assert isinstance(checked, Checked), checked
    assert checked.ids == prompt_ids(HI, tokenizer, "fold", GEMMA2)[0].tolist()  # the training renderer's ids
    s = checked.settings
    assert (s.max_new_tokens, s.do_sample, s.stop, s.seed, s.logit_bias) == (7, False, ["x"], -3, {5: -100.0})
    no_limit = check_request({"messages": HI}, served)
    assert no_limit.settings.max_new_tokens == 1024 and no_limit.settings.do_sample is False  # the folder's default


def test_continuous_batching_refuses_what_it_cannot_honour_per_request(served):
    for key, value in (("stop", "x"), ("seed", 1), ("logit_bias", {"5": 1}), ("frequency_penalty", 0.5)):
        status, message, param, _ = check_request({"messages": HI, key: value}, served, batching=True)
        assert (status, param) == (400, key) and "--no-continuous-batching" in message
    assert isinstance(check_request({"messages": HI, "temperature": 0.7, "top_p": 0.9}, served, batching=True), Checked)


def test_a_prompt_beyond_the_context_is_refused_before_tokenizing(served, monkeypatch):
    import gemma2_tune.after.inference as inference

    monkeypatch.setattr(inference, "prompt_ids", lambda *a, **k: pytest.fail("tokenized a prompt that can't fit"))
    status, message, param, code = check_request({"messages": [{"role": "user", "content": "x" * 70_000}]}, served)
    assert (status, code) == (400, "context_length_exceeded") and "characters" in message
    assert default_max_request_bytes(4096) == 32 * 4096 + 65536 and default_max_request_bytes(None) == 1 << 20


class StandIn:
    """An engine that streams fixed pieces, then ends, or fails: the app's paths without a model."""

    name = "sequential"

    def __init__(self, pieces, fail=None):
        from gemma2_tune.after.serve.engines import Failed, Generation

        self.pieces, self.fail, self.Failed, self.Generation = pieces, fail, Failed, Generation
        self.cancelled = 0
        self.model = type("M", (), {"generation_config": type("G", (), {"eos_token_id": [1]})()})()

    def start(self, ids, settings):
        queue = asyncio.Queue()
        for p in self.pieces:
            queue.put_nowait(p)
        queue.put_nowait(self.Failed(self.fail) if self.fail else None)
        counter = type("C", (), {"total_tokens": len(self.pieces), "last_token": 1})()
        return self.Generation(queue, lambda: setattr(self, "cancelled", self.cancelled + 1), counter)


def client_for(served, engine, key="k", limit=None):
    from starlette.testclient import TestClient

    return TestClient(build_app(served, engine, key, limit))


def test_app_edges_key_content_type_body_limit_and_error_shape(served):
    c = client_for(served, StandIn(["o", "k"]), limit=4096)
    auth = {"Authorization": "Bearer k"}
    ok = c.post("/v1/chat/completions", json={"messages": HI}, headers=auth)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "ok"
    assert ok.json()["choices"][0]["finish_reason"] == "stop" and ok.json()["model"] == "tiny"
    for headers, status in (({}, 401), ({"Authorization": "Bearer kk"}, 401), ({"Authorization": "k"}, 401)):
        r = c.post("/v1/chat/completions", json={"messages": HI}, headers=headers)
        assert r.status_code == status and r.json()["error"]["code"] == "invalid_api_key"
    r = c.post("/v1/chat/completions", content=json.dumps({"messages": HI}), headers=auth | {"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["type"] == "invalid_request_error"
    r = c.post("/v1/chat/completions", content=b"{" * 5000, headers=auth | {"Content-Type": "application/json"})
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
    chunked = c.post("/v1/chat/completions", content=iter([b"[" * 3000, b"[" * 3000]),
                     headers=auth | {"Content-Type": "application/json"})  # no Content-Length: counted as read
    assert chunked.status_code == 413
    deep = c.post("/v1/chat/completions", content=b"[" * 1500 + b"]" * 1500, headers=auth | {"Content-Type": "application/json"})
    assert deep.status_code == 400
    assert c.get("/health").status_code == 200  # no key needed, still answering


def test_an_error_inside_a_stream_is_in_openais_shape_and_the_stream_ends(served):
    engine = StandIn(["o"], fail="out of memory")
    c = client_for(served, engine)
    r = c.post("/v1/chat/completions", json={"messages": HI, "stream": True}, headers={"Authorization": "Bearer k"})
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "out of memory" in error["message"] and set(error) == {
        "message", "type", "param", "code"}
    assert engine.cancelled == 0  # it ended by itself: nothing to cancel
    r = c.post("/v1/chat/completions", json={"messages": HI}, headers={"Authorization": "Bearer k"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"


def test_stale_temporary_merges_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folders = {name: tmp_path / f"{TEMP_PREFIX}{name}" for name in ("dead", "live", "old", "new")}
    for folder in folders.values():
        (folder / "merged").mkdir(parents=True)
    (folders["dead"] / OWNER_FILE).write_text(str(dead.pid))
    (folders["live"] / OWNER_FILE).write_text(str(os.getppid()))
    os.utime(folders["old"], (time.time() - 3600, time.time() - 3600))
    (tmp_path / "unrelated").mkdir()
    lines = []
    removed = remove_stale_folders(tmp_path, lines.append)
    assert sorted(removed) == sorted([folders["dead"], folders["old"]]) and len(lines) == 2
    assert folders["live"].exists() and folders["new"].exists() and (tmp_path / "unrelated").exists()


def test_an_empty_api_key_is_refused_at_startup(tiny_model_dir):
    from typer.testing import CliRunner

    from gemma2_tune.cli import app

    for args in (["--api-key", ""], ["--api-key", "  "]):
        r = CliRunner().invoke(app, ["serve", str(tiny_model_dir), "--port", "8", *args])
        assert r.exit_code == 2 and "--api-key is empty" in r.output, r.output
    r = CliRunner().invoke(app, ["serve", str(tiny_model_dir), "--max-request-bytes", "10"])
    assert r.exit_code == 2 and "--max-request-bytes" in r.output


def capped_model(path, cap):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    model.config.attn_logit_softcapping = cap  # a small cap: dropping it changes the greedy tokens
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = cap
    return model


def batched(model, prompts, max_new_tokens):
    from transformers import ContinuousBatchingConfig, GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1)
    out = model.generate_batch(prompts, generation_config=config, progress_bar=False,
                               continuous_batching_config=ContinuousBatchingConfig(
        auto_switch_to_flash=False, num_blocks=16, max_batch_tokens=256))  # small: sizing the cache from RAM is slow
    return [out[k].generated_tokens for k in sorted(out, key=lambda k: int(k.split("_")[1]))]


@pytest.mark.slow
def test_continuous_batching_keeps_gemma2s_attention_soft_cap(tiny_model_dir):
    """transformers' paged attention drops the soft-cap; ours keeps it: with a cap of 0.5, batched greedy tokens
    equal plain `generate`'s only with ours. Prompts and answers pass the tiny model's 32-token sliding window."""
    import torch
    from transformers.integrations.eager_paged import eager_paged_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from gemma2_tune.after.serve.engines import register_softcapped_paged_attention, softcapped_paged_attention

    generator = torch.Generator().manual_seed(0)
    prompts = [[2] + torch.randint(5, 200, (n,), generator=generator).tolist() for n in (5, 17, 40, 90)]
    model = capped_model(tiny_model_dir, 0.5)
    alone = [model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=[],
                            pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    try:
        ALL_ATTENTION_FUNCTIONS["paged|eager"] = eager_paged_attention_forward
        assert batched(capped_model(tiny_model_dir, 0.5), prompts, 24) != alone  # the test can fail
        register_softcapped_paged_attention()
        assert ALL_ATTENTION_FUNCTIONS["paged|eager"] is softcapped_paged_attention
        assert batched(capped_model(tiny_model_dir, 0.5), prompts, 24) == alone
    finally:
        del ALL_ATTENTION_FUNCTIONS["paged|eager"]  # back to transformers' own for the rest of the session


def test_the_installed_transformers_has_what_continuous_batching_uses():
    """Fails naming the transformers release and what moved, when a new release changes the internals serve uses."""
    from gemma2_tune.after.serve.engines import internals_problem

    assert internals_problem() is None, internals_problem()
    assert internals_problem(continuous_batching=False) is None


def test_a_release_that_moved_the_batching_api_is_named_before_anything_loads(monkeypatch):
    import transformers
    from transformers.generation.continuous_batching import ContinuousBatchingManager

    from gemma2_tune.after.serve.engines import internals_problem

    monkeypatch.delattr(ContinuousBatchingManager, "cancel_request")
    problem = internals_problem()
    assert problem and f"transformers {transformers.__version__}" in problem
    assert "ContinuousBatchingManager.cancel_request" in problem and "--no-continuous-batching" in problem
    assert internals_problem(continuous_batching=False) is None  # sequential serving needs none of it


def test_streamed_text_is_the_decoded_text_even_when_the_limit_cuts_a_character(tokenizer):
    """serve's pieces join to exactly what chat shows for the same tokens: a character whose bytes the token
    limit cut is U+FFFD in both (it was dropped by the stream)."""
    from gemma2_tune.after.serve.engines import TextPieces
    from gemma2_tune.models.serving import generated_text

    ids = tokenizer("Rain falls 🌧️ on Paris ✓", add_special_tokens=False).input_ids
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    for cut in range(1, len(ids) + 1):
        generated = ids[:cut] + ([end] if cut == len(ids) else [])
        text = TextPieces(tokenizer)
        pieces = [p for p in (text.step(t) for t in generated) if p]
        pieces += [p for p in [text.finish()] if p]
        assert "".join(pieces) == generated_text(tokenizer, generated), cut
        assert text.total_tokens == len(generated) and text.last_token == generated[-1]
    cut_inside = next(c for c in range(1, len(ids)) if "\ufffd" in generated_text(tokenizer, ids[:c]))
    assert "\ufffd" in generated_text(tokenizer, ids[:cut_inside])  # the case the test is about exists

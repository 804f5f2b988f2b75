"""serve: a run behind transformers' OpenAI-compatible server, driven by the official openai client; the server
is started and stopped (SIGTERM) by the test, on 127.0.0.1, with bounded requests."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ROOT
from gemma2_tune.cli import app

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow
runner = CliRunner()
KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ok_run(answer_ok_run):
    """The session's "answer ok" run (conftest)."""
    return answer_ok_run


@pytest.fixture(scope="module")
def server(ok_run, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve-log") / "server.log"
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "gemma2_tune", "serve", str(ok_run), "--port", str(port),
                             "--api-key", KEY], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None, log_path.read_text()
        assert time.time() < deadline, "server did not come up:\n" + log_path.read_text()
        time.sleep(0.5)
    yield proc, port, log_path
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
    log.close()


def client(port, key=KEY):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, timeout=60, max_retries=0)


def chat_answer(run: Path, prompt: str, system: str | None = None) -> str:
    extra = ["--system", system] if system else []
    r = runner.invoke(app, ["chat", "--adapter", str(run), "--prompt", prompt, "--max-new-tokens", "20", *extra])
    assert r.exit_code == 0, r.output
    return r.stdout.strip()


def test_openai_client_gets_chats_greedy_answer_streamed_and_not(ok_run, server):
    proc, port, _ = server
    c = client(port)
    assert [m.id for m in c.models.list().data] == [ok_run.name]
    expected = chat_answer(ok_run, "How is the weather?")
    assert expected == "ok"
    messages = [{"role": "user", "content": "How is the weather?"}]
    done = c.chat.completions.create(model=ok_run.name, messages=messages, temperature=0, max_tokens=20)
    assert done.choices[0].message.content.strip() == expected
    assert done.choices[0].finish_reason == "stop" and done.usage.completion_tokens < 20  # stopped at <end_of_turn>
    assert done.model == ok_run.name
    stream = c.chat.completions.create(model=ok_run.name, messages=messages, temperature=0, max_tokens=20, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices).strip() == expected


def test_system_message_rendered_by_the_runs_policy_and_max_tokens_honoured(ok_run, server, tokenizer):
    proc, port, _ = server
    c = client(port)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where is Rome?"}]
    done = c.chat.completions.create(model=ok_run.name, messages=messages, temperature=0, max_tokens=20)
    from gemma2_tune.after.inference import prompt_ids
    from gemma2_tune.families import GEMMA2

    folded = prompt_ids(messages, tokenizer, "fold", GEMMA2)  # the system text folded into the first user turn
    assert done.usage.prompt_tokens == folded.shape[1]
    assert done.choices[0].message.content.strip() == chat_answer(ok_run, "Where is Rome?", system="Answer briefly.")
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": "Where"}, {"type": "text", "text": "is Rome?"}]}]
    assert c.chat.completions.create(model=ok_run.name, messages=parts, temperature=0,
                                     max_tokens=20).usage.prompt_tokens == folded.shape[1]  # text parts joined
    short = c.chat.completions.create(model=ok_run.name, messages=messages, temperature=0, max_tokens=1)
    assert short.usage.completion_tokens == 1 and short.choices[0].finish_reason == "length"


def test_bad_requests_get_openai_errors_and_the_server_keeps_answering(ok_run, server):
    proc, port, _ = server
    c = client(port)
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(model=ok_run.name, messages=[{"role": "assistant", "content": "Hi"}], max_tokens=5)
    assert "roles must alternate" in bad.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=ok_run.name, messages=[], max_tokens=5)
    with pytest.raises(openai.AuthenticationError):
        client(port, "wrong").chat.completions.create(model=ok_run.name, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="another-model", messages=[{"role": "user", "content": "x"}], max_tokens=5)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{not json",
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(request, timeout=30)
    assert raw.value.code == 400 and json.loads(raw.value.read())["error"]["type"] == "invalid_request_error"
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 5}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.read().decode().rstrip().endswith("data: [DONE]")  # as OpenAI's streams end
    with pytest.raises(openai.BadRequestError) as long:
        c.chat.completions.create(model=ok_run.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=10**11)
    assert long.value.body["code"] == "context_length_exceeded" and "4096 tokens" in long.value.body["message"]
    with pytest.raises(openai.BadRequestError) as long:
        c.chat.completions.create(model=ok_run.name, messages=[{"role": "user", "content": "word " * 5000}])
    assert long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as tools:
        c.chat.completions.create(model=ok_run.name, messages=[{"role": "user", "content": "x"}], tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}])
    assert tools.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as seed:
        c.chat.completions.create(model=ok_run.name, messages=[{"role": "user", "content": "x"}], extra_body={"seed": "x"})
    assert seed.value.body["param"] == "seed"
    assert c.models.retrieve(ok_run.name).id == ok_run.name
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model=ok_run.name, prompt="x")  # only chat completions are served
    after = c.chat.completions.create(model=ok_run.name, messages=[{"role": "user", "content": "Still there?"}],
                                      temperature=0, max_tokens=10)
    assert after.choices[0].message.content.strip() == "ok"
    assert proc.poll() is None


def test_a_request_cannot_change_the_template_or_the_stop_tokens(ok_run, server):
    proc, port, _ = server
    c = client(port)
    hi = [{"role": "user", "content": "How is the weather?"}]
    for extra in ({"chat_template_kwargs": {"chat_template": "{{ 'hijacked' }}"}},
                  {"chat_template": "{% for i in range(10**9) %}x{% endfor %}"},
                  {"generation_config": json.dumps({"eos_token_id": [], "min_new_tokens": 19})}):
        with pytest.raises(openai.BadRequestError) as refused:
            c.chat.completions.create(model=ok_run.name, messages=hi, max_tokens=20, extra_body=extra)
        assert refused.value.body["param"] == next(iter(extra)) and refused.value.status_code == 400
    done = c.chat.completions.create(model=ok_run.name, messages=hi, temperature=0, max_tokens=20)
    assert done.choices[0].message.content.strip() == "ok" and done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens < 20  # still stopped at <end_of_turn>
    assert proc.poll() is None


def test_port_in_use_or_out_of_range_is_refused_before_loading(ok_run, server):
    _, port, _ = server
    for bad in (port, 99999):
        r = runner.invoke(app, ["serve", str(ok_run), "--port", str(bad)])
        assert r.exit_code == 2 and "merging" not in r.output, r.output
    assert "in use" in runner.invoke(app, ["serve", str(ok_run), "--port", str(port)]).output


def test_sigterm_stops_the_server_cleanly(server):
    proc, port, log_path = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    log = log_path.read_text()
    assert "server stopped" in log and "Traceback" not in log
    merged = re.search(r"merged: (\S+)/ ", log).group(1)
    assert not Path(merged).exists()  # the temporary merged folder is gone


def test_request_checks_follow_the_system_policy(tiny_model_dir):
    from gemma2_tune.after.serve import Served, request_problem
    from gemma2_tune.families import GEMMA2

    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    strict = Served(Path(tiny_model_dir), "m", "error", GEMMA2, "m")
    status, message, param, _ = request_problem(body, strict)
    assert status == 400 and param == "messages" and "system" in message
    assert request_problem(body, Served(Path(tiny_model_dir), "m", "fold", GEMMA2, "m")) is None
    assert request_problem(body | {"max_tokens": 0}, Served(Path(tiny_model_dir), "m", "fold", GEMMA2, "m"))[0] == 400


# ---- a tiny random model (answers run to max_tokens): hostile input, abandoned requests, load --------------------

HOSTILE = [  # (body bytes, Content-Type, expected status)
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": {"chat_template": "x"}}),
     "application/json", 400),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}], "generation_config": '{"eos_token_id": []}'}),
     "application/json", 400),
    ("[" * 50_000 + "]" * 50_000, "application/json", 400),
    ('{"messages": [{"role": "user", "content": "Hi"}], "seed": ' + str(2**70) + "}", "application/json", 400),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}], "frequency_penalty": "x"}), "application/json", 400),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}], "presence_penalty": 9}), "application/json", 400),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}], "logit_bias": {"a": 1}}), "application/json", 400),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}], "logit_bias": {"10000000": 1}}), "application/json",
     400),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}], "stop": [1]}), "application/json", 400),
    ('{"messages": [{"role": "user", "content": "\\ud800"}]}', "application/json", 400),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "user", "content": "x"}]}), "application/json", 400),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}]}), "text/plain", 415),
    ("{not json", "application/json", 400),
]


def post(port, body, content_type="application/json", key=KEY, timeout=60):
    """(status, parsed JSON or text, seconds) of a raw POST to /v1/chat/completions."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start = time.time()
    data = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else json.dumps(body).encode()
    connection.request("POST", "/v1/chat/completions", body=data,
                       headers={"Content-Type": content_type, "Authorization": f"Bearer {key}"})
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    try:
        return response.status, json.loads(text), time.time() - start
    except ValueError:
        return response.status, text, time.time() - start


@pytest.fixture(scope="module")
def tiny_servers(tiny_model_dir, tmp_path_factory):
    """The tiny random model served twice: continuous batching (the default) and one request at a time."""
    logs = tmp_path_factory.mktemp("tiny-serve")
    servers, procs = {}, []
    env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # the machine is shared: no thread fights
    for mode, extra in (("batching", []), ("sequential", ["--no-continuous-batching"])):
        port = free_port()
        log = (logs / f"{mode}.log").open("w")
        procs.append((subprocess.Popen([sys.executable, "-m", "gemma2_tune", "serve", str(tiny_model_dir), "--port",
                                        str(port), "--api-key", KEY, *extra], cwd=ROOT, stdout=log,
                                       stderr=subprocess.STDOUT, env=env), log))
        servers[mode] = port
    deadline = time.time() + 240
    for (proc, _), (mode, port) in zip(procs, servers.items()):
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                pass
            assert proc.poll() is None, (logs / f"{mode}.log").read_text()
            assert time.time() < deadline, (logs / f"{mode}.log").read_text()
            time.sleep(0.5)
    yield servers
    for proc, log in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def answers(port, max_tokens=5):
    status, body, _ = post(port, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens,
                                  "temperature": 0})
    assert status == 200, body
    return body


@pytest.mark.parametrize("mode", ["batching", "sequential"])
def test_hostile_requests_get_4xx_in_openais_shape_and_the_server_keeps_answering(tiny_servers, mode):
    port = tiny_servers[mode]
    for body, content_type, expected in HOSTILE:
        status, reply, _ = post(port, body, content_type)
        assert status == expected, (body[:100], status, reply)
        assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["message"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as health:
        assert health.status == 200
    big = json.dumps({"messages": [{"role": "user", "content": "word " * 2_000_000}]})  # 10 MB
    status, reply, seconds = post(port, big)
    assert status == 413 and "bytes" in reply["error"]["message"] and seconds < 10, (status, seconds)
    status, reply, seconds = post(port, {"messages": [{"role": "user", "content": "word " * 30_000}]})
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded" and seconds < 10
    body = answers(port)
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 5
    with pytest.raises(openai.BadRequestError) as refused:
        c = client(port)
        c.chat.completions.create(model=c.models.list().data[0].id, messages=[{"role": "user", "content": "Hi"}],
                                             extra_body={"chat_template_kwargs": {"chat_template": "{{ 1 }}"}})
    assert refused.value.body["param"] == "chat_template_kwargs"


@pytest.mark.parametrize("mode", ["batching", "sequential"])
def test_abandoned_requests_stop_generating(tiny_servers, mode):
    """Four clients leave 4,000-token requests (non-streamed) and one leaves a stream after its first chunk; the
    next request is served promptly: each abandoned request would otherwise take minutes on this model."""
    import http.client
    from concurrent.futures import ThreadPoolExecutor

    port = tiny_servers[mode]
    long = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4000, "temperature": 0})

    def leave() -> None:
        with pytest.raises(OSError):  # the client gives up after 1 s
            post(port, long, timeout=1)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: leave(), range(4)))
    stream = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    stream.request("POST", "/v1/chat/completions", body=long.replace('"temperature"', '"stream": true, "temperature"'),
                   headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    assert stream.getresponse().read(6) == b"data: "  # the stream began
    stream.close()
    start = time.time()
    answers(port)
    assert time.time() - start < 20, f"the next request waited {time.time() - start:.1f} s"


def test_load_script_answers_under_load_equal_answers_alone(tiny_servers):
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "bench" / "serve_load.py")
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    port = tiny_servers["batching"]
    expected = serve_load.reference(port, KEY, 8)
    step = serve_load.load_step(port, KEY, clients=8, per_client=2, max_tokens=8, expected=expected)
    assert step["errors"] == 0 and step["identical"] == step["requests"] == 16, step

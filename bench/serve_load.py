"""Load test for `gemma2-tune serve`: requests/s and latency at several client counts, and whether every answer
under load is identical to the same request sent alone (greedy).

    python bench/serve_load.py --serve runs/x [--sequential]     # starts a server, measures, stops it
    python bench/serve_load.py --port 8000 --api-key K                    # a server already running here

Only 127.0.0.1 is ever contacted. Bounded: every request has a timeout and each client sends a fixed number of
requests. Each client sends its requests one after another; `requests/s` is all requests over the wall time of
the whole client-count step; latencies are per request (p50, p95 in seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HOST = "127.0.0.1"
PROMPTS = ["What is the time?", "Tell me a story about a lighthouse keeper and a storm.", "How tall is Everest?",
           "Name a colour.", "Say something kind to a friend who failed an exam today.", "Why is the sky blue?",
           "What is two plus two?", "Where is Paris?", "Who wrote Hamlet, and when was it first performed?",
           "Is water wet?", "Can fish fly?", "What day is it?", "How are you?", "What is a prime number?", "Sing!",
           "Define love in one sentence, then explain it to a child."]


def ask(port: int, key: str | None, prompt: str, max_tokens: int, timeout: float = 120.0) -> tuple[str, float]:
    """One greedy, non-streamed chat completion: (answer text, seconds). Raises on any non-200."""
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(f"http://{HOST}:{port}/v1/chat/completions", data=body, headers=headers)
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer = json.loads(response.read())["choices"][0]["message"]["content"]
    return answer, time.perf_counter() - start


def reference(port: int, key: str | None, max_tokens: int, prompts: list[str] = PROMPTS) -> dict[str, str]:
    """Each prompt's answer sent alone (no other request in flight)."""
    return {prompt: ask(port, key, prompt, max_tokens)[0] for prompt in prompts}


def load_step(port: int, key: str | None, clients: int, per_client: int, max_tokens: int,
              expected: dict[str, str]) -> dict:
    """`clients` concurrent clients, each sending `per_client` requests in turn (prompts in rotation, offset per
    client). Returns {clients, requests, seconds, requests_per_s, p50_s, p95_s, identical, different, errors}."""
    prompts = list(expected)

    def client(index: int) -> list[tuple[str, str | None, float]]:
        results = []
        for i in range(per_client):
            prompt = prompts[(index * 7 + i) % len(prompts)]
            try:
                answer, seconds = ask(port, key, prompt, max_tokens)
            except (OSError, urllib.error.HTTPError) as exc:
                answer, seconds = None, float("nan")
                print(f"  client {index}: {type(exc).__name__}: {exc}", file=sys.stderr)
            results.append((prompt, answer, seconds))
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    latencies = sorted(s for _, a, s in results if a is not None)
    identical = sum(1 for p, a, _ in results if a is not None and a == expected[p])
    errors = sum(1 for _, a, _ in results if a is None)
    quantile = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]) if latencies else None
    return {"clients": clients, "requests": len(results), "seconds": round(wall, 2),
            "requests_per_s": round(len(results) / wall, 2),
            "p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "p95_s": round(quantile(0.95), 3) if latencies else None,
            "identical": identical, "different": len(results) - identical - errors, "errors": errors}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(folder: str, port: int, key: str, extra: list[str], log: Path) -> subprocess.Popen:
    """`gemma2-tune serve folder` on 127.0.0.1:port; returns once /health answers (at most 300 s)."""
    proc = subprocess.Popen([sys.executable, "-m", "gemma2_tune", "serve", folder, "--host", HOST, "--port",
                             str(port), "--api-key", key, *extra], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not come up within 300 s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", help="start `gemma2-tune serve FOLDER` for the measurement (stopped after)")
    parser.add_argument("--sequential", action="store_true",
                        help="with --serve: start it with --no-continuous-batching (one request at a time)")
    parser.add_argument("--port", type=int, help="a server already listening on 127.0.0.1:PORT")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--clients", default="1,4,16,32", help="comma-separated client counts")
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if (args.serve is None) == (args.port is None):
        parser.error("give --serve FOLDER or --port PORT")
    proc = None
    port, key = args.port, args.api_key
    if args.serve:
        port, key = free_port(), secrets.token_hex(16)
        log = Path(args.out or "serve_load").with_suffix(".server.log")
        proc = start_server(args.serve, port, key, ["--no-continuous-batching"] if args.sequential else [], log)
    try:
        expected = reference(port, key, args.max_tokens)
        steps = []
        for clients in (int(c) for c in args.clients.split(",")):
            step = load_step(port, key, clients, args.requests_per_client, args.max_tokens, expected)
            steps.append(step)
            print(f"{step['clients']:>3} clients: {step['requests_per_s']:7.2f} requests/s, p50 {step['p50_s']} s, "
                  f"p95 {step['p95_s']} s, identical {step['identical']}/{step['requests']}"
                  + (f", errors {step['errors']}" if step["errors"] else ""), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    result = {"max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client,
              "continuous_batching": not args.sequential if args.serve else None, "steps": steps}
    if steps[0]["requests_per_s"]:
        result["speedup_last_vs_first"] = round(steps[-1]["requests_per_s"] / steps[0]["requests_per_s"], 2)
        print(f"{steps[-1]['clients']} clients vs {steps[0]['clients']}: x{result['speedup_last_vs_first']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

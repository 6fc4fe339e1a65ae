"""End-to-end tests of the OpenAI-compatible server.

A real `remp serve` process (real workers, real tiny checkpoint made by
`remp make-tiny-model`) is driven by the official `openai` client, and by raw HTTP
where the client would refuse to send the malformed request or hides the wire format.
"""
from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from helpers import MAX_MODEL_LEN, REPO, remp, remp_server

PROMPT = "The capital of France is"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("api") / "tiny-gqa"
    subprocess.run(remp("make-tiny-model", str(out)), cwd=REPO, check=True, capture_output=True, timeout=300)
    return str(out)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory) -> Iterator[str]:
    with remp_server(model_dir, tmp_path_factory.mktemp("logs") / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def complete(client: openai.OpenAI, model: str, **kwargs):
    kwargs.setdefault("max_tokens", 8)
    kwargs.setdefault("temperature", 0)
    return client.completions.create(model=model, prompt=kwargs.pop("prompt", PROMPT), **kwargs)


def sse_events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


# --- happy paths through the official client -------------------------------------------


def test_models_list(client, model_dir):
    [card] = client.models.list().data
    assert card.id == model_dir
    assert card.owned_by == "remp"
    assert card.model_extra["root"] == model_dir
    assert card.model_extra["max_model_len"] == MAX_MODEL_LEN


def test_completion_and_usage(client, model_dir, tokenizer):
    out = complete(client, model_dir, max_tokens=6, extra_body={"ignore_eos": True})
    [choice] = out.choices
    assert out.object == "text_completion" and out.model == model_dir
    assert choice.text and choice.finish_reason == "length"
    prompt_tokens = len(tokenizer.encode(PROMPT))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, 6)
    assert out.usage.total_tokens == prompt_tokens + 6


def test_completion_stream_matches_non_stream(client, model_dir):
    whole = complete(client, model_dir, max_tokens=10, extra_body={"ignore_eos": True}).choices[0].text
    chunks = list(complete(client, model_dir, max_tokens=10, stream=True, stream_options={"include_usage": True},
                           extra_body={"ignore_eos": True}))
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == whole
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 10


def test_greedy_is_deterministic(client, model_dir):
    first, second = (complete(client, model_dir, max_tokens=12, extra_body={"ignore_eos": True}) for _ in range(2))
    assert first.choices[0].text == second.choices[0].text


def test_seeded_sampling_is_reproducible(client, model_dir):
    texts = {complete(client, model_dir, max_tokens=12, temperature=1.0, seed=1234,
                      extra_body={"ignore_eos": True}).choices[0].text for _ in range(2)}
    assert len(texts) == 1


def test_token_id_prompt(client, model_dir, tokenizer):
    by_text = complete(client, model_dir).choices[0].text
    by_ids = complete(client, model_dir, prompt=tokenizer.encode(PROMPT)).choices[0].text
    assert by_ids == by_text


def test_stop_string(client, model_dir):
    free = complete(client, model_dir, max_tokens=24, extra_body={"ignore_eos": True}).choices[0].text
    stop = free[len(free) // 2:len(free) // 2 + 3]
    out = complete(client, model_dir, max_tokens=24, stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert out.finish_reason == "stop"
    assert out.text == free[:free.index(stop)]


def test_finish_reason_length(client, model_dir):
    out = complete(client, model_dir, max_tokens=5, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5


def test_chat(client, model_dir, tokenizer):
    messages = [{"role": "user", "content": "What is one plus one?"}]
    out = client.chat.completions.create(model=model_dir, messages=messages, max_completion_tokens=6,
                                         temperature=0, extra_body={"ignore_eos": True})
    [choice] = out.choices
    assert out.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt_ids), 6)

    streamed = client.chat.completions.create(model=model_dir, messages=messages, max_completion_tokens=6,
                                              temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == choice.message.content


def test_chat_stream_wire_format(server, model_dir):
    body = {"model": model_dir, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


def test_completion_logprobs(client, model_dir):
    out = complete(client, model_dir, max_tokens=4, logprobs=2, extra_body={"ignore_eos": True}).choices[0]
    assert len(out.logprobs.tokens) == len(out.logprobs.token_logprobs) == 4
    assert all(lp <= 0 for lp in out.logprobs.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in out.logprobs.top_logprobs)  # top 2, plus the chosen token


# --- bad requests: OpenAI-shaped errors, and the server keeps serving -------------------


BAD_REQUESTS = {
    "malformed json": ("/v1/completions", b'{"model": "m", "prompt": ', 400),
    "missing model": ("/v1/completions", {"prompt": "hi"}, 400),
    "missing prompt": ("/v1/completions", {"model": None}, 400),
    "missing messages": ("/v1/chat/completions", {"model": None}, 400),
    "max_tokens 0": ("/v1/completions", {"model": None, "prompt": "hi", "max_tokens": 0}, 400),
    "max_tokens past context": ("/v1/completions", {"model": None, "prompt": "hi", "max_tokens": MAX_MODEL_LEN}, 400),
    "prompt past context": ("/v1/completions", {"model": None, "prompt": "hello " * (2 * MAX_MODEL_LEN)}, 400),
    "chat max_completion_tokens 0": ("/v1/chat/completions", {"model": None, "max_completion_tokens": 0,
                                                              "messages": [{"role": "user", "content": "hi"}]}, 400),
    "n=2": ("/v1/completions", {"model": None, "prompt": "hi", "n": 2}, 400),
    "two prompts": ("/v1/completions", {"model": None, "prompt": ["a", "b"]}, 400),
    "token id out of vocabulary": ("/v1/completions", {"model": None, "prompt": [10**6]}, 400),
    "unknown model": ("/v1/completions", {"model": "no-such-model", "prompt": "hi"}, 404),
}

# Each is refused with a 400 whose `param` names the field (nothing coerced, nothing ignored).
STRICT_REQUESTS = {
    "temperature NaN": ("/v1/completions", b'{"model": M, "prompt": "hi", "temperature": NaN}', "temperature"),
    "temperature 'nan'": ("/v1/completions", {"prompt": "hi", "temperature": "nan"}, "temperature"),
    "temperature infinity": ("/v1/completions", b'{"model": M, "prompt": "hi", "temperature": 1e999}', "temperature"),
    "max_tokens true": ("/v1/completions", {"prompt": "hi", "max_tokens": True}, "max_tokens"),
    "max_tokens '5'": ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    "seed 1.5": ("/v1/completions", {"prompt": "hi", "seed": 1.5}, "seed"),
    "lone surrogate in a prompt": ("/v1/completions", b'{"model": M, "prompt": "a\\ud800b"}', "prompt"),
    "lone surrogate in a message": ("/v1/chat/completions",
                                    b'{"model": M, "messages": [{"role": "user", "content": "a\\udc00"}]}',
                                    "messages.0.content"),
    "empty stop string": ("/v1/completions", {"prompt": "hi", "stop": [""]}, "stop"),
    "unknown field": ("/v1/completions", {"prompt": "hi", "frobnicate": 1}, "frobnicate"),
    "echo": ("/v1/completions", {"prompt": "hi", "echo": True}, "echo"),
    "suffix": ("/v1/completions", {"prompt": "hi", "suffix": "!"}, "suffix"),
    "best_of": ("/v1/completions", {"prompt": "hi", "best_of": 3}, "best_of"),
    "logit_bias": ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 10}}, "logit_bias"),
    "presence_penalty": ("/v1/completions", {"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
    "frequency_penalty": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                   "frequency_penalty": 1.0}, "frequency_penalty"),
    "tools": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                       "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    "response_format": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                 "response_format": {"type": "json_object"}}, "response_format"),
    "reconfigure tp true": ("/v1/admin/reconfigure", {"tensor_parallel_size": True, "pipeline_parallel_size": 1},
                            "tensor_parallel_size"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request(server, client, model_dir, name):
    path, body, status = BAD_REQUESTS[name]
    if isinstance(body, bytes):
        response = httpx.post(f"{server}{path}", content=body, headers={"content-type": "application/json"})
    else:
        body = {k: model_dir if k == "model" and v is None else v for k, v in body.items()}
        response = httpx.post(f"{server}{path}", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if name == "unknown model":
        assert error["message"] == "The model `no-such-model` does not exist."
    if "context" in name:
        assert "maximum context length" in error["message"].lower()
    assert complete(client, model_dir, max_tokens=1).choices[0].text is not None


@pytest.mark.parametrize("name", STRICT_REQUESTS)
def test_strict_request_names_the_field(server, client, model_dir, name):
    path, body, param = STRICT_REQUESTS[name]
    if isinstance(body, bytes):
        response = httpx.post(f"{server}{path}", content=body.replace(b"M", json.dumps(model_dir).encode()),
                              headers={"content-type": "application/json"}, timeout=60)
    else:
        if path != "/v1/admin/reconfigure":
            body = {"model": model_dir, **body}
        response = httpx.post(f"{server}{path}", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    if name in STRICT_REQUESTS and name.split()[0] in ("echo", "suffix", "best_of", "logit_bias", "presence_penalty",
                                                       "frequency_penalty", "tools", "response_format"):
        assert "not supported by remp" in error["message"]
    assert complete(client, model_dir, max_tokens=1).choices[0].text is not None
    assert httpx.get(f"{server}/v1/admin/topology").json()["tensor_parallel_size"] == 1


def test_neutral_values_of_unsupported_parameters_are_served(server, model_dir):
    """Clients that always send the defaults (penalties 0, echo false, best_of 1, ...) are served."""
    body = {"model": model_dir, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "echo": False, "best_of": 1,
            "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "suffix": None}
    assert httpx.post(f"{server}/v1/completions", json=body, timeout=60).status_code == 200
    chat = {"model": model_dir, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "tools": [],
            "response_format": {"type": "text"}}
    assert httpx.post(f"{server}/v1/chat/completions", json=chat, timeout=60).status_code == 200


def test_a_tiny_temperature_is_greedy(client, model_dir):
    greedy = complete(client, model_dir, max_tokens=12, extra_body={"ignore_eos": True}).choices[0]
    tiny = complete(client, model_dir, max_tokens=12, temperature=1e-38, extra_body={"ignore_eos": True}).choices[0]
    assert (tiny.text, tiny.finish_reason) == (greedy.text, "length")


def _serve_rss_kb(url: str) -> int:
    from helpers import serve_pids
    [pid] = serve_pids(int(url.rsplit(":", 1)[1]))
    status = open(f"/proc/{pid}/status").read()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def test_large_bodies_are_refused_without_stalling_the_server(server, model_dir):
    """A body over --max-request-bytes (8 MiB by default) gets 413 before it is parsed — with a
    Content-Length or chunked; a prompt under it but longer than any context can hold is refused
    without tokenizing; /health and a concurrent stream keep answering meanwhile, and the
    server's memory does not keep what the requests brought."""
    rss_before = _serve_rss_kb(server)
    stream_body = {"model": model_dir, "prompt": "hi", "max_tokens": 100, "stream": True, "ignore_eos": True}
    gaps: list[float] = []
    health: list[float] = []

    def stream_meanwhile() -> None:
        last = time.monotonic()
        with httpx.stream("POST", f"{server}/v1/completions", json=stream_body, timeout=60) as response:
            for _ in response.iter_lines():
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

    def probe_health() -> None:
        for _ in range(20):
            t0 = time.monotonic()
            assert httpx.get(f"{server}/health", timeout=30).status_code == 200
            health.append(time.monotonic() - t0)
            time.sleep(0.05)

    threads = [threading.Thread(target=stream_meanwhile), threading.Thread(target=probe_health)]
    for t in threads:
        t.start()
    too_big = json.dumps({"model": model_dir, "prompt": "x" * (9 * 2**20)}).encode()
    reply = httpx.post(f"{server}/v1/completions", content=too_big, headers={"content-type": "application/json"},
                       timeout=60)
    assert reply.status_code == 413 and "max-request-bytes" in reply.json()["error"]["message"]
    chunked = httpx.post(f"{server}/v1/completions", content=iter([too_big[i:i + 2**20]
                                                                   for i in range(0, len(too_big), 2**20)]),
                         headers={"content-type": "application/json"}, timeout=60)
    assert chunked.status_code == 413
    for _ in range(3):  # 6 MiB of text: under the limit, far over any context of 256 tokens
        long = httpx.post(f"{server}/v1/completions", json={"model": model_dir, "prompt": "hello " * 2**20},
                          timeout=60)
        assert long.status_code == 400 and "maximum context length" in long.json()["error"]["message"]
    for t in threads:
        t.join(timeout=120)
    assert max(health) < 1.0, health
    assert max(gaps) < 2.0, max(gaps)
    assert _serve_rss_kb(server) - rss_before < 300 * 1024


# --- metrics and aborts -----------------------------------------------------------------


def test_metrics(server, client, model_dir):
    complete(client, model_dir, max_tokens=3, extra_body={"ignore_eos": True})
    samples = scrape(server)
    assert metric(samples, "remp:request_success_total", finished_reason="length") >= 1
    assert metric(samples, "remp:prompt_tokens_total") > 0
    assert metric(samples, "remp:generation_tokens_total") >= 3
    for histogram in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert metric(samples, f"remp:{histogram}_count") >= 1
    assert metric(samples, "remp:tensor_parallel_size") == 1
    assert metric(samples, "remp:pipeline_parallel_size") == 1
    assert metric(samples, "remp:num_kv_blocks") == 128
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert ("remp:" + gauge, (("model_name", model_dir),)) in samples
    assert ("remp:num_preemptions_total", (("model_name", model_dir),)) in samples


def test_client_disconnect_aborts_request(server, model_dir):
    aborted_before = metric(scrape(server), "remp:request_success_total", finished_reason="abort")
    body = {"model": model_dir, "prompt": "hi", "max_tokens": MAX_MODEL_LEN - 8, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
        next(response.iter_lines())  # the request is running; now hang up
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(server)
        if (metric(samples, "remp:request_success_total", finished_reason="abort") > aborted_before
                and metric(samples, "remp:num_requests_running") == 0):
            break
        assert time.monotonic() < deadline, "the disconnected request was not aborted"
        time.sleep(0.2)


# --- API key ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(model_dir, tmp_path_factory) -> Iterator[str]:
    with remp_server(model_dir, tmp_path_factory.mktemp("logs") / "serve-key.log",
                     "--api-key", "s3cret", "--served-model-name", "tiny") as url:
        yield url


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}])
def test_api_key_refused(keyed_server, headers):
    response = httpx.get(f"{keyed_server}/v1/models", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_api_key_accepted_and_served_model_name(keyed_server, model_dir):
    client = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key="s3cret", max_retries=0, timeout=60)
    [card] = client.models.list().data
    assert (card.id, card.model_extra["root"]) == ("tiny", model_dir)
    assert complete(client, "tiny", max_tokens=2).choices[0].text is not None
    with pytest.raises(openai.NotFoundError):
        complete(client, model_dir, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed_server}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{keyed_server}/health").status_code == 200
    assert httpx.get(f"{keyed_server}/metrics").status_code == 200


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/v1/admin/topology"])
def test_api_key_guards_docs_and_admin_routes(keyed_server, path):
    assert httpx.get(f"{keyed_server}{path}").status_code == 401
    assert httpx.get(f"{keyed_server}{path}", headers={"Authorization": "Bearer s3cret"}).status_code == 200


# --- CLI --------------------------------------------------------------------------------


def test_serve_refuses_invalid_layout(model_dir):
    result = subprocess.run(remp("serve", model_dir, "-tp", "3"), cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert "tensor_parallel_size 3" in result.stderr and "heads" in result.stderr
    assert "Traceback" not in result.stderr

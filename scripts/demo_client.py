"""The quick-start demo: chat with the server, then switch its layout live under load.

It goes through the official ``openai`` client, so the demo exercises the API exactly as
users' code would. Part 1 asks a few questions and prints the answers with tokens/s.
Part 2 keeps several greedy streaming requests in flight while it switches the layout
through ``POST /v1/admin/reconfigure``, prints each switch's outcome, pause and bytes moved,
and reports whether every request's answer equals the one it got with no switch.
"""

from __future__ import annotations

import argparse
import threading
import time

import httpx
from openai import OpenAI

from remp.topology import Topology

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "What is 1+1?",
]


def ask(client: OpenAI, model: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    """Stream a greedy chat answer; returns (text, completion tokens)."""
    text, tokens = [], 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0.0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return "".join(text), tokens


def chat(client: OpenAI, model: str, max_tokens: int) -> dict[str, str]:
    answers = {}
    for prompt in PROMPTS:
        start = time.perf_counter()
        answer, tokens = ask(client, model, prompt, max_tokens)
        elapsed = time.perf_counter() - start
        answers[prompt] = answer
        print(f"\n>>> {prompt}\n{answer}\n[{elapsed:.2f} s, {tokens / elapsed:.1f} tokens/s]")
    return answers


def switch_under_load(client: OpenAI, base_url: str, api_key: str, model: str, max_tokens: int,
                      layouts: list[tuple[int, int]], expected: dict[str, str]) -> bool:
    """Run every prompt concurrently while switching through `layouts`; True if nothing changed."""
    got: dict[str, str] = {}
    threads = [threading.Thread(target=lambda p=p: got.update({p: ask(client, model, p, max_tokens)[0]}))
               for p in PROMPTS]
    for t in threads:
        t.start()
    time.sleep(0.5)  # let the requests start generating
    headers = {"Authorization": f"Bearer {api_key}"}
    for tp, pp in layouts:
        reply = httpx.post(f"{base_url}/admin/reconfigure", headers=headers, timeout=600,
                           json={"tensor_parallel_size": tp, "pipeline_parallel_size": pp}).json()
        if "error" in reply:
            print(f"switch to tp{tp}pp{pp} refused: {reply['error']['message']}")
            continue
        t = reply["timings_s"]
        print(f"switch to tp{tp}pp{pp}: {reply['outcome']}, pause {t.get('pause', 0) * 1000:.0f} ms, "
              f"total {t.get('total', 0) * 1000:.0f} ms, KV moved {reply['kv_bytes_moved'] / 2**20:.2f} MiB "
              f"of {reply['live_kv_blocks']} live blocks, weights copied {reply['weight_bytes_loaded'] / 2**20:.0f} MiB")
    for t in threads:
        t.join()
    same = all(got.get(p) == expected[p] for p in PROMPTS)
    print(f"\n{len(got)} of {len(PROMPTS)} requests completed across the switches; answers identical to the "
          f"no-switch run: {same}" + ("" if same else " (tensor parallelism sums in another order, and more "
                                       "so in bfloat16: a greedy near-tie can flip)"))
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", help="model name; default: the first one /v1/models lists")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--switch", default="",
                        help="layouts to switch through under load, e.g. tp3pp1,tp1pp2,tp1pp1 (empty: no switching)")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    print(f"model: {model}")
    answers = chat(client, model, args.max_tokens)
    if args.switch:
        layouts = [(t.tp, t.pp) for t in map(Topology.parse, args.switch.split(","))]
        print(f"\n== switching live through {args.switch} while every prompt above is asked again")
        switch_under_load(client, args.base_url, args.api_key, model, args.max_tokens, layouts, answers)


if __name__ == "__main__":
    main()

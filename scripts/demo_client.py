"""Send a few chat requests to an OpenAI-compatible server and print the answers.

Used by run.sh as the quick-start demo; it goes through the official ``openai``
client so the demo exercises the API exactly as users' code would.
"""

from __future__ import annotations

import argparse
import time

from openai import OpenAI

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "What is 1+1?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", help="model name; default: the first one /v1/models lists")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    print(f"model: {model}")
    for prompt in PROMPTS:
        start = time.perf_counter()
        response = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=args.max_tokens,
            temperature=0.0,
        )
        elapsed = time.perf_counter() - start
        answer = response.choices[0].message.content
        usage = response.usage
        rate = f"{usage.completion_tokens / elapsed:.1f} tokens/s" if usage else "no usage reported"
        print(f"\n>>> {prompt}\n{answer}\n[{elapsed:.2f} s, {rate}]")


if __name__ == "__main__":
    main()

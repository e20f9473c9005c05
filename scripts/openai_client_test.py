#!/usr/bin/env python3
"""Talks to a running `videollava serve` with the official `openai` client (pip install openai).

    python scripts/openai_client_test.py --base-url http://127.0.0.1:8000/v1 [--model NAME]

Checks: /v1/models lists the model; a non-streaming and a streaming completion (the streamed
deltas concatenate to the non-streaming text, greedy), with an image and with a video given as
data URIs, usage in both; an unknown model raises NotFoundError. Exits non-zero on failure.
"""

import argparse
import base64
import pathlib
import sys

import openai

ROOT = pathlib.Path(__file__).resolve().parent.parent
MEDIA = ROOT / "crates" / "videollava" / "tests" / "fixtures" / "media"


def data_uri(name: str, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode((MEDIA / name).read_bytes()).decode()


def check(cond: bool, what: str) -> None:
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default=None, help="default: the first model /v1/models lists")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=300)

    models = client.models.list()
    ids = [m.id for m in models.data]
    check(len(ids) == 1, f"/v1/models lists one model: {ids}")
    model = args.model or ids[0]

    cases = {
        "image": {"type": "image_url", "image_url": {"url": data_uri("landscape.png", "image/png")}},
        "video": {"type": "video_url", "video_url": {"url": data_uri("clip.mp4", "video/mp4")}},
    }
    for name, part in cases.items():
        messages = [{"role": "user", "content": [part, {"type": "text", "text": f"What is in this {name}?"}]}]
        resp = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
        text = resp.choices[0].message.content
        check(isinstance(text, str), f"{name}: non-streaming answer {text!r}")
        check(resp.choices[0].finish_reason in ("stop", "length"), f"{name}: finish_reason {resp.choices[0].finish_reason}")
        check(resp.usage is not None and resp.usage.completion_tokens >= 1, f"{name}: usage {resp.usage}")

        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, finish, usage, roles = [], None, None, []
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.role:
                    roles.append(choice.delta.role)
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                if choice.finish_reason:
                    finish = choice.finish_reason
        check(roles[:1] == ["assistant"], f"{name}: first chunk has the assistant role")
        check("".join(pieces) == text, f"{name}: streamed text equals the non-streaming text")
        check(finish == resp.choices[0].finish_reason, f"{name}: streamed finish_reason {finish}")
        check(usage is not None and usage.completion_tokens == resp.usage.completion_tokens, f"{name}: streamed usage {usage}")

    resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, logprobs=True, top_logprobs=2)
    lp = resp.choices[0].logprobs
    check(lp is not None and len(lp.content) == resp.usage.completion_tokens, "logprobs: one entry per token")
    check(all(len(t.top_logprobs) == 2 for t in lp.content), "logprobs: two alternatives each")

    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        check(False, "unknown model raises")
    except openai.NotFoundError as e:
        check(e.status_code == 404, "unknown model: 404 NotFoundError")
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "<image> what?"}], max_tokens=2)
        check(False, "placeholder without media raises")
    except openai.BadRequestError as e:
        check(e.status_code == 400, "placeholder without media: 400 BadRequestError")
    print("all checks passed")


if __name__ == "__main__":
    main()

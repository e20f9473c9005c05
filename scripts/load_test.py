#!/usr/bin/env python3
"""Load test of `videollava serve`: N concurrent streamed video questions.

Sends `--concurrency` requests at once (each: one video as a data URI, or as a server-side
path with --video-path-on-server, plus a question) to /v1/chat/completions with streaming,
and reports, per concurrency level:
  - time to first token (TTFT) p50 / p95 / max,
  - aggregate decode tokens/s: completion tokens after each request's first one, summed,
    over the time from the first request's first token to the last request's end (prefills
    of later requests included),
  - steady decode tokens/s: tokens received, all requests together, while every request is
    decoding (from the last first token to the first end),
  - mean per-request decode tokens/s, and the prefix-cache counters from /metrics.
Only the Python standard library is used. Example:

  videollava serve --model DIR --max-batch-size 8 &
  scripts/load_test.py --video clip.mp4 --concurrency 1,8 --max-tokens 64
"""

import argparse
import base64
import json
import mimetypes
import statistics
import sys
import threading
import time
import urllib.request


def percentile(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def one_request(base, body, timeout, out):
    """Streams one completion; appends a dict of timings (or an error) to `out`."""
    t0 = time.perf_counter()
    first = None
    tokens = 0
    stamps = []
    usage = None
    req = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            for raw in resp:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for c in chunk.get("choices", []):
                    if c.get("delta", {}).get("content"):
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        stamps.append(now)
                        tokens += 1
    except Exception as e:  # noqa: BLE001 - reported, not raised
        out.append({"error": str(e)})
        return
    end = time.perf_counter()
    completion = usage["completion_tokens"] if usage else tokens
    cached = (usage or {}).get("prompt_tokens_details", {}).get("cached_tokens", 0)
    out.append(
        {
            "start": t0,
            "first": first if first is not None else end,
            "end": end,
            "completion_tokens": completion,
            "prompt_tokens": (usage or {}).get("prompt_tokens", 0),
            "cached_tokens": cached,
            "stamps": stamps,
        }
    )


def metrics(base):
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except Exception:  # noqa: BLE001
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("videollava_prefix_cache_") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name.replace("videollava_prefix_cache_", "")] = float(value)
    return out


def run_level(base, n, make_body, timeout):
    results = []
    threads = [threading.Thread(target=one_request, args=(base, make_body(i), timeout, results)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    errors = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    if not ok:
        return {"concurrency": n, "errors": errors}
    ttft = [r["first"] - r["start"] for r in ok]
    decode_tokens = sum(max(r["completion_tokens"] - 1, 0) for r in ok)
    window = max(r["end"] for r in ok) - min(r["first"] for r in ok)
    per_request = [
        (r["completion_tokens"] - 1) / (r["end"] - r["first"])
        for r in ok
        if r["completion_tokens"] > 1 and r["end"] > r["first"]
    ]
    # While every request decodes at once (from the last first token to the first end): content
    # chunks received per second, all requests together (no prefill of a newcomer in between).
    lo, hi = max(r["first"] for r in ok), min(r["end"] for r in ok)
    in_window = sum(1 for r in ok for t in r["stamps"] if lo < t <= hi)
    steady = round(in_window / (hi - lo), 2) if hi - lo > 0.05 and in_window > 0 else None
    return {
        "concurrency": n,
        "ok": len(ok),
        "steady_decode_tok_s": steady,
        "errors": errors,
        "wall_s": round(wall, 3),
        "ttft_p50_s": round(percentile(ttft, 50), 3),
        "ttft_p95_s": round(percentile(ttft, 95), 3),
        "ttft_max_s": round(max(ttft), 3),
        "completion_tokens": sum(r["completion_tokens"] for r in ok),
        "cached_prompt_tokens": sum(r["cached_tokens"] for r in ok),
        "aggregate_decode_tok_s": round(decode_tokens / window, 2) if window > 0 else None,
        "mean_request_decode_tok_s": round(statistics.mean(per_request), 2) if per_request else None,
    }


def conversation(base, url, question, max_tokens, model, timeout):
    """Turn 1 about the video, then turn 2 with the history resent (as OpenAI clients do):
    returns both turns' timings (turn 2 should reuse turn 1's prefix)."""
    turns = []
    messages = [
        {
            "role": "user",
            "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]
    for follow_up in (None, "And what happens after that?"):
        if follow_up:
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": follow_up}]
        body = {
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if model:
            body["model"] = model
        out = []
        one_request(base, body, timeout, out)
        r = out[0]
        if "error" in r:
            raise SystemExit(f"conversation turn failed: {r['error']}")
        turns.append(r)
        # The answer text for the history: ask again without streaming (same greedy answer).
        plain = dict(body, stream=False)
        plain.pop("stream_options")
        req = urllib.request.Request(
            base + "/v1/chat/completions", data=json.dumps(plain).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            answer = json.loads(resp.read())["choices"][0]["message"]["content"]
    return turns


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="http://127.0.0.1:8000", help="server address")
    ap.add_argument("--model", default=None, help="model name to send (default: none)")
    ap.add_argument("--video", help="local video file, sent as a data URI")
    ap.add_argument("--video-path-on-server", help="a path under the server's --allowed-media-dir instead")
    ap.add_argument("--question", default="What happens in this video?")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated levels, e.g. 1,4,8")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--distinct",
        action="store_true",
        help="a different question per request (the video prefix is still shared)",
    )
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per request")
    ap.add_argument(
        "--conversation",
        action="store_true",
        help="instead: one conversation of two turns about the video (history resent), "
        "reporting each turn's time to first token",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object per level")
    ap.add_argument("--warmup", type=int, default=1, help="requests sent (one at a time) before measuring")
    args = ap.parse_args()

    if args.video:
        mime = mimetypes.guess_type(args.video)[0] or "video/mp4"
        with open(args.video, "rb") as f:
            url = f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"
    elif args.video_path_on_server:
        url = args.video_path_on_server
    else:
        url = None

    def make_body(i):
        question = f"{args.question} (viewer {i})" if args.distinct else args.question
        content = [{"type": "text", "text": question}]
        if url:
            content.insert(0, {"type": "video_url", "video_url": {"url": url}})
        body = {
            "messages": [{"role": "user", "content": content}],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        if args.model:
            body["model"] = args.model
        return body

    if args.conversation:
        if not url:
            raise SystemExit("--conversation needs --video or --video-path-on-server")
        t1, t2 = conversation(args.base, url, args.question, args.max_tokens, args.model, args.timeout)
        ttft1, ttft2 = t1["first"] - t1["start"], t2["first"] - t2["start"]
        print(
            f"turn 1: TTFT {ttft1:.3f} s ({t1['prompt_tokens']} prompt tokens, {t1['cached_tokens']} cached); "
            f"turn 2: TTFT {ttft2:.3f} s ({t2['prompt_tokens']} prompt tokens, {t2['cached_tokens']} cached); "
            f"turn 2 / turn 1: {100 * ttft2 / ttft1:.1f}%"
        )
        print(json.dumps({"prefix_cache": metrics(args.base)}))
        return

    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    for i in range(args.warmup):
        # Media decoding, feature and prefix caches, allocations: not part of what is measured.
        run_level(args.base, 1, make_body, args.timeout)
    rows = []
    for n in levels:
        row = run_level(args.base, n, make_body, args.timeout)
        row["prefix_cache"] = metrics(args.base)
        rows.append(row)
        if args.json:
            print(json.dumps({k: v for k, v in row.items()}), flush=True)
        else:
            print(
                f"N={n:3d}: ok {row.get('ok', 0)}, errors {len(row['errors'])}, "
                f"TTFT p50 {row.get('ttft_p50_s')} s p95 {row.get('ttft_p95_s')} s, "
                f"aggregate decode {row.get('aggregate_decode_tok_s')} tok/s "
                f"(all decoding at once: {row.get('steady_decode_tok_s')}), "
                f"per request {row.get('mean_request_decode_tok_s')} tok/s, "
                f"cached prompt tokens {row.get('cached_prompt_tokens')}",
                flush=True,
            )
            for e in row["errors"][:3]:
                print(f"  error: {e}", file=sys.stderr)
    for key in ("aggregate_decode_tok_s", "steady_decode_tok_s"):
        if len(rows) > 1 and rows[0].get(key) and rows[-1].get(key):
            print(f"{key} at N={levels[-1]} / N={levels[0]}: {rows[-1][key] / rows[0][key]:.2f}x")


if __name__ == "__main__":
    main()

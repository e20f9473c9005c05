"""Side-by-side table of `videollava bench --json` and `bench_checkpoint.py run --json`.

    python scripts/reference/bench_report.py RUST.json TRANSFORMERS.json
"""

import json
import sys


def main():
    rust = json.load(open(sys.argv[1]))
    tf = json.load(open(sys.argv[2]))
    st = tf["stages"]
    tf_decode_tps = st["decode_steps"].get("tokens_per_s") or float("nan")
    rows = [
        ("load (s)", rust["load_s"], st["load"]["seconds"]),
        ("media decode (s)", rust["media_decode_s"], st["decode"]["seconds"]),
        ("preprocess (s)", rust["preprocess_s"], st["preprocess"]["seconds"]),
        ("vision towers (s)", rust["vision_s"], st["vision"]["seconds"]),
        ("time to first token (s)", rust["time_to_first_token_s"], st["prefill"]["seconds"]),
        ("decode (tokens/s)", rust["decode_tokens_per_s"], tf_decode_tps),
        ("peak RSS (MiB)", rust["peak_rss_mib"], tf["peak_rss_mb"]),
    ]
    print(f"prompt tokens: videollava {rust['prompt_tokens']}, transformers {st['preprocess']['prompt_tokens']}")
    print(f"{'stage':<26}{'videollava':>12}{'transformers':>14}{'ratio':>9}")
    for name, a, b in rows:
        ratio = a / b if b else float("nan")
        print(f"{name:<26}{a:>12.3f}{b:>14.3f}{ratio:>9.2f}")


if __name__ == "__main__":
    main()

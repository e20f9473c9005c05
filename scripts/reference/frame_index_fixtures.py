"""Expected video frame indices from numpy, for tests/video_decode.rs::sample_indices_match_numpy.

One line per case, `u|l TOTAL N: indices`:
  u: np.arange(0, TOTAL, TOTAL / N).astype(int)[:N]   (the Hugging Face recipe)
  l: np.linspace(0, TOTAL - 1, N).astype(int)         (the original Video-LLaVA repo)
for N in (1, 6, 7, 8, 16) and TOTAL in 1..=40 plus 47, 50, 63..65, 99..101, 127..129, 131..133, 150,
199..201, 255..257, 299, 300, then N = 8 for every other TOTAL up to 300. Cases such as TOTAL=17,
N=7, where arange yields N + 1 values, are included.

Usage: python frame_index_fixtures.py OUT.txt
"""
import sys

import numpy as np


def main(out_path):
    totals = list(range(1, 41)) + [47, 50, 63, 64, 65, 99, 100, 101, 127, 128, 129, 131, 132, 133, 150, 199, 200, 201, 255, 256, 257, 299, 300]
    lines = []
    seen = set()
    cases = [(t, n) for n in (1, 6, 7, 8, 16) for t in totals]
    cases += [(t, 8) for t in range(1, 301) if (t, 8) not in set(cases)]
    for total, n in cases:
        if (total, n) in seen:
            continue
        seen.add((total, n))
        u = np.arange(0, total, total / n).astype(int)[:n]
        l = np.linspace(0, total - 1, n).astype(int)
        lines.append(f"u {total} {n}: " + " ".join(map(str, u)))
        lines.append(f"l {total} {n}: " + " ".join(map(str, l)))
    with open(out_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{out_path}: {len(lines)} cases")


if __name__ == "__main__":
    main(sys.argv[1])

"""Prints the library's module import graph and fails on cycles and on edges against the data flow.

Edges: file A imports file B when A names `crate::x::y` or `super::y` resolving to B's module
(`use` lines and paths in code). Reported at two levels: top-level modules (config, media, ...)
and files. The flow (README's layout): the floor (error, batch_feature, huge_pages, mapped, kernels, hub) under
config -> media -> processor -> model -> generate -> engine -> batch; a module may import only modules
before it in that order, and the model takes tensors (it imports neither media nor processor).
Usage: python3 scripts/dev/module_graph.py [crates/videollava/src]
"""
import os
import re
import sys
from collections import defaultdict

root = sys.argv[1] if len(sys.argv) > 1 else "crates/videollava/src"


def module_of(path):
    rel = os.path.relpath(path, root)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib"):
        rel = rel[:-1]
    return rel


files = {}
for d, _, fs in os.walk(root):
    for f in fs:
        if f.endswith(".rs"):
            p = os.path.join(d, f)
            files[tuple(module_of(p))] = p
mods = set(files)


def resolve(parts):
    # longest prefix that is a module
    for n in range(len(parts), 0, -1):
        if tuple(parts[:n]) in mods:
            return tuple(parts[:n])
    return None


edges = defaultdict(set)
for m, p in files.items():
    src = open(p).read()
    # Test modules do not count (a test may use anything).
    src = re.split(r"#\[cfg\(test\)\]\s*mod tests", src)[0]
    # Comments (doc links included) are not imports.
    src = re.sub(r"//[^\n]*", "", src)
    for hit in re.finditer(r"\bcrate::([a-z_0-9]+(?:::[a-z_0-9]+)*)", src):
        t = resolve(hit.group(1).split("::"))
        if t and t != m and not (len(t) < len(m) and m[: len(t)] == t):
            edges[m].add(t)
    for hit in re.finditer(r"\bsuper::([a-z_0-9]+(?:::[a-z_0-9]+)*)", src):
        base = list(m[:-1]) if files[m].endswith("mod.rs") is False else list(m[:-1])
        if files[m].endswith("mod.rs"):
            base = list(m[:-1])
        t = resolve(base + hit.group(1).split("::"))
        if t and t != m and not (len(t) < len(m) and m[: len(t)] == t):
            edges[m].add(t)


def cycles(graph):
    found, state = [], {}

    def dfs(u, stack):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                dfs(v, stack)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            dfs(u, [])
    return found


top = defaultdict(set)
for a, bs in edges.items():
    for b in bs:
        if a[:1] != b[:1] and a and b:
            top[a[0]].add(b[0])
print("top-level modules -> what they import:")
for a in sorted(top):
    print(f"  {a:10} -> {', '.join(sorted(top[a]))}")
bad = cycles(top) + cycles(edges)
for c in bad:
    print("CYCLE:", " -> ".join(x if isinstance(x, str) else "::".join(x) for x in c))

ORDER = ["error", "batch_feature", "huge_pages", "mapped", "kernels", "hub",
         "config", "media", "processor", "model", "generate", "engine", "batch"]
FORBIDDEN = {("model", "media"), ("model", "processor")}
against = []
for a in sorted(top):
    for b in sorted(top[a]):
        if a not in ORDER or b not in ORDER:
            against.append(f"{a} -> {b}: module not in the flow list of scripts/dev/module_graph.py")
        elif ORDER.index(b) > ORDER.index(a) or (a, b) in FORBIDDEN:
            against.append(f"{a} -> {b}: against the data flow")
for line in against:
    print("EDGE:", line)
if not bad and not against:
    print("no cycles; every edge follows the data flow")
sys.exit(1 if bad or against else 0)

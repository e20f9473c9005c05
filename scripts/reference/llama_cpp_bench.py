"""Our engine and llama.cpp side by side on the same Llama decoder and prompt length (issue 12, "Targets").

llama.cpp is built from PyPI's `llama-cpp-python` (pinned below: LLAMA_CPP_PYTHON), the checkpoint's
language model is converted with the `convert_hf_to_gguf.py` of that same release (the sdist's
vendor/llama.cpp, gguf-py included), quantized with the built library, and timed through the binding's C API:
prefill of exactly N token ids, then greedy decode. Our side is `videollava bench` on bigbuckbunny.mp4,
whose language-model prefill is the same 2,074 positions for a 7B-shaped checkpoint (8 frames x 257 + text).
Nothing here runs at test time; every venv and GGUF lives outside the repository.

    # 1. two llama.cpp builds (minutes each on 2 cores; run in the background and poll the log)
    python3 scripts/reference/llama_cpp_bench.py build --venv /work/venvs/llamacpp-native --flavor native
    python3 scripts/reference/llama_cpp_bench.py build --venv /work/venvs/llamacpp-avx2 --flavor avx2
    # 2. GGUFs: BF16 from the checkpoint, then Q8_0 and Q4_K_M from the BF16 one. Run with an interpreter that
    #    has torch + transformers (the converter imports both); the quantizing runs under --llama-venv.
    VENV_TORCH/bin/python scripts/reference/llama_cpp_bench.py convert --model CKPT --out GGUF_DIR \
        --llama-venv /work/venvs/llamacpp-native
    # 3. timings, one process per run (peak RSS is per process); each writes one JSON file
    /work/venvs/llamacpp-native/bin/python scripts/reference/llama_cpp_bench.py time \
        --gguf GGUF_DIR/lm-q4_k_m.gguf --threads 2 --prompt-tokens 2074 --new-tokens 16 --json OUT/llama-native-q4.json
    python3 scripts/reference/llama_cpp_bench.py ours --model CKPT --quantize q4k [--kernels avx2] --json OUT/ours-q4.json
    # 4. one markdown table
    python3 scripts/reference/llama_cpp_bench.py report OUT/*.json
    # or 3 + 4 in one go: ours (none, q8_0, q4k) and llama.cpp (BF16, Q8_0, Q4_K_M) per flavour, one process each,
    # each run's weight files read through once before it (page cache), OUT/report.md at the end
    python3 scripts/reference/llama_cpp_bench.py sitting --model CKPT --gguf GGUF_DIR --out OUT \
        --llama-venv native=/work/venvs/llamacpp-native --llama-venv avx2=/work/venvs/llamacpp-avx2 \
        [--flash-attn auto off] [--repeat 2]

`build --flavor`: `native` = -DGGML_NATIVE=ON with AMX compiled out (the machine's own kernels: AVX-512, VNNI,
BF16 where present; llama.cpp's AMX path crashes here, see NO_AMX below), `native-amx` = plain -DGGML_NATIVE=ON;
`avx2` = -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
-DGGML_AVX512=OFF (and AVX-VNNI / AVX512-* / AMX off), the build an AVX2-only CPU user gets, to compare with our
AVX2 path forced by VIDEOLLAVA_KERNELS=avx2. Both: no BLAS, no multimodal library (LLAVA_BUILD=OFF), OpenMP on
(ggml's default). pip's wheel cache is bypassed so each flavour is really compiled.

`time`: llama.cpp's defaults as its own tools use them: n_batch 2048, n_ubatch 512 (llama-cli / llama-bench),
flash attention `auto`, KV cache F16, weights memory-mapped (with the CPU backend's own repacking of quantized
weights, which llama.cpp does by default), no warm-up run (as ours: one request after load; --repeat N runs N
times from an empty KV cache and reports the median). The prompt is a BOS followed by seeded random ids (the ids
do not change the work); the first generated token comes from the prefill's logits, then --new-tokens - 1
single-token decode steps are timed (argmax fed back, EOS not special): the same count as `videollava bench
--max-new-tokens N`, which generates N tokens and times the N - 1 steps after the first. Prints and writes JSON:
wall-clock prefill and decode seconds and tokens/s, llama.cpp's own perf counters (last run), what `auto` flash
attention resolved to, the weight buffers (mapped / repacked), peak RSS (VmHWM), load averages, system_info.
On 2 threads llama.cpp's timings collapse when anything else runs (its threads meet at a barrier after every op,
so one preempted thread stalls both): time in a quiet sitting and look at the load averages in the report.

`ours`: `videollava bench --dtype bf16 --threads T --video VIDEO --max-new-tokens N [--quantize q8_0|q4k]`, with
VIDEOLLAVA_KERNELS=avx2 when --kernels avx2 (--repeat N: N processes, medians); its prefill figure is the language model's alone (vision towers
excluded, reported separately), the same positions llama.cpp prefills. With --quantize it first loads once with a
two-token text request so the timed run reads the saved quantized weights (--no-warm: time the first load).

Precision pairs: BF16 GGUF vs our BF16; Q8_0 vs our q8_0; Q4_K_M vs our q4k (llama.cpp's Q4_K_M keeps
attn_v / ffn_down of half the layers and the output matrix in Q6_K).
"""

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
SHARED = os.path.abspath(os.path.join(ROOT, "..", "shared"))
DEFAULT_VIDEO = os.path.join(SHARED, "fixtures", "media", "bigbuckbunny.mp4")

LLAMA_CPP_PYTHON = "0.3.36"

COMMON_CMAKE = ["-DLLAVA_BUILD=OFF", "-DGGML_BLAS=OFF"]
# llama.cpp's AMX path (ggml_backend_amx_mul_mat, taken for Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K weights where -march=native
# has AMX-INT8) segfaults on this project's Sapphire Rapids-class KVM machine at the first prefill, Q8_0 and Q4_K_M
# alike (upstream ggml-org/llama.cpp#20824, closed unfixed). `native` therefore compiles AMX out (GCC honours
# -mno-amx-* whatever their order against -march=native; system_info then shows no AMX_INT8); `native-amx` is the
# plain -march=native build, for machines where that path works. BF16 weights never take the AMX path.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
FLAVORS = {
    "native": ["-DGGML_NATIVE=ON", f"-DCMAKE_C_FLAGS='{NO_AMX}'", f"-DCMAKE_CXX_FLAGS='{NO_AMX}'"],
    "native-amx": ["-DGGML_NATIVE=ON"],
    "avx2": [
        "-DGGML_NATIVE=OFF",
        "-DGGML_AVX=ON",
        "-DGGML_AVX2=ON",
        "-DGGML_FMA=ON",
        "-DGGML_F16C=ON",
        "-DGGML_BMI2=ON",
        "-DGGML_AVX_VNNI=OFF",
        "-DGGML_AVX512=OFF",
        "-DGGML_AVX512_VBMI=OFF",
        "-DGGML_AVX512_VNNI=OFF",
        "-DGGML_AVX512_BF16=OFF",
        "-DGGML_AMX_TILE=OFF",
        "-DGGML_AMX_INT8=OFF",
        "-DGGML_AMX_BF16=OFF",
    ],
}
BUILD_INFO = "llama_cpp_bench_build.json"  # written into the venv by `build`

# GGUF file names written by `convert`, and the precision each one is compared at.
GGUF_TYPES = {"bf16": "lm-bf16.gguf", "Q8_0": "lm-q8_0.gguf", "Q4_K_M": "lm-q4_k_m.gguf"}
PRECISION_OF_FTYPE = {"BF16": "bf16", "Q8_0": "8-bit", "Q4_K_M": "4-bit", "Q4_K - Medium": "4-bit"}
PRECISION_OF_OURS = {None: "bf16", "none": "bf16", "q8_0": "8-bit", "q4k": "4-bit"}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def peak_rss_mib():
    """VmHWM of this process (as `videollava bench` reads it), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    keys = ["avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"]
                    return [k for k in keys if k in have]
    except OSError:
        pass
    return []


def cpu_model_number():
    """'family F model M stepping S' from /proc/cpuinfo (a VM's model name is often generic)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                k, _, v = line.partition(":")
                fields[k.strip()] = v.strip()
    except OSError:
        return None
    return f"family {fields.get('cpu family')} model {fields.get('model')} stepping {fields.get('stepping')}"


def machine():
    return {
        "cpu": cpu_name(),
        "cpu_id": cpu_model_number(),
        "cpu_flags": cpu_flags(),
        "cpus": os.cpu_count(),
        "hypervisor": "hypervisor" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else None,
    }


# ---------------------------------------------------------------- build


def cmd_build(args):
    venv = os.path.abspath(args.venv)
    cmake_args = " ".join(FLAVORS[args.flavor] + COMMON_CMAKE + (args.cmake_arg or []))
    py = os.path.join(venv, "bin", "python")
    t0 = time.time()
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    env = dict(os.environ, CMAKE_ARGS=cmake_args, CMAKE_BUILD_PARALLEL_LEVEL=str(args.jobs))
    log(f"building llama-cpp-python=={LLAMA_CPP_PYTHON} into {venv} with CMAKE_ARGS='{cmake_args}'")
    subprocess.run(
        [py, "-m", "pip", "install", "--no-cache-dir", "--force-reinstall", "--no-binary", "llama-cpp-python",
         "--verbose", f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
        env=env, check=True,
    )
    seconds = time.time() - t0
    probe = subprocess.run(
        [py, "-c", "import llama_cpp; llama_cpp.llama_backend_init(); "
         "print(llama_cpp.__version__); print(llama_cpp.llama_print_system_info().decode())"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    info = {
        "flavor": args.flavor,
        "llama_cpp_python": probe[0],
        "cmake_args": cmake_args,
        "build_seconds": round(seconds, 1),
        "system_info": probe[1] if len(probe) > 1 else "",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    with open(os.path.join(venv, BUILD_INFO), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2))


# ---------------------------------------------------------------- convert


def llama_cpp_source(work):
    """vendor/llama.cpp of the pinned llama-cpp-python sdist (downloaded once into WORK/src)."""
    src = os.path.join(work, "src")
    root = os.path.join(src, f"llama_cpp_python-{LLAMA_CPP_PYTHON}")
    vendor = os.path.join(root, "vendor", "llama.cpp")
    if not os.path.exists(os.path.join(vendor, "convert_hf_to_gguf.py")):
        os.makedirs(src, exist_ok=True)
        tarball = os.path.join(src, f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz")
        if not os.path.exists(tarball):
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", src,
                 f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
                check=True,
            )
        with tarfile.open(tarball) as t:
            t.extractall(src, filter="data") if hasattr(tarfile, "data_filter") else t.extractall(src)
    return vendor


def stage_language_model(ckpt, stage):
    """A directory the converter reads as a plain Llama: the full text config (sparse hub configs resolved by
    transformers' defaults) under LlamaForCausalLM, symlinks to the checkpoint's shards and tokenizer config, and
    its tokenizer.json padded to the embedding's rows (pad_tokenizer).
    The converter itself strips the `language_model.` of both weight layouts (4.x `language_model.model.*`,
    5.x `model.language_model.*`) and skips the towers and projector (names with `vision_` / `projector.`)."""
    from transformers import AutoConfig

    if os.path.isdir(stage):
        shutil.rmtree(stage)
    os.makedirs(stage)
    cfg = AutoConfig.from_pretrained(ckpt)
    text = cfg.text_config.to_dict()
    if text.get("model_type") not in ("llama", None):
        raise SystemExit(f"{ckpt}: text model is {text.get('model_type')!r}; this script stages Llama decoders only")
    text["architectures"] = ["LlamaForCausalLM"]
    text["model_type"] = "llama"
    text["torch_dtype"] = text["dtype"] = "bfloat16"
    text.setdefault("vocab_size", cfg.to_dict().get("vocab_size"))
    with open(os.path.join(stage, "config.json"), "w") as f:
        json.dump(text, f, indent=2, default=str)
    linked = []
    for name in sorted(os.listdir(ckpt)):
        if name.endswith(".safetensors") or name in (
            "model.safetensors.index.json", "special_tokens_map.json", "generation_config.json",
        ):
            os.symlink(os.path.abspath(os.path.join(ckpt, name)), os.path.join(stage, name))
            linked.append(name)
    padded = pad_tokenizer(ckpt, stage, text["vocab_size"])
    return text, linked, padded


def pad_tokenizer(ckpt, stage, vocab_size):
    """tokenizer.json and tokenizer_config.json with unused special tokens `<unused_ID>` for the embedding rows
    no token names (Video-LLaVA: 32,000 pieces + <image> <video> <pad> = 32,003 tokens, 32,064 rows). llama.cpp
    requires one token per row, and the converter pads only sentencepiece vocabularies (tokenizer.model, which
    the hf checkpoints lack). Both files carry them because transformers 5 takes added tokens from
    tokenizer_config.json's added_tokens_decoder and 4.x from tokenizer.json. Returns how many were added; the
    ids in use are untouched."""
    with open(os.path.join(ckpt, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    cfg_path = os.path.join(ckpt, "tokenizer_config.json")
    cfg = {}
    if os.path.exists(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    ids = set(tok["model"]["vocab"].values()) | {a["id"] for a in tok.get("added_tokens", [])}
    n = max(ids) + 1
    if len(ids) != n:
        raise SystemExit(f"{ckpt}/tokenizer.json: token ids are not contiguous ({len(ids)} ids, largest {n - 1})")
    for i in range(n, vocab_size):
        entry = {"content": f"<unused_{i}>", "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True}
        tok.setdefault("added_tokens", []).append({"id": i, **entry})
        cfg.setdefault("added_tokens_decoder", {})[str(i)] = entry
    with open(os.path.join(stage, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    with open(os.path.join(stage, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2)
    return max(0, vocab_size - n)


def cmd_convert(args):
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    work = os.path.abspath(args.work or os.path.join(out, "work"))
    vendor = llama_cpp_source(work)
    log(f"converter: {vendor}/convert_hf_to_gguf.py (llama-cpp-python {LLAMA_CPP_PYTHON} sdist), gguf-py beside it")
    for mod in ("torch", "transformers", "safetensors", "yaml"):
        try:
            __import__(mod)
        except ImportError:
            raise SystemExit(f"the converter needs {mod}: run `convert` with an interpreter that has torch + transformers")
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    try:
        import sentencepiece  # noqa: F401  (imported by the converter before it looks for tokenizer.model)
    except ImportError:
        extras = os.path.join(work, "extras")
        if not os.path.exists(os.path.join(extras, "sentencepiece")):
            subprocess.run([sys.executable, "-m", "pip", "install", "--target", extras, "sentencepiece"], check=True)
        env["PYTHONPATH"] = extras + os.pathsep + env.get("PYTHONPATH", "")

    stage = os.path.join(work, "hf-language-model")
    text, linked, padded = stage_language_model(args.model, stage)
    log(f"staged {stage}: {text['num_hidden_layers']} layers, hidden {text['hidden_size']}, vocab {text['vocab_size']} "
        f"({padded} unused tokens added to tokenizer.json); linked {', '.join(linked)}")
    bf16 = os.path.join(out, GGUF_TYPES["bf16"])
    timings = {}
    if not os.path.exists(bf16) or args.force:
        t0 = time.time()
        subprocess.run(
            [sys.executable, os.path.join(vendor, "convert_hf_to_gguf.py"), stage, "--outtype", "bf16", "--outfile", bf16],
            env=env, check=True,
        )
        timings["convert_bf16_s"] = round(time.time() - t0, 1)
    if args.llama_venv:
        py = os.path.join(os.path.abspath(args.llama_venv), "bin", "python")
        for ftype in ("Q8_0", "Q4_K_M"):
            dst = os.path.join(out, GGUF_TYPES[ftype])
            if os.path.exists(dst) and not args.force:
                continue
            t0 = time.time()
            subprocess.run(
                [py, os.path.abspath(__file__), "quantize", "--src", bf16, "--dst", dst, "--type", ftype,
                 "--threads", str(args.threads)],
                check=True,
            )
            timings[f"quantize_{ftype}_s"] = round(time.time() - t0, 1)
    else:
        log("no --llama-venv: BF16 only (run `quantize` from a llama.cpp venv for Q8_0 / Q4_K_M)")
    info_path = os.path.join(out, "convert.json")
    earlier = {}
    if os.path.exists(info_path):
        with open(info_path) as f:
            earlier = json.load(f)
    info = {
        **earlier,
        "checkpoint": os.path.abspath(args.model),
        "llama_cpp_python": LLAMA_CPP_PYTHON,
        "converter": os.path.join(vendor, "convert_hf_to_gguf.py"),
        "files": {k: os.path.getsize(os.path.join(out, v)) for k, v in GGUF_TYPES.items() if os.path.exists(os.path.join(out, v))},
        **timings,
    }
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2))


def cmd_quantize(args):
    import llama_cpp as L

    ftypes = {"Q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_K_M": L.LLAMA_FTYPE_MOSTLY_Q4_K_M}
    params = L.llama_model_quantize_default_params()
    params.ftype = ftypes[args.type]
    params.nthread = args.threads
    log(f"quantizing {args.src} -> {args.dst} ({args.type}) with llama_model_quantize")
    rc = L.llama_model_quantize(args.src.encode(), args.dst.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed: {rc}")


# ---------------------------------------------------------------- time (llama.cpp)


def build_info():
    path = os.path.join(sys.prefix, BUILD_INFO)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def cmd_time(args):
    import ctypes
    import random

    import numpy as np

    import llama_cpp as L

    if args.new_tokens < 2 or args.prompt_tokens < 1 or args.repeat < 1:
        raise SystemExit("--new-tokens must be at least 2, --prompt-tokens and --repeat at least 1")
    load1 = os.getloadavg()
    # llama.cpp's log (thousands of lines at load) goes to --log FILE, or is dropped; kept in memory to read back
    # what it resolved (flash attention under `auto`, buffer types).
    lines = []

    def on_log(level, text, user_data):
        lines.append(text.decode(errors="replace"))

    log_cb = L.llama_log_callback(on_log)
    L.llama_log_set(log_cb, ctypes.c_void_p(0))
    L.llama_backend_init()
    system_info = L.llama_print_system_info().decode()
    info = build_info()
    flavor = info.get("flavor") or (
        "native-amx" if "AMX_INT8 = 1" in system_info else "native" if "AVX512 = 1" in system_info else "avx2")

    t0 = time.time()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_mmap = not args.no_mmap
    model = L.llama_model_load_from_file(args.gguf.encode(), mp)
    if not model:
        raise SystemExit(f"{args.gguf}: llama.cpp could not load it:\n" + "".join(lines[-20:]))
    n_ctx = args.prompt_tokens + args.new_tokens + 16
    cp = L.llama_context_default_params()
    cp.n_ctx = n_ctx
    cp.n_batch = args.n_batch
    cp.n_ubatch = args.n_ubatch
    cp.n_threads = args.threads
    cp.n_threads_batch = args.threads
    cp.no_perf = False
    fa = {"auto": -1, "off": 0, "on": 1}[args.flash_attn]
    if hasattr(cp, "flash_attn_type"):
        cp.flash_attn_type = fa
    elif fa >= 0:
        cp.flash_attn = bool(fa)
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("llama_init_from_model failed")
    load_s = time.time() - t0
    rss_after_load = peak_rss_mib()
    buf = ctypes.create_string_buffer(256)
    L.llama_model_desc(model, buf, len(buf))
    desc = buf.value.decode()
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    bos = L.llama_vocab_bos(vocab)

    rng = random.Random(args.seed)
    ids = [bos] + [rng.randrange(259, min(n_vocab, 32000)) for _ in range(args.prompt_tokens - 1)]

    def decode(tokens):
        arr = (L.llama_token * len(tokens))(*tokens)
        rc = L.llama_decode(ctx, L.llama_batch_get_one(arr, len(tokens)))
        if rc != 0:
            raise SystemExit(f"llama_decode returned {rc}")

    def argmax_last():
        ptr = L.llama_get_logits_ith(ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax())

    def one_run():
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        t0 = time.time()
        for i in range(0, len(ids), args.n_batch):
            decode(ids[i:i + args.n_batch])
        tok = argmax_last()
        prefill_s = time.time() - t0
        generated, steps = [tok], []
        for _ in range(args.new_tokens - 1):
            t = time.time()
            decode([tok])
            tok = argmax_last()
            steps.append(time.time() - t)
            generated.append(tok)
        return prefill_s, steps, generated

    # --repeat N: N prefill + decode runs from an empty KV cache; the median run by prefill time (the lower one of an even count) is reported (and
    # every run listed), as llama-bench repeats; the first run also pays the page faults of the mapped weights.
    reps = []
    for _ in range(args.repeat):
        L.llama_perf_context_reset(ctx)
        reps.append(one_run())
    prefill_s, steps, generated = sorted(reps, key=lambda r: r[0])[(len(reps) - 1) // 2]
    decode_s = sorted(sum(r[1]) for r in reps)[(len(reps) - 1) // 2]
    perf = L.llama_perf_context(ctx)
    load2 = os.getloadavg()
    text_log = "".join(lines)
    if args.log:
        with open(args.log, "w") as f:
            f.write(text_log)
    fa_resolved = re.findall(r"Flash Attention (?:was auto, set to )?(enabled|disabled)", text_log)
    buffers = sorted(set(re.findall(r"load_tensors: +(\S+) model buffer size = +([0-9.]+ MiB)", text_log)))
    ftype = next((p for k, p in PRECISION_OF_FTYPE.items() if k in desc), "?")
    report = {
        "engine": "llama.cpp",
        "label": args.label or f"llama.cpp {flavor} {ftype}",
        "precision": ftype,
        "kernels": flavor,
        "gguf": os.path.abspath(args.gguf),
        "model_desc": desc,
        "llama_cpp_python": L.__version__,
        "build": info,
        "system_info": system_info,
        "threads": args.threads,
        "n_batch": args.n_batch,
        "n_ubatch": args.n_ubatch,
        "flash_attn": args.flash_attn + (f" ({fa_resolved[-1]})" if fa_resolved else ""),
        "model_buffers": [f"{name} {size}" for name, size in buffers],
        "mmap": not args.no_mmap,
        "load_s": load_s,
        "prompt_tokens": len(ids),
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": len(ids) / prefill_s,
        "decode_tokens": len(steps),
        "decode_s": decode_s,
        "decode_tokens_per_s": len(steps) / decode_s,
        "decode_median_token_s": sorted(steps)[len(steps) // 2],
        "runs": [{"prefill_s": r[0], "decode_s": sum(r[1])} for r in reps],
        "llama_perf": {"t_p_eval_ms": perf.t_p_eval_ms, "n_p_eval": perf.n_p_eval,
                       "t_eval_ms": perf.t_eval_ms, "n_eval": perf.n_eval},
        "generated_ids": generated,
        "peak_rss_after_load_mib": rss_after_load,
        "peak_rss_mib": peak_rss_mib(),
        "loadavg_start": load1,
        "loadavg_end": load2,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    L.llama_free(ctx)
    L.llama_model_free(model)
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)


# ---------------------------------------------------------------- ours


def cmd_ours(args):
    binary = os.path.abspath(args.binary)
    if not os.path.exists(binary):
        raise SystemExit(f"{binary}: not built (cargo build --release -p videollava-cli)")
    raw = (args.json or "ours.json") + ".raw"
    cmd = [binary, "bench", "--model", args.model, "--dtype", "bf16", "--threads", str(args.threads),
           "--video", args.video, "--max-new-tokens", str(args.new_tokens), "--json", raw]
    if args.quantize != "none":
        cmd += ["--quantize", args.quantize]
    cmd += args.extra or []
    env = dict(os.environ)
    env.pop("VIDEOLLAVA_KERNELS", None)
    if args.kernels != "native":
        env["VIDEOLLAVA_KERNELS"] = args.kernels
    if args.quantize != "none" and not args.no_warm:
        # Quantizing happens at the first load and is saved; warm that cache with a short text-only request so the
        # timed run loads the saved weights, as every later run of a user does.
        warm = [binary, "bench", "--model", args.model, "--dtype", "bf16", "--threads", str(args.threads),
                "--quantize", args.quantize, "--max-new-tokens", "2", "--bandwidth-mib", "0", "--prompt", "Hi"]
        warm += args.extra or []
        log("warming the quantized cache: " + " ".join(warm))
        subprocess.run(warm, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log(("VIDEOLLAVA_KERNELS=" + args.kernels + " " if args.kernels != "native" else "") + " ".join(cmd))
    load1 = os.getloadavg()
    reps = []
    for _ in range(args.repeat):
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(raw) as f:
            reps.append(json.load(f))
    load2 = os.getloadavg()
    # --repeat N: N processes; the median run by prefill time is reported, decode by its own median
    r = dict(sorted(reps, key=lambda x: x["prefill_s"])[(len(reps) - 1) // 2])
    by_decode = sorted(reps, key=lambda x: x["decode_s"])[(len(reps) - 1) // 2]
    for k in ("decode_s", "decode_tokens_per_s", "decode_median_token_s"):
        r[k] = by_decode[k]
    precision = PRECISION_OF_OURS[args.quantize]
    report = {
        "engine": "videollava",
        "label": args.label or f"videollava {args.kernels} {precision}",
        "precision": precision,
        "kernels": args.kernels,
        "kernel_set": r.get("kernel_set"),
        "command": ("VIDEOLLAVA_KERNELS=" + args.kernels + " " if args.kernels != "native" else "") + " ".join(cmd),
        "threads": r.get("threads"),
        "load_s": r.get("load_s"),
        "vision_s": r.get("vision_s"),
        "prompt_tokens": r.get("prompt_tokens"),
        "prefill_s": r.get("prefill_s"),
        "prefill_tokens_per_s": r.get("prefill_tokens_per_s"),
        "decode_tokens": r.get("decode_tokens"),
        "decode_s": r.get("decode_s"),
        "decode_tokens_per_s": r.get("decode_tokens_per_s"),
        "decode_median_token_s": r.get("decode_median_token_s"),
        "peak_rss_mib": r.get("peak_rss_mib"),
        "loadavg_start": load1,
        "loadavg_end": load2,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "runs": [{"prefill_s": x["prefill_s"], "decode_s": x["decode_s"]} for x in reps],
        "bench": r,
    }
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)


# ---------------------------------------------------------------- report


def cmd_report(args):
    runs = []
    for path in args.files:
        with open(path) as f:
            r = json.load(f)
        if r.get("engine") in ("videollava", "llama.cpp"):
            runs.append(r)
    if not runs:
        raise SystemExit("no run JSON files (from `time` / `ours`) given")
    m = runs[0]["machine"]
    out = [f"CPU: {m['cpu']}, {m.get('cpu_id')} ({', '.join(m['cpu_flags'])}; {m['cpus']} CPUs"
           f"{', under a hypervisor' if m.get('hypervisor') else ''})", ""]
    builds = {r["kernels"]: r.get("build", {}) for r in runs if r["engine"] == "llama.cpp"}
    for flavor, b in sorted(builds.items()):
        if b:
            out.append(f"llama.cpp `{flavor}`: llama-cpp-python {b.get('llama_cpp_python')}, CMAKE_ARGS `{b.get('cmake_args')}`")
    sysinfo = {r["kernels"]: r.get("system_info", "") for r in runs if r["engine"] == "llama.cpp"}
    for flavor, s in sorted(sysinfo.items()):
        out.append(f"llama.cpp `{flavor}` system_info: `{s.strip()}`")
    ours_sets = sorted({f"{r['kernels']} -> {r.get('kernel_set')}" for r in runs if r["engine"] == "videollava"})
    if ours_sets:
        out.append(f"videollava kernels (requested -> used): {', '.join(ours_sets)}")
    out.append("")

    def fmt(v, p=2):
        return "-" if v is None else f"{v:.{p}f}"

    def load(r):
        return f"{r['loadavg_start'][0]:.2f}/{r['loadavg_end'][0]:.2f}"

    out.append("| kernels | precision | llama.cpp options | prompt tokens (ours / llama.cpp) | prefill tok/s ours | "
               "prefill tok/s llama.cpp | ratio | decode tok/s ours | decode tok/s llama.cpp | ratio | "
               "peak RSS MiB ours / llama.cpp | load avg 1 min start/end: ours; llama.cpp |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    order = {"bf16": 0, "8-bit": 1, "4-bit": 2}
    keys = sorted({(r["kernels"], r["precision"]) for r in runs}, key=lambda k: (k[0] != "native", k[0], order.get(k[1], 9)))

    def get(r, k):
        return r.get(k) if r else None

    def ratio(a, b):
        return f"{a / b:.2f}" if a and b else "-"

    for kern, prec in keys:
        # videollava's `--kernels native` pairs with both llama.cpp native builds
        mine = [r for r in runs if (r["kernels"], r["precision"]) == (kern, prec)]
        ours = next((r for r in mine if r["engine"] == "videollava"), None)
        if ours is None and kern.startswith("native"):
            ours = next((r for r in runs if r["engine"] == "videollava" and (r["kernels"], r["precision"]) == ("native", prec)), None)
        lls = [r for r in mine if r["engine"] == "llama.cpp"] or [None]
        if ours is None and kern.startswith("native") and kern != "native" and lls == [None]:
            continue
        for ll in lls:
            opts = f"fa {ll['flash_attn']}, batch {ll['n_batch']}/{ll['n_ubatch']}" if ll else "-"
            out.append(
                f"| {kern} | {prec} | {opts} | {get(ours, 'prompt_tokens') or '-'} / {get(ll, 'prompt_tokens') or '-'} | "
                f"{fmt(get(ours, 'prefill_tokens_per_s'))} | {fmt(get(ll, 'prefill_tokens_per_s'))} | "
                f"{ratio(get(ours, 'prefill_tokens_per_s'), get(ll, 'prefill_tokens_per_s'))} | "
                f"{fmt(get(ours, 'decode_tokens_per_s'))} | {fmt(get(ll, 'decode_tokens_per_s'))} | "
                f"{ratio(get(ours, 'decode_tokens_per_s'), get(ll, 'decode_tokens_per_s'))} | "
                f"{fmt(get(ours, 'peak_rss_mib'), 0)} / {fmt(get(ll, 'peak_rss_mib'), 0)} | "
                f"{load(ours) if ours else '-'}; {load(ll) if ll else '-'} |"
            )
    spread = [r for r in runs if len(r.get("runs", [])) > 1]
    if spread:
        out.append("")
        out.append("Every timed run, prefill s / decode s (the table has the median):")
        for r in spread:
            out.append(f"- {r['label']}{' fa ' + r['flash_attn'] if r['engine'] == 'llama.cpp' else ''}: "
                       + ", ".join(f"{x['prefill_s']:.2f}/{x['decode_s']:.2f}" for x in r["runs"]))
    out.append("")
    out.append("ratio = ours / llama.cpp (> 1: ours faster). Prefill: the language model's positions only "
               "(ours excludes the vision towers); decode: single-token steps after the first token.")
    print("\n".join(out))


# ---------------------------------------------------------------- sitting


def page_in(paths):
    """Read files through once so the timed run finds them in the page cache: a 7B BF16 checkpoint and a BF16 GGUF
    (13.5 GB each) do not both stay cached in 24 GB, and each run maps its weights."""
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def cmd_sitting(args):
    """Every run of the comparison, one process each, in a fixed order, then the report."""
    os.makedirs(args.out, exist_ok=True)
    me = os.path.abspath(__file__)
    venvs = dict(v.split("=", 1) for v in args.llama_venv)
    runs = []
    for flavor in args.flavors:
        kernels = "native" if flavor.startswith("native") else flavor
        if flavor in ("native", "avx2"):
            for q in ("none", "q8_0", "q4k"):
                name = f"ours-{kernels}-{q}"
                shards = [os.path.join(args.model, f) for f in sorted(os.listdir(args.model)) if f.endswith(".safetensors")]
                runs.append((name, shards, [sys.executable, me, "ours", "--model", args.model, "--kernels", kernels, "--quantize", q,
                                    "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
                                    "--video", args.video, "--binary", args.binary, "--repeat", str(args.repeat), "--json", os.path.join(args.out, name + ".json")]))
        py = os.path.join(venvs[flavor], "bin", "python")
        for g in args.gguf_types:
            for fa in args.flash_attn:
                name = f"llama-{flavor}-{g}-fa_{fa}"
                runs.append((name, [os.path.join(args.gguf, f"lm-{g}.gguf")], [py, me, "time", "--gguf", os.path.join(args.gguf, f"lm-{g}.gguf"),
                                    "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
                                    "--new-tokens", str(args.new_tokens), "--flash-attn", fa, "--repeat", str(args.repeat),
                                    "--json", os.path.join(args.out, name + ".json"), "--log", os.path.join(args.out, name + ".llama.log")]))
    for name, files, cmd in runs:
        if not args.no_page_in:
            page_in(files)
        log(f"== {name}: {' '.join(cmd)}")
        with open(os.path.join(args.out, name + ".log"), "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            log(f"   {name} failed (exit {rc}); see {os.path.join(args.out, name + '.log')}")
    files = sorted(os.path.join(args.out, f) for f in os.listdir(args.out) if f.endswith(".json") and not f.endswith(".raw"))
    report = subprocess.run([sys.executable, me, "report", *files], capture_output=True, text=True, check=True).stdout
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report)
    print(report)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="venv + llama-cpp-python built from source for one flavour")
    b.add_argument("--venv", required=True)
    b.add_argument("--flavor", required=True, choices=sorted(FLAVORS))
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs")
    b.add_argument("--cmake-arg", action="append", help="extra CMake argument (repeatable)")

    c = sub.add_parser("convert", help="checkpoint's language model -> BF16 GGUF (+ Q8_0, Q4_K_M with --llama-venv)")
    c.add_argument("--model", required=True, help="Video-LLaVA checkpoint directory")
    c.add_argument("--out", required=True, help="directory for lm-bf16.gguf, lm-q8_0.gguf, lm-q4_k_m.gguf")
    c.add_argument("--work", help="where the llama.cpp source and the staged directory go [default: OUT/work]")
    c.add_argument("--llama-venv", help="a venv made by `build`, whose llama_model_quantize makes Q8_0 and Q4_K_M")
    c.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    c.add_argument("--force", action="store_true", help="redo files that exist")

    q = sub.add_parser("quantize", help="(run from a llama.cpp venv) llama_model_quantize one GGUF")
    q.add_argument("--src", required=True)
    q.add_argument("--dst", required=True)
    q.add_argument("--type", required=True, choices=["Q8_0", "Q4_K_M"])
    q.add_argument("--threads", type=int, default=os.cpu_count() or 1)

    t = sub.add_parser("time", help="(run from a llama.cpp venv) prefill N ids + greedy decode, JSON out")
    t.add_argument("--gguf", required=True)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--prompt-tokens", type=int, default=2074)
    t.add_argument("--new-tokens", type=int, default=16, help="tokens generated (the first from the prefill)")
    t.add_argument("--n-batch", type=int, default=2048)
    t.add_argument("--n-ubatch", type=int, default=512)
    t.add_argument("--flash-attn", default="auto", choices=["auto", "on", "off"])
    t.add_argument("--no-mmap", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--repeat", type=int, default=1, help="runs from an empty KV cache; medians reported")
    t.add_argument("--label")
    t.add_argument("--json")
    t.add_argument("--log", help="write llama.cpp's own log here")

    o = sub.add_parser("ours", help="videollava bench on the same workload, JSON out")
    o.add_argument("--model", required=True)
    o.add_argument("--quantize", default="none", choices=["none", "q8_0", "q4k"])
    o.add_argument("--kernels", default="native", help="native, or a VIDEOLLAVA_KERNELS value (avx2, portable)")
    o.add_argument("--threads", type=int, default=2)
    o.add_argument("--new-tokens", type=int, default=16, help="--max-new-tokens")
    o.add_argument("--video", default=DEFAULT_VIDEO)
    o.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "videollava"))
    o.add_argument("--repeat", type=int, default=1, help="timed runs (processes); medians reported")
    o.add_argument("--no-warm", action="store_true", help="do not load once first to save the quantized weights")
    o.add_argument("--label")
    o.add_argument("--json")
    o.add_argument("extra", nargs="*", help="after --: more `videollava bench` options")

    st = sub.add_parser("sitting", help="all runs (ours and llama.cpp per flavour and precision), then the report")
    st.add_argument("--model", required=True)
    st.add_argument("--gguf", required=True, help="the directory `convert` wrote")
    st.add_argument("--out", required=True)
    st.add_argument("--llama-venv", action="append", required=True, help="FLAVOR=VENV (repeatable)")
    st.add_argument("--flavors", nargs="+", default=["native", "avx2"])
    st.add_argument("--gguf-types", nargs="+", default=["bf16", "q8_0", "q4_k_m"])
    st.add_argument("--flash-attn", nargs="+", default=["auto"], choices=["auto", "on", "off"])
    st.add_argument("--repeat", type=int, default=1, help="timed runs per configuration (medians reported)")
    st.add_argument("--no-page-in", action="store_true", help="do not read each run's weight files once before it")
    st.add_argument("--threads", type=int, default=2)
    st.add_argument("--prompt-tokens", type=int, default=2074)
    st.add_argument("--new-tokens", type=int, default=16)
    st.add_argument("--video", default=DEFAULT_VIDEO)
    st.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "videollava"))

    r = sub.add_parser("report", help="markdown table from `time` / `ours` JSON files")
    r.add_argument("files", nargs="+")

    args = p.parse_args()
    {"build": cmd_build, "convert": cmd_convert, "quantize": cmd_quantize, "time": cmd_time, "ours": cmd_ours,
     "report": cmd_report, "sitting": cmd_sitting}[args.cmd](args)


if __name__ == "__main__":
    main()

"""Train the project's own small Llama-style tokenizer for test fixtures.

A byte-fallback BPE with SentencePiece conventions ("▁" for spaces, a "▁" prepended to every text
segment, <unk>=0 <s>=1 </s>=2, byte tokens <0x00>..<0xFF> at ids 3..258), trained on a seeded
synthetic corpus, then <image>, <video> and <pad> added as special tokens, saved through
transformers' LlamaTokenizerFast so the files are exactly what transformers writes.

    python scripts/reference/make_tokenizer.py --out DIR [--vocab-size 800]
"""

import argparse
import json
import random

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

WORDS = (
    "the a an this that these video image picture frame clip scene man woman child dog cat bird rabbit "
    "bunny tree forest sky cloud river car road street city house room table chair ball game player "
    "is are was were be been being has have had do does did can could will would should may might "
    "what why how who where when which describe explain tell show see look watch happen happens "
    "funny strange beautiful big small red green blue yellow white black bright dark fast slow "
    "and or but because so then there here in on at of to from with without over under near "
    "first second last next many few some all each every one two three four five six seven eight "
    "USER ASSISTANT SYSTEM question answer please thank you yes no maybe not very really quite "
    "running jumping walking eating sleeping playing talking laughing falling flying swimming "
    "café naïve résumé über straße español português 日本語 中文 한국어 русский ελληνικά"
).split()

SENTENCES = [
    "USER: What is happening in this video? ASSISTANT: A rabbit is walking through the forest.",
    "USER: Why is this video funny? ASSISTANT: Because the cat falls off the table.",
    "USER: Describe the image. ASSISTANT: A red car on a street in the city.",
    "USER: How many people are there? ASSISTANT: There are three people.",
    "Tell me about the frame, please. What colour is the sky?",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14",
    "Punctuation: (hello), [world]; {foo}: bar! baz? qux... \"quoted\" 'single' - dash / slash",
]


def corpus(seed: int, lines: int):
    rng = random.Random(seed)
    for s in SENTENCES:
        for _ in range(20):
            yield s
    for _ in range(lines):
        n = rng.randint(3, 14)
        words = [rng.choice(WORDS) for _ in range(n)]
        sep = rng.choice([" ", " ", " ", ", ", "\n"])
        text = sep.join(words)
        if rng.random() < 0.3:
            text = text.capitalize() + rng.choice([".", "?", "!"])
        yield text


def build(vocab_size: int, seed: int) -> Tokenizer:
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 256,
        special_tokens=["<unk>", "<s>", "</s>"],
        show_progress=False,
        limit_alphabet=120,
    )
    trainer_tok.train_from_iterator(corpus(seed, 4000), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    # Llama layout: specials, then the 256 byte tokens, then the learned pieces.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<unk>", "<s>", "</s>"]])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<image>", "<video>", "<pad>"]])
    return tok


def save(tok: Tokenizer, out: str) -> None:
    from transformers import LlamaTokenizerFast

    fast = LlamaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    fast.save_pretrained(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab-size", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tok = build(args.vocab_size, args.seed)
    save(tok, args.out)
    print(f"tokenizer with {tok.get_vocab_size()} tokens written to {args.out}")


if __name__ == "__main__":
    main()

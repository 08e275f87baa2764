"""A tiny LLaMA-like SentencePiece model for tests, trained in well under a second.

`train_tiny_spm(dir)` trains a BPE model on a few hundred lines of generated English text with the normalizer
and special-id settings of LLaMA's `tokenizer.model` (unk 0, bos 1, eos 2, no pad, byte fallback, digits split,
identity normalization, extra whitespace kept, dummy prefix added) and writes `dir/tokenizer.model`. The model
is cached: a later call with the same directory and vocab size returns the existing file.
"""
import io
import os
import random

# Settings copied from LLaMA's tokenizer.model trainer_spec / normalizer_spec (the ones that change encodings).
LLAMA_LIKE = dict(
    model_type="bpe",
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    byte_fallback=True,                 # characters outside the vocab become <0xNN> pieces, never <unk>
    split_digits=True,                  # "2048" -> "2" "0" "4" "8"
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,     # "a  b" keeps both spaces; a trailing space stays a "▁" piece
    add_dummy_prefix=True,              # "Hello" is encoded as "▁Hello"
    allow_whitespace_only_pieces=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    max_sentencepiece_length=16,
    character_coverage=0.99995,
)

_WORDS = (
    "the a an of to in on with and or is are was were be this that these those it its there here what which who "
    "how why when where image picture photo man woman person people dog cat bus car train street table room "
    "kitchen window sky tree grass water beach city building sign red blue green white black yellow small large "
    "old young two three many some standing sitting walking holding looking wearing playing riding near next "
    "behind front top side under describe question answer assistant user human chat curious artificial "
    "intelligence helpful detailed polite answers questions gives between shows contains appears left right "
    "color number count letter option choice single word phrase briefly concisely"
).split()
_PUNCT = [".", ",", "?", "!", ":", ";"]
_EXTRA = ["USER:", "ASSISTANT:", "café", "naïve", "Zürich", "(A)", "(B)", "e.g.", "don't", "it's"]


def _lines(n: int, seed: int = 0) -> list[str]:
    """n lines of pseudo-English: words, capitals, numbers, punctuation and a few accented words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(4, 16)):
            r = rng.random()
            if r < 0.08:
                words.append(str(rng.randint(0, 2048)))
            elif r < 0.14:
                words.append(rng.choice(_EXTRA))
            else:
                w = rng.choice(_WORDS)
                words.append(w.capitalize() if rng.random() < 0.15 else w)
            if rng.random() < 0.1:
                words[-1] += rng.choice(_PUNCT)
        out.append(" ".join(words))
    return out


def train_tiny_spm(path_dir, vocab_size: int = 768, user_defined_symbols: tuple = ()) -> str:
    """Train (or reuse) `path_dir/tokenizer.model`, a LLaMA-like BPE SentencePiece model; return its path.
    In this vocabulary "▁USER" is one piece and "USER" two ("U", "SER"); LLaMA's is the other way round
    ("USER" one piece, "▁USER" = "▁US", "ER"). `user_defined_symbols=("USER",)` gives a model that, like
    LLaMA's, spends one piece more on "▁USER" ("▁", "USER") than on "USER"."""
    import sentencepiece as spm

    path = os.path.join(str(path_dir), "tokenizer.model")
    if os.path.exists(path) and spm.SentencePieceProcessor(model_file=path).vocab_size() == vocab_size:
        return path
    os.makedirs(str(path_dir), exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_lines(2000)), model_writer=buf, vocab_size=vocab_size,
        num_threads=1, minloglevel=2, user_defined_symbols=list(user_defined_symbols), **LLAMA_LIKE,
    )
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)  # atomic: a concurrent reader never sees a half-written model
    return path

"""LLaMA's SentencePiece tokenizer as Hugging Face's slow `LlamaTokenizer` runs it, the `<image>` splice, and a
streaming decoder for generation.

LLaMA / Vicuna ship a SentencePiece BPE model (`tokenizer.model`, 32000 pieces: <unk>=0, <s>=1, </s>=2,
byte pieces <0x00>..<0xFF> at 3..258). The settings that shape every encoding:
- add_dummy_prefix: `sp.encode(text)` encodes "▁" + text, so "Hi" -> ["▁Hi"] and "\nHi" -> ["▁", "<0x0A>",
  "Hi"] (the famous lone "▁" = 29871 before a newline).
- remove_extra_whitespaces = False: spaces are kept, a trailing space is its own "▁" piece.
- split_by_whitespace: pieces never cross a "▁" word start, so sp(a + " " + b) == sp(a) + sp(b) whenever
  b starts with a non-space character (b's dummy prefix plays the part of the space). The templates rely on
  this to tokenize a conversation segment by segment with the same ids as the whole string.
- byte_fallback: characters outside the vocabulary become UTF-8 byte pieces, never <unk>; decoding a prefix
  that ends inside a multi-byte character gives U+FFFD (the streaming decoder holds those back).

The original LLaVA loads this file with `AutoTokenizer(..., use_fast=False)`: transformers' slow
`LlamaTokenizer`, configured by the `tokenizer_config.json` beside it. Its three settings that change ids:
- The special-token strings "<s>", "</s>", "<unk>" in a text become their ids; SentencePiece encodes the text
  between them. The vicuna templates write "</s>" after every assistant turn.
- legacy (absent = true): with `legacy: true` every piece of text between special tokens is encoded with the
  dummy prefix. With `legacy: false` (Vicuna-v1.5, the LLaVA-1.5 checkpoints, and every fine-tune the original
  train.py saves) only the start of the text gets a "▁" (none when the text starts with a special token), and
  the text right after a special token is encoded as it stands: "A1</s>USER" ends [..., "</s>", "USER"] where
  legacy gives [..., "</s>", "▁US", "ER"]. transformers gets there with a second SentencePiece model whose
  `add_dummy_prefix` is off, and encodes text that starts with a space as "<unk>" + text, dropping the pieces
  of "<unk>" (so the space is kept as "▁"); `Tokenizer.encode` does the same.
- add_bos_token (absent = true) / add_eos_token (absent = false): <s> / </s> around a whole prompt.
Nothing here imports transformers (or protobuf: the second model is the first with one protobuf field
appended, see NO_DUMMY_PREFIX).
"""
import json
import os
import re

IMAGE_PLACEHOLDER = "<image>"  # where an image goes in prompt text
EOS_STRING = "</s>"            # LLaMA's end-of-sequence piece, written between turns by the vicuna templates
TOKENIZER_CONFIG = "tokenizer_config.json"
# transformers' values when tokenizer_config.json (or the key) is absent
DEFAULT_SETTINGS = {"legacy": True, "add_bos_token": True, "add_eos_token": False}
# A serialized ModelProto with these 4 bytes appended has add_dummy_prefix = false: 0x1a = field 3
# (normalizer_spec), length-delimited; 0x02 = 2 bytes; 0x18 0x00 = its field 3 (add_dummy_prefix), varint 0.
# Protobuf merges a repeated message field into the first occurrence, so this sets that one flag, as
# transformers' `model.normalizer_spec.MergeFrom(NormalizerSpec(add_dummy_prefix=False))` does.
NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


def read_settings(directory) -> tuple[dict, str]:
    """(settings, where they came from): legacy / add_bos_token / add_eos_token from `directory`'s
    tokenizer_config.json, transformers' defaults for what it does not say (null means the default too)."""
    path = os.path.join(os.fspath(directory), TOKENIZER_CONFIG)
    if not os.path.isfile(path):
        return dict(DEFAULT_SETTINGS), f"transformers' defaults: no {path}"
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got a JSON {type(d).__name__}")
    settings = {}
    for key, default in DEFAULT_SETTINGS.items():
        value = d.get(key)
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{path}: {key!r} must be true, false or null, got {value!r}")
        settings[key] = default if value is None else value
    return settings, f"from {path}"


class Tokenizer:
    """SentencePiece with the slow LlamaTokenizer's rules and LLaVA's conventions.

    `path` is a `tokenizer.model` file or a checkpoint directory holding one; the tokenizer_config.json beside
    it gives `legacy`, `add_bos_token` and `add_eos_token` (see the module docstring); keyword arguments that
    are not None override it. `vocab_size` is the number of SentencePiece pieces (32000 for LLaMA); checkpoints
    may have a larger embedding (llava-hf adds <image>=32000 and <pad>=32001 and pads to 32064): `decode`
    skips those ids.
    """

    def __init__(self, path, legacy=None, add_bos_token=None, add_eos_token=None):
        import sentencepiece as spm

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SentencePiece tokenizer model not found: {path}")
        try:
            with open(path, "rb") as f:
                proto = f.read()
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
            self.sp_bare = spm.SentencePieceProcessor(model_proto=proto + NO_DUMMY_PREFIX)  # legacy=false's
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with a terse message
            raise ValueError(f"{path}: not a readable SentencePiece model ({e})") from e
        self.path = path
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        for name, i in (("bos", self.bos_id), ("eos", self.eos_id), ("unk", self.unk_id)):
            if i < 0:
                raise ValueError(f"{path}: the SentencePiece model has no {name} piece "
                                 f"(LLaMA's has <unk>=0, <s>=1, </s>=2)")
        # LLaMA has no pad piece; LLaVA training sets `tokenizer.pad_token = tokenizer.unk_token` (id 0).
        self.pad_id = self.unk_id
        self.special_ids = frozenset((self.bos_id, self.eos_id, self.unk_id))
        self._special = {self.sp.id_to_piece(i): i for i in self.special_ids}  # "</s>" -> 2, ...
        # re.split with a group keeps the specials: [text, special, text, ..., text]; longest first as HF's trie
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self._special, key=len, reverse=True))) + ")")
        self._unk_piece = self.sp.id_to_piece(self.unk_id)
        self._unk_len = len(self.sp_bare.encode(self._unk_piece))  # pieces of the string "<unk>", not its id
        self.settings, self.settings_source = read_settings(os.path.dirname(path))
        given = {"legacy": legacy, "add_bos_token": add_bos_token, "add_eos_token": add_eos_token}
        overridden = {k: v for k, v in given.items() if v is not None}
        if overridden:
            self.settings.update(overridden)
            self.settings_source += f" (overridden: {', '.join(sorted(overridden))})"
        self.legacy = self.settings["legacy"]
        self.add_bos, self.add_eos = self.settings["add_bos_token"], self.settings["add_eos_token"]

    def __repr__(self):
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, {self.describe()})"

    def describe(self) -> str:
        """'legacy=false add_bos_token=true add_eos_token=false (from DIR/tokenizer_config.json)': the settings
        that change ids, and where they came from (train.py and generate.py print it)."""
        values = " ".join(f"{k}={str(v).lower()}" for k, v in self.settings.items())
        return f"{values} ({self.settings_source})"

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `text` as the slow LlamaTokenizer gives them without added BOS/EOS
        (`tokenizer.encode(text, add_special_tokens=False)`): "<s>", "</s>", "<unk>" become their ids, the text
        between them goes through SentencePiece with the dummy prefix `legacy` says; `bos` / `eos` frame it."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        if not self.legacy:
            text = text.replace("▁", " ")  # as transformers does: a literal "▁" in the text is a space
        ids = [self.bos_id] if bos else []
        for k, part in enumerate(self._split.split(text)):
            if k % 2:
                ids.append(self._special[part])
            elif part:
                ids += self._encode_text(part, starts_text=k == 0)
        return ids + ([self.eos_id] if eos else [])

    def _encode_text(self, text: str, starts_text: bool) -> list[int]:
        """SentencePiece ids of text holding no special token; `starts_text`: it begins the whole text."""
        if self.legacy:
            return self.sp.encode(text)  # the dummy prefix on every piece of text
        if starts_text:
            text = "▁" + text
        if not text.startswith(("▁", " ")):
            return self.sp_bare.encode(text)  # after a special token: as it stands
        ids = self.sp_bare.encode(self._unk_piece + text)  # "<unk>▁Hey": the leading space survives as "▁"
        return ids[self._unk_len:] if len(ids) >= self._unk_len else ids

    def save(self, out_dir):
        """Write tokenizer.model and a tokenizer_config.json holding the settings in force (the source's
        other keys kept), so the saved checkpoint tokenizes as this tokenizer does."""
        import shutil
        src = os.path.join(os.path.dirname(self.path), TOKENIZER_CONFIG)
        if os.path.isfile(src):
            with open(src, encoding="utf-8") as f:
                d = json.load(f)
        else:
            d = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                 "pad_token": None, "clean_up_tokenization_spaces": False}
        d.update(self.settings)
        shutil.copyfile(self.path, os.path.join(os.fspath(out_dir), "tokenizer.model"))
        with open(os.path.join(os.fspath(out_dir), TOKENIZER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")

    def _text_ids(self, ids) -> list[int]:
        """Drop special ids (<s>, </s>, <unk> = pad) and ids past the SentencePiece vocab (<image>, <pad>)."""
        out = []
        for i in ids:
            i = int(i)
            if i < 0:
                raise ValueError(f"Tokenizer.decode: negative id {i} (remove the image sentinel -200 and the "
                                 f"label pad -100 before decoding)")
            if i < self.vocab_size and i not in self.special_ids:
                out.append(i)
        return out

    def decode(self, ids) -> str:
        """Text of `ids`, skipping special and added ids (like HF's `skip_special_tokens=True`).

        SentencePiece drops the leading space of the first piece (the dummy prefix) and joins byte pieces
        into UTF-8 characters; bytes that do not form a character come out as U+FFFD.
        """
        return self.sp.decode(self._text_ids(ids))

    def id_to_piece(self, i: int) -> str:
        """The piece string of id `i` ("▁the", "<0x0A>", "</s>")."""
        if not 0 <= int(i) < self.vocab_size:
            raise ValueError(f"id {i} is outside the SentencePiece vocabulary [0, {self.vocab_size})")
        return self.sp.id_to_piece(int(i))


def tokenize_with_images(text: str, tokenizer: Tokenizer, image_token_id: int, bos: bool = True) -> list[int]:
    """Token ids of a prompt containing `<image>` placeholders, one `image_token_id` per placeholder: the
    original LLaVA's `tokenizer_image_token`.

    That function splits the text on "<image>" and tokenizes each chunk with its own call
    `tokenizer(chunk).input_ids` ([BOS] + encode(chunk) [+ EOS with add_eos_token]), keeping only the first
    chunk's BOS. Each chunk is thus the start of a text and gets the dummy prefix under either `legacy`, so
    "USER: <image>\nWhat" becomes
        encode("USER: ") + [img] + encode("\nWhat") = [▁USER, :, ▁] + [img] + [▁, <0x0A>, What]
    i.e. a lone "▁" on each side of the image: that is what LLaVA was trained on, so we reproduce it.

    bos: whether this is a whole prompt (BOS first when the tokenizer adds one); the templates pass False for
    the pieces of a conversation after the first.
    image_token_id: -200 (IMAGE_TOKEN_INDEX) for the original LLaVA convention, 32000 for llava-hf. Either way
    it stands for one image; the model glue expands it to Np embeddings.
    """
    ids = [tokenizer.bos_id] if bos and tokenizer.add_bos else []
    for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k > 0:
            ids.append(image_token_id)
        ids += tokenizer.encode(chunk, eos=tokenizer.add_eos)
    return ids


class StreamDecoder:
    """Turns a growing list of generated ids into text increments whose concatenation is `decode(ids)`.

    Decoding token by token is wrong for SentencePiece: `decode([id])` drops the piece's leading space
    ("▁the" -> "the"), and a byte piece alone is half a character. So we decode a window that starts one
    emitted chunk back and diff it against that chunk's text (the idea of HF text-generation-inference's
    `decode_token`):
        prev = decode(ids[prefix:read])     # text already emitted (its leading space is stripped ...)
        cur  = decode(ids[prefix:])         # ... in both, so the difference is exact
        new  = cur[len(prev):]
    `new` is held back while it ends with U+FFFD (an unfinished UTF-8 character split over byte pieces);
    `flush()` returns whatever is left at the end. Special ids are dropped before windowing, so an EOS in
    the middle does not shift the leading-space stripping.

        dec = StreamDecoder(tok)
        for ...: generated.append(next_id); print(dec.step(generated), end="")
        print(dec.flush())
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.n_seen = 0    # how many ids of the caller's list have been consumed
        self.ids = []      # text ids seen so far (specials and added tokens dropped)
        self.prefix = 0    # start of the decode window in self.ids
        self.read = 0      # end of the text already emitted, in self.ids

    def step(self, ids) -> str:
        """`ids` is the whole generated list so far (it must extend the previous call's). Returns new text."""
        if len(ids) < self.n_seen:
            raise ValueError(f"StreamDecoder.step: got {len(ids)} ids, fewer than the {self.n_seen} seen before")
        self.ids += self.tokenizer._text_ids(ids[self.n_seen:])
        self.n_seen = len(ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """The remaining text, including a trailing incomplete character (as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        sp = self.tokenizer.sp
        prev = sp.decode(self.ids[self.prefix:self.read])
        cur = sp.decode(self.ids[self.prefix:])
        if len(cur) <= len(prev) or (cur.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return cur[len(prev):]

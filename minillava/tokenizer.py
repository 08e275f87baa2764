"""LLaMA's SentencePiece tokenizer, the `<image>` splice, and a streaming decoder for generation.

LLaMA / Vicuna ship a SentencePiece BPE model (`tokenizer.model`, 32000 pieces: <unk>=0, <s>=1, </s>=2,
byte pieces <0x00>..<0xFF> at 3..258). The settings that shape every encoding:
- add_dummy_prefix: every call to `sp.encode(text)` encodes "▁" + text, so "Hi" -> ["▁Hi"] and
  "\nHi" -> ["▁", "<0x0A>", "Hi"] (the famous lone "▁" = 29871 before a newline).
- remove_extra_whitespaces = False: spaces are kept, a trailing space is its own "▁" piece.
- split_by_whitespace: pieces never cross a "▁" word start, so sp(a + " " + b) == sp(a) + sp(b) whenever
  b starts with a non-space character (b's dummy prefix plays the part of the space). The templates rely on
  this to tokenize a conversation segment by segment with the same ids as the whole string.
- byte_fallback: characters outside the vocabulary become UTF-8 byte pieces, never <unk>; decoding a prefix
  that ends inside a multi-byte character gives U+FFFD (the streaming decoder holds those back).

The original LLaVA (and llava-hf) load this file through Hugging Face's slow `LlamaTokenizer(legacy=True)`,
which splits the text on its special-token strings ("</s>", ...) and calls `sp.encode` on each piece in
between. `tokenize_with_images` reproduces that for "<image>" and "</s>", which are the two markers LLaVA
prompts contain. Nothing here imports transformers.
"""
import os

IMAGE_PLACEHOLDER = "<image>"  # where an image goes in prompt text
EOS_STRING = "</s>"            # LLaMA's end-of-sequence piece, written between turns by the vicuna templates


class Tokenizer:
    """A thin wrapper around `sentencepiece.SentencePieceProcessor` with LLaVA's conventions.

    `path` is a `tokenizer.model` file or a checkpoint directory holding one. `vocab_size` is the number of
    SentencePiece pieces (32000 for LLaMA); checkpoints may have a larger embedding (llava-hf adds
    <image>=32000 and <pad>=32001 and pads to 32064): `decode` skips those ids.
    """

    def __init__(self, path):
        import sentencepiece as spm

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SentencePiece tokenizer model not found: {path}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
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

    def __repr__(self):
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """SentencePiece ids of `text` (with its dummy "▁" prefix), optionally framed by BOS / EOS.

        Special-token strings in the text ("</s>") are encoded as plain characters here; see
        `tokenize_with_images` for the splitting LLaVA's prompts need.
        """
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

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
    """Token ids of a prompt containing `<image>` placeholders, one `image_token_id` per placeholder.

    The text is split on "<image>" and each chunk is encoded alone with `sp.encode` (no BOS), joined by one
    image id each, with one BOS at the very start. This is what the original LLaVA `tokenizer_image_token`
    produces: it encodes each chunk with HF's LlamaTokenizer(legacy=True), which adds a BOS to every chunk
    and calls `sp.encode(chunk)`, then keeps only the first chunk's BOS. Because every chunk gets its own
    dummy prefix, "USER: <image>\\nWhat" becomes
        sp("USER: ") + [img] + sp("\\nWhat") = [▁USER, :, ▁] + [img] + [▁, <0x0A>, ▁What]
    i.e. a lone "▁" on each side of the image: that is what LLaVA was trained on, so we reproduce it.

    Like the HF tokenizer, the literal string "</s>" inside a chunk becomes the EOS id (the text after it is
    again encoded with its own dummy prefix): the vicuna templates write "</s>" after every assistant turn.
    Other special strings ("<s>", "<unk>") are encoded as plain text.

    image_token_id: -200 (IMAGE_TOKEN_INDEX) for the original LLaVA convention, 32000 for llava-hf. Either way
    it stands for one image; the model glue expands it to Np embeddings.
    """
    ids = [tokenizer.bos_id] if bos else []
    for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k > 0:
            ids.append(image_token_id)
        for j, piece in enumerate(chunk.split(EOS_STRING)):
            if j > 0:
                ids.append(tokenizer.eos_id)
            ids.extend(tokenizer.encode(piece))
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

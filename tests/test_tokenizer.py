"""Tokenizer, `<image>` splicing and streaming decode, on a tiny LLaMA-like SentencePiece model."""
import pytest

from minillava.tokenizer import StreamDecoder, Tokenizer, tokenize_with_images
from tests.spm_util import train_tiny_spm

IMG = -200  # the original LLaVA sentinel; llava-hf uses 32000

# Strings that exercise the dummy prefix, kept whitespace, digits, newlines and byte fallback.
TEXTS = [
    "Hello world",
    "The dog is sitting on the grass.",
    "  two leading spaces and a trailing one ",
    "a\nb\n\nc",
    "2048 cats, 12 dogs",
    "café naïve Zürich",
    "日本語 🙂 emoji",
    "USER: What is this? ASSISTANT: A bus.",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(train_tiny_spm(tmp_path_factory.mktemp("spm")))


def pieces(tok, ids):
    return [tok.id_to_piece(i) for i in ids]


def test_special_ids(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)  # LLaVA pads with unk
    assert tok.vocab_size == 768
    assert pieces(tok, [0, 1, 2, 3 + 0x0A]) == ["<unk>", "<s>", "</s>", "<0x0A>"]


def test_load_errors(tmp_path, tok):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer(missing)
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match=str(bad)):
        Tokenizer(bad)
    # A checkpoint directory holding tokenizer.model is accepted.
    assert Tokenizer(tok.path.rsplit("/", 1)[0]).encode("a dog") == tok.encode("a dog")


def test_encode_llama_conventions(tok):
    ids = tok.encode("the dog", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == tok.encode("the dog")
    assert pieces(tok, tok.encode("the dog")) == ["▁the", "▁dog"]             # dummy prefix
    assert pieces(tok, tok.encode("\nthe"))[:2] == ["▁", "<0x0A>"]           # lone "▁" before a newline
    assert pieces(tok, tok.encode("the ")) == ["▁the", "▁"]                   # trailing space kept
    assert pieces(tok, tok.encode("2048")) == ["▁", "2", "0", "4", "8"]       # digits split
    emoji = tok.encode("🙂")                                                   # F0 9F 99 82, byte fallback
    assert pieces(tok, emoji) == ["▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text  # identity normalization: lossless round trip


def test_decode_skips_special_and_added_ids(tok):
    ids = tok.encode("a dog")
    added = [tok.vocab_size, tok.vocab_size + 1]  # like llava-hf's <image>=32000, <pad>=32001
    assert tok.decode([tok.bos_id] + ids[:1] + added + ids[1:] + [tok.eos_id, tok.pad_id]) == "a dog"
    with pytest.raises(ValueError, match="-200"):
        tok.decode(ids + [IMG])
    with pytest.raises(ValueError, match="outside"):
        tok.id_to_piece(tok.vocab_size)


def test_tokenize_with_images(tok):
    enc = tok.encode
    # 0 images: plain encode with one BOS.
    assert tokenize_with_images("describe the dog", tok, IMG) == [1] + enc("describe the dog")
    assert tokenize_with_images("describe the dog", tok, IMG, bos=False) == enc("describe the dog")
    # 1 image: each chunk gets its own dummy prefix, so the image sits between two lone "▁" pieces,
    # exactly as the original tokenizer_image_token gives ("▁", img, "▁", "<0x0A>").
    ids = tokenize_with_images("USER: <image>\nWhat is this?", tok, IMG)
    assert ids == [1] + enc("USER: ") + [IMG] + enc("\nWhat is this?")
    i = ids.index(IMG)
    assert pieces(tok, ids[i - 1:i]) == ["▁"] and pieces(tok, ids[i + 1:i + 3]) == ["▁", "<0x0A>"]
    # 2 images, one at the very start (its empty chunk encodes to nothing) and two adjacent.
    ids = tokenize_with_images("<image>the dog<image><image> a cat", tok, 32000)
    assert ids == [1, 32000] + enc("the dog") + [32000, 32000] + enc(" a cat")
    assert ids.count(32000) == 3
    # "</s>" is the EOS token, and the text after it starts a new encode (HF legacy behaviour).
    ids = tokenize_with_images("a dog.</s>USER: hi", tok, IMG, bos=False)
    assert ids == enc("a dog.") + [2] + enc("USER: hi")
    assert pieces(tok, ids[ids.index(2) + 1:ids.index(2) + 2]) == ["▁USER"]


def test_stream_decoder_matches_full_decode(tok):
    text = "Hello  wörld, 日本語 🙂 café\n 12 naïve!"
    ids = tok.encode(text) + [tok.eos_id]
    for chunk in (1, 3):  # one new id per step, then three at a time
        dec = StreamDecoder(tok)
        outs = [dec.step(ids[:n]) for n in range(chunk, len(ids) + chunk, chunk)] + [dec.flush()]
        assert "".join(outs) == tok.decode(ids) == text
        assert not any("\ufffd" in o for o in outs)  # half characters are held back, never emitted
    # Token by token, each 3- and 4-byte character comes out whole, in one step.
    dec = StreamDecoder(tok)
    outs = [dec.step(ids[:n]) for n in range(1, len(ids) + 1)]
    assert "🙂" in outs and "日" in outs
    assert outs[0] == "H"  # the first piece's dummy "▁" is stripped, like decode()


def test_stream_decoder_specials_and_flush(tok):
    # A special id in the middle must not shift SentencePiece's leading-space stripping.
    ids = tok.encode("the dog") + [tok.bos_id] + tok.encode("a cat")
    dec = StreamDecoder(tok)
    outs = [dec.step(ids[:n]) for n in range(1, len(ids) + 1)] + [dec.flush()]
    assert "".join(outs) == tok.decode(ids) == "the dog a cat"
    # An unfinished character is only released by flush(): 3 of the 4 bytes of F0 9F 99 82, one U+FFFD each.
    ids = tok.encode("the 🙂")[:-1]
    dec = StreamDecoder(tok)
    assert "".join(dec.step(ids[:n]) for n in range(1, len(ids) + 1)) == "the "
    assert dec.flush() == "\ufffd" * 3
    with pytest.raises(ValueError, match="fewer"):
        dec.step(ids[:1])


def test_parity_with_hf_legacy_tokenizer(tok):
    """Oracle: transformers' SentencePiece backend with legacy=True, i.e. the slow LlamaTokenizer the
    original LLaVA used, and the original `tokenizer_image_token` algorithm run on top of it."""
    pytest.importorskip("transformers")
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    hf = SentencePieceBackend(vocab_file=tok.path, legacy=True, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), text

    def original_tokenizer_image_token(prompt):  # llava/mm_utils.py, with HF's BOS per chunk
        chunks = [[hf.bos_token_id] + hf.encode(c, add_special_tokens=False) for c in prompt.split("<image>")]
        out = [chunks[0][0]]
        for k, c in enumerate(chunks):
            out += ([IMG] if k else []) + c[1:]
        return out

    for prompt in ["USER: <image>\nWhat is this? ASSISTANT: A bus.</s>USER: Color? ASSISTANT:",
                   "<image>the dog<image><image> a cat </s> x", "no image at all 🙂", "<image>"]:
        assert tokenize_with_images(prompt, tok, IMG) == original_tokenizer_image_token(prompt), prompt

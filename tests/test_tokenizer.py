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


# ----------------------------------------------------------------------------------------------------------
# tokenizer_config.json: legacy, add_bos_token, add_eos_token. The expected pieces below are what transformers
# 4.37.2's slow LlamaTokenizer gives on this vocabulary (tests/test_original_llava.py checks it live).

def with_config(tmp_path, tok, config):
    import json
    import shutil
    shutil.copyfile(tok.path, tmp_path / "tokenizer.model")
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return Tokenizer(tmp_path)


@pytest.mark.parametrize("text, legacy, non_legacy", [
    ("a dog.</s>USER: hi", ["▁a", "▁dog", ".", "</s>", "▁USER", ":", "▁h", "i"],
     ["▁a", "▁dog", ".", "</s>", "U", "SER", ":", "▁h", "i"]),                # no "▁" after a special token
    ("</s>USER", ["</s>", "▁USER"], ["</s>", "U", "SER"]),                     # nor at a special start
    ("a </s> USER", ["▁a", "▁", "</s>", "▁", "▁USER"], ["▁a", "▁", "</s>", "▁USER"]),  # the space is kept
    ("x<s>y<unk>z", ["▁", "x", "<s>", "▁y", "<unk>", "▁", "<0x7A>"],            # all three specials split
     ["▁", "x", "<s>", "y", "<unk>", "<0x7A>"]),
    ("USER: hi", ["▁USER", ":", "▁h", "i"], ["▁USER", ":", "▁h", "i"]),        # the start is the same
    ("", [], []),
])
def test_legacy_and_non_legacy_pieces(tmp_path, tok, text, legacy, non_legacy):
    old = with_config(tmp_path, tok, {"legacy": True})
    new = Tokenizer(tmp_path, legacy=False)
    assert pieces(old, old.encode(text)) == legacy
    assert pieces(new, new.encode(text)) == non_legacy


def test_settings_from_tokenizer_config(tmp_path, tok):
    d = tmp_path / "defaults"
    d.mkdir()
    t = with_config(d, tok, None)  # no file: transformers' defaults
    assert (t.legacy, t.add_bos, t.add_eos) == (True, True, False) and "defaults" in t.describe()
    d = tmp_path / "vicuna"
    d.mkdir()
    t = with_config(d, tok, {"legacy": False, "add_bos_token": True, "add_eos_token": False, "pad_token": None})
    assert t.describe() == (f"legacy=false add_bos_token=true add_eos_token=false "
                            f"(from {d / 'tokenizer_config.json'})")
    t = Tokenizer(d, legacy=True)
    assert t.legacy and t.describe().endswith("(overridden: legacy))")
    (d / "tokenizer_config.json").write_text('{"legacy": null}')  # null is the default, as in transformers
    assert Tokenizer(d).legacy is True
    (d / "tokenizer_config.json").write_text('{"legacy": "no"}')
    with pytest.raises(ValueError, match=r"tokenizer_config.json: 'legacy' must be true, false or null, got 'no'"):
        Tokenizer(d)
    (d / "tokenizer_config.json").write_text('{"legacy": fal')
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer(d)


def test_bos_and_eos_settings_in_prompts(tmp_path, tok):
    """tokenizer_image_token: each <image> chunk is `tokenizer(chunk).input_ids`, only the first BOS kept."""
    enc = tok.encode
    t = with_config(tmp_path, tok, {"add_bos_token": False, "add_eos_token": True})
    assert tokenize_with_images("a <image> b", t, IMG) == enc("a ") + [2, IMG] + enc(" b") + [2]
    t = Tokenizer(tmp_path, add_bos_token=True, add_eos_token=False)
    assert tokenize_with_images("a <image> b", t, IMG) == [1] + enc("a ") + [IMG] + enc(" b")


def test_non_legacy_image_chunks_start_a_text(tmp_path, tok):
    """Each chunk between images is its own tokenizer call in the original, so it starts with the dummy "▁"
    under legacy=false too; only text after "</s>" inside a chunk loses it."""
    t = with_config(tmp_path, tok, {"legacy": False})
    ids = tokenize_with_images("USER: <image>\nWhat</s>USER: x", t, IMG)
    i = ids.index(IMG)
    assert pieces(t, ids[i + 1:i + 3]) == ["▁", "<0x0A>"]
    assert pieces(t, ids[ids.index(2) + 1:ids.index(2) + 3]) == ["U", "SER"]

"""Conversation templates: exact supervised spans, prompt strings, errors, and parity with the original
LLaVA masking algorithm (run on transformers' legacy SentencePiece tokenizer as the oracle)."""
import pytest

from minillava.templates import (IGNORE_INDEX, LLAVA_V1_SYSTEM, TEMPLATES, VICUNA_SYSTEM, build_prompt,
                                 format_conversation, get_template, original_masks_all, stop_strings,
                                 tokenize_conversation)
from minillava.tokenizer import Tokenizer, tokenize_with_images
from tests.spm_util import train_tiny_spm

IMG = -200

SINGLE = [
    {"from": "human", "value": "<image>\nWhat is in the picture?"},
    {"from": "gpt", "value": "A red bus on the street."},
]
# Image AFTER the text in the first human turn; three rounds; replies with digits, bytes and a newline.
MULTI = [
    {"from": "human", "value": "What is the dog doing?\n<image>"},
    {"from": "gpt", "value": "The dog is sitting near 2 trees."},
    {"from": "human", "value": "What color is it?"},
    {"from": "gpt", "value": "It is black, with a café-au-lait 🙂 spot."},
    {"from": "human", "value": "Count the people."},
    {"from": "gpt", "value": "\nThere are 12 people."},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(train_tiny_spm(tmp_path_factory.mktemp("spm")))


def supervised_spans(labels):
    """[(start, end)] of maximal runs of labels != IGNORE_INDEX."""
    spans, start = [], None
    for i, l in enumerate(labels + [IGNORE_INDEX]):
        if l != IGNORE_INDEX and start is None:
            start = i
        elif l == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_templates_match_original_conversation_py():
    # Strings from haotian-liu/LLaVA llava/conversation.py (conv_vicuna_v1, conv_llava_v1).
    assert VICUNA_SYSTEM == ("A chat between a curious user and an artificial intelligence assistant. The "
                             "assistant gives helpful, detailed, and polite answers to the user's questions.")
    assert LLAVA_V1_SYSTEM == VICUNA_SYSTEM.replace("user", "human")
    for name in ("vicuna_v1", "llava_v1", "llava_hf"):
        t = get_template(name)
        assert (t.roles, t.sep, t.sep2) == (("USER", "ASSISTANT"), " ", "</s>")
    assert get_template(TEMPLATES["plain"]) is TEMPLATES["plain"]
    with pytest.raises(ValueError, match="known: plain, vicuna_v1, llava_v1, llava_hf"):
        get_template("chatml")


def test_plain_spelled_out(tok):
    conv = [{"from": "human", "value": "Describe the image concisely.\n<image>"},
            {"from": "gpt", "value": "A dog on the grass."}]
    assert format_conversation(conv, "plain") == "<image>A dog on the grass.\n"
    ids, labels = tokenize_conversation(conv, "plain", tok, IMG)
    caption = tok.encode("A dog on the grass.\n")  # caption and "\n" in one encode: "\n" is <0x0A>
    assert ids == [1, IMG] + caption and tok.eos_id not in ids
    assert labels == [IGNORE_INDEX, IGNORE_INDEX] + caption
    assert tok.id_to_piece(ids[-1]) == "<0x0A>"
    assert tok.decode(labels[2:]) == "A dog on the grass.\n"


def test_vicuna_single_turn_spelled_out(tok):
    ids, labels = tokenize_conversation(SINGLE, "vicuna_v1", tok, IMG)
    prompt = tok.encode(VICUNA_SYSTEM + " USER: ") + [IMG] + tok.encode("\nWhat is in the picture? ASSISTANT:")
    reply = tok.encode("A red bus on the street.")
    assert ids == [1] + prompt + reply + [2]
    assert labels == [IGNORE_INDEX] * (1 + len(prompt)) + reply + [2]
    # The generation prompt is exactly the unsupervised prefix: what the model saw in training.
    gen = tokenize_with_images(build_prompt(SINGLE[:1], "vicuna_v1"), tok, IMG)
    assert gen == ids[:1 + len(prompt)]


def test_vicuna_multi_turn_image_after_text_spelled_out(tok):
    """MULTI (image after the text of the first question, three rounds) as the exact sequence of segments, each
    tokenized on its own, and the exact (start, end) of the three supervised spans."""
    enc = tok.encode
    segments = [  # (ids, supervised)
        ([1] + enc(VICUNA_SYSTEM + " USER: "), False),
        ([IMG], False),                                           # moved to the front of the turn ...
        (enc("\nWhat is the dog doing? ASSISTANT:"), False),     # ... followed by "\n" and the stripped text
        (enc("The dog is sitting near 2 trees.") + [2], True),
        (enc("USER: What color is it? ASSISTANT:"), False),
        (enc("It is black, with a café-au-lait 🙂 spot.") + [2], True),
        (enc("USER: Count the people. ASSISTANT:"), False),
        (enc("\nThere are 12 people.") + [2], True),
    ]
    ids, labels = tokenize_conversation(MULTI, "vicuna_v1", tok, IMG)
    assert ids == [i for seg, _ in segments for i in seg]
    assert labels == [i if sup else IGNORE_INDEX for seg, sup in segments for i in seg]
    ends = [sum(len(seg) for seg, _ in segments[:k + 1]) for k in range(len(segments))]
    assert supervised_spans(labels) == [(ends[2], ends[3]), (ends[4], ends[5]), (ends[6], ends[7])]
    # Boundaries: each reply's first piece carries the space after "ASSISTANT:" as its dummy "▁"; the text
    # after each "</s>" starts a new encode ("▁USER"); the image sits between two lone "▁" pieces.
    assert [tok.id_to_piece(ids[e]) for e in (ends[3], ends[5])] == ["▁USER", "▁USER"]
    assert tok.id_to_piece(ids[ends[2]]).startswith("▁T") and tok.id_to_piece(ids[ends[6]]) == "▁"
    i = ids.index(IMG)
    assert [tok.id_to_piece(j) for j in (ids[i - 1], ids[i + 1], ids[i + 2])] == ["▁", "▁", "<0x0A>"]


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_v1", "llava_hf"])
def test_multi_turn_labels_are_exactly_the_replies(tok, name):
    ids, labels = tokenize_conversation(MULTI, name, tok, IMG)
    assert len(ids) == len(labels)
    # The image id appears once, moved to the front of the first user turn: "USER: " img "\nWhat is...".
    assert ids.count(IMG) == 1
    i = ids.index(IMG)
    system = {"vicuna_v1": VICUNA_SYSTEM + " ", "llava_v1": LLAVA_V1_SYSTEM + " ", "llava_hf": ""}[name]
    assert ids[:i] == [1] + tok.encode(system + "USER: ")
    after = tok.encode("\nWhat is the dog doing? ASSISTANT:")
    assert ids[i + 1:i + 1 + len(after)] == after
    # Each reply, encoded on its own, followed by EOS, is supervised; everything else is -100.
    replies = [MULTI[k]["value"] for k in (1, 3, 5)]
    spans = supervised_spans(labels)
    assert len(spans) == 3
    expected = [IGNORE_INDEX] * len(ids)
    for (s, e), reply in zip(spans, replies):
        want = tok.encode(reply) + [tok.eos_id]
        assert ids[s:e] == want and labels[s:e] == want
        assert tok.decode(labels[s:e]) == reply
        assert tok.decode(ids[s - 2:s]) == "ASSISTANT:"  # the span starts right after the role marker
        expected[s:e] = want
    assert labels == expected
    assert labels[-1] == tok.eos_id and ids[-1] == tok.eos_id
    # Segment-wise ids equal the whole prompt string tokenized the original way (split on <image>, </s>).
    text = format_conversation(MULTI, name)
    assert ids == tokenize_with_images(text, tok, IMG)


def test_prompt_strings(tok):
    assert format_conversation(MULTI[:4], "vicuna_v1") == (
        VICUNA_SYSTEM + " USER: <image>\nWhat is the dog doing? ASSISTANT: The dog is sitting near 2 trees.</s>"
        "USER: What color is it? ASSISTANT: It is black, with a café-au-lait 🙂 spot.</s>")
    history = [("user", "What is the dog doing? <image>"), ("assistant", "Sitting."), ("user", "Why?")]
    assert build_prompt(history, "vicuna_v1") == (
        VICUNA_SYSTEM + " USER: <image>\nWhat is the dog doing? ASSISTANT: Sitting.</s>USER: Why? ASSISTANT:")
    assert build_prompt([("human", "<image>\nWhat is this?")], "llava_hf") == "USER: <image>\nWhat is this? ASSISTANT:"
    assert build_prompt(SINGLE[:1], "llava_v1") == (
        LLAVA_V1_SYSTEM + " USER: <image>\nWhat is in the picture? ASSISTANT:")
    # Two images in one turn: both moved to the front, one "<image>\n" each.
    assert build_prompt([("human", " <image> Compare them. <image>")], "llava_hf") == (
        "USER: <image>\n<image>\nCompare them. ASSISTANT:")
    assert build_prompt([("human", "Describe it. <image>")], "plain") == "<image>"
    # Multi-turn generation prompt = the training ids up to the last reply.
    ids, labels = tokenize_conversation(MULTI, "vicuna_v1", tok, IMG)
    gen = tokenize_with_images(build_prompt(MULTI[:5], "vicuna_v1"), tok, IMG)
    assert gen == ids[:len(gen)] and labels[len(gen) - 1] == IGNORE_INDEX
    assert ids[len(gen):] == tok.encode(MULTI[5]["value"]) + [2]
    assert stop_strings("vicuna_v1") == ["</s>"] and stop_strings("plain") == ["\n"]


def test_llava_llama_2_spelled_out_as_the_original_writes_it(tok):
    """conv_llava_llama_2 (the original's --conv-mode llava_llama_2), from its get_prompt: the system prompt inside
    the first [INST], " reply </s>" after each answer, "<s>" (the BOS id) before every later [INST]."""
    system = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
              "the user provides, and assist the user with a variety of tasks using natural language.")
    assert format_conversation(MULTI[:4], "llava_llama_2") == (
        f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n<image>\nWhat is the dog doing? [/INST] The dog is sitting near 2 "
        "trees. </s><s>[INST] What color is it? [/INST] It is black, with a café-au-lait 🙂 spot. </s>")
    assert build_prompt(MULTI[:3], "llava_llama_2").endswith("2 trees. </s><s>[INST] What color is it? [/INST]")
    ids = tokenize_with_images(build_prompt(MULTI[:3], "llava_llama_2"), tok, IMG)
    k = ids.index(tok.eos_id)
    assert ids[k + 1] == tok.bos_id  # "<s>" is the BOS id, as the slow LlamaTokenizer reads it
    assert stop_strings("llava_llama_2") == ["</s>"]


def test_text_only_and_whitespace_replies(tok):
    # No image (ShareGPT records); replies with a leading space and a leading newline.
    conv = [{"from": "human", "value": "Hi  there "}, {"from": "gpt", "value": " Hello!"},
            {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "\n4"}]
    ids, labels = tokenize_conversation(conv, "vicuna_v1", tok, IMG)
    assert IMG not in ids
    assert ids == tokenize_with_images(format_conversation(conv, "vicuna_v1"), tok, IMG)
    got = [labels[s:e] for s, e in supervised_spans(labels)]
    assert got == [tok.encode(" Hello!") + [2], tok.encode("\n4") + [2]]


@pytest.mark.parametrize("conv, template, match", [
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], "vicuna_v1", "turn 0.*expected 'human'"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "vicuna_v1", "turn 1.*expected 'gpt'"),
    ([{"from": "system", "value": "a"}], "vicuna_v1", "turn 0: unknown role 'system'"),
    ([{"from": "human", "value": "a"}], "vicuna_v1", "must end with a gpt reply"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}], "vicuna_v1", "turn 1: empty assistant reply"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "x <image>"}], "vicuna_v1",
     "turn 1: <image> in an assistant"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": 3}], "vicuna_v1", "turn 1: value must be a str"),
    ([{"role": "user", "content": "a"}], "vicuna_v1", "turn 0: expected keys 'from' and 'value'"),
    ([], "vicuna_v1", "non-empty"),
    (MULTI[:4], "plain", "exactly one"),
    ([{"from": "human", "value": "no image"}, {"from": "gpt", "value": "a"}], "plain", "no <image>"),
    (SINGLE, "vicuna_v2", "unknown conversation template 'vicuna_v2'"),
])
def test_bad_conversations(tok, conv, template, match):
    with pytest.raises(ValueError, match=match):
        tokenize_conversation(conv, template, tok, IMG)


def test_build_prompt_errors():
    with pytest.raises(ValueError, match="must end with a human turn"):
        build_prompt(SINGLE, "vicuna_v1")
    with pytest.raises(ValueError, match="turn 1.*expected 'gpt'"):
        build_prompt([("human", "a"), ("human", "b")], "vicuna_v1")
    with pytest.raises(ValueError, match="single human turn"):
        build_prompt(MULTI[:3], "plain")


def test_labels_match_original_llava_masking(tok):
    """Oracle: the original train.py `preprocess_v1` / `preprocess_plain` masking (counting tokens per round)
    on transformers' legacy SentencePiece tokenizer (the slow LlamaTokenizer LLaVA used). Where it does not
    hit its "tokenization mismatch" case, its labels must equal ours."""
    pytest.importorskip("transformers")
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    hf = SentencePieceBackend(vocab_file=tok.path, legacy=True, bos_token="<s>", eos_token="</s>", unk_token="<unk>")

    def tokenizer_image_token(prompt):  # llava/mm_utils.py
        chunks = [[hf.bos_token_id] + hf.encode(c, add_special_tokens=False) for c in prompt.split("<image>")]
        out = [chunks[0][0]]
        for k, c in enumerate(chunks):
            out += ([IMG] if k else []) + c[1:]
        return out

    def preprocess_v1(conversation):  # llava/train/train.py, legacy tokenizer branch
        ids = tokenizer_image_token(conversation)
        target = list(ids)
        sep = " ASSISTANT: "
        cur = 1
        target[:cur] = [IGNORE_INDEX]
        for rou in conversation.split("</s>"):
            if rou == "":
                break
            parts = rou.split(sep)
            if len(parts) != 2:
                break
            parts[0] += sep
            round_len = len(tokenizer_image_token(rou))
            instruction_len = len(tokenizer_image_token(parts[0])) - 2
            target[cur:cur + instruction_len] = [IGNORE_INDEX] * instruction_len
            cur += round_len
        target[cur:] = [IGNORE_INDEX] * (len(target) - cur)
        assert cur == len(ids), "tokenization mismatch"
        return ids, target

    for name in ("vicuna_v1", "llava_v1"):
        for conv in (SINGLE, MULTI, MULTI[:2]):
            assert tokenize_conversation(conv, name, tok, IMG) == preprocess_v1(format_conversation(conv, name))

    caption = "A dog on the grass, 3 cats."
    ids = tokenizer_image_token("<image>" + caption + "\n")  # preprocess_plain
    labels = [IGNORE_INDEX] * len(tokenizer_image_token("<image>")) + ids[2:]
    assert tokenize_conversation([SINGLE[0], {"from": "gpt", "value": caption}], "plain", tok, IMG) == (ids, labels)


@pytest.fixture(scope="module", params=["user-two-pieces", "user-one-piece"])
def non_legacy(request, tmp_path_factory):
    """legacy=false tokenizers (Vicuna-v1.5's setting) on two vocabularies: in this test vocabulary "USER"
    costs two pieces ("U", "SER") and "▁USER" one; with USER as a symbol, as in LLaMA's, one less than "▁USER"."""
    symbols = ("USER",) if request.param == "user-one-piece" else ()
    path = train_tiny_spm(tmp_path_factory.mktemp(request.param), user_defined_symbols=symbols)
    return Tokenizer(path, legacy=False), request.param


def test_non_legacy_labels(non_legacy):
    """With legacy=false the text after each "</s>" has no dummy prefix, in the ids and in the labels' spans;
    the segment-wise ids still equal the whole string tokenized as the original does."""
    tok, _ = non_legacy
    ids, labels = tokenize_conversation(MULTI, "vicuna_v1", tok, IMG)
    assert ids == tokenize_with_images(format_conversation(MULTI, "vicuna_v1"), tok, IMG)
    spans = supervised_spans(labels)
    assert [labels[s:e] for s, e in spans] == [tok.encode(MULTI[k]["value"]) + [2] for k in (1, 3, 5)]
    for s, e in spans[:2]:  # after each </s>: "USER" as it stands, unsupervised
        after = tok.encode("</s>USER")[1:]  # not encode("USER"): that starts a text, "▁USER"
        assert ids[e:e + len(after)] == after and labels[e] == IGNORE_INDEX
        assert tok.id_to_piece(after[0]) in ("U", "USER")
    gen = tokenize_with_images(build_prompt(MULTI[:5], "vicuna_v1"), tok, IMG)  # a chat's third turn
    assert gen == ids[:len(gen)]


def test_original_masks_all(tok, non_legacy):
    """The original's round counting (minus one per later round with legacy=false) matches its ids only where
    "USER" after "</s>" is one piece shorter than "▁USER"; single-turn and plain records always match."""
    new, vocab = non_legacy
    assert original_masks_all(MULTI, "vicuna_v1", new, IMG, 2048) == (vocab == "user-two-pieces")
    assert not original_masks_all(MULTI, "vicuna_v1", tok, IMG, 2048)  # legacy: exact
    assert not original_masks_all(SINGLE, "vicuna_v1", new, IMG, 2048)
    assert not original_masks_all(SINGLE, "plain", new, IMG, 2048)
    # A reply that contains " ASSISTANT: " breaks its round split: the original masks everything, legacy or not.
    odd = [SINGLE[0], {"from": "gpt", "value": "I said ASSISTANT: hello"}]
    assert original_masks_all(odd, "vicuna_v1", tok, IMG, 2048)
    # It checks only when the counted length is below model_max_length (a truncated sample is not checked).
    assert not original_masks_all(MULTI, "vicuna_v1", new, IMG, 20)

"""Conversation templates: LLaVA's prompt formats, training tokenization with exact labels, generation prompts.

The templates, as in the original code (haotian-liu/LLaVA v1.2.2, llava/conversation.py):
- `vicuna_v1` (conv_vicuna_v1; stage 2 and all LLaVA-1.5 evaluation): system = VICUNA_SYSTEM, roles
  ("USER", "ASSISTANT"), sep " ", sep2 "</s>" (SeparatorStyle.TWO):
      "{system} USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>"
- `llava_v1` (conv_llava_v1): the same, except the system prompt says "human" where vicuna_v1 says "user"
  (LLAVA_V1_SYSTEM). Its roles are still ("USER", "ASSISTANT"), not ("Human", "Assistant") (those belong to
  the v0 templates, which use "###" separators).
- `plain` (conv_llava_plain; stage 1): "<image>" + caption + "\\n"; the human instruction is dropped
  (train.py `preprocess_plain` replaces it by "<image>"). Only caption + "\\n" is supervised; no EOS.
- `llava_hf`: llava-hf's documented prompt "USER: <image>\\n{prompt} ASSISTANT:" = vicuna_v1 without a
  system prompt (and without the leading space the original would put there). Multi-turn uses "</s>"
  after assistant turns, like the vicuna_v1 data the weights were trained on.
In every template a human turn containing `<image>` has it moved to the front: the placeholder is removed,
the text stripped, and "<image>\\n" prepended (train.py `preprocess_multimodal`, Conversation.get_prompt).
Two deliberate differences: a turn with k placeholders gets k "<image>\\n" (the original's `.replace` keeps
only one), and a conversation that does not start with a human turn is an error (the original's
preprocess_v1 silently drops a leading gpt turn; the data loader should decide that, loudly).

Training labels. The original derives masks by re-tokenizing each round and counting (and silently masks
the whole sample when the count disagrees). Here ids are built by concatenating per-segment tokenizations
and the supervised spans are recorded as they are appended:
    [BOS] enc("{system} USER: ") [img] enc("\\nQ1 ASSISTANT:")   -100
    enc("A1")                                                 supervised
    enc("</s>USER: Q2 ASSISTANT:")                            </s> supervised, the rest -100
    enc("A2") [EOS]                                           supervised
(enc = Tokenizer.encode, each <image> chunk its own call as in `tokenize_with_images`.) The reply is encoded
on its own: its dummy "▁" prefix is the space after "ASSISTANT:", so (SentencePiece never merges across a
word start) the ids equal those of the whole prompt string tokenized the way the original does
(`tokenize_with_images`). A "</s>" is encoded together with the text after it, because that text follows a
special token: with `legacy: true` it gets a dummy prefix ("▁USER"), with `legacy: false` it does not
("USER"), exactly as the slow LlamaTokenizer does on the whole string. The tests check that equality. Where it
cannot hold: an empty reply (the whole string would end the instruction with a lone "▁" piece), so empty
replies are rejected.

Where the original's counting disagrees with its own ids it trains on nothing from that record (its
"WARNING: tokenization mismatch ... (ignored)"); with `legacy: false` that happens whenever "USER" after
"</s>" is not exactly one piece shorter than "▁USER". `original_masks_all` tells which records those are;
minillava trains on their correct spans and the data report counts them.
"""
from dataclasses import dataclass

from minillava.tokenizer import EOS_STRING, IMAGE_PLACEHOLDER, Tokenizer, tokenize_with_images

IGNORE_INDEX = -100  # label of positions that carry no loss (PyTorch cross_entropy's default ignore_index)

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                        "content that the user provides, and assist the user with a variety of tasks using natural "
                        "language.")


@dataclass(frozen=True)
class Template:
    """A conversation format: SeparatorStyle.TWO (vicuna), LLAMA_2 ([INST] ... [/INST]), MPT (ChatML), or the
    stage-1 `plain` format."""
    name: str
    system: str                          # "" = no system prompt (and no separator after it)
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "                       # after the system prompt and after each user turn
    sep2: str = EOS_STRING               # after each assistant turn: "</s>" is the EOS token
    plain: bool = False                  # "<image>" + caption + "\n", human text dropped
    style: str = "two"                   # "two", "llama_2" or "mpt": how turns are framed (_segments)


TEMPLATES = {
    "plain": Template("plain", system="", roles=("", ""), sep="\n", sep2="", plain=True),
    "vicuna_v1": Template("vicuna_v1", system=VICUNA_SYSTEM),
    "llava_v1": Template("llava_v1", system=LLAVA_V1_SYSTEM),
    "llava_hf": Template("llava_hf", system=""),
    # LLaVA-1.6: Mistral-7B-Instruct ("[INST] <image>\nQ1 [/INST] A1 </s>[INST] Q2 [/INST]") and
    # Nous-Hermes-2-Yi-34B (ChatML: "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n
    # <image>\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>..."), as conv_mistral_instruct, conv_chatml_direct
    "mistral_instruct": Template("mistral_instruct", system="", sep="", style="llama_2"),
    # LLaVA on LLaMA-2-chat (conv_llava_llama_2): "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n<image>\nQ1 [/INST] A1 </s>
    # <s>[INST] Q2 [/INST]", "<s>" (the BOS id) opening every later round
    "llava_llama_2": Template("llava_llama_2", system=LLAVA_LLAMA_2_SYSTEM, sep="<s>", style="llama_2"),
    "chatml_direct": Template("chatml_direct", system="<|im_start|>system\nAnswer the questions.",
                              roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), sep="<|im_end|>",
                              sep2="<|im_end|>", style="mpt"),
}

_ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


def get_template(name) -> Template:
    """The template called `name` (a Template passes through)."""
    if isinstance(name, Template):
        return name
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def _normalize_turns(turns) -> list[tuple[str, str]]:
    """[(role, text)] with role in {"human", "gpt"}, from official dicts or (role, text) pairs; checks that
    roles alternate starting with human."""
    if not isinstance(turns, (list, tuple)) or len(turns) == 0:
        raise ValueError(f"conversation must be a non-empty list of turns, got {turns!r}")
    out = []
    for i, turn in enumerate(turns):
        if isinstance(turn, dict):
            if "from" not in turn or "value" not in turn:
                raise ValueError(f"turn {i}: expected keys 'from' and 'value', got {sorted(turn)}")
            role, text = turn["from"], turn["value"]
        elif isinstance(turn, (list, tuple)) and len(turn) == 2:
            role, text = turn
        else:
            raise ValueError(f"turn {i}: expected a {{'from', 'value'}} dict or a (role, text) pair, got {turn!r}")
        norm = _ROLE_ALIASES.get(str(role).lower())
        if norm is None:
            raise ValueError(f"turn {i}: unknown role {role!r} (expected 'human'/'user' or 'gpt'/'assistant')")
        if not isinstance(text, str):
            raise ValueError(f"turn {i}: value must be a str, got {type(text).__name__}")
        expected = "human" if i % 2 == 0 else "gpt"
        if norm != expected:
            raise ValueError(f"turn {i}: roles must alternate starting with human; expected {expected!r}, got {role!r}")
        if norm == "gpt" and IMAGE_PLACEHOLDER in text:
            raise ValueError(f"turn {i}: {IMAGE_PLACEHOLDER} in an assistant reply (images belong to human turns)")
        out.append((norm, text))
    return out


def _move_images_to_front(text: str) -> str:
    """"Q <image>" -> "<image>\\nQ": placeholders removed, text stripped, one "<image>\\n" per image in front."""
    n = text.count(IMAGE_PLACEHOLDER)
    if n == 0:
        return text
    return (IMAGE_PLACEHOLDER + "\n") * n + text.replace(IMAGE_PLACEHOLDER, "").strip()


def _segments(turns, t: Template, training: bool = True) -> list[tuple[str, str]]:
    """The conversation as (kind, text) segments, kind in {"prompt", "reply", "eos"}; only reply and eos
    are supervised. Prompt texts may hold "<image>" markers; `_join` turns segments into the prompt string.
    An empty reply is an error in training (nothing to supervise) but allowed in a chat history (a model may
    answer with EOS at once; the original then writes "ASSISTANT: </s>").
    """
    if t.plain:
        if len(turns) != 2:
            raise ValueError(f"template 'plain' takes exactly one (human, gpt) pair, got {len(turns)} turns")
        n_img = turns[0][1].count(IMAGE_PLACEHOLDER)
        if n_img == 0:
            raise ValueError(f"template 'plain': the human turn has no {IMAGE_PLACEHOLDER}")
        return [("prompt", IMAGE_PLACEHOLDER * n_img), ("reply", turns[1][1] + t.sep)]
    segs = []
    for k in range(0, len(turns), 2):
        question = _move_images_to_front(turns[k][1])
        if t.style == "llama_2":  # the system prompt goes inside the first [INST]
            system = f"<<SYS>>\n{t.system}\n<</SYS>>\n\n" if t.system and k == 0 else ""
            segs.append(("prompt", f"{t.sep if k else ''}[INST] {system}{question} [/INST]"))
        elif t.style == "mpt":
            segs.append(("prompt", (t.system + t.sep if k == 0 else "") + t.roles[0] + question + t.sep + t.roles[1]))
        else:
            prefix = t.system + t.sep if t.system and k == 0 else ""
            segs.append(("prompt", prefix + f"{t.roles[0]}: {question}{t.sep}{t.roles[1]}:"))
        if k + 1 < len(turns):
            reply = turns[k + 1][1]
            if reply == "" and training:
                raise ValueError(f"turn {k + 1}: empty assistant reply (nothing to supervise)")
            segs.append(("reply", reply + " " if t.style == "llama_2" else reply))  # llama_2: "A1 </s>"
            segs.append(("eos", t.sep2))  # "</s>": the model must learn to stop
    return segs


def _join(segs, t: Template) -> str:
    """Segments -> prompt string: "ASSISTANT:" / "[/INST]" and the reply are separated by one space (none in plain;
    in ChatML the reply follows "assistant\n")."""
    space = "" if t.plain or t.style == "mpt" else " "
    return "".join(space + text if kind == "reply" else text for kind, text in segs)


def format_conversation(conversations, template) -> str:
    """The whole training text of a conversation, as the original's `conv.get_prompt()` writes it
    ("{system} USER: <image>\\nQ1 ASSISTANT: A1</s>USER: ..."); for reading and debugging."""
    t = get_template(template)
    return _join(_segments(_normalize_turns(conversations), t), t)


def tokenize_conversation(conversations, template, tokenizer: Tokenizer,
                          image_token_id: int) -> tuple[list[int], list[int]]:
    """Training ids and labels of one conversation [{"from": "human"|"gpt", "value": str}, ...].

    Returns (input_ids, labels), equal lengths; labels[i] = input_ids[i] on the assistant replies and their
    closing EOS (vicuna_v1 / llava_v1 / llava_hf) or on caption + "\\n" (plain), IGNORE_INDEX (-100)
    elsewhere (BOS, system, user turns, role names, image ids). Each `<image>` becomes one `image_token_id`.
    The conversation must alternate human/gpt starting with human and end with a gpt reply. Truncation to the
    model's positions (each image counting Np) is data.encode's.
    """
    t = get_template(template)
    if t.style == "mpt":  # the reply follows "\n" with no space: encoded alone it would gain a dummy prefix
        raise ValueError(f"template {t.name!r} is for generation: minillava does not train with ChatML templates "
                         "(their reply ids cannot be split from the prompt's on a SentencePiece word start)")
    turns = _normalize_turns(conversations)
    if len(turns) % 2 != 0:
        raise ValueError(f"training conversation must end with a gpt reply; turn {len(turns) - 1} is human")
    if tokenizer.add_eos:
        raise ValueError(f"{tokenizer.settings_source}: add_eos_token=true cannot be trained on (the original's "
                         "tokenizer_image_token would put an EOS after every text chunk)")
    input_ids, labels = ([tokenizer.bos_id], [IGNORE_INDEX]) if tokenizer.add_bos else ([], [])
    segs = _segments(turns, t)
    for k, (kind, text) in enumerate(segs):
        if kind == "eos" and k + 1 < len(segs):
            continue  # encoded with the prompt after it, which follows a special token
        n_eos = 1 if k > 0 and segs[k - 1][0] == "eos" else 0
        ids = tokenize_with_images(segs[k - 1][1] * n_eos + text, tokenizer, image_token_id, bos=False)
        input_ids += ids
        labels += ids[:n_eos] + [IGNORE_INDEX] * (len(ids) - n_eos) if kind == "prompt" else ids
    return input_ids, labels


def build_prompt(history, template) -> str:
    """Generation prompt for `history` = [(role, text)] or official dicts, ending with a human turn.

    vicuna_v1: "{system} USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:" (no trailing space: the
    model's first token carries the space as its "▁"). plain: "<image>" (the stage-1 model only captions;
    the human text is dropped as in training). Tokenize with `tokenize_with_images(prompt, ...)`.
    """
    t = get_template(template)
    turns = _normalize_turns(history)
    if turns[-1][0] != "human":
        raise ValueError(f"generation history must end with a human turn; turn {len(turns) - 1} is {turns[-1][0]!r}")
    if t.plain:
        if len(turns) != 1:
            raise ValueError(f"template 'plain' takes a single human turn for generation, got {len(turns)} turns")
        n_img = turns[0][1].count(IMAGE_PLACEHOLDER)
        if n_img == 0:
            raise ValueError(f"template 'plain': the human turn has no {IMAGE_PLACEHOLDER}")
        return IMAGE_PLACEHOLDER * n_img
    return _join(_segments(turns, t, training=False), t)


def stop_strings(template) -> list[str]:
    """Strings that end a reply: "</s>" (the EOS id also stops) for the chat templates, "\\n" for plain
    (as the original's `conv.sep2 if sep_style == TWO else conv.sep`)."""
    t = get_template(template)
    return [t.sep] if t.plain or t.style == "mpt" else [t.sep2]


def original_masks_all(conversations, template, tokenizer: Tokenizer, image_token_id: int,
                       max_length: int) -> bool:
    """Whether the original train.py's `preprocess_v1` would train on nothing from this conversation.

    It tokenizes the whole prompt, then walks the rounds (split on "</s>") counting each as
    len(tokenizer_image_token(round)) (its BOS stands for the "</s>" cut off), minus one for rounds after the
    first when `legacy` is false (a correction that is exact when "USER" is one piece shorter than "▁USER",
    as in LLaMA's vocabulary). If the counted length differs from the ids' (pad = <unk> ids not counted) and
    the sample was not truncated, it masks every label. `plain` (preprocess_plain) never does; the LLaVA-1.6
    templates (preprocess_llama_2) are not modelled here: False."""
    t = get_template(template)
    if t.plain or t.style != "two":
        return False
    text = format_conversation(conversations, t)

    def n_ids(s):
        return len(tokenize_with_images(s, tokenizer, image_token_id))
    ids = tokenize_with_images(text, tokenizer, image_token_id)
    total = len(ids) - ids.count(tokenizer.pad_id)
    sep = t.sep + t.roles[1] + ": "
    counted = 1
    for i, rou in enumerate(text.split(t.sep2)):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        counted += n_ids(rou) - (i > 0 and not tokenizer.legacy)
    return counted < max_length and counted != total

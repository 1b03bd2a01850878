"""A Qwen2 tokenizer trained offline: byte-level BPE with Qwen2's pre-tokenizer, Qwen's special tokens and chat
template, wrapped in the real `Qwen2Tokenizer`. Used by the tiny model (`world/tiny_qwen.py`) and by random
real-size models (`models/random_vl.py`, with the real special-token ids). Notes: offline-stack.md section 2.
"""

from __future__ import annotations

import json

# Qwen2's pre-tokenizer split pattern.
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_VERBS = ["insert", "approach", "stop at", "retract from", "move to", "align with", "push", "hold", "touch", "pierce"]
_OBJECTS = [
    "the needle",
    "the white square silicone",
    "the eye phantom",
    "the trocar",
    "the tissue layer",
    "the red point",
    "the blue point",
    "the target mark",
    "the membrane",
    "the surface",
]


def _corpus() -> list[str]:
    out = []
    for i, v in enumerate(_VERBS):
        for j, o in enumerate(_OBJECTS):
            out.append(f"{v} {o} slowly and stop when you feel contact {i * 10 + j}.")
            out.append(f"Perform {o} insertion task. Observe the current state and predict the next action.")
    return out


def train_bpe(vocab_size: int = 400):
    """A `tokenizers.Tokenizer`: byte-level BPE with Qwen2's pre-tokenizer, trained in well under a second on short
    robot instructions, with `<|endoftext|>` as its only special token (every family's tiny tokenizer starts here)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    return bpe


def train_tokenizer(vocab_size: int = 400, first_special_id: int | None = None):
    """A Qwen2Tokenizer over a locally trained byte-level BPE, with Qwen's special tokens and template.

    Args:
        first_special_id: put `<|endoftext|>` and the special tokens at this id and the ones after it (the real
            Qwen ids start at 151643), padding the vocabulary with unreachable filler tokens; used by random
            real-size models (`models/random_vl.py`) so that token ids match the real checkpoint's config.
    """
    from transformers import Qwen2Tokenizer

    state = json.loads(train_bpe(vocab_size).to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    vocab = state["vocab"] if first_special_id is None else _vocab_with_special_ids(state["vocab"], first_special_id)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=SPECIAL_TOKENS,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _vocab_with_special_ids(vocab: dict[str, int], first: int) -> dict[str, int]:
    """Move `<|endoftext|>` + SPECIAL_TOKENS to ids first, first + 1, ...; fill the gaps with filler tokens that no
    merge produces (so they never appear in tokenized text)."""
    specials = ["<|endoftext|>", *SPECIAL_TOKENS]
    if first < len(vocab):
        raise ValueError(f"first_special_id {first} must be >= the trained vocabulary size {len(vocab)}")
    out = {t: i for t, i in vocab.items() if t not in specials}
    used = set(out.values())
    out.update({f"<|sensorvla_unused_{i}|>": i for i in range(first) if i not in used})
    out.update({t: first + k for k, t in enumerate(specials)})
    return out

"""Byte-level BPE tokenizer with a chat template for alignd's built-in model (HF `tokenizers`).

The result is a `PreTrainedTokenizerFast` saved with `save_pretrained`, so `AutoTokenizer.from_pretrained`
loads it like any Hub tokenizer and `apply_chat_template` renders conversations. Any other tokenizer with a
chat template works everywhere alignd takes one.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, END = "<|pad|>", "<|bos|>", "<|end|>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = [PAD, BOS, END, USER, ASSISTANT, SYSTEM]

# One turn per role marker, closed by <|end|>, which is also the EOS token: generation stops at the end of the
# assistant's turn. The generation prompt is the assistant marker and a newline.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>\n{% elif m['role'] == 'user' %}<|user|>\n"
    "{% else %}<|assistant|>\n{% endif %}"
    "{{ m['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; every byte is in the alphabet, so no input is ever unknown."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
        padding_side="left",  # decoder-only generation pads on the left
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast

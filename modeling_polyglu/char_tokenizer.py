"""A character-level tokenizer built locally, for demos and tests that must not download anything.

`build_char_tokenizer(texts)` returns a `PreTrainedTokenizerFast` whose vocabulary is the special tokens plus every
character of `texts`; it saves and reloads with `AutoTokenizer` like any Hub tokenizer.
"""

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}


def build_char_tokenizer(texts, extra_special_tokens=()) -> PreTrainedTokenizerFast:
    """One token per character seen in `texts`; ids 0..3 are <pad>, <bos>, <eos>, <unk>."""
    characters = sorted({character for text in texts for character in text})
    specials = list(SPECIAL_TOKENS.values()) + list(extra_special_tokens)
    vocab = {token: index for index, token in enumerate(specials + [c for c in characters if c not in specials])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, additional_special_tokens=list(extra_special_tokens), **SPECIAL_TOKENS
    )


# ChatML, as Qwen3 uses; {% generation %} marks the assistant tokens for TRL's assistant-only loss
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_chat_tokenizer(texts) -> PreTrainedTokenizerFast:
    """A character tokenizer with ChatML special tokens and chat template; <|im_end|> ends a turn (eos)."""
    tokenizer = build_char_tokenizer(list(texts) + ["\nuserassistantsystem"], extra_special_tokens=("<|im_start|>", "<|im_end|>"))
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.eos_token = "<|im_end|>"
    return tokenizer

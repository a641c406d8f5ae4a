"""A word-level tokenizer built in memory: text models trained here (tests,
the embedded default) need no vocabulary download."""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")


def word_level_tokenizer(words: Iterable[str], max_length: int = 77) -> PreTrainedTokenizerFast:
    """Whitespace/punctuation-split words, one id each, ``[BOS] ... [EOS]``
    around every text, padded with ``[PAD]`` (id 0); unknown words map to
    ``[UNK]``. Saves and loads with ``save_pretrained`` / ``from_pretrained``."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=max_length,
    )

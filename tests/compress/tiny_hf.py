"""A tiny Llama and a word-level tokenizer that prepends a BOS token, for export and CLI-data tests.

Built from scratch in memory (no hub, no download): the tokenizer's post-processor adds ``<s>`` in front of every
encoded text by default, as Llama / Mistral tokenizers do, so tests can check that BOS reaches the token windows.
"""

from __future__ import annotations

import torch

BOS = "<s>"
WORDS = [f"w{i}" for i in range(60)]


def bos_tokenizer():
    """A ``PreTrainedTokenizerFast``: ``[UNK]`` = 0, ``<s>`` = 1, ``w0..w59`` = 2..61, BOS prepended by default."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, BOS: 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    backend.post_processor = TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                special_tokens=[(BOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token=BOS)


def tiny_llama(hidden: int = 64, intermediate: int = 128, layers: int = 2, tie: bool = True, seed: int = 0):
    """A random-init ``LlamaForCausalLM`` (vocab 62) in float32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS) + 2, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=tie, bos_token_id=1, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).eval()

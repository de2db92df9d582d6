"""Offline tiny models and a character-level tokenizer, built in process with no download.

The tokenizer maps every character of an alphabet to one token (a `tokenizers` WordLevel model
with a one-character split), adds <pad>, <bos>, <eos>, and a chat template that concatenates
message contents. It is saved and loaded as a standard `PreTrainedTokenizerFast`.
The models are random-init Llama or Qwen2 causal LMs from `transformers` configs; the defaults
(hidden 64, 4 layers, 4 heads, MLP 256, tied embeddings: about 0.26M parameters) learn 2-digit
addition on a CPU in about a minute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

DEFAULT_ALPHABET = "0123456789+-*=,. "
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"
    "{% if not add_generation_prompt and messages %}{{ eos_token }}{% endif %}"
)


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """A one-token-per-character tokenizer over `alphabet`; prompts start with <bos>."""
    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"tokenizer alphabet has repeated characters: {alphabet!r}")
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for char in alphabet:
        vocab[char] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@dataclass
class TinyModelSpec:
    """Shape of a random-init model; `arch` is "llama" or "qwen2"."""

    arch: str = "llama"
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True


def build_tiny_causal_lm(
    spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast, seed: int = 0, attn_implementation: str = "sdpa"
) -> PreTrainedModel:
    """A random-init causal LM whose vocabulary and special ids match `tokenizer`."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads or spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation=attn_implementation,
    )
    if spec.arch == "llama":
        config, model_class = LlamaConfig(**common), LlamaForCausalLM
    elif spec.arch == "qwen2":
        config, model_class = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        raise ValueError(f"model.tiny.arch={spec.arch!r} is not one of ['llama', 'qwen2']")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model

"""Load the tokenizer and causal LMs a recipe needs: tiny offline models or `from_pretrained`.

`model.source=tiny` builds a random-init model and a character tokenizer in process (no download).
`model.source=pretrained` loads `model.name_or_path` with `from_pretrained`: a hub id for real users,
or a local directory such as the `hf` export inside one of our checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from types import SimpleNamespace
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf.checkpoint import CHECKPOINT_DIR, export_dir, list_checkpoints
from rlhf.config import ConfigError, ModelConfig
from rlhf.models.lora import AdapterDisabledView, apply_lora
from rlhf.models.options import CHUNKABLE_FAMILIES, chunkable
from rlhf.models.shared_prefix import FLEX, SUPPORTED_FAMILIES, check_family, shared_prefix_attention
from rlhf.models.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_causal_lm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Config fields that name a model or tokenizer to load (a hub id or a local directory).
MODEL_PATH_FIELDS = (
    "model.name_or_path",
    "model.tokenizer_name_or_path",
    "reward_model.name_or_path",
    "critic.name_or_path",
    "rto.dpo_model",
    "rto.dpo_reference_model",
    "token_weights.guide_model",
    "token_weights.positive_model",
    "token_weights.negative_model",
    "treg.model",
    "teacher.dpo_model",
    "teacher.reverse_dpo_model",
    "teacher.reference_model",
)


def looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id ("org/name" or "name")."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or path.endswith("/")


def check_model_paths(cfg: object) -> None:
    """Every configured model path that is a local path exists (checked before any model loads):
    a missing directory is an error that says so, not the hub's "repo id must be..." message."""
    for field in MODEL_PATH_FIELDS:
        value: object = cfg
        for part in field.split("."):
            value = getattr(value, part, None)
        if field.startswith("model.") and getattr(cfg, "model", None) and cfg.model.source != "pretrained":
            continue
        if isinstance(value, str) and looks_local(value) and not os.path.isdir(os.path.expanduser(value)):
            raise ConfigError(f"{field}={value!r}: no such directory")


def run_export(path: str) -> str:
    """A run directory (one with checkpoints/ and no model files of its own) stands for its newest
    checkpoint's Hugging Face export, so `model.name_or_path=runs/my-sft` picks up what that run
    trained; any other path is returned as it is."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return path
    checkpoints = list_checkpoints(path) if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)) else []
    return export_dir(checkpoints[-1]) if checkpoints else path


def _from_pretrained(loader, field: str, path: str, **kwargs):
    """`loader.from_pretrained(path)` with an error naming the field when nothing loads from there."""
    path = run_export(path)
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as exc:
        where = (
            "the directory has no loadable files"
            if os.path.isdir(path)
            else "not a local directory, and not on the hub or in its cache"
        )
        raise ConfigError(f"{field}={path!r}: {where} ({exc})") from exc


# Families whose forward returns lm_head(hidden) unchanged (no logit scaling or soft-capping).


def model_shape(cfg: ModelConfig) -> Any:
    """The model's transformers config (its text part for multimodal ones), read without loading
    any weights; for the tiny model, its shape fields."""
    if cfg.source == "tiny":
        t = cfg.tiny
        return SimpleNamespace(
            hidden_size=t.hidden_size,
            num_attention_heads=t.num_heads,
            head_dim=None,
            max_position_embeddings=t.max_position_embeddings,
        )
    config = _from_pretrained(
        AutoConfig, "model.name_or_path", cfg.name_or_path, trust_remote_code=cfg.trust_remote_code
    )
    return getattr(config, "text_config", None) or config


def model_context(cfg: ModelConfig) -> int | None:
    """The model's context length (max_position_embeddings) from its config alone, before any
    weights load; None when the config does not say."""
    return getattr(model_shape(cfg), "max_position_embeddings", None)


def _attention(cfg: ModelConfig) -> str:
    """The implementation to load: ours (rlhf.models.shared_prefix) for the shared prefix, and for
    FlexAttention always (padding-free bins take its block mask too); otherwise transformers'."""
    if cfg.shared_prefix or cfg.attn_implementation == FLEX:
        return shared_prefix_attention(cfg.attn_implementation)
    return cfg.attn_implementation


def _dtype(cfg: ModelConfig) -> torch.dtype:
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={cfg.dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[cfg.dtype]


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer, with a pad token guaranteed (or a clear error naming the fix)."""
    if cfg.source == "tiny":
        tokenizer = build_char_tokenizer(cfg.tiny.alphabet)
        where = "the tiny character tokenizer"
    elif cfg.source == "pretrained":
        path = cfg.tokenizer_name_or_path or cfg.name_or_path
        if not path:
            raise ConfigError(
                "model.source=pretrained needs model.name_or_path (a hub id or a local directory)"
            )
        field = "model.tokenizer_name_or_path" if cfg.tokenizer_name_or_path else "model.name_or_path"
        tokenizer = _from_pretrained(AutoTokenizer, field, path, trust_remote_code=cfg.trust_remote_code)
        where = f"the tokenizer at {path!r}"
    else:
        raise ConfigError(f"model.source={cfg.source!r} is not one of ['tiny', 'pretrained']")
    if tokenizer.pad_token is None:
        if cfg.pad_token is None:
            raise ConfigError(
                f"{where} has no pad token; set model.pad_token to a token it has, or model.pad_token=eos "
                "to pad with the EOS token"
            )
        tokenizer.pad_token = tokenizer.eos_token if cfg.pad_token == "eos" else cfg.pad_token
    if tokenizer.eos_token is None:
        raise ConfigError(f"{where} has no EOS token, so completions could never end")
    return tokenizer


def load_causal_lm(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """The policy (or reference) model, in float32 unless `model.dtype` says otherwise."""
    if cfg.source == "tiny":
        t = cfg.tiny
        spec = TinyModelSpec(
            arch=t.arch,
            hidden_size=t.hidden_size,
            num_layers=t.num_layers,
            num_heads=t.num_heads,
            num_kv_heads=t.num_kv_heads,
            intermediate_size=t.intermediate_size,
            max_position_embeddings=t.max_position_embeddings,
            tie_word_embeddings=t.tie_word_embeddings,
        )
        model = build_tiny_causal_lm(spec, tokenizer, seed=seed, attn_implementation=_attention(cfg))
        return _checked_family(model.to(_dtype(cfg)), cfg)
    model = _from_pretrained(
        AutoModelForCausalLM,
        "model.name_or_path",
        cfg.name_or_path,
        dtype=_dtype(cfg),
        attn_implementation=_attention(cfg),
        trust_remote_code=cfg.trust_remote_code,
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return _checked_family(_without_dropout(model), cfg)


def _checked_family(model: PreTrainedModel, cfg: ModelConfig) -> PreTrainedModel:
    """With `model.shared_prefix`, only families the equivalence tests cover (a clear error, not
    silently wrong numbers); with `model.logprob_chunk_tokens`, only heads that are a plain linear
    map (the chunked pass applies the head itself); with `model.padding_free`, only families whose
    attention builds the packed mask from positions. The layout itself travels in ForwardOptions."""
    if cfg.shared_prefix:
        try:
            check_family(model)
        except ValueError as error:
            raise ConfigError(str(error)) from error
    family = getattr(model.config, "model_type", None)
    if cfg.logprob_chunk_tokens and not chunkable(model.config):
        raise ConfigError(
            f"model.logprob_chunk_tokens: the {family!r} family is not supported (tested: "
            f"{', '.join(CHUNKABLE_FAMILIES)}, whose logits are the LM head's output as it is)"
        )
    if cfg.padding_free and family not in SUPPORTED_FAMILIES:
        raise ConfigError(
            f"model.padding_free: the {family!r} family is not supported (tested: {', '.join(SUPPORTED_FAMILIES)})"
        )
    return model


def load_policy(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> torch.nn.Module:
    """The trainable policy: the causal LM, with LoRA adapters when `model.lora.enabled`."""
    model = _checkpointed(load_causal_lm(cfg, tokenizer, seed), cfg)
    return apply_lora(model, cfg.lora) if cfg.lora.enabled else model


def _checkpointed(model: PreTrainedModel, cfg: ModelConfig) -> PreTrainedModel:
    """With `model.gradient_checkpointing`: activation checkpointing on every decoder layer
    (non-reentrant, which LoRA, the shared-prefix attention and ZeRO-3 need), and the model in
    training mode, the only mode where transformers checkpoints (dropout is off in every model we
    load, so the mode changes nothing else; generation switches to eval itself)."""
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()
    return model


def load_reference(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, engine, seed: int = 0
) -> torch.nn.Module:
    """The frozen reference: the policy with adapters disabled under LoRA (no second copy of the
    weights), otherwise a fresh copy of the initial model placed like the policy (sharded under ZeRO-3)."""
    if cfg.lora.enabled:
        return AdapterDisabledView(engine.module)
    return engine.prepare_frozen(lambda: load_causal_lm(cfg, tokenizer, seed))


def load_scorer(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0, per_token: bool = False
) -> PreTrainedModel:
    """A scalar-head model: a sequence classifier (reward model) or, with `per_token`, a token
    classifier (critic: one value per position). Both use a head named `score`, so a critic can
    start from a reward-model checkpoint; a causal-LM checkpoint gives a fresh head."""
    auto = AutoModelForTokenClassification if per_token else AutoModelForSequenceClassification
    if cfg.source == "tiny":
        lm = load_causal_lm(cfg, tokenizer, seed)
        config = lm.config
        config.num_labels = 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = auto.from_config(config)
        # Take the policy's backbone module itself rather than copying its weights: under ZeRO-3's
        # construction context `from_config` builds a partitioned backbone that cannot be copied into;
        # the tiny model is whole and deepspeed.initialize partitions it like the policy.
        setattr(model, model.base_model_prefix, lm.base_model)
        return _checkpointed(_without_dropout(model).to(_dtype(cfg)), cfg)
    with _quiet_load_report():
        model, info = _from_pretrained(
            auto,
            "model.name_or_path",
            cfg.name_or_path,
            num_labels=1,
            dtype=_dtype(cfg),
            attn_implementation=_attention(cfg),
            trust_remote_code=cfg.trust_remote_code,
            output_loading_info=True,
        )
    _say_what_was_initialised(cfg.name_or_path, info)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return _checkpointed(_checked_family(_without_dropout(model), cfg), cfg)


@contextlib.contextmanager
def _quiet_load_report():
    """transformers' boxed LOAD REPORT off: a scalar head missing from a causal-LM checkpoint is
    the expected case, said once in a line by `_say_what_was_initialised`."""
    # at a raised level transformers also checks tensor-parallel plans, whose logger then warns
    loggers = [
        logging.getLogger(f"transformers.{name}")
        for name in ("modeling_utils", "distributed.tensor_parallel")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _say_what_was_initialised(path: str, info: dict[str, Any]) -> None:
    """One line for the new scalar head; a warning for any other weight the checkpoint lacked or
    held in a shape the model does not have (those would train from random values)."""
    missing = sorted(info.get("missing_keys") or [])
    head = [key for key in missing if key.split(".")[0] == "score"]
    if head:
        print(
            f"[model] {path}: new scalar head initialised ({', '.join(head)}; the checkpoint has none)",
            flush=True,
        )
    others = [key for key in missing if key not in head] + sorted(
        str(key) for key in (info.get("mismatched_keys") or [])
    )
    if others:
        more = f" and {len(others) - 5} more" if len(others) > 5 else ""
        warnings.warn(
            f"{path}: weights not in the checkpoint, newly initialised: {others[:5]}{more}", stacklevel=3
        )


def _without_dropout(model: PreTrainedModel) -> PreTrainedModel:
    """Dropout off (TRL's `disable_dropout`): old, new and reference logprobs and value targets
    must come from the same deterministic function (the token classifier's head has p=0.1)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def load_frozen(
    engine: Any, path: str, tokenizer: PreTrainedTokenizerBase, like: ModelConfig
) -> torch.nn.Module:
    """A frozen model from `path` (a hub id or local directory) loaded like the policy's config and
    placed by the training engine (partitioned under ZeRO-3); its vocabulary must cover the tokenizer."""
    model = engine.prepare_frozen(lambda: load_causal_lm(like.pretrained_like(path), tokenizer))
    if model.config.vocab_size < len(tokenizer):
        raise ConfigError(
            f"{path!r} has a vocabulary of {model.config.vocab_size}, the tokenizer {len(tokenizer)}"
        )
    return model

"""Config groups every recipe shares: the model, data, optimizer, distributed backend, logger,
checkpoints, evaluation, the training loop's length and the run itself."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rlhf.config.checks import ConfigError, check_choice, check_range


@dataclass
class TinyModelConfig:
    arch: str = "llama"
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    alphabet: str = "0123456789+-*=,. "

    def __post_init__(self) -> None:
        check_choice("model.tiny.arch", self.arch, ("llama", "qwen2"))
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            check_range(f"model.tiny.{name}", getattr(self, name), 1)


@dataclass
class LoraConfig:
    """LoRA adapters on the policy (peft). The reference is the same model with adapters disabled."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    # "tiny": random init built in process; "pretrained": `from_pretrained(name_or_path)` (a hub id
    # or a local directory, such as the `hf` export of one of our checkpoints).
    source: str = "tiny"
    name_or_path: str | None = None
    tokenizer_name_or_path: str | None = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: str = "float32"
    # transformers' name: sdpa, eager, flash_attention_2, or flex_attention, with which the packed
    # layouts (shared_prefix, padding_free) attend through one FlexAttention call with a block-sparse
    # mask (rlhf/models/flex.py); CUDA only for training (torch has no FlexAttention backward on CPU)
    attn_implementation: str = "sdpa"
    # Used only when the tokenizer has no pad token: a token string, or "eos" to reuse EOS.
    pad_token: str | None = None
    trust_remote_code: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Prefix Grouper: rows that repeat a prompt (GRPO/PPO groups, DPO chosen/rejected) are packed so
    # the prompt is encoded once; same values, less work. Needs attn_implementation sdpa, eager,
    # flash_attention_2 or flex_attention, and a Llama, Qwen2, Qwen3, Mistral or Phi3 model (others
    # are refused).
    shared_prefix: bool = False
    # Activation checkpointing for the trained models (policy, critic, reward model): each decoder
    # layer's activations are recomputed in the backward instead of kept; same gradients, less
    # memory, about a third more compute.
    gradient_checkpointing: bool = False
    # Memory-lean logprobs: > 0 applies the LM head, log-softmax, gather and entropy this many
    # response tokens at a time, each chunk recomputed in the backward, so [rows, tokens, vocab]
    # logits never exist at once (at 152k vocabulary, 2.5 GB per 4k-token row in fp32). Same
    # values and gradients; the head runs twice per chunk with gradient. 0: the plain computation.
    # null (default): chosen per pass from its size (rlhf/models/options.py): whole while its fp32
    # logits fit in 512 MB, else chunks of at most 256 MB of logits.
    logprob_chunk_tokens: int | None = None
    # Padding-free passes (logprobs, reward-model scores, critic values): a micro-batch's rows go
    # through the model packed, their valid tokens only (positions restarting per row,
    # block-diagonal causal attention built by transformers from the positions), so pads cost nothing. Same values; Llama, Qwen2, Qwen3,
    # Mistral and Phi3 (others are refused). Rows that repeat a prompt take the shared-prefix
    # layout instead when model.shared_prefix is on as well.
    padding_free: bool = False

    def __post_init__(self) -> None:
        check_choice("model.source", self.source, ("tiny", "pretrained"))
        check_range("model.logprob_chunk_tokens", self.logprob_chunk_tokens, 0)
        check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if self.source == "tiny" and (self.name_or_path or self.tokenizer_name_or_path):
            # the tiny random-init model would train in its place, silently
            raise ConfigError(
                f"model.name_or_path={self.name_or_path!r} is set but model.source=tiny (the built-in "
                "random-init model): add model=pretrained to load it"
            )

    def pretrained_like(self, name_or_path: str, dtype: str | None = None) -> ModelConfig:
        """Config for another checkpoint (reward model, critic, frozen guide) that runs like this one."""
        return ModelConfig(
            source="pretrained",
            name_or_path=name_or_path,
            dtype=dtype or self.dtype,
            attn_implementation=self.attn_implementation,
            trust_remote_code=self.trust_remote_code,
            shared_prefix=self.shared_prefix,
            gradient_checkpointing=self.gradient_checkpointing,
            logprob_chunk_tokens=self.logprob_chunk_tokens,
            padding_free=self.padding_free,
        )


@dataclass
class DataConfig:
    # "arithmetic", "sums", "sort" or "group" (synthetic, no download), a local .jsonl/.json/.parquet/
    # .csv file or directory, or a Hugging Face hub dataset name.
    source: str = "arithmetic"
    train_split: str = "train"
    eval_split: str | None = "eval"
    prompt_column: str = "prompt"
    completion_column: str | None = "answer"  # SFT target; also handed to rewards as a column
    required_columns: list[str] = field(default_factory=list)
    # preference data (reward model, DPO): two completions of one prompt, the first preferred
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    margin_column: str | None = None  # optional per-pair margin for the Bradley-Terry loss
    # Conversational rows (message lists, TRL's formats) are always rendered with the chat template;
    # true also wraps plain-string prompts as one user turn (and completions as the assistant's).
    apply_chat_template: bool = False
    chat_template: str | None = None  # a Jinja file or string replacing the tokenizer's template
    messages_column: str = "messages"  # SFT: a whole conversation, learned from its last assistant turn (every one: train.assistant_only_loss)
    # Length policy, in tokens, checked before training: prompts over max_prompt_length, and
    # prompt + completion over max_length (SFT, DPO, reward models), are truncated (prompts from the
    # left, completions from the right) or dropped ("truncate" | "drop"); null: no limit.
    max_prompt_length: int | None = 512
    max_length: int | None = 1024
    overlong: str = "truncate"
    # Tokens a response to this data needs: rollout.max_new_tokens and eval.max_new_tokens default
    # to it (chat-sized; the synthetic presets set their own).
    response_budget: int = 256
    # synthetic task options
    num_digits: int = 2
    eval_size: int = 1000
    task_seed: int = 0
    reverse_digits: bool = True
    sum_max_target: int = 30  # "sums": targets 4..this, written with up to sum_max_parts one-digit parts
    sum_max_parts: int = 4
    # "sums" with long answers: every target needs at least sum_min_parts parts, and starts at
    # sum_min_target (e.g. 12 parts, targets 30-80: answers of 45 tokens, countless correct ones)
    sum_min_parts: int = 2
    sum_min_target: int = 4
    sort_length: int = 16  # "sort"/"group": lists of this many digits; answers are 2 * length - 1 tokens
    # "sort"/"group": this many training lists moved to a "validation" split (data.eval_split=validation),
    # for tuning that never sees the held-out lists
    validation_size: int = 0

    def __post_init__(self) -> None:
        check_choice("data.overlong", self.overlong, ("truncate", "drop"))
        for name in ("max_prompt_length", "max_length"):
            if getattr(self, name) is not None:
                check_range(f"data.{name}", getattr(self, name), 1)
        check_range("data.response_budget", self.response_budget, 1)
        check_range("data.validation_size", self.validation_size, 0)


COMMAND_LINE_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\r": "\r"}


def unescaped(text: str) -> str:
    """`text` with the escapes a shell passes through literally (backslash-n, -t, -r) made the
    characters they name."""
    for escape, character in COMMAND_LINE_ESCAPES.items():
        text = text.replace(escape, character)
    return text


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    scheduler: str = "constant_with_warmup"  # any transformers.get_scheduler name
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        from transformers.trainer_utils import SchedulerType

        check_range("optim.lr", self.lr, 0)
        check_range("optim.weight_decay", self.weight_decay, 0)
        check_range("optim.max_grad_norm", self.max_grad_norm, 0, low_open=True)
        check_range("optim.warmup_steps", self.warmup_steps, 0)
        check_choice("optim.scheduler", self.scheduler, [t.value for t in SchedulerType])
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas} must be two numbers in [0, 1)")


@dataclass
class DistributedConfig:
    # "single": one process; "deepspeed": ZeRO data parallelism over the launcher's processes
    # (torchrun, deepspeed, SLURM), or one process with ZeRO offload.
    backend: str = "single"
    device: str = "auto"  # "auto": cuda when available, else cpu
    zero_stage: int = 0  # 0 (plain data parallel), 1 (optimizer), 2 (+ gradients), 3 (+ parameters)
    offload_optimizer: bool = False  # optimizer state in CPU memory
    offload_params: bool = False  # ZeRO-3 parameters in CPU memory
    # A DeepSpeed JSON file merged over the generated config (its keys win), for anything not above.
    deepspeed_config: str | None = None
    # Seconds a collective may wait for the other ranks before the job fails: a hung or dead rank
    # ends the job within this time instead of holding every GPU. Raise it when one rank does long
    # work alone between collectives (a very large checkpoint export).
    timeout_s: float = 600

    def __post_init__(self) -> None:
        check_choice("distributed.backend", self.backend, ("single", "deepspeed"))
        check_choice("distributed.zero_stage", self.zero_stage, (0, 1, 2, 3))
        check_range("distributed.timeout_s", self.timeout_s, 0, low_open=True)
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ConfigError(f"distributed.device={self.device!r} is not auto, cpu, cuda or cuda:N")


@dataclass
class LoggerConfig:
    console: bool = True
    jsonl: bool = True
    wandb: bool = True
    wandb_mode: str = "offline"  # "offline" syncs later with `wandb sync`; "online" needs a login
    wandb_project: str = "rlhf"
    wandb_entity: str | None = None
    log_every: int = 1
    # Rollout rows saved per logged step to <run_dir>/rollouts.jsonl and the wandb table (0: none)
    rollout_samples: int = 4

    def __post_init__(self) -> None:
        check_choice("logger.wandb_mode", self.wandb_mode, ("offline", "online", "disabled"))
        check_range("logger.log_every", self.log_every, 1)
        check_range("logger.rollout_samples", self.rollout_samples, 0)


@dataclass
class CheckpointConfig:
    every: int = 50  # optimizer steps between checkpoints; 0 saves only at the end
    keep_last: int = 2
    save_final: bool = True

    def __post_init__(self) -> None:
        check_range("checkpoint.every", self.every, 0)
        check_range("checkpoint.keep_last", self.keep_last, 0)


@dataclass
class EvalConfig:
    every: int = 0  # 0: only before and after training
    num_samples: int = 1000
    batch_size: int = 250
    max_new_tokens: int = 8

    def __post_init__(self) -> None:
        check_range("eval.every", self.every, 0)
        check_range("eval.num_samples", self.num_samples, 0)
        check_range("eval.batch_size", self.batch_size, 1)
        check_range("eval.max_new_tokens", self.max_new_tokens, 1)


PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainLoopConfig:
    """Fields of every recipe's `train` group."""

    steps: int = 100
    time_limit_s: float | None = None  # stop (with a checkpoint) after this many seconds of training
    # fp32: float32 everywhere. bf16: mixed precision, bf16 compute with float32 master weights and
    # optimizer state (rlhf/models/precision.py); logprobs, KL, advantages and losses stay float32.
    precision: str = "fp32"
    # > 0: micro-batches also end before their rows' valid tokens (prompt + response; both rows of
    # a preference pair) exceed this many, so long rows go in small micro-batches and short ones in
    # large; every rank runs as many micro-batches as the rank that needs most (ZeRO-3 forwards are
    # collective), and the loss normaliser stays one per optimizer step. 0: micro_batch_size rows each.
    max_tokens_per_micro_batch: int = 0

    def __post_init__(self) -> None:
        check_range("train.steps", self.steps, 0)
        check_range("train.time_limit_s", self.time_limit_s, 0, low_open=True)
        check_choice("train.precision", self.precision, PRECISIONS)
        check_range("train.max_tokens_per_micro_batch", self.max_tokens_per_micro_batch, 0)


@dataclass
class RowsTrainConfig(TrainLoopConfig):
    """Recipes that step through dataset rows (SFT, reward model, DPO): the length of training in
    optimizer steps, or in passes over the training rows (`epochs`, which then sets `steps`)."""

    batch_size: int = 64
    micro_batch_size: int = 64
    epochs: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("train.epochs", self.epochs, 0, low_open=True)

    def total_steps(self, num_rows: int) -> int:
        """Optimizer steps of the run: ceil(epochs * rows / batch_size) when `epochs` is set (printed),
        else `steps`."""
        return _steps_from_epochs(self.epochs, self.steps, num_rows, self.batch_size, "rows")


def _steps_from_epochs(epochs: float | None, steps: int, num_rows: int, per_step: int, what: str) -> int:
    if epochs is None:
        return steps
    total = max(1, math.ceil(epochs * num_rows / per_step))
    print(f"[train] train.epochs={epochs:g} over {num_rows} {what}: {total} steps", flush=True)
    return total


@dataclass
class RunConfig:
    """Fields common to every recipe."""

    seed: int = 0
    run_dir: str = "runs/default"
    resume: str | None = None  # a run directory (its latest checkpoint) or a checkpoint directory
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class ReferenceSyncConfig:
    # TR-DPO's moving reference (TRL's sync_ref_model): every sync_steps training steps,
    # reference <- mixup_alpha * policy + (1 - mixup_alpha) * reference; kept in checkpoints
    sync: bool = False
    sync_steps: int = 512
    mixup_alpha: float = 0.6

    def __post_init__(self) -> None:
        check_range("reference.sync_steps", self.sync_steps, 1)
        check_range("reference.mixup_alpha", self.mixup_alpha, 0, 1, low_open=True)


def check_reference_sync(cfg, has_reference: bool, why_not: str) -> None:
    """reference.sync needs a separate reference model to move (not LoRA's adapter-off view)."""
    if not cfg.reference.sync:
        return
    if not has_reference:
        raise ConfigError(f"reference.sync=true: {why_not}, so there is no reference model to synchronise")
    if cfg.model.lora.enabled:
        raise ConfigError(
            "reference.sync=true with model.lora.enabled: the reference is the policy with its adapters "
            "off, not a model of its own that could move (TRL refuses this too); train without LoRA"
        )


@dataclass
class ScoringModelConfig:
    """A frozen reward model (sequence classifier sharing the policy's tokenizer)."""

    name_or_path: str | None = None  # a reward-model export or hub id; None: reward functions only
    weight: float = 1.0
    dtype: str = "float32"

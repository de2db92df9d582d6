"""Configs of the recipes that step through dataset rows: SFT, the reward model, DPO and its
token-level variants, and AlignDistil."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.config.checks import ConfigError, check_choice, check_range
from rlhf.config.common import EvalConfig, ReferenceSyncConfig, RowsTrainConfig, RunConfig
from rlhf.config.rl import RolloutConfig


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
class SFTConfig(RunConfig):
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    # A 0/1 reward from rewards.REWARD_FUNCTIONS scoring greedy completions for the accuracy checks
    # (it needs its columns, e.g. exact_match needs `answer`); None: no accuracy check.
    accuracy_reward: str | None = None


@dataclass
class RewardModelConfig(RunConfig):
    train: RewardModelTrainConfig = field(default_factory=RewardModelTrainConfig)


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


TOKEN_WEIGHT_METHODS = ("none", "tgdpo", "cdpo", "uniform")


@dataclass
class TokenWeightConfig:
    # none | tgdpo (token rewards of a frozen DPO model) | cdpo (critical-token contrastive estimation)
    # | uniform (every rejected token weighted by uniform_rejected_weight: cDPO's control, its mean
    # weight without its token credit)
    method: str = "none"
    guide_model: str | None = None  # TGDPO: a DPO- or SimPO-trained policy on the same data
    alpha: float = 0.5  # TGDPO: w = 1 +- alpha * beta * log(pi_guide / pi_ref)
    floor: float = 0.0  # TGDPO: weights are clamped at this value (the paper needs w > 0)
    positive_model: str | None = None  # cDPO: model fine-tuned on correct samples
    negative_model: str | None = None  # cDPO: model fine-tuned on incorrect samples
    contrast_beta: float = 1.0  # cDPO: s_t = softmax((1 + b) z_pos - b z_neg)[y_t]
    weight_chosen: bool = False  # cDPO: chosen tokens weighted by s_t too (default only rejected)
    uniform_rejected_weight: float = 1.0  # uniform: the one weight of every rejected token

    def __post_init__(self) -> None:
        check_choice("token_weights.method", self.method, TOKEN_WEIGHT_METHODS)
        check_range("token_weights.uniform_rejected_weight", self.uniform_rejected_weight, 0, low_open=True)


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

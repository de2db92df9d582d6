"""Config dataclasses shared by the recipes; YAML files in configs/ only override their defaults.

Plain dataclasses, importable without Hydra. `register_configs()` (called by the recipes) stores them
in Hydra's ConfigStore so that composition is typed: an unknown key or a wrong type is an error.
Derived numbers (rollouts per step, accumulation steps) are computed into a `BatchPlan` by
`plan_grpo_batches` / `plan_sft_batches`, never written back into the config.

Layout: `checks` (ConfigError and the field checks), `common` (groups every recipe shares),
`rl` (GRPO and PPO), `preference` (the row-stepping recipes: SFT, reward model, DPO, AlignDistil),
`plans` (batch arithmetic). Everything is importable from `rlhf.config`.
"""

from __future__ import annotations

from rlhf.config.checks import (
    ConfigError,
    check_choice,
    check_range,
)
from rlhf.config.common import (
    COMMAND_LINE_ESCAPES,
    PRECISIONS,
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    LoggerConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    ReferenceSyncConfig,
    RowsTrainConfig,
    RunConfig,
    ScoringModelConfig,
    TinyModelConfig,
    TrainLoopConfig,
    check_reference_sync,
    unescaped,
)
from rlhf.config.plans import (
    BatchPlan,
    check_vespo_correction,
    plan_grpo_batches,
    plan_ppo_batches,
    plan_rollout_batches,
    plan_sft_batches,
)
from rlhf.config.preference import (
    AlignDistilConfig,
    DistillLossConfig,
    DistillTeacherConfig,
    DistillTrainConfig,
    DPOConfig,
    DPOEvalConfig,
    DPOLossConfig,
    DPOTrainConfig,
    ReferenceConfig,
    RewardModelConfig,
    RewardModelTrainConfig,
    SFTConfig,
    SFTTrainConfig,
    TokenWeightConfig,
    TRegConfig,
)
from rlhf.config.rl import (
    AdvantageConfig,
    CriticConfig,
    CuriosityConfig,
    GAEConfig,
    GRPOConfig,
    GRPOTrainConfig,
    GTPOWeightsConfig,
    LossConfig,
    MacroConfig,
    PolicyLossArgs,
    PPOConfig,
    PPOLossConfig,
    RewardConfig,
    RewardTermConfig,
    RolloutConfig,
    RTOConfig,
    ScoreShapingConfig,
    ServerConfig,
    VllmConfig,
    check_estimator,
    check_policy_loss,
)


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


__all__ = [
    "ConfigError",
    "check_choice",
    "check_range",
    "TinyModelConfig",
    "LoraConfig",
    "ModelConfig",
    "DataConfig",
    "RewardTermConfig",
    "RewardConfig",
    "PolicyLossArgs",
    "check_policy_loss",
    "LossConfig",
    "GTPOWeightsConfig",
    "check_estimator",
    "AdvantageConfig",
    "ServerConfig",
    "VllmConfig",
    "RolloutConfig",
    "COMMAND_LINE_ESCAPES",
    "unescaped",
    "OptimConfig",
    "DistributedConfig",
    "LoggerConfig",
    "CheckpointConfig",
    "EvalConfig",
    "PRECISIONS",
    "TrainLoopConfig",
    "RowsTrainConfig",
    "GRPOTrainConfig",
    "SFTTrainConfig",
    "RewardModelTrainConfig",
    "RunConfig",
    "ReferenceSyncConfig",
    "check_reference_sync",
    "GRPOConfig",
    "SFTConfig",
    "RewardModelConfig",
    "ScoringModelConfig",
    "CriticConfig",
    "PPOLossConfig",
    "MacroConfig",
    "GAEConfig",
    "ScoreShapingConfig",
    "RTOConfig",
    "CuriosityConfig",
    "PPOConfig",
    "DPOLossConfig",
    "ReferenceConfig",
    "TokenWeightConfig",
    "TRegConfig",
    "DPOTrainConfig",
    "DPOEvalConfig",
    "DPOConfig",
    "DistillTeacherConfig",
    "DistillLossConfig",
    "DistillTrainConfig",
    "AlignDistilConfig",
    "BatchPlan",
    "plan_rollout_batches",
    "plan_grpo_batches",
    "check_vespo_correction",
    "plan_ppo_batches",
    "plan_sft_batches",
    "register_configs",
]

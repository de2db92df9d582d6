"""The same recipe files run under the deepspeed launcher and torchrun, with ZeRO-1 and ZeRO-3
(reference partitioned, generation with gathered parameters), LoRA, and a checkpoint export that
loads with from_pretrained."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

from rlhf.checkpoint import list_checkpoints
from rlhf.loggers import read_metrics
from tests.distributed.test_zero_invariance import ROOT, SMALL, _env, _free_port, torchrun

FAST = [
    "train.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=4",
    "train.micro_batch_size=2",
    "eval.num_samples=8",
]


def _trained_rows(run_dir) -> list[dict]:
    return [r for r in read_metrics(str(run_dir)) if "loss" in r]


def test_grpo_under_deepspeed_launcher_zero3_with_reference(tmp_path):
    """A local pretrained directory: from_pretrained partitions policy and reference as they load;
    both run the shared-prefix forward (prefill once per group, packed logprob passes), in bf16
    mixed precision with activation checkpointing."""
    from rlhf.models.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_causal_lm

    tokenizer = build_char_tokenizer()
    build_tiny_causal_lm(
        TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tokenizer
    ).save_pretrained(tmp_path / "start")
    tokenizer.save_pretrained(tmp_path / "start")
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    port = _free_port()
    command = [
        launcher,
        "--num_gpus",
        "2",
        "--master_port",
        str(port),
        "--module",
        "recipes.grpo",
        *SMALL,
        *FAST,
        "distributed=zero3",
        "model=pretrained",
        f"model.name_or_path={tmp_path / 'start'}",
        "model.shared_prefix=true",
        "model.gradient_checkpointing=true",
        "train.precision=bf16",
        "loss.kl_coef=0.05",
        "train.steps=2",
        "train.num_minibatches=2",
        "checkpoint.every=2",
        f"run_dir={tmp_path / 'run'}",
    ]
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    rows = _trained_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["kl/mean"], r["reward/mean"]])).all() for r in rows)
    exported = AutoModelForCausalLM.from_pretrained(
        os.path.join(list_checkpoints(str(tmp_path / "run"))[-1], "hf")
    )
    assert exported.model.embed_tokens.weight.shape[1] == 32
    assert abs(rows[0]["kl/mean"]) < 1e-3  # the reference runs in bf16 like the policy
    # DeepSpeed's CPU all-reduce segments (one per rank) are unlinked at exit, not left in RAM
    if os.path.isdir("/dev/shm"):
        assert not [name for name in os.listdir("/dev/shm") if name.endswith((f"_{port}_0", f"_{port}_1"))]


def test_sft_under_torchrun_zero1_with_lora(tmp_path):
    torchrun(
        [
            "-m",
            "recipes.sft",
            *SMALL,
            "distributed=zero1",
            "model.lora.enabled=true",
            "model.lora.r=4",
            "train.steps=2",
            "train.batch_size=8",
            "train.micro_batch_size=2",
            "train.check_every=0",
            "eval.num_samples=8",
            "optim.lr=1e-2",
            f"run_dir={tmp_path}",
        ]
    )
    checkpoint = list_checkpoints(str(tmp_path))[-1]
    assert os.path.isfile(os.path.join(checkpoint, "adapter", "adapter_config.json"))
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(checkpoint, "hf"))
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_one_process_zero3_offload_with_python(tmp_path):
    """The single-GPU case: plain `python` with ZeRO-3 parameter and optimizer offload."""
    command = [
        sys.executable,
        "-m",
        "recipes.grpo",
        *SMALL,
        *FAST,
        "distributed=zero3_offload",
        "loss.kl_coef=0.05",
        "train.steps=2",
        f"run_dir={tmp_path}",
    ]
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert [r["step"] for r in _trained_rows(tmp_path)] == [1, 2]
    AutoModelForCausalLM.from_pretrained(os.path.join(list_checkpoints(str(tmp_path))[-1], "hf"))


def test_ppo_under_torchrun_zero2_with_reward_model(tmp_path):
    """Policy and critic as two DeepSpeed engines in each of 2 ranks; the critic starts from the RM."""
    from rlhf.config import ModelConfig, TinyModelConfig
    from rlhf.models.load import load_scorer, load_tokenizer

    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
    tokenizer = load_tokenizer(cfg)
    load_scorer(cfg, tokenizer, seed=7).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    torchrun(
        [
            "-m",
            "recipes.ppo",
            *SMALL,
            "distributed=zero2",
            f"reward_model.name_or_path={tmp_path / 'rm'}",
            "train.prompts_per_step=4",
            "train.micro_batch_size=2",
            "rollout.max_new_tokens=4",
            "train.steps=2",
            "checkpoint.every=2",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    rows = _trained_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(
        torch.isfinite(torch.tensor([r["loss"], r["loss/value"], r["reward/model_mean"]])).all() for r in rows
    )
    checkpoint = list_checkpoints(str(tmp_path / "run"))[-1]
    AutoModelForTokenClassification.from_pretrained(os.path.join(checkpoint, "critic_hf"))


def test_ppo_under_torchrun_zero3_with_curiosity_and_macro_actions(tmp_path):
    """CD-RLHF's module reads the policy's partitioned embedding table (gathered for the lookup) and
    the partitioned reference's hidden states; macro GAE and the rollout sample log run on 2 ranks."""
    torchrun(
        [
            "-m",
            "recipes.ppo",
            *SMALL,
            "distributed=zero3",
            "+experiment=ppo_sums",
            "curiosity.eta=0.04",
            "advantage.macro.segmenter=fixed",
            "advantage.macro.n=3",
            "train.prompts_per_step=4",
            "train.micro_batch_size=2",
            "rollout.max_new_tokens=6",
            "train.steps=2",
            "eval.num_samples=4",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    rows = _trained_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        values = [row["loss"], row["curiosity/loss"], row["curiosity/error_mean"], row["macro/segments_mean"]]
        assert torch.isfinite(torch.tensor(values)).all(), row
    with open(tmp_path / "run" / "rollouts.jsonl") as handle:
        assert len(handle.readlines()) == 2 * 2  # rank 0 writes its own 2 rows each step


@pytest.mark.parametrize("reference", ["precompute", "sync"])
def test_dpo_under_torchrun_zero3_matches_one_process(tmp_path, reference):
    """precompute: each rank precomputes its share of the reference values (uneven shares,
    collective forwards), all ranks read the whole cache. sync: the partitioned reference moves toward
    the partitioned policy one gathered module at a time (TR-DPO). Either way the losses equal a
    one-process run on the same pairs."""
    from recipes import dpo
    from rlhf.data.preferences import make_addition_preferences
    from tests.recipes.conftest import CONFIG_DIR, SMALL_MODEL

    data = make_addition_preferences(eval_size=15)
    (tmp_path / "pairs").mkdir()
    data["train"].select(range(47)).to_json(str(tmp_path / "pairs" / "train.jsonl"))
    data["eval"].to_json(str(tmp_path / "pairs" / "eval.jsonl"))
    common = [
        f"data.source={tmp_path / 'pairs'}",
        *(
            ["reference.precompute=true"]
            if reference == "precompute"
            else ["reference.sync=true", "reference.sync_steps=1", "reference.mixup_alpha=0.5"]
        ),
        "train.steps=3",
        "train.batch_size=8",
        "train.micro_batch_size=2",
        "eval.every=0",
        "eval.num_samples=14",
        "optim.lr=1e-2",
    ]
    torchrun(["-m", "recipes.dpo", *SMALL, *common, "distributed=zero3", f"run_dir={tmp_path / 'two'}"])
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rlhf.config import register_configs

    register_configs()

    def one_process(overrides: list[str], name: str) -> list[dict]:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            cfg = compose("dpo", overrides=[*SMALL_MODEL, *overrides, f"run_dir={tmp_path / name}"])
        dpo.train(OmegaConf.to_object(cfg))
        return _trained_rows(tmp_path / name)

    two, one = _trained_rows(tmp_path / "two"), one_process(common, "one")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(two, one):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(b["loss"])), (a["loss"], b["loss"])
    if reference == "sync":  # the match means something: a fixed reference gives another step 3
        fixed = one_process([o for o in common if not o.startswith("reference.")], "fixed")
        assert abs(fixed[2]["loss"] - two[2]["loss"]) > 1e-3, (fixed[2]["loss"], two[2]["loss"])
        return
    shards = [
        n
        for e in os.listdir(tmp_path / "two" / "token_cache")
        for n in os.listdir(tmp_path / "two" / "token_cache" / e)
    ]
    assert sum(n.startswith("shard-") for n in shards) == 4  # 2 ranks x (train, eval)


@pytest.mark.parametrize(
    "method",
    [
        # rounds of dynamic sampling differ per rank's prompts: every rank must run the same rounds
        # token-budget micro-batches differ per rank: every rank runs as many as the most any needs
        [
            "loss=gspo",
            "advantage=reinforce_pp_baseline",
            "advantage.dynamic_sampling=true",
            "train.max_tokens_per_micro_batch=10",
            "train.num_minibatches=2",
            "loss.kl_coef=0.05",
        ],
        # NTHR's pass runs on gathered parameters: ranks skip different groups
        [
            "+experiment=grpo_gtpo",
            "loss.args.gtpo.entropy_threshold=1e9",
            "model.shared_prefix=true",
            "advantage.nthr=true",
        ],
    ],
    ids=["gspo-reinforce_pp_baseline-dynamic", "gtpo-nthr-shared_prefix"],
)
def test_grpo_family_under_torchrun_zero3(tmp_path, method):
    torchrun(
        [
            "-m",
            "recipes.grpo",
            *SMALL,
            *FAST,
            "distributed=zero3",
            "reward.functions=[{name: 'tests.recipes.test_grpo_family:prompt_dependent_reward', weight: 1.0}]",
            "reward.accuracy_reward=null",
            *method,
            "train.steps=2",
            "eval.every=0",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    rows = _trained_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["reward/mean"]])).all() for r in rows)


def test_aligndistil_under_torchrun_zero3(tmp_path):
    """Policy and both frozen teachers partitioned; the chunked full-vocabulary KL runs the heads
    under ZeRO-3 on every rank."""
    from tests.unit.test_distill import save_teachers

    save_teachers(tmp_path)
    torchrun(
        [
            "-m",
            "recipes.aligndistil",
            *SMALL,
            "distributed=zero3",
            f"teacher.dpo_model={tmp_path / 'dpo'}",
            f"teacher.reverse_dpo_model={tmp_path / 'reverse'}",
            "train.steps=2",
            "train.batch_size=8",
            "train.micro_batch_size=2",
            "loss.chunk_tokens=2",
            "eval.every=0",
            "eval.num_samples=8",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    rows = _trained_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)

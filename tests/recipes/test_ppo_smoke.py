"""PPO with a critic on a tiny model: finite losses, policy and critic move, exports load, resume."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

from recipes import ppo
from rlhf.checkpoint import export_dir
from rlhf.config import ConfigError, ModelConfig, TinyModelConfig
from rlhf.loggers import read_metrics
from rlhf.models.load import load_causal_lm, load_scorer, load_tokenizer
from tests.resume_checks import assert_resume_matches

FAST = [
    "train.prompts_per_step=4",
    "train.micro_batch_size=2",
    "rollout.max_new_tokens=4",
    "eval.num_samples=8",
]


@pytest.fixture()
def reward_model_dir(tmp_path):
    """A (random) reward model with the test policy's shape and tokenizer, saved like an export."""
    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
    tokenizer = load_tokenizer(cfg)
    model = load_scorer(cfg, tokenizer, seed=7)
    path = tmp_path / "rm"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_ppo_with_reward_model_moves_policy_and_critic(make_config, reward_model_dir):
    cfg = make_config(
        "ppo",
        *FAST,
        f"reward_model.name_or_path={reward_model_dir}",
        "train.steps=3",
        "train.num_minibatches=2",
        "train.updates_per_rollout=2",
        "optim.lr=1e-2",
        "critic.optim.lr=1e-2",
        "loss.entropy_coef=0.01",
        "shaping.normalize=true",
        "shaping.score_clip=2.5",
        "loss.kl_controller=adaptive",
        "checkpoint.every=3",
    )
    initial_policy = load_causal_lm(cfg.model, load_tokenizer(cfg.model), seed=cfg.seed).state_dict()
    initial_critic = AutoModelForTokenClassification.from_pretrained(reward_model_dir).state_dict()
    result = ppo.train(cfg)
    rows = [r for r in read_metrics(result["run_dir"]) if "loss" in r]
    for key in (
        "loss",
        "loss/value",
        "reward/model_mean",
        "kl/sequence_mean",
        "kl/coef",
        "value/error",
        "entropy",
        "clip/fraction",
    ):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rows), key
    assert rows[-1]["kl/coef"] != 0.05  # the adaptive controller moved
    policy = AutoModelForCausalLM.from_pretrained(export_dir(result["checkpoint"])).state_dict()
    critic = AutoModelForTokenClassification.from_pretrained(
        os.path.join(result["checkpoint"], "critic_hf")
    ).state_dict()
    assert all(not torch.equal(policy[k], initial_policy[k]) for k in policy)
    assert any(not torch.equal(critic[k], initial_critic[k]) for k in critic)
    assert not torch.equal(critic["score.weight"], initial_critic["score.weight"])
    # scored by the reward model alone, the run is still evaluated on held-out prompts by it
    evaluations = [r for r in read_metrics(result["run_dir"]) if "eval/reward/reward_model" in r]
    assert [r["step"] for r in evaluations] == [0, 3]
    assert all(
        r["eval/reward"] == r["eval/reward/reward_model"] for r in evaluations
    )  # reward_model.weight 1


def test_ppo_with_reward_functions_resumes_exactly(make_config, tmp_path):
    common = [
        *FAST,
        "+experiment=ppo_arithmetic_rewards",
        "checkpoint.every=2",
        "eval.every=0",
        "optim.lr=1e-2",
        "train.num_minibatches=2",
    ]
    straight = ppo.train(make_config("ppo", *common, "train.steps=4", run_dir=str(tmp_path / "a")))
    ppo.train(make_config("ppo", *common, "train.steps=2", run_dir=str(tmp_path / "b")))
    resumed = ppo.train(make_config("ppo", "train.steps=4", f"resume={tmp_path / 'b'}"))
    first = {r["step"]: r for r in read_metrics(straight["run_dir"]) if "loss" in r}
    second = {r["step"]: r for r in read_metrics(resumed["run_dir"]) if "loss" in r}
    for step in (3, 4):
        for key in ("loss", "loss/value", "kl/sequence_mean", "value/mean", "kl/coef"):
            assert first[step][key] == second[step][key], (step, key)
    assert_resume_matches(straight, resumed, 2, 4)  # the critic's weights and optimizer too


def test_ppo_needs_a_score(make_config):
    with pytest.raises(ConfigError, match="PPO needs a score"):
        ppo.train(make_config("ppo", "critic.init=policy"))


def test_ppo_with_rto_token_reward(make_config, reward_model_dir, tmp_path):
    """RTO: a DPO model's clipped token log-ratio joins the token reward (both reference options)."""
    cfg = make_config("ppo", "seed=3", run_dir=str(tmp_path / "sft"))
    tokenizer = load_tokenizer(cfg.model)
    dpo_dir = tmp_path / "dpo"
    load_causal_lm(cfg.model, tokenizer, seed=11).save_pretrained(dpo_dir)  # a model unlike the reference
    tokenizer.save_pretrained(dpo_dir)
    for reference in ("policy", "dpo_reference"):
        result = ppo.train(
            make_config(
                "ppo",
                "+experiment=ppo_rto",
                *FAST,
                f"reward_model.name_or_path={reward_model_dir}",
                f"rto.dpo_model={dpo_dir}",
                f"rto.reference={reference}",
                f"rto.dpo_reference_model={dpo_dir}",
                "rto.clip=0.001",  # 0.05 * |log ratio| above 0.001 happens on most tokens of two random models
                "train.steps=2",
                run_dir=str(tmp_path / reference),
            )
        )
        rows = [r for r in read_metrics(result["run_dir"]) if "loss" in r]
        if reference == "policy":  # a different model: non-zero log-ratios, clipped to 0.001 per token
            assert all(r["rto/clip_fraction"] > 0 for r in rows)
            assert all(r["reward/rto_sum"] != 0 for r in rows)
            assert all(abs(r["reward/rto_token_mean"]) <= 0.001 for r in rows)
        else:  # its own reference is the same model: the reward is exactly 0
            assert all(r["reward/rto_sum"] == 0 for r in rows)


def test_shared_prefix_forward_gives_the_same_run(make_config, reward_model_dir, tmp_path):
    """Two samples per prompt: reference, critic and reward-model passes packed; same run."""
    common = [*FAST, f"reward_model.name_or_path={reward_model_dir}", "train.steps=2", "eval.every=0"]
    runs = [
        ppo.train(
            make_config(
                "ppo",
                *common,
                "rollout.group_size=2",
                f"model.shared_prefix={on}",
                run_dir=str(tmp_path / str(on)),
            )
        )
        for on in (False, True)
    ]
    plain, shared = ({r["step"]: r for r in read_metrics(run["run_dir"]) if "loss" in r} for run in runs)
    for step in plain:
        for key in ("loss", "loss/value", "reward/model_mean", "kl/sequence_mean", "value/mean"):
            assert shared[step][key] == pytest.approx(plain[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_macro_actions_of_one_token_are_token_level_ppo(make_config, tmp_path):
    common = [*FAST, "+experiment=ppo_arithmetic_rewards", "train.steps=2", "eval.every=0"]
    token = ppo.train(make_config("ppo", *common, run_dir=str(tmp_path / "token")))
    macro = ppo.train(
        make_config(
            "ppo",
            *common,
            "advantage.macro.segmenter=fixed",
            "advantage.macro.n=1",
            run_dir=str(tmp_path / "n1"),
        )
    )
    first, second = (
        {r["step"]: r for r in read_metrics(run["run_dir"]) if "loss" in r} for run in (token, macro)
    )
    for step in first:
        for key in ("loss", "loss/value", "kl/sequence_mean"):
            assert second[step][key] == pytest.approx(first[step][key], rel=1e-6, abs=1e-9), (step, key)
    assert second[1]["macro/segment_length_mean"] == 1.0


@pytest.mark.parametrize(
    "macro",
    [
        ["advantage.macro.segmenter=fixed", "advantage.macro.n=2", "advantage.macro.ratio=macro"],
        ["advantage.macro.segmenter=perplexity", "advantage.macro.reward_aggregation=sum"],
        ["advantage.macro.segmenter=parse", "advantage.macro.aggregation=position"],
        ["advantage.macro.segmenter=randomized", "advantage.macro.aggregation=last"],
    ],
)
def test_macro_action_ppo_runs(make_config, macro, tmp_path):
    """Each segmenter makes segments longer than a token on some rows, and GAE over them gives other
    value targets than token-level PPO from the same start."""
    common = [*FAST, "+experiment=ppo_arithmetic_rewards", "train.steps=2"]
    token = ppo.train(make_config("ppo", *common, run_dir=str(tmp_path / "token")))
    result = ppo.train(make_config("ppo", *common, *macro, run_dir=str(tmp_path / "macro")))
    rows = [r for r in read_metrics(result["run_dir"]) if "loss" in r]
    token_rows = [r for r in read_metrics(token["run_dir"]) if "loss" in r]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["loss/value"]])).all() for r in rows)
    assert all(1 <= r["macro/segments_mean"] <= 4 for r in rows)  # 4-token responses
    assert rows[0]["macro/segment_length_mean"] > 1
    assert rows[0]["value/returns_mean"] != pytest.approx(token_rows[0]["value/returns_mean"], rel=1e-6)


def test_macro_config_errors_name_the_field(make_config):
    with pytest.raises(ConfigError, match="advantage.macro.segmenter"):
        ppo.train(make_config("ppo", "+experiment=ppo_arithmetic_rewards", "advantage.macro.segmenter=words"))


def test_curiosity_ppo_runs_and_resumes_exactly(make_config, tmp_path):
    """CD-RLHF: gate recorded during generation, states from the reference pass, the module trained
    and checkpointed with the run."""
    common = [
        *FAST,
        "+experiment=ppo_arithmetic_rewards",
        "curiosity.eta=0.5",
        "checkpoint.every=2",
        "eval.every=0",
    ]
    straight = ppo.train(make_config("ppo", *common, "train.steps=4", run_dir=str(tmp_path / "a")))
    ppo.train(make_config("ppo", *common, "train.steps=2", run_dir=str(tmp_path / "b")))
    resumed = ppo.train(make_config("ppo", *common, "train.steps=4", f"resume={tmp_path / 'b'}"))
    first = {r["step"]: r for r in read_metrics(straight["run_dir"]) if "loss" in r}
    second = {r["step"]: r for r in read_metrics(resumed["run_dir"]) if "loss" in r}
    assert 0 < first[1]["curiosity/gated_fraction"] < 1
    assert all(torch.isfinite(torch.tensor(r["curiosity/loss"])) for r in first.values())
    for step in (3, 4):
        for key in ("loss", "curiosity/loss", "curiosity/error_mean"):
            assert first[step][key] == second[step][key], (step, key)
    assert_resume_matches(straight, resumed, 2, 4)  # the curiosity model's state too


def test_padding_free_gives_the_same_ppo_run(make_config, reward_model_dir, tmp_path):
    """model.padding_free reaches the reward model's and the critic's passes too (their models load
    with it): rewards, values and both losses equal the padded run's."""
    common = [*FAST, f"reward_model.name_or_path={reward_model_dir}", "train.steps=2", "optim.lr=1e-2"]
    common += ["critic.optim.lr=1e-2", "rollout.max_new_tokens=6"]
    plain = ppo.train(make_config("ppo", *common, run_dir=str(tmp_path / "plain")))
    packed = ppo.train(
        make_config("ppo", *common, "model.padding_free=true", run_dir=str(tmp_path / "packed"))
    )
    for key in ("reward/model_mean", "value/mean", "loss", "loss/value"):
        # fp32: the same terms, summed over other widths
        assert packed[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key

"""DPO recipe: learns synthetic pairs, cached reference values equal on-the-fly ones, token-level
variants reduce to DPO where the spec says so, resume is exact, bad configs name the field."""

from __future__ import annotations

import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipes import dpo
from rlhf.checkpoint import export_dir
from rlhf.config import ConfigError, ModelConfig
from rlhf.loggers import read_metrics
from rlhf.models.load import load_tokenizer
from tests.resume_checks import assert_resume_matches

FAST = [
    "train.steps=4",
    "train.batch_size=8",
    "train.micro_batch_size=4",
    "eval.every=0",
    "eval.num_samples=16",
]


@pytest.fixture()
def pairs(tmp_path_factory) -> str:
    """A small local pair dataset (48 train, 16 eval) so that precomputation stays quick."""
    from rlhf.data.preferences import make_addition_preferences

    directory = tmp_path_factory.mktemp("pairs")
    data = make_addition_preferences(eval_size=16)
    data["train"].select(range(48)).to_json(str(directory / "train.jsonl"))
    data["eval"].to_json(str(directory / "eval.jsonl"))
    return f"data.source={directory}"


def losses(result) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(result["run_dir"]) if "loss" in r}


def test_dpo_learns_pairs_and_exports(make_config):
    result = dpo.train(
        make_config(
            "dpo",
            "train.steps=40",
            "train.batch_size=16",
            "train.micro_batch_size=8",
            "optim.lr=3e-3",
            "eval.num_samples=64",
            "eval.accuracy_reward=exact_match",
            "eval.max_new_tokens=4",
        )
    )
    rows = [r for r in read_metrics(result["run_dir"]) if "loss" in r]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert sum(r["loss"] for r in rows[-5:]) / 5 < rows[0]["loss"]
    assert result["eval/reward_accuracy_before"] == 0.0  # policy == reference: every margin is 0
    assert result["eval/reward_accuracy"] > 0.6
    assert "eval/accuracy" in result  # held-out generation ran (its value on a 40-step model is noise)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "logprobs/chosen"):
        assert key in rows[-1]
    model = AutoModelForCausalLM.from_pretrained(export_dir(result["checkpoint"]))
    exported = ModelConfig(source="pretrained", name_or_path=export_dir(result["checkpoint"]))
    assert model.config.vocab_size == len(load_tokenizer(exported))  # model and tokenizer export together
    assert os.path.exists(os.path.join(result["run_dir"], "dpo_curves.png"))


def test_precomputed_reference_matches_on_the_fly_and_is_reused(make_config, tmp_path, pairs):
    cache = tmp_path / "cache"
    live = dpo.train(make_config("dpo", pairs, *FAST, run_dir=str(tmp_path / "live")))
    precompute = ["reference.precompute=true", f"reference.cache_dir={cache}"]
    cached = dpo.train(make_config("dpo", pairs, *FAST, *precompute, run_dir=str(tmp_path / "c")))
    assert losses(cached) == pytest.approx(losses(live), rel=1e-5)
    entries = os.listdir(cache)
    assert len(entries) == 2  # train and eval splits
    assert all(os.path.exists(cache / entry / "complete.json") for entry in entries)
    # A second run with the same key reads the cache instead of computing: a poisoned shard fails it.
    for entry in entries:
        for name in os.listdir(cache / entry):
            if name.startswith("shard-"):
                (cache / entry / name).write_bytes(b"not a tensor file")
    with pytest.raises(Exception, match="pickle|load|tensor|zip|magic"):
        dpo.train(make_config("dpo", pairs, *FAST, *precompute, run_dir=str(tmp_path / "d")))


@pytest.mark.parametrize(
    "variant",
    [
        ["token_weights.method=tgdpo", "token_weights.alpha=0.0"],  # alpha 0: weights 1, DPO
        ["token_weights.method=uniform"],  # every rejected weight 1: DPO
        # T-REG on, with one template for "better" and "worse": every token reward is 0, so the
        # regulariser (computed, weighted, added) is 0 and the run is DPO's
        ["treg.alpha=0.5", "treg.better_template='1{prompt}'", "treg.worse_template='1{prompt}'"],
    ],
)
def test_token_variants_reduce_to_dpo(make_config, tmp_path, variant):
    base = dpo.train(make_config("dpo", *FAST, run_dir=str(tmp_path / "base")))
    guide = export_dir(base["checkpoint"])
    extra = [f"token_weights.guide_model={guide}"] if "tgdpo" in variant[0] else []
    result = dpo.train(make_config("dpo", *FAST, *variant, *extra, run_dir=str(tmp_path / "v")))
    assert losses(result) == pytest.approx(losses(base), rel=1e-6)
    rows = [r for r in read_metrics(result["run_dir"]) if "loss" in r]
    metric = {"tgdpo": "tgdpo/floor_rate", "uniform": "uniform/rejected_weight"}.get(
        variant[0].split("=")[-1], "treg/weight"
    )
    assert all(metric in r for r in rows), "the variant's code ran"
    if "treg" in variant[0]:
        assert all(r["treg/regularizer"] == 0.0 and 0 < r["treg/weight"] < 1 for r in rows)


def test_token_variants_train(make_config, tmp_path, pairs):
    base = dpo.train(make_config("dpo", pairs, *FAST, "optim.lr=3e-3", run_dir=str(tmp_path / "base")))
    plain = dpo.train(
        make_config("dpo", pairs, *FAST, "reference.precompute=true", run_dir=str(tmp_path / "plain"))
    )
    guide = export_dir(base["checkpoint"])
    for name, variant in {
        "tgdpo": [
            "token_weights.method=tgdpo",
            f"token_weights.guide_model={guide}",
            "token_weights.floor=0.05",
        ],
        "cdpo": [
            "token_weights.method=cdpo",
            f"token_weights.positive_model={guide}",
            "token_weights.negative_model=" + guide,
            "token_weights.weight_chosen=true",
        ],
        "treg": ["treg.alpha=0.5", "treg.better_template='1{prompt}'", "treg.worse_template='9{prompt}'"],
        "uniform": ["token_weights.method=uniform", "token_weights.uniform_rejected_weight=0.5"],
        "simpo": ["loss.type=simpo", "loss.simpo_gamma=0.2"],
    }.items():
        result = dpo.train(
            make_config(
                "dpo", pairs, *FAST, "reference.precompute=true", *variant, run_dir=str(tmp_path / name)
            )
        )
        rows = [r for r in read_metrics(result["run_dir"]) if "loss" in r]
        assert len(rows) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows), name
        # same data, seed and steps: runs are bit-for-bit repeatable, so any difference is the variant's
        assert losses(result)[4] != losses(plain)[4], f"{name} trained like plain DPO"
        if name == "tgdpo":
            assert all("tgdpo/floor_rate" in r for r in rows)  # TGDPO's own weights were computed
        if name == "cdpo":
            # identical positive and negative models: s_t = softmax(z)[y_t] is strictly inside (0, 1),
            # so every rejected weight 1 - s_t is too (never the plain-DPO weight 1)
            assert all(0 < r["cdpo/rejected_weight_mean"] < 1 for r in rows)
        if name == "treg":
            assert all(r["treg/regularizer"] != 0 for r in rows)


@pytest.mark.parametrize(
    "loss_type,first_loss",
    [("sigmoid", math.log(2)), ("ipo", (1 / (2 * 0.1)) ** 2), ("hinge", 1.0), ("robust", math.log(2))],
)
def test_each_dpo_loss_trains_through_the_recipe(make_config, tmp_path, loss_type, first_loss):
    """At step 1 the policy is the reference, every log-ratio is 0, and each loss has a known value
    (beta 0.1): sigmoid and robust log 2, IPO (1 / 2 beta)^2, hinge 1. Then the policy moves."""
    overrides = ["loss.label_smoothing=0.2"] if loss_type == "robust" else []
    result = dpo.train(
        make_config(
            "dpo", *FAST, f"loss.type={loss_type}", "loss.beta=0.1", *overrides, run_dir=str(tmp_path)
        )
    )
    trained = losses(result)
    assert trained[1] == pytest.approx(first_loss, rel=1e-5)
    assert trained[4] != pytest.approx(first_loss, rel=1e-6)  # the policy left the reference


def test_dpo_resumes_exactly(make_config, tmp_path):
    full = dpo.train(make_config("dpo", *FAST, "checkpoint.every=2", run_dir=str(tmp_path / "a")))
    dpo.train(make_config("dpo", *FAST, "train.steps=2", "checkpoint.every=2", run_dir=str(tmp_path / "b")))
    resumed = dpo.train(make_config("dpo", *FAST, "checkpoint.every=2", f"resume={tmp_path / 'b'}"))
    assert losses(resumed)[3] == losses(full)[3] and losses(resumed)[4] == losses(full)[4]
    assert_resume_matches(full, resumed, 2, 4)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["loss.type=kto"], "loss.type"),
        (["token_weights.method=tgdpo"], "token_weights.guide_model"),
        (["token_weights.method=cdpo"], "token_weights.positive_model"),
        (["token_weights.method=weird"], "token_weights.method"),
        (["loss.type=simpo", "treg.alpha=0.5"], "treg.model"),
    ],
)
def test_bad_configs_name_the_field(make_config, overrides, field):
    with pytest.raises((ConfigError, ValueError), match=field.replace(".", r"\.")):
        dpo.train(make_config("dpo", *FAST, *overrides))


def test_shared_prefix_forward_gives_the_same_run(make_config, tmp_path):
    """Chosen and rejected share the prompt: packed once per pair, the losses are unchanged."""
    plain = dpo.train(make_config("dpo", *FAST, run_dir=str(tmp_path / "plain")))
    shared = dpo.train(
        make_config("dpo", *FAST, "model.shared_prefix=true", run_dir=str(tmp_path / "shared"))
    )
    assert losses(shared) == pytest.approx(losses(plain), rel=1e-5)

"""Run inspection: saved rollout samples, the rlhf.inspect API, wandb tables and histograms, and the
walkthrough notebook executed end to end against a run made here."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from recipes import grpo, ppo
from rlhf.inspect import load_run, token_heatmap
from rlhf.loggers import WandbLogger, read_rollouts, rewind_jsonl, wandb_name

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GRPO_FAST = [
    "train.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=4",
    "eval.num_samples=8",
    "train.micro_batch_size=4",
    "logger.rollout_samples=3",
]


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    """A 2-step macro-action PPO run on the tiny model with rollout samples saved."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rlhf.config import register_configs
    from tests.recipes.conftest import CONFIG_DIR, SMALL_MODEL

    register_configs()
    run_dir = tmp_path_factory.mktemp("inspect") / "ppo"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(
            "ppo",
            overrides=[
                *SMALL_MODEL,
                f"run_dir={run_dir}",
                "reward.functions=[{name: digit_match, weight: 1.0}]",
                "critic.init=policy",
                "train.prompts_per_step=4",
                "train.micro_batch_size=2",
                "rollout.max_new_tokens=5",
                "eval.num_samples=8",
                "train.steps=2",
                "optim.lr=1e-2",
                "advantage.macro.segmenter=fixed",
                "advantage.macro.n=2",
                "logger.rollout_samples=3",
            ],
        )
    return ppo.train(OmegaConf.to_object(cfg))


def test_ppo_saves_rollout_samples_with_every_per_token_quantity(ppo_run):
    records = read_rollouts(ppo_run["run_dir"])
    assert [r["step"] for r in records] == [1, 1, 1, 2, 2, 2]
    for record in records:
        n = record["length"]
        assert n == len(record["tokens"]) > 0
        for key in ("logprobs", "ref_logprobs", "kl", "rewards", "values", "advantages", "segment_ids"):
            assert len(record[key]) == n, key
        assert record["kl"] == pytest.approx(
            [a - b for a, b in zip(record["logprobs"], record["ref_logprobs"])], abs=1e-6
        )
        # the score sits on the last token's reward, next to its KL penalty
        assert record["rewards"][-1] == pytest.approx(record["score"] - 0.05 * record["kl"][-1], abs=1e-5)
        assert all(isinstance(s, int) for s in record["segment_ids"])
        assert record["segment_ids"][0] == 0 and record["segment_ids"][-1] == max(record["segment_ids"])
    assert os.path.exists(os.path.join(ppo_run["run_dir"], "ppo_curves.png"))


def test_inspect_api_on_a_ppo_run(ppo_run):
    run = load_run(ppo_run["run_dir"])
    assert run.config["train"]["steps"] == 2 and run.checkpoint == run.checkpoints[-1]
    assert list(run.metrics["step"])[-1] == 2 and "loss" in run.metrics
    assert len(run.rollouts) == 6 and {"prompt", "completion", "advantages"} <= set(run.rollouts.columns)
    # opening a checkpoint selects it
    assert load_run(run.checkpoints[-1]).checkpoint == run.checkpoints[-1]

    record = run.rollouts.iloc[-1]
    heatmap = run.heatmap(record, "advantages")
    assert heatmap.html.count("<span") == record["length"] and "advantages" in heatmap.html
    assert "#" in run.heatmap(record, "segment_ids").html  # categorical colours
    with pytest.raises(KeyError, match="per-token quantity"):
        run.heatmap(record, "score")

    frame = run.compare_logprobs("12+34=", "46")
    assert list(frame.columns) == ["token", "policy_logprob", "reference_logprob", "log_ratio"]
    assert list(frame["token"]) == ["4", "6"]
    assert frame["log_ratio"].abs().max() > 0  # trained at lr 1e-2: the policy has moved
    assert (frame["policy_logprob"] <= 0).all()

    greedy = run.generate(["12+34=", "1+1="], max_new_tokens=4)
    assert len(greedy) == 2 and greedy == run.generate(["12+34=", "1+1="], max_new_tokens=4)
    assert len(run.generate(["12+34="], max_new_tokens=4, temperature=1.0, num_samples=3)) == 3


def test_reference_is_the_runs_starting_model(make_config):
    """With a zero learning rate the checkpoint equals the start: every log-ratio is 0."""
    result = grpo.train(make_config("grpo", *GRPO_FAST, "train.steps=1", "optim.lr=0.0", "loss.kl_coef=0.1"))
    frame = load_run(result["run_dir"]).compare_logprobs("61+86=", "147")
    assert frame["log_ratio"].abs().max() < 1e-6


def test_grpo_samples_have_logprobs_even_without_an_old_policy_pass(make_config):
    result = grpo.train(make_config("grpo", *GRPO_FAST, "train.steps=2", "loss.kl_coef=0.1"))
    records = read_rollouts(result["run_dir"])
    assert len(records) == 6
    for record in records:
        assert len(record["logprobs"]) == record["length"] and all(x <= 0 for x in record["logprobs"])
        assert len(record["ref_logprobs"]) == record["length"]
        assert isinstance(record["advantage"], float)


def test_logs_rewind_to_a_step_and_a_half_written_last_line_is_tolerated(tmp_path):
    """What a resume does to the logs: rows after the checkpoint's step go, a half-written last line
    (a crash mid-write) goes; the readers skip such a line, and a bad line elsewhere names its number."""
    rows = [{"step": 1, "completion": "a"}, {"step": 2, "completion": "b"}, {"step": 3, "completion": "c"}]
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "compl')
    assert [r["completion"] for r in read_rollouts(str(tmp_path))] == ["a", "b", "c"]
    assert rewind_jsonl(str(path), last_step=2) == 2
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:2])
    assert read_rollouts(str(tmp_path / "missing")) == []
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="rollouts.jsonl line 2 is not valid JSON"):
        read_rollouts(str(tmp_path))


def test_token_heatmap_colours_and_errors():
    signed = token_heatmap(["a", "b", "c"], [-2.0, 0.0, 1.0]).html
    assert "rgb(214,39,40)" in signed  # the most negative value takes the full red
    assert "rgb(255,255,255)" in signed  # zero stays white
    assert token_heatmap(["a", " "], [1.0, 0.5]).html.count("rgb(255,127,14)") == 1  # one hue, max full
    assert "·" in token_heatmap(["a", " "], [1.0, 0.5]).html  # whitespace stays visible
    escaped = token_heatmap(["<x>"], [1.0]).html
    assert ">&lt;x&gt;</span>" in escaped and "<x>" not in escaped
    with pytest.raises(ValueError, match="2 tokens but 1 values"):
        token_heatmap(["a", "b"], [1.0])


def test_load_run_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        load_run(str(tmp_path))
    (tmp_path / "config.yaml").write_text("seed: 1\nmodel: {source: tiny}\n")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        _ = load_run(str(tmp_path)).policy


class _RecordingRun:
    def __init__(self):
        self.logged = []

    def log(self, data, step):
        self.logged.append((step, data))


def test_wandb_gets_sections_a_rollout_table_and_histograms():
    import wandb

    logger = WandbLogger.__new__(WandbLogger)
    logger.wandb, logger.run = wandb, _RecordingRun()
    logger.log({"loss": 1.0, "reward/mean": 0.5}, step=3)
    assert logger.run.logged[0] == (3, {"train/loss": 1.0, "reward/mean": 0.5})
    assert wandb_name("kl/mean") == "kl/mean"
    records = [
        {"step": 3, "prompt": "p", "completion": "c", "score": 1.0, "length": 2, "advantages": [1.0, 3.0]},
        {
            "step": 3,
            "prompt": "<u>p",
            "raw_prompt": [{"role": "user", "content": "p"}],
            "completion": "c",
            "score": 0.0,
            "length": 1,
            "advantage": -1.0,
        },
    ]
    logger.log_rollouts(
        records, 3, {"reward": [1.0, 0.0], "advantage": [1.0, math.nan], "response_length": []}
    )
    step, data = logger.run.logged[1]
    table = data["rollouts/samples"]
    assert step == 3 and table.columns == [
        "step",
        "prompt",
        "raw_prompt",
        "completion",
        "score",
        "length",
        "advantage",
    ]
    assert table.data[0] == [3, "p", "p", "c", 1.0, 2, 2.0]  # per-token advantages shown as their mean
    # a chat prompt: the text fed to the model, and the data's message list beside it
    assert table.data[1] == [3, "<u>p", '[{"role": "user", "content": "p"}]', "c", 0.0, 1, -1.0]
    assert isinstance(data["hist/reward"], wandb.Histogram) and "hist/advantage" in data
    assert "hist/response_length" not in data  # nothing finite to draw


def test_offline_wandb_run_holds_the_rollout_table(make_config, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = make_config("grpo", *GRPO_FAST, "logger=default", "logger.console=false", "train.steps=1")
    result = grpo.train(cfg)
    wandb_dir = os.path.join(result["run_dir"], "wandb")
    tables = [
        os.path.join(root, name)
        for root, _, names in os.walk(wandb_dir)
        for name in names
        if name.startswith("samples_") and name.endswith(".table.json")
    ]
    assert len(tables) == 1
    with open(tables[0]) as handle:
        table = json.load(handle)
    assert table["columns"][:4] == ["step", "prompt", "raw_prompt", "completion"] and len(table["data"]) == 3


def test_walkthrough_notebook_runs_on_a_fresh_run(make_config, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    result = grpo.train(make_config("grpo", *GRPO_FAST, "train.steps=3", "loss.kl_coef=0.1"))
    monkeypatch.setenv("RLHF_RUN_DIR", result["run_dir"])
    notebook = nbformat.read(os.path.join(ROOT, "notebooks", "inspect_checkpoint.ipynb"), as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    )
    client.execute()  # raises CellExecutionError on any failing cell
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    html = [o for o in outputs if "text/html" in o.get("data", {})]
    assert any("<span title=" in o["data"]["text/html"] for o in html)  # the heatmaps rendered
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the curves rendered
    assert torch.isfinite(torch.tensor(result["loss"]))

"""The README's "Your own model and data" commands, run as written (plus fewer steps) on a chat model
built here: a Qwen2-shaped random-init model with a byte-level BPE tokenizer and a ChatML template,
and datasets in TRL's conversational formats. Each step's output is checked."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from rlhf.inspect import load_run
from rlhf.loggers import read_metrics
from tests.chat_model import save_chat_model

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# What the test adds to each README command: fewer and smaller steps (the commands are otherwise
# run as written).
FEWER_STEPS = {
    "sft": ["train.batch_size=4", "train.micro_batch_size=2", "eval.num_samples=4"],
    "reward_model": ["train.batch_size=4", "train.micro_batch_size=2", "eval.num_samples=4"],
    "ppo": [
        "train.steps=2",
        "train.prompts_per_step=2",
        "train.micro_batch_size=2",
        "rollout.max_new_tokens=12",
        "logger.rollout_samples=2",
    ],
    "grpo": [
        "train.steps=2",
        "train.prompts_per_step=2",
        "rollout.group_size=2",
        "train.micro_batch_size=4",
        "rollout.max_new_tokens=12",
        "logger.rollout_samples=2",
    ],
    "dpo": ["train.batch_size=4", "train.micro_batch_size=2", "eval.num_samples=4"],
}

SYSTEM = {"role": "system", "content": "Be brief."}
QUESTIONS = ["Hi", "What is 12 + 30?", "Write a short greeting.", "What is the capital of France?"]
ANSWERS = ["Hello!", "42.", "Hello! Nice to meet you.", "Paris."]

REWARDS_MODULE = '''
def brevity(prompts, completions, **columns):
    """1 for a short answer; checks it gets the conversational form TRL's GRPOTrainer passes."""
    assert isinstance(prompts[0], list) and prompts[0][0]["role"] == "system", prompts[0]
    assert isinstance(completions[0], list) and completions[0][0]["role"] == "assistant", completions[0]
    return [1.0 if len(c[0]["content"]) < 20 else 0.0 for c in completions]
'''


def readme_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Your own model and data", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.startswith(".venv/bin/python -m recipes.")]


def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def user_files(root: str) -> None:
    save_chat_model(os.path.join(root, "my-model"))
    conversations = [
        {"messages": [SYSTEM, {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in zip(QUESTIONS, ANSWERS)
    ]
    pairs = [
        {
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": a}],
            "rejected": [{"role": "assistant", "content": a + " " + a + " And more words than needed."}],
        }
        for q, a in zip(QUESTIONS, ANSWERS)
    ]
    prompts = [{"prompt": [SYSTEM, {"role": "user", "content": q}]} for q in QUESTIONS]
    for split in ("train", "eval"):
        write_jsonl(f"{root}/data/sft/{split}.jsonl", conversations * (2 if split == "train" else 1))
        write_jsonl(f"{root}/data/prefs/{split}.jsonl", pairs * (2 if split == "train" else 1))
    write_jsonl(f"{root}/data/prompts/train.jsonl", prompts)
    with open(f"{root}/my_rewards.py", "w") as handle:
        handle.write(REWARDS_MODULE)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Run the README commands in order in a fresh directory; returns it."""
    root = str(tmp_path_factory.mktemp("user"))
    user_files(root)
    env = {**os.environ, "PYTHONPATH": ROOT, "WANDB_MODE": "disabled"}
    commands = readme_commands()
    assert [c.split()[2] for c in commands] == [
        "recipes.sft",
        "recipes.reward_model",
        "recipes.ppo",
        "recipes.grpo",
        "recipes.dpo",
    ]
    for command in commands:
        argv = shlex.split(command)
        recipe = argv[2].split(".", 1)[1]
        argv = [sys.executable, *argv[1:], *FEWER_STEPS[recipe]]
        done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return root


def metrics(root: str, run: str) -> list[dict]:
    return read_metrics(os.path.join(root, "runs", run))


def test_sft_on_messages(pipeline):
    rows = metrics(pipeline, "chat-sft")
    assert any("eval/loss" in r for r in rows) and rows[0]["loss"] > 0
    assert max(r["step"] for r in rows) == 6  # train.epochs=3 over 8 conversations, 4 per step


def test_reward_model_on_conversational_pairs(pipeline):
    assert any("eval/pair_accuracy" in r for r in metrics(pipeline, "chat-rm"))


def test_ppo_with_that_reward_model_shows_the_fed_prompt(pipeline):
    run = load_run(os.path.join(pipeline, "runs", "chat-ppo"))
    record = run.rollouts.iloc[-1]
    assert record["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert record["prompt"].endswith("<|im_start|>assistant\n")
    assert record["raw_prompt"][0] == SYSTEM
    run.heatmap(record, "advantages", path=os.path.join(pipeline, "ppo.html"))
    assert os.path.getsize(os.path.join(pipeline, "ppo.html")) > 0


def test_grpo_with_own_reward_on_conversations(pipeline):
    run = load_run(os.path.join(pipeline, "runs", "chat-grpo"))
    assert "reward/my_rewards:brevity/mean" in run.metrics.columns
    record = run.rollouts.iloc[-1]
    run.heatmap(record, "advantages")  # the README's example works on GRPO's rollouts too
    with pytest.raises(KeyError, match="'values' is not a per-token quantity of this record; it has"):
        run.heatmap(record, "values")
    completions = run.generate([[SYSTEM, {"role": "user", "content": "Hi"}]], max_new_tokens=4)
    assert len(completions) == 1
    with pytest.raises(KeyError) as missing:  # the raw prompt's messages are not a per-token quantity
        run.heatmap(record, "raw_prompt")
    assert "advantages" in str(missing.value) and "raw_prompt" not in str(missing.value).split("it has")[1]
    # a string on a conversational run is fed as the run's prompts were: one user turn, templated
    user = [{"role": "user", "content": "Hi"}]
    assert run.generate(["Hi"], max_new_tokens=4) == run.generate([user], max_new_tokens=4)
    frame = run.compare_logprobs(user, [{"role": "assistant", "content": "Hello!"}])
    assert "".join(frame["token"]).startswith("Hello!<|im_end|>") and (frame["policy_logprob"] <= 0).all()


def test_dpo_on_conversational_pairs(pipeline):
    rows = metrics(pipeline, "chat-dpo")
    assert any("eval/reward_accuracy" in r for r in rows) and "rewards/margin" in rows[-1]

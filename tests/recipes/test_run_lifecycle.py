"""The run lifecycle every recipe shares (rlhf/run.py): run directories, resume from the saved
config, checkpoint integrity and fallback, log rewinding, preemption, the time limit."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from recipes import dpo, grpo, ppo
from rlhf.checkpoint import CheckpointError, list_checkpoints
from rlhf.config import ConfigError
from rlhf.inspect import load_run
from rlhf.loggers import read_metrics
from rlhf.models.load import load_causal_lm, load_tokenizer
from rlhf.run import PREEMPTED_EXIT_CODE, Preempted
from tests.recipes.conftest import CONFIG_DIR, SMALL_MODEL
from tests.resume_checks import assert_resume_matches

FAST = [
    "train.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=4",
    "eval.num_samples=8",
    "train.micro_batch_size=4",
    "eval.every=0",
]
ROOT = os.path.dirname(CONFIG_DIR)


def _snapshot(run_dir) -> dict[str, bytes]:
    """Every file of a run directory with its bytes, to show that nothing was touched."""
    files = {}
    for root, _, names in os.walk(run_dir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, run_dir)] = handle.read()
    return files


def _trained(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(str(run_dir)) if "loss" in r}


@pytest.fixture()
def four_steps(make_config, tmp_path):
    """A GRPO run of 4 steps with checkpoints at 2 and 4."""
    cfg = make_config("grpo", *FAST, "train.steps=4", "checkpoint.every=2", run_dir=str(tmp_path / "run"))
    grpo.train(cfg)
    return cfg


def test_a_new_run_in_a_used_directory_is_refused_and_touches_nothing(make_config, four_steps):
    before = _snapshot(four_steps.run_dir)
    with pytest.raises(
        ConfigError, match=f"already holds a run .*resume={four_steps.run_dir}.*another run_dir"
    ):
        grpo.train(make_config("grpo", *FAST, "train.steps=2", run_dir=four_steps.run_dir))
    assert _snapshot(four_steps.run_dir) == before


def test_resume_takes_the_saved_config_and_applies_overrides_on_top(make_config, tmp_path):
    first = make_config(
        "grpo", *FAST, "train.steps=2", "optim.lr=0.02", "loss.kl_coef=0.05", run_dir=str(tmp_path / "r")
    )
    grpo.train(first)
    cfg = make_config("grpo", f"resume={first.run_dir}", "train.steps=3", "optim.lr=0.01")
    assert cfg.run_dir == first.run_dir and cfg.train.steps == 3 and cfg.optim.lr == 0.01
    assert cfg.loss.kl_coef == 0.05 and cfg.rollout.group_size == 4  # from the saved config, not defaults
    result = grpo.train(cfg)
    assert result["step"] == 3 and sorted(_trained(first.run_dir)) == [1, 2, 3]
    with open(os.path.join(first.run_dir, "config_history", "config-000.yaml")) as handle:
        assert yaml.safe_load(handle)["train"]["steps"] == 2  # the first start's config is kept
    with open(os.path.join(first.run_dir, "config.yaml")) as handle:
        assert yaml.safe_load(handle)["train"]["steps"] == 3
    with open(os.path.join(first.run_dir, "run.json")) as handle:
        info = json.load(handle)
    assert info["recipe"] == "grpo" and [s["step"] for s in info["starts"]] == [0, 2]


def _grpo_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    """`python -m recipes.grpo <args>` in `cwd`, one thread, the repository importable."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "recipes.grpo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_resume_from_the_command_line_prints_the_overrides(tmp_path):
    """The README's `resume=<run dir>` through Hydra: the saved config, the override printed."""
    run_dir = tmp_path / "cli"
    first = _grpo_cli(
        *SMALL_MODEL, *FAST, "train.steps=1", "model.tiny.hidden_size=16", f"run_dir={run_dir}", cwd=ROOT
    )
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _grpo_cli(f"resume={run_dir}", "train.steps=2", cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "override train.steps: 1 -> 2" in resumed.stdout
    assert "hidden_size" not in resumed.stdout  # the tiny model's shape came from the saved config
    assert sorted(_trained(run_dir)) == [1, 2]
    assert not [p for p in os.listdir(tmp_path) if p != "cli"], "Hydra wrote nothing of its own"


def test_a_multirun_gives_every_job_its_own_run_dir(tmp_path):
    """`-m ... seed=1,2`: the default run_dir's timestamp is the same for the whole sweep, so each
    job trains into <run_dir>/job<N> with its own config; Hydra's sweep record goes under runs/."""
    sweep = _grpo_cli("-m", *SMALL_MODEL, *FAST, "train.steps=1", "seed=1,2", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    (stamp,) = os.listdir(tmp_path / "runs" / "grpo")
    jobs = tmp_path / "runs" / "grpo" / stamp
    assert sorted(os.listdir(jobs)) == ["job0", "job1"]
    for job, seed in (("job0", 1), ("job1", 2)):
        with open(jobs / job / "config.yaml") as handle:
            assert yaml.safe_load(handle)["seed"] == seed
        assert sorted(_trained(str(jobs / job))) == [1]
    assert sorted(os.listdir(tmp_path / "runs")) == ["grpo", "multirun"]
    assert sorted(os.listdir(tmp_path)) == ["runs"], "Hydra wrote nothing outside runs/"


@pytest.mark.parametrize(
    "recipe,overrides,message",
    [
        (
            "grpo",
            ["model.tiny.hidden_size=64"],
            "model.tiny.hidden_size was 32 in the saved run and is 64 now",
        ),
        ("grpo", ["data.eval_size=500"], "data.eval_size was 1000 in the saved run and is 500 now"),
        ("dpo", [], "does not fit this recipe|trained by recipes.grpo"),
    ],
)
def test_a_resume_that_cannot_continue_names_the_field_and_touches_nothing(
    make_config, four_steps, recipe, overrides, message
):
    before = _snapshot(four_steps.run_dir)
    with pytest.raises(ConfigError, match=message):
        cfg = make_config(recipe, f"resume={four_steps.run_dir}", *overrides)
        {"grpo": grpo, "dpo": dpo}[recipe].train(cfg)
    assert _snapshot(four_steps.run_dir) == before


def test_another_world_size_is_refused_before_anything_is_touched(make_config, four_steps):
    newest = list_checkpoints(four_steps.run_dir)[-1]
    manifest = json.loads(open(os.path.join(newest, "manifest.json")).read())
    manifest["world_size"] = 2
    with open(os.path.join(newest, "manifest.json"), "w") as handle:
        json.dump(manifest, handle)
    before = _snapshot(four_steps.run_dir)
    with pytest.raises(ConfigError, match="written by 2 processes; resume it with 2, not 1"):
        grpo.train(make_config("grpo", f"resume={four_steps.run_dir}", "train.steps=6"))
    assert _snapshot(four_steps.run_dir) == before


def test_a_corrupt_newest_checkpoint_is_skipped_and_a_named_one_is_an_error(make_config, four_steps, capsys):
    run_dir = four_steps.run_dir
    straight = _trained(run_dir)
    newest = os.path.join(run_dir, "checkpoints", "step-000004")
    state = os.path.join(newest, "state.pt")
    with open(state, "r+b") as handle:  # what a crash or a full disk leaves: a truncated file
        handle.truncate(os.path.getsize(state) // 2)
    with pytest.raises(CheckpointError, match=f"{state} is .* bytes; the manifest says"):
        grpo.train(make_config("grpo", f"resume={newest}"))
    with open(os.path.join(newest, "engine", "optimizer.pt"), "ab") as handle:
        handle.write(b"x")
    cfg = make_config("grpo", f"resume={run_dir}")
    assert f"skipping checkpoint {newest}" in capsys.readouterr().out
    result = grpo.train(cfg)
    assert result["step"] == 4
    resumed = _trained(run_dir)
    assert sorted(resumed) == [1, 2, 3, 4]  # steps 3-4 replayed from step 2, each logged once
    for step in (3, 4):
        assert resumed[step]["loss"] == straight[step]["loss"]
        assert resumed[step]["optim/grad_norm"] == straight[step]["optim/grad_norm"]


def test_an_older_checkpoint_named_explicitly_sets_later_ones_aside(make_config, four_steps):
    older = os.path.join(four_steps.run_dir, "checkpoints", "step-000002")
    grpo.train(make_config("grpo", f"resume={older}", "train.steps=3", "checkpoint.keep_last=1"))
    names = sorted(os.listdir(os.path.join(four_steps.run_dir, "checkpoints")))
    assert names == ["step-000003", "step-000004.superseded"]  # pruning kept to this run's own history
    assert sorted(_trained(four_steps.run_dir)) == [1, 2, 3]


def test_a_half_written_metrics_line_is_repaired_on_resume(make_config, tmp_path):
    cfg = make_config("grpo", *FAST, "train.steps=2", "checkpoint.every=2", run_dir=str(tmp_path / "r"))
    grpo.train(cfg)
    with open(os.path.join(cfg.run_dir, "metrics.jsonl"), "a") as handle:
        handle.write('{"step": 3, "loss": 0.')  # the disk filled up mid-write
    assert sorted(_trained(cfg.run_dir)) == [1, 2]
    assert len(load_run(cfg.run_dir).metrics) >= 2
    grpo.train(make_config("grpo", f"resume={cfg.run_dir}", "train.steps=3"))
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as handle:
        lines = handle.read().splitlines()
    assert all(json.loads(line) for line in lines)  # every line parses
    assert sorted(_trained(cfg.run_dir)) == [1, 2, 3]


def send_signal_at_step_2(prompts, completions, **_):
    """A reward that signals its own process during the second step (preemption)."""
    send_signal_at_step_2.calls += 1
    if send_signal_at_step_2.calls == 2:
        os.kill(os.getpid(), send_signal_at_step_2.signal)
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGUSR1])
def test_a_preemption_signal_saves_after_the_step_and_exits_with_code_75(
    make_config, tmp_path, signal_number
):
    reward = [
        "reward.functions=[{name: 'tests.recipes.test_run_lifecycle:send_signal_at_step_2', weight: 1.0}]"
    ]
    common = [*FAST, *reward, "reward.accuracy_reward=null", "train.steps=4", "checkpoint.every=0"]
    common.append("data.eval_split=null")  # the reward counts its calls: training's only
    send_signal_at_step_2.signal = signal_number
    send_signal_at_step_2.calls = 10  # no signal in the uninterrupted run
    straight = grpo.train(make_config("grpo", *common, run_dir=str(tmp_path / "straight")))
    send_signal_at_step_2.calls = 0
    cfg = make_config("grpo", *common, run_dir=str(tmp_path / "preempted"))
    with pytest.raises(Preempted) as stopped:
        grpo.train(cfg)
    assert stopped.value.code == PREEMPTED_EXIT_CODE and stopped.value.step == 2
    assert [os.path.basename(c) for c in list_checkpoints(cfg.run_dir)] == ["step-000002"]
    assert signal.getsignal(signal_number) is signal.SIG_DFL  # the handler is gone with the run
    send_signal_at_step_2.calls = 10
    resumed = grpo.train(make_config("grpo", f"resume={cfg.run_dir}"))
    # the GRPO loss of a first epoch is 0 (advantages sum to 0 per group): compare the gradients
    assert _trained(cfg.run_dir)[4]["optim/grad_norm"] == _trained(straight["run_dir"])[4]["optim/grad_norm"]
    assert_resume_matches(straight, resumed, 2, 4)


PPO_FAST = [
    "train.prompts_per_step=4",
    "rollout.max_new_tokens=4",
    "train.micro_batch_size=4",
    "eval.every=0",
    "critic.init=policy",
    "reward.accuracy_reward=null",
]


def test_ppo_stops_at_its_time_limit_with_a_checkpoint(make_config):
    cfg = make_config(
        "ppo",
        *PPO_FAST,
        "reward.functions=[{name: 'tests.recipes.test_grpo_smoke:digit_sum', weight: 1.0}]",
        "train.steps=50",
        "train.time_limit_s=0.001",
        "checkpoint.every=0",
    )
    result = ppo.train(cfg)
    assert result["step"] == 1 and result["checkpoint"].endswith("step-000001")


def no_score(prompts, completions, **_):
    return [None] * len(completions)


def test_ppo_does_not_train_on_rows_no_reward_could_score(make_config):
    """Every row unscored: no token is trained (the KL penalty alone would move the policy)."""
    cfg = make_config(
        "ppo",
        *PPO_FAST,
        "reward.functions=[{name: 'tests.recipes.test_run_lifecycle:no_score', weight: 1.0}]",
        "train.steps=2",
        "optim.lr=0.05",
    )
    initial = load_causal_lm(cfg.model, load_tokenizer(cfg.model), seed=cfg.seed).state_dict()
    result = ppo.train(cfg)
    assert result["reward/unscored_fraction"] == 1.0
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(os.path.join(result["checkpoint"], "hf")).state_dict()
    assert all(torch.equal(trained[name], initial[name]) for name in trained)


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "advantage.estimator=grpoo",
            # the known estimators listed (the list grows with the registry)
            r"advantage.estimator='grpoo' is not one of \[.*'group_relative'.*'rloo'\]",
        ),
        ("loss.aggregation=mean", "loss.aggregation='mean' is not one of"),
        ("loss.kl_estimator=k4", "loss.kl_estimator='k4' is not one of"),
        ("rollout.max_new_tokens=0", r"rollout.max_new_tokens=0 is out of range: it must be in \[1, inf\]"),
        ("rollout.top_p=1.5", "rollout.top_p=1.5 is out of range"),
        ("optim.scheduler=cosinus", "optim.scheduler='cosinus' is not one of"),
        ("logger.wandb_mode=live", "logger.wandb_mode='live' is not one of"),
        ("distributed.zero_stage=5", "distributed.zero_stage=5 is not one of"),
    ],
)
def test_bad_modes_and_numbers_fail_when_the_config_is_composed(make_config, override, message):
    with pytest.raises(ConfigError, match=message):
        make_config("grpo", override)


@pytest.mark.parametrize(
    "recipe,override,message",
    [
        ("ppo", "advantage.macro.segmenter=words", "advantage.macro.segmenter='words' is not one of"),
        ("ppo", "loss.kl_controller=pid", "loss.kl_controller='pid' is not one of"),
        ("ppo", "critic.init=random", "critic.init='random' is not one of"),
        ("dpo", "loss.type=dpo", "loss.type='dpo' is not one of"),
        ("dpo", "token_weights.method=tdpo", "token_weights.method='tdpo' is not one of"),
    ],
)
def test_recipe_mode_strings_fail_when_composed(make_config, recipe, override, message):
    with pytest.raises(ConfigError, match=message):
        make_config(recipe, override)


def test_a_missing_local_model_path_says_so(make_config):
    cfg = make_config(
        "grpo", "model=pretrained", "model.name_or_path=runs/sft/nothing/checkpoints/step-000001/hf"
    )
    with pytest.raises(ConfigError, match="model.name_or_path='runs/sft/nothing/.*': no such directory"):
        grpo.train(cfg)
    assert not os.path.exists(cfg.run_dir)


def test_training_state_fields_survive_a_round_trip(make_config, four_steps):
    """The config written to the run directory composes back into the same dataclass."""
    cfg = make_config("grpo", f"resume={four_steps.run_dir}")
    assert dataclasses.replace(cfg, resume=None) == dataclasses.replace(four_steps, resume=None)


def test_a_model_path_with_the_tiny_model_selected_is_an_error(make_config):
    """`model.name_or_path=<dir>` without `model=pretrained` used to train the toy model instead."""
    with pytest.raises(ConfigError, match="model.source=tiny .*: add model=pretrained"):
        make_config("grpo", "model.name_or_path=runs/sft/x/hf")
    assert (
        make_config("grpo", "model=pretrained", "model.name_or_path=runs/sft/x/hf").model.source
        == "pretrained"
    )


def test_two_runs_started_at_once_in_one_directory_the_second_is_refused(tmp_path):
    """Both pass the empty-directory check (the run files come later, after the model loads): the
    exclusive lock file decides, and the loser stops with a message before training anything."""
    run_dir = tmp_path / "race"
    args = [*SMALL_MODEL, *FAST, "train.steps=3", f"run_dir={run_dir}"]
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", WANDB_SILENT="true")
    started = [
        subprocess.Popen(
            [sys.executable, "-m", "recipes.grpo", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outcomes = [process.communicate(timeout=300) + (process.returncode,) for process in started]
    codes = sorted(code for _, _, code in outcomes)
    assert codes[0] == 0 and codes[1] != 0, [err[-1500:] for _, err, _ in outcomes]
    (refused,) = [err for _, err, code in outcomes if code != 0]
    # usually both pass the directory check and the lock refuses; a start that comes late enough
    # finds the run files already there
    assert f"run_dir='{run_dir}' is in use" in refused or "already holds a run" in refused, refused[-1500:]
    assert sorted(_trained(run_dir)) == [1, 2, 3]  # one run's steps, once each
    assert not (run_dir / ".lock").exists()  # released when the run ended


def test_a_lock_left_by_a_killed_run_is_taken_over(make_config, tmp_path):
    run_dir = tmp_path / "stale"
    run_dir.mkdir()
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    import socket

    (run_dir / ".lock").write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()}))
    result = grpo.train(make_config("grpo", *FAST, "train.steps=1", run_dir=str(run_dir)))
    assert result["step"] == 1 and not (run_dir / ".lock").exists()

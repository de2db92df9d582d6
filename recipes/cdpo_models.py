"""cDPO's contrastive-estimation models: self-sampled data, a positive and a negative LoRA model,
and the pairs that the DPO recipe then trains on with critical-token weights.

Following the authors' code (Lin et al., "Critical Tokens Matter", arXiv 2411.19943):
1. Sample `samples` completions per training prompt from the policy and verify each with a 0/1
   reward function (`exact_match` by default); the temperature sets how many come out wrong.
2. LoRA-fine-tune a positive model on the correct samples and a negative model on the incorrect ones,
   both from the policy: rank 8 on the MLP projections (gate/up/down), lr 3e-4, one epoch. The
   merged models are exported.
3. Pairs: one correct (chosen) and one incorrect (rejected) sample per prompt that has both.
4. `python -m recipes.dpo +experiment=dpo_cdpo ...` (printed at the end, or run with `run_dpo=true`)
   scores every rejected token with s_t = softmax(2 z_pos - z_neg)[y_t] in its precompute pass and
   trains DPO with weights 1 - s_t on rejected tokens. Weights are computed from the same token ids the
   loss uses, so the alignment problem of the authors' separately tokenised weight lists cannot occur.

Launch:  python -m recipes.cdpo_models policy=<sft export> [out=runs/cdpo] [samples=16] [temperature=1.0]
             [prompts=2000] [reward=exact_match] [run_dpo=true] [sft.<override>...] [dpo.<override>...]
"""

from __future__ import annotations

import json
import os
import random
import sys

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from recipes import dpo, sft
from rewards import REWARD_FUNCTIONS
from rlhf.checkpoint import export_dir
from rlhf.config import DataConfig, ModelConfig, register_configs
from rlhf.data.chat import prepare_prompts
from rlhf.data.load import load_task_data
from rlhf.models.load import load_causal_lm, load_tokenizer
from rlhf.rollout.engine import closing_engine, engine_for_model, generate_rollouts
from rlhf.rollout.sampling import SamplingParams, prompt_inputs
from rlhf.scoring import resolve_reward

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
LORA = [
    "model.lora.enabled=true",
    "model.lora.r=8",
    "model.lora.alpha=16",
    "model.lora.target_modules=[gate_proj,up_proj,down_proj]",
    "optim.lr=3e-4",
    "optim.warmup_steps=0",
]


@torch.no_grad()
def sample_and_verify(
    policy_dir: str,
    data_cfg: DataConfig,
    *,
    num_prompts: int,
    samples: int,
    temperature: float,
    reward: str,
    max_new_tokens: int,
    seed: int,
    engine: str = "hf",
) -> list[dict]:
    """`samples` completions for each of `num_prompts` training prompts, each with its 0/1 verdict;
    sampled by the rollout engine named `engine` (hf: transformers generate, vllm)."""
    model_cfg = ModelConfig(source="pretrained", name_or_path=policy_dir)
    tokenizer = load_tokenizer(model_cfg)
    model = load_causal_lm(model_cfg, tokenizer).eval()
    verify = resolve_reward(reward, REWARD_FUNCTIONS)
    train_rows, _ = load_task_data(data_cfg)
    rows = train_rows.shuffle(seed=seed).select(range(min(num_prompts, len(train_rows))))
    rows = prepare_prompts(rows, tokenizer, data_cfg, "cDPO sampling prompts", response_budget=max_new_tokens)
    torch.manual_seed(seed)
    out = []
    sampler = engine_for_model(engine, model, tokenizer, max_new_tokens, seed)
    with closing_engine(sampler), sampler.ready(0):
        for start in range(0, len(rows), 100):
            batch = generate_rollouts(
                sampler,
                **prompt_inputs(rows[start : start + 100], data_cfg.prompt_column),
                group_size=samples,
                sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature),
                seed=seed * 1_000_003 + start,
            )
            scores = verify(batch.prompts, batch.reward_completions(), **batch.columns)
            for index, (prompt, completion, score) in enumerate(
                zip(batch.prompts, batch.completions, scores)
            ):
                extra = {k: v[index] for k, v in batch.columns.items()}
                out.append({"prompt": prompt, "completion": completion, "correct": score == 1.0, **extra})
    return out


def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def build_pairs(samples: list[dict], seed: int) -> list[dict]:
    """One (correct, incorrect) pair per prompt that has both; the answer column is kept."""
    rng = random.Random(seed)
    by_prompt: dict[str, dict[str, list[dict]]] = {}
    for row in samples:  # keyed by the prompt's JSON: a conversational prompt is a list of messages
        by_prompt.setdefault(json.dumps(row["prompt"]), {"good": [], "bad": []})[
            "good" if row["correct"] else "bad"
        ].append(row)
    pairs = []
    for split in by_prompt.values():
        if split["good"] and split["bad"]:
            good, bad = rng.choice(split["good"]), rng.choice(split["bad"])
            extra = {k: v for k, v in good.items() if k not in ("prompt", "completion", "correct")}
            pairs.append(
                {
                    "prompt": good["prompt"],
                    "chosen": good["completion"],
                    "rejected": bad["completion"],
                    **extra,
                }
            )
    return pairs


def build_cdpo_models(
    policy_dir: str,
    out_dir: str,
    *,
    samples: int = 16,
    temperature: float = 1.0,
    num_prompts: int = 2000,
    reward: str = "exact_match",
    max_new_tokens: int = 5,
    batch_size: int = 64,
    seed: int = 0,
    sft_overrides: tuple[str, ...] = (),
    engine: str = "hf",
    task_overrides: tuple[str, ...] = (),
) -> dict[str, str | int]:
    """Sample, verify, train the positive and negative LoRA models; returns their export paths,
    the pairs directory and the counts. `task_overrides` (e.g. `data=sort`) choose the task sampled
    from; `sft_overrides` also reach the two LoRA trainings."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        data_cfg = OmegaConf.to_object(compose("sft", overrides=[*task_overrides, *sft_overrides])).data
        rows = sample_and_verify(
            policy_dir,
            data_cfg,
            num_prompts=num_prompts,
            samples=samples,
            temperature=temperature,
            reward=reward,
            max_new_tokens=max_new_tokens,
            seed=seed,
            engine=engine,
        )
        correct = [{"prompt": r["prompt"], "answer": r["completion"]} for r in rows if r["correct"]]
        incorrect = [{"prompt": r["prompt"], "answer": r["completion"]} for r in rows if not r["correct"]]
        print(f"[cdpo] {len(rows)} samples: {len(correct)} correct, {len(incorrect)} incorrect", flush=True)
        if not correct or not incorrect:
            raise ValueError(
                f"cDPO needs both correct and incorrect samples, got {len(correct)} and {len(incorrect)}: "
                "change temperature or samples"
            )
        pairs = build_pairs(rows, seed)
        held_out = max(1, len(pairs) // 10)
        write_jsonl(os.path.join(out_dir, "pairs", "eval.jsonl"), pairs[:held_out])
        write_jsonl(os.path.join(out_dir, "pairs", "train.jsonl"), pairs[held_out:])
        exports = {}
        for name, data in (("positive", correct), ("negative", incorrect)):
            write_jsonl(os.path.join(out_dir, f"{name}_data", "train.jsonl"), data)
            steps = max(1, -(-len(data) // batch_size))  # one epoch
            cfg = OmegaConf.to_object(
                compose(
                    "sft",
                    overrides=[
                        "model=pretrained",
                        f"model.name_or_path={policy_dir}",
                        "data=jsonl",
                        f"data.source={out_dir}/{name}_data",
                        "data.completion_column=answer",
                        # the tiny model's SFT settings (the sft.yaml defaults are TRL's, for real models)
                        "optim.lr=3e-3",
                        "optim.weight_decay=0.1",
                        "optim.warmup_steps=100",
                        "data.eval_split=null",
                        f"train.steps={steps}",
                        f"train.batch_size={batch_size}",
                        f"train.micro_batch_size={batch_size}",
                        "train.stop_at_accuracy=null",
                        "checkpoint.every=0",
                        f"run_dir={out_dir}/{name}",
                        f"seed={seed}",
                        *LORA,
                        *sft_overrides,
                    ],
                )
            )
            print(
                f"[cdpo] {name} LoRA model on {len(data)} samples, {steps} steps -> {out_dir}/{name}",
                flush=True,
            )
            exports[name] = export_dir(sft.train(cfg)["checkpoint"])
    return {
        "positive_model": exports["positive"],
        "negative_model": exports["negative"],
        "pairs": os.path.join(out_dir, "pairs"),
        "num_pairs": len(pairs),
        "num_correct": len(correct),
        "num_incorrect": len(incorrect),
    }


def dpo_overrides(policy_dir: str, built: dict) -> list[str]:
    """The DPO recipe's overrides for cDPO on what `build_cdpo_models` produced."""
    return [
        "+experiment=dpo_cdpo",
        "model=pretrained",
        f"model.name_or_path={policy_dir}",
        f"data.source={built['pairs']}",
        "data.completion_column=null",
        f"token_weights.positive_model={built['positive_model']}",
        f"token_weights.negative_model={built['negative_model']}",
    ]


def main(args: list[str]) -> None:
    options = {
        "out": "runs/cdpo",
        "samples": "16",
        "temperature": "1.0",
        "prompts": "2000",
        "reward": "exact_match",
    }
    options.update(run_dpo="false", seed="0", engine="hf")
    passed = [a for a in args if "=" in a and not a.startswith(("sft.", "dpo."))]
    for arg in passed:
        key, value = arg.split("=", 1)
        if key not in {*options, "policy"}:
            raise SystemExit(f"unknown option {key!r}; options: policy, {', '.join(options)}, sft.*, dpo.*")
        options[key] = value
    if "policy" not in options:
        raise SystemExit("policy=<an SFT export directory> is required")
    built = build_cdpo_models(
        options["policy"],
        options["out"],
        samples=int(options["samples"]),
        temperature=float(options["temperature"]),
        num_prompts=int(options["prompts"]),
        reward=options["reward"],
        seed=int(options["seed"]),
        sft_overrides=tuple(a[4:] for a in args if a.startswith("sft.")),
        engine=options["engine"],
    )
    overrides = [*dpo_overrides(options["policy"], built), *[a[4:] for a in args if a.startswith("dpo.")]]
    print(
        "[cdpo] models and pairs ready; train with:\n  python -m recipes.dpo " + " ".join(overrides),
        flush=True,
    )
    if options["run_dpo"] == "true":
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            cfg = OmegaConf.to_object(compose("dpo", overrides=[*overrides, f"run_dir={options['out']}/dpo"]))
        dpo.train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])

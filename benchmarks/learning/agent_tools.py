"""Tool use learned by GRPO: 3-digit multiplication with a `multiply` tool the tiny model cannot replace.

The task: "What is 347 * 812?", answered with the exact product. A 1.5M-parameter model (2 layers,
hidden 256) cannot multiply 3-digit numbers, so the answer is reachable only through the tool; what
it can learn is to copy the factors into the call and the tool's result into the answer (digit by
digit: the tokenizer does not merge digits). The warm start is SFT on traces (`messages` and a
`tools` column, every assistant turn trained) in two phases: first on traces that all call the tool
(using it: the copying), then on a mix in which only a fraction (`--tool-fraction`, 0.2) call it and
the rest answer directly with the right product, which the model can imitate in form but not in
value. The start knows how to use the tool but seldom does; GRPO with `rollout.tools` has to learn
*when* to call it from the reward alone. Arms, each from the same SFT checkpoint of the seed:

- `tools`: GRPO with the tool (episodes of up to 3 turns).
- `no_tools`: the same GRPO without it (single-turn; the control that the tool is what is learned).
- `trl` (with --trl): TRL's GRPOTrainer with `tools=[multiply]` on the same model, data and batch
  shape, for the step-time ratio and the accuracy at equal steps.

Held-out accuracy is greedy exact match on 200 problems disjoint from training, played as episodes
with the arm's tools (our evaluation for every arm, TRL's included).

Usage: python benchmarks/learning/agent_tools.py [--seeds 1 2 3] [--trl] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.common import append_results, compose_config  # noqa: E402

TOOL = "benchmarks.learning.agent_tools:multiply"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


def question(a: int, b: int) -> str:
    return f"What is {a} * {b}?"


def trace(a: int, b: int, use_tool: bool) -> list[dict]:
    """One SFT conversation: a tool call, its result and the answer; or the answer alone."""
    user = {"role": "user", "content": question(a, b)}
    answer = {"role": "assistant", "content": str(a * b)}
    if not use_tool:
        return [user, answer]
    call = {"type": "function", "function": {"name": "multiply", "arguments": {"a": a, "b": b}}}
    return [
        user,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "multiply", "content": str(a * b)},
        answer,
    ]


def build_task(directory: str, tool_fraction: float, num_train: int = 2500, num_heldout: int = 200) -> dict:
    """Write the tokenizer, the SFT traces and the prompt splits under `directory`; returns their paths.

    The byte-level BPE tokenizer is trained on rendered traces (Qwen2.5's chat template, TRL's copy,
    which TRL and transformers know how to parse tool calls from), so a whole episode is ~290 tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import get_json_schema
    from trl.chat_template_utils import qwen2_5_chat_template

    rng = random.Random(0)
    pairs = sorted(
        {(rng.randint(100, 999), rng.randint(100, 999)) for _ in range(2 * (num_train + num_heldout))}
    )
    rng.shuffle(pairs)
    train, heldout = pairs[:num_train], pairs[num_train : num_train + num_heldout]
    schema = get_json_schema(multiply)

    def tokenizer_from(texts: list[str]) -> PreTrainedTokenizerFast:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=1200,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        bpe.train_from_iterator(texts, trainer)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            additional_special_tokens=["<|im_start|>"],
        )
        tokenizer.chat_template = qwen2_5_chat_template
        return tokenizer

    # A first tokenizer only renders the corpus the real one is trained on.
    bootstrap = tokenizer_from(
        [qwen2_5_chat_template, *(json.dumps(trace(a, b, True)) for a, b in train[:300])]
    )
    rendered = [
        bootstrap.apply_chat_template(trace(a, b, use_tool), tools=[schema], tokenize=False)
        for i, (a, b) in enumerate(train[:400])
        for use_tool in (True, i % 2 == 0)
    ]
    tokenizer = tokenizer_from(rendered * 3)
    paths = {name: os.path.join(directory, name) for name in ("tokenizer", "tool_use", "sft", "prompts")}
    tokenizer.save_pretrained(paths["tokenizer"])
    for name in ("tool_use", "sft", "prompts"):
        os.makedirs(paths[name], exist_ok=True)
    # every trace calls the tool (the first SFT phase: using it), then the mix (the second: the habit)
    for name, fraction in (("tool_use", 1.0), ("sft", tool_fraction)):
        with open(os.path.join(paths[name], "train.jsonl"), "w") as handle:
            for a, b in train:
                row = {"messages": trace(a, b, rng.random() < fraction), "tools": json.dumps([schema])}
                handle.write(json.dumps(row) + "\n")
    for split, rows in (("train", train), ("eval", heldout)):
        with open(os.path.join(paths["prompts"], f"{split}.jsonl"), "w") as handle:
            for a, b in rows:
                row = {"prompt": [{"role": "user", "content": question(a, b)}], "answer": str(a * b)}
                handle.write(json.dumps(row) + "\n")
    return paths


def initial_model(tokenizer_dir: str, directory: str, seed: int, layers: int, hidden: int) -> str:
    """A freshly initialised Qwen2 (heads of 32 dimensions, GQA 2:1, MLP 2x) with the task's
    tokenizer, saved."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


REWARDS = "reward.functions=[{name: exact_match, weight: 1.0}, {name: digit_match, weight: 1.0}]"


def run_sft(model_dir: str, data_dir: str, run_dir: str, seed: int, steps: int, lr: float) -> str:
    """SFT on the traces (cosine schedule after 50 warm-up steps); returns the exported checkpoint's
    directory."""
    from recipes import sft
    from rlhf.checkpoint import export_dir

    cfg = compose_config(
        "sft",
        [
            "model=pretrained",
            f"model.name_or_path={model_dir}",
            "data=jsonl",
            f"data.source={data_dir}",
            "train.assistant_only_loss=true",
            f"train.steps={steps}",
            "train.batch_size=16",
            "train.micro_batch_size=16",
            f"optim.lr={lr}",
            "optim.scheduler=cosine",
            "optim.warmup_steps=50",
            f"seed={seed}",
            f"run_dir={run_dir}",
            "logger=quiet",
        ],
    )
    return export_dir(sft.train(cfg)["checkpoint"])


def grpo_overrides(model_dir: str, prompts_dir: str, steps: int, lr: float) -> list[str]:
    """The batch shape and sampling every GRPO arm shares (ours and TRL's)."""
    return [
        "model=pretrained",
        f"model.name_or_path={model_dir}",
        "data=jsonl",
        f"data.source={prompts_dir}",
        "rollout.max_new_tokens=160",
        "rollout.group_size=8",
        "train.prompts_per_step=8",
        f"train.steps={steps}",
        f"optim.lr={lr}",
        REWARDS,
        "eval.num_samples=200",
        f"eval.every={max(1, steps // 3)}",
        "logger=quiet",
    ]


def agent_overrides(tools: bool) -> list[str]:
    """Episodes of up to 3 turns (two tool calls and an answer) within 160 generated and tool tokens."""
    return (
        [f"rollout.tools=[{TOOL}]", "rollout.max_turns=3", "rollout.max_episode_tokens=160"] if tools else []
    )


def run_grpo(
    model_dir: str, prompts_dir: str, run_dir: str, seed: int, steps: int, lr: float, tools: bool
) -> dict:
    """Our GRPO from `model_dir`; returns held-out accuracy before and after, the median step time
    and the tool calls per episode over the first and last 10 steps."""
    from recipes import grpo
    from rlhf.loggers import read_metrics

    cfg = compose_config(
        "grpo",
        [
            *grpo_overrides(model_dir, prompts_dir, steps, lr),
            *agent_overrides(tools),
            f"seed={seed}",
            f"run_dir={run_dir}",
        ],
    )
    result = grpo.train(cfg)
    rows = read_metrics(run_dir)
    steps = [r for r in rows if "time/step" in r]
    calls = [r.get("episodes/tool_calls_mean", 0.0) for r in steps]
    return {
        "before": result["eval/accuracy_before"],
        "after": result["eval/accuracy"],
        "step_s": statistics.median(r["time/step"] for r in steps),
        "tool_calls_first10": statistics.mean(calls[:10]),
        "tool_calls_last10": statistics.mean(calls[-10:]),
        "train_accuracy": [r["accuracy"] for r in steps],
        "heldout": [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r and r["step"] > 0],
    }


def heldout_accuracy(model_dir: str, prompts_dir: str, tools: bool) -> float:
    """Greedy exact match of `model_dir` on the held-out split, built as the GRPO recipe builds its
    held-out evaluation (same prompts, agent, budgets and rewards), for a model trained elsewhere."""
    from transformers import AutoModelForCausalLM

    from rlhf.agents.agent import build_agent
    from rlhf.data.load import load_task_data
    from rlhf.eval.accuracy import greedy_evaluation
    from rlhf.rollout.hf import TransformersEngine
    from rlhf.rollout.prompts import rl_prompts
    from rlhf.scoring import build_rewards, score_rollout

    cfg = compose_config("grpo", [*grpo_overrides(model_dir, prompts_dir, 1, 1e-4), *agent_overrides(tools)])
    train_rows, eval_rows = load_task_data(cfg.data)
    rewards = build_rewards(cfg.reward, cfg.data, {"train": train_rows, "eval": eval_rows})
    tokenizer, train_rows, eval_rows = rl_prompts(cfg, train_rows, eval_rows)
    agent = build_agent(cfg, tokenizer, train_rows, rewards)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    results = greedy_evaluation(
        TransformersEngine.for_model(model, tokenizer),
        eval_rows,
        lambda batch: score_rollout(rewards, batch, cfg.reward)[:3],
        accuracy_reward=cfg.reward.accuracy_reward,
        max_new_tokens=cfg.eval.max_new_tokens,
        agent=agent,
    )
    return results["eval/accuracy"]


def run_trl(model_dir: str, prompts_dir: str, output_dir: str, seed: int, steps: int, lr: float) -> dict:
    """TRL's GRPOTrainer with `tools=[multiply]` from `model_dir`, matched to our arm: 8 prompts x 8
    completions per step, one update per batch, loss averaged per sequence then over sequences
    (`loss_type="grpo"`, our `sequence_mean_token_mean`), rewards scaled by the group's std, no KL,
    constant lr, gradient norm clipped at 1, two tool rounds at most, 160 tokens per episode (a turn
    may take all that is left of them, in both)."""
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.common import step_timer
    from rewards import digit_match, exact_match

    dataset = load_dataset("json", data_files=os.path.join(prompts_dir, "train.jsonl"))["train"]
    args = GRPOConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=64,
        num_generations=8,
        gradient_accumulation_steps=1,
        max_completion_length=160,
        max_tool_calling_iterations=2,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        loss_type="grpo",
        scale_rewards="group",
        temperature=1.0,
        seed=seed,
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
    )
    times: list[float] = []
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=[exact_match, digit_match],
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        tools=[multiply],
        callbacks=[step_timer(times)],
    )
    trainer.train()
    trainer.save_model(os.path.join(output_dir, "final"))
    logged = [r for r in trainer.state.log_history if "rewards/exact_match/mean" in r]
    calls = [r.get("tools/call_frequency", 0.0) for r in logged]
    after = heldout_accuracy(os.path.join(output_dir, "final"), prompts_dir, True)
    return {
        "after": after,
        "step_s": statistics.median(times),
        "tool_calls_first10": statistics.mean(calls[:10]),
        "tool_calls_last10": statistics.mean(calls[-10:]),
        "train_accuracy": [r["rewards/exact_match/mean"] for r in logged],
        "heldout": [(steps, after)],
    }


ARM_LABELS = {"tools": "GRPO with the tool", "no_tools": "GRPO without it", "trl": "TRL GRPOTrainer(tools=)"}


def plot_curves(results: dict[int, dict], arms: list[str], path: str) -> None:
    """Training exact match (10-step mean) and held-out accuracy per arm, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.common import moving_average, save_figure

    colors = dict(zip(arms, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for index, (_seed, result) in enumerate(sorted(results.items())):
        for arm in arms:
            label = ARM_LABELS[arm] if index == 0 else None
            curve = moving_average(result[arm]["train_accuracy"], 10)
            left.plot(
                range(1, len(curve) + 1), [100 * v for v in curve], color=colors[arm], lw=1, label=label
            )
            points = [(0, result[arm]["before"])] + result[arm]["heldout"]
            right.plot(
                *zip(*[(s, 100 * a) for s, a in points]),
                color=colors[arm],
                marker="o",
                ms=3,
                lw=1,
                label=label,
            )
    left.set(title="training exact match (%, 10-step mean), one line per seed", xlabel="GRPO step")
    right.set(title="held-out exact match (%), greedy episodes, 200 problems", xlabel="GRPO step")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle("3-digit multiplication with a multiply tool, from an SFT start that calls it half the time")
    fig.tight_layout()
    save_figure(fig, path)


def summary_table(results: dict[int, dict], arms: list[str]) -> str:
    """Per seed: held-out accuracy after SFT and after each arm, tool calls per episode, step times."""
    header = ["seed", "after SFT, with the tool"]
    header += ["after SFT, without it"] if "no_tools" in arms else []
    header += [f"{ARM_LABELS[a]}" for a in arms]
    header += [f"tool calls/episode, {a} (first 10 -> last 10 steps)" for a in arms if a != "no_tools"]
    header += [f"step s, {a}" for a in arms]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for seed, r in sorted(results.items()):
        cells = [str(seed), f"{100 * r['sft']:.1f}%"]
        cells += [f"{100 * r['no_tools']['before']:.1f}%"] if "no_tools" in arms else []
        cells += [f"{100 * r[a]['after']:.1f}%" for a in arms]
        cells += [
            f"{r[a]['tool_calls_first10']:.2f} -> {r[a]['tool_calls_last10']:.2f}"
            for a in arms
            if a != "no_tools"
        ]
        cells += [f"{r[a]['step_s']:.2f}" for a in arms]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for arm in arms:
        gains = [100 * (r[arm]["after"] - r[arm]["before"]) for r in results.values()]
        spread = (
            f", sd {statistics.stdev(gains):.1f}, per seed {', '.join(f'{g:+.1f}' for g in gains)}"
            if len(gains) > 1
            else ""
        )
        lines.append(f"- {ARM_LABELS[arm]}: held-out gain {statistics.mean(gains):+.1f} points{spread}.")
    if "trl" in arms and "tools" in arms:
        ratios = [r["trl"]["step_s"] / r["tools"]["step_s"] for r in results.values()]
        lines.append(
            f"- Step time, TRL / ours (median step of each run): {statistics.median(ratios):.2f}x "
            f"({', '.join(f'{x:.2f}' for x in ratios)})."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--tool-fraction",
        type=float,
        default=0.2,
        help="share of the second SFT phase's traces that call the tool",
    )
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny Qwen2")
    parser.add_argument("--hidden", type=int, default=256, help="its hidden size")
    parser.add_argument("--traces", type=int, default=20000, help="SFT traces (and training prompts)")
    parser.add_argument(
        "--tool-use-steps", type=int, default=600, help="SFT on traces that all call the tool"
    )
    parser.add_argument("--sft-steps", type=int, default=300, help="then SFT on the mix (--tool-fraction)")
    parser.add_argument("--sft-lr", type=float, default=1e-3)
    parser.add_argument("--grpo-steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=5e-4, help="GRPO learning rate (every arm)")
    parser.add_argument("--arms", nargs="+", default=["tools", "no_tools"], choices=["tools", "no_tools"])
    parser.add_argument("--trl", action="store_true", help="add TRL's GRPOTrainer(tools=) as an arm")
    parser.add_argument("--dir", default=None, help="work directory (default: a fresh temporary one)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = args.dir or tempfile.mkdtemp(prefix="agent_tools_")
    task = build_task(os.path.join(root, "task"), args.tool_fraction, num_train=args.traces)
    results: dict[int, dict] = {}
    for seed in args.seeds:
        seed_dir = os.path.join(root, f"seed{seed}")
        started = time.perf_counter()
        model = initial_model(
            task["tokenizer"], os.path.join(seed_dir, "init"), seed, args.layers, args.hidden
        )
        tool_user = run_sft(
            model,
            task["tool_use"],
            os.path.join(seed_dir, "tool_use"),
            seed,
            args.tool_use_steps,
            args.sft_lr,
        )
        start = run_sft(
            tool_user, task["sft"], os.path.join(seed_dir, "sft"), seed, args.sft_steps, args.sft_lr
        )
        # The SFT start's held-out accuracy with the tool, as the recipe evaluates it (a cross-check
        # of this file's evaluation against the recipe's: the `tools` arm's `before` must equal it).
        results[seed] = {
            "sft_s": time.perf_counter() - started,
            "sft": heldout_accuracy(start, task["prompts"], True),
        }
        for arm in args.arms:
            run_dir = os.path.join(seed_dir, arm)
            results[seed][arm] = run_grpo(
                start, task["prompts"], run_dir, seed, args.grpo_steps, args.lr, tools=arm == "tools"
            )
            print(f"[agent_tools] seed {seed} {arm}: {results[seed][arm]}", flush=True)
        if args.trl:
            trl_dir = os.path.join(seed_dir, "trl")
            results[seed]["trl"] = run_trl(start, task["prompts"], trl_dir, seed, args.grpo_steps, args.lr)
            results[seed]["trl"]["before"] = results[seed]["sft"]
            print(f"[agent_tools] seed {seed} trl: {results[seed]['trl']}", flush=True)
    arms = [*args.arms, *(["trl"] if args.trl else [])]
    with open(os.path.join(root, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    plot = os.path.join(ROOT, "benchmarks", "plots", "agent_tools.png")
    plot_curves(results, arms, plot)
    table = summary_table(results, arms)
    print(table)
    print(f"curves: {plot}; runs and results.json: {root}")
    if not args.no_record:
        command = " ".join(["python benchmarks/learning/agent_tools.py", *sys.argv[1:]])
        append_results(
            "Agents: GRPO learns to call a tool (3-digit multiplication)",
            command,
            setup_description(args) + "\n\n" + table,
        )


def setup_description(args: argparse.Namespace) -> str:
    return (
        f"Tiny Qwen2 ({args.layers} layers, hidden {args.hidden}) with a 1200-token BPE tokenizer; SFT (lr "
        f"{args.sft_lr}, cosine, every assistant turn trained) {args.tool_use_steps} steps on {args.traces} traces "
        f"that all call `multiply`, then {args.sft_steps} steps on traces of which {100 * args.tool_fraction:.0f}% "
        f"call it; then {args.grpo_steps} GRPO steps per arm (8 prompts x 8 episodes, lr {args.lr}, exact match + "
        "digit match rewards, no KL), episodes of up to 3 turns within 160 tokens; held-out: greedy episodes on "
        "200 problems disjoint from training, evaluated by the same code for every arm. Curves: "
        "benchmarks/plots/agent_tools.png."
    )


if __name__ == "__main__":
    main()

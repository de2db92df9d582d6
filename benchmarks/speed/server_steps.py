"""GRPO step time with generation in the training process against generation on a vLLM server,
in turn (rollout.max_staleness=0) and ahead of the trainer (rollout.max_staleness=1).

Arms, the same run otherwise (tiny Llama with head_dim 32, reversed-addition prompts, 8 prompts x
8 samples, `--new-tokens` per sample):
- `colocated`: rollout.engine=vllm, the engine inside the training process.
- `server`: rollout.engine=vllm_server, one launched server, generate then train.
- `server_ahead`: the same server, the next step's rollout generated while this one trains.

Reported per arm: the median step time over the steps after the first two, the share of the step
the trainer waited for its rollout, and the weight-sync time. On one machine the server and the
trainer share the CPU cores, so overlap gains here are a floor of what separate devices give.

Usage: python benchmarks/speed/server_steps.py [--steps 12] [--new-tokens 32] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.common import append_results, compose_config  # noqa: E402

ARMS = {
    "colocated": ["rollout.engine=vllm"],
    "server": ["rollout.engine=vllm_server"],
    "server_ahead": ["rollout.engine=vllm_server", "rollout.max_staleness=1"],
}


def run_arm(name: str, steps: int, new_tokens: int, directory: str) -> dict[str, float]:
    from recipes import grpo
    from rlhf.loggers import read_metrics

    overrides = [
        "model.tiny.hidden_size=128",
        "model.tiny.num_layers=4",
        "model.tiny.num_heads=4",
        "model.tiny.intermediate_size=512",
        "train.prompts_per_step=8",
        "rollout.group_size=8",
        f"rollout.max_new_tokens={new_tokens}",
        "rollout.vllm.max_model_len=256",
        f"train.steps={steps}",
        "eval.every=0",
        "checkpoint.every=0",
        "checkpoint.save_final=false",
        "reward.functions=[{name: digit_match, weight: 1.0}]",
        "reward.accuracy_reward=null",
        "optim.lr=1e-3",
        "logger=quiet",
        f"run_dir={os.path.join(directory, name)}",
        *ARMS[name],
    ]
    result = grpo.train(compose_config("grpo", overrides))
    rows = [r for r in read_metrics(result["run_dir"]) if "time/step" in r][2:]
    step = statistics.median(r["time/step"] for r in rows)
    waited = [r.get("async/trainer_wait_s", r["time/generate"]) / r["time/step"] for r in rows]
    return {
        "step_s": step,
        "wait_share": statistics.mean(waited),
        "sync_s": statistics.median(r.get("time/weight_sync", 0.0) for r in rows),
        "staleness": statistics.mean(r.get("async/staleness_mean", 0.0) for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="server_steps_")
    results = {name: run_arm(name, args.steps, args.new_tokens, directory) for name in args.arms}
    base = results.get("colocated", next(iter(results.values())))["step_s"]
    lines = [
        "| arm | median step (s) | vs colocated | trainer waiting for its rollout | weight sync (s) | mean staleness |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['step_s']:.3f} | {base / r['step_s']:.2f}x | {100 * r['wait_share']:.0f}% "
            f"| {r['sync_s']:.3f} | {r['staleness']:.2f} |"
        )
    body = (
        f"GRPO, tiny Llama (4 layers, hidden 128), 8 prompts x 8 samples, {args.new_tokens} new tokens, "
        f"{args.steps} steps (median over steps 3+); one launched server on the same 2 CPU cores.\n\n"
        + "\n".join(lines)
    )
    print(body)
    if not args.no_record:
        command = " ".join(["python benchmarks/speed/server_steps.py", *sys.argv[1:]])
        append_results("vLLM server: GRPO step time, in turn and ahead of the trainer", command, body)


if __name__ == "__main__":
    main()

"""Why CD-RLHF's curiosity came out negative on the tokens it is meant to encourage: each step of a
PPO + curiosity run on the sums task taken apart.

An earlier study found the whitened curiosity of the gated (outside the policy's top-1) tokens
averaging -0.2 and -0.5 in two of three seeds. Candidate causes: an error in the gate, in the
whitening, or in the forward model's inputs, or a property of the task. This script runs PPO with
the authors' curiosity settings (eta 0.04, top-1 gate, module lr 1e-5; +experiment=[ppo_sums,
ppo_curiosity]) from an SFT start on sums and records, at every step and for every response token,
the module's prediction error (before its update), the gate, the token, its position and the
whitened reward. Then:
  1. gate: the top-1 of the policy's distribution recomputed by a full forward of the rollout
     against the gate recorded during generation (share of tokens that agree);
  2. forward model's inputs: the states handed to the module against the reference model's last
     hidden states from a separate forward (max abs difference; states s_t and s_{t+1} of token t);
  3. whitening: the z-scores recomputed per sequence from the recorded errors, Bessel-corrected
     variance as torch.var (max abs difference);
  4. composition: the mean z-score of gated tokens, against top-1 tokens overall, and matched by
     token id and by position (means over ids / positions of gated minus top-1, weighted by the
     gated count). If the matched differences are positive while the overall mean is negative,
     curiosity does rank a non-greedy token above a greedy one of the same kind, and the negative
     mean comes from which tokens get sampled off the top-1, not from an error.

Each seed runs with the authors' module learning rate (1e-5) and with a larger one (1e-3, by
default), which tells a property of the module's training apart from one of the task.

Usage: python benchmarks/studies/curiosity_gate.py [--seeds 1 2 3] [--steps 60] [--module-lrs 1e-5 1e-3]
       [--no-record]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.common import append_results, compose_config  # noqa: E402
from rlhf.intrinsic import whiten_per_sequence  # noqa: E402

RUNS = os.path.join(ROOT, "runs", "long_horizon", "sums")


def sft_start() -> str:
    """The SFT warm start on sums (+experiment=sft_sums, seed 1), trained once and reused."""
    from recipes import sft
    from rlhf.checkpoint import export_dir, list_checkpoints

    run_dir = os.path.join(RUNS, "sft")
    if not list_checkpoints(run_dir):
        sft.train(
            compose_config("sft", ["+experiment=sft_sums", "seed=1", f"run_dir={run_dir}", "logger=quiet"])
        )
    return export_dir(list_checkpoints(run_dir)[-1])


def _full_forward(model, batch):
    """Logits and last hidden states at every response position from one forward of prompt+response."""
    ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
    mask = torch.cat([batch.prompt_mask, batch.response_mask], dim=1).long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    width, length = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    predict = slice(width - 1, width - 1 + length)  # the column whose output predicts response token t
    read = slice(width, width + length)  # the column that reads token t
    hidden = out.hidden_states[-1]
    return out.logits[:, predict], hidden[:, predict], hidden[:, read]


class Recorder:
    """Wraps the recipe's frozen passes and the curiosity source to keep what the analysis needs."""

    def __init__(self):
        self.steps: list[dict] = []
        self.policy = self.reference = None

    def passes(self, original):
        def wrapped(cfg, policy, models, batch, metrics):
            self.policy, self.reference = policy.model, models.reference
            return original(cfg, policy, models, batch, metrics)

        return wrapped

    def source(self, original):
        recorder = self

        def wrapped(curiosity, batch):
            reward, stats = original(curiosity, batch)
            with torch.no_grad():
                error = curiosity._error(batch)
                logits, states, next_states = _full_forward(recorder.reference, batch)
                policy_logits = _full_forward(recorder.policy, batch)[0]
            mask = batch.response_mask
            recorder.steps.append(
                {
                    "error": error.cpu(),
                    "whitened": (reward / curiosity.eta).cpu(),
                    "gate": batch.outside_topk.cpu(),
                    "mask": mask.cpu(),
                    "ids": batch.response_ids.cpu(),
                    "top1_agrees": float(
                        ((batch.response_ids != policy_logits.argmax(-1)) == batch.outside_topk)[mask]
                        .float()
                        .mean()
                    ),
                    "state_diff": float(
                        max(
                            (states - batch.ref_states).abs()[mask].max(),
                            (next_states - batch.ref_next_states).abs()[mask].max(),
                        )
                    ),
                }
            )
            return reward, stats

        return wrapped


def run_seed(seed: int, start: str, steps: int, module_lr: float) -> list[dict]:
    import shutil

    from recipes import ppo
    from rlhf.intrinsic import Curiosity

    run_dir = os.path.join(RUNS, "curiosity_gate", f"lr{module_lr:g}_seed{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)  # the records live in memory: always a fresh run
    recorder = Recorder()
    original_passes, original_call = ppo._passes, Curiosity.__call__
    ppo._passes = recorder.passes(original_passes)
    Curiosity.__call__ = recorder.source(original_call)
    try:
        cfg = compose_config(
            "ppo",
            [
                "+experiment=[ppo_sums,ppo_curiosity]",
                "model=pretrained",
                f"model.name_or_path={start}",
                f"seed={seed}",
                f"train.steps={steps}",
                f"curiosity.lr={module_lr}",
                f"run_dir={run_dir}",
                "checkpoint.save_final=false",
                "logger=quiet",
            ],
        )
        ppo.train(cfg)
    finally:
        ppo._passes, Curiosity.__call__ = original_passes, original_call
    return recorder.steps


def whitening_error(step: dict) -> float:
    """Max abs difference between the recorded z-scores (gated tokens) and ones recomputed here."""
    worst = 0.0
    for row in range(step["error"].shape[0]):
        valid = step["mask"][row]
        if valid.sum() < 2:
            continue
        values = step["error"][row][valid].double()
        z = (values - values.mean()) / torch.sqrt(values.var() + 1e-8)
        gate = step["gate"][row][valid]
        if gate.any():
            recorded = step["whitened"][row][valid][gate].double()
            worst = max(worst, float((z[gate] - recorded).abs().max()))
    return worst


def matched_difference(keys_z_gate: list[tuple[int, float, bool]]) -> float | None:
    """Mean over keys (token id or position) of gated z minus top-1 z, weighted by the gated count."""
    by_key: dict[int, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for key, z, gated in keys_z_gate:
        by_key[key][0 if gated else 1].append(z)
    pairs = [(len(g), statistics.mean(g) - statistics.mean(t)) for g, t in by_key.values() if g and t]
    total = sum(n for n, _ in pairs)
    return sum(n * d for n, d in pairs) / total if total else None


def gated_mean(step: dict) -> float:
    """The step's mean whitened curiosity over gated tokens (the logged curiosity/reward_mean)."""
    gated = step["mask"] & step["gate"]
    return float(step["whitened"][gated].mean())


def analyse(steps: list[dict]) -> dict[str, float]:
    by_id, by_position, gated_z, greedy_z, gated_error, greedy_error = [], [], [], [], [], []
    for step in steps:
        z = whiten_per_sequence(step["error"].double(), step["mask"])  # every token, before the gate
        for row, col in step["mask"].nonzero().tolist():
            gated = bool(step["gate"][row, col])
            by_id.append((int(step["ids"][row, col]), float(z[row, col]), gated))
            by_position.append((col, float(z[row, col]), gated))
            (gated_z if gated else greedy_z).append(float(z[row, col]))
            (gated_error if gated else greedy_error).append(float(step["error"][row, col]))
    return {
        "gated_first": gated_mean(steps[0]),
        "gated_last": statistics.mean(gated_mean(s) for s in steps[-10:]),
        "error_first": float(steps[0]["error"][steps[0]["mask"]].mean()),
        "error_last": float(steps[-1]["error"][steps[-1]["mask"]].mean()),
        "gate_agreement": statistics.mean(s["top1_agrees"] for s in steps),
        "state_diff": max(s["state_diff"] for s in steps),
        "whitening_diff": max(whitening_error(s) for s in steps),
        "gated_share": len(gated_z) / (len(gated_z) + len(greedy_z)),
        "gated_z": statistics.mean(gated_z),
        "greedy_z": statistics.mean(greedy_z),
        "gated_error": statistics.mean(gated_error),
        "greedy_error": statistics.mean(greedy_error),
        "matched_by_id": matched_difference(by_id),
        "matched_by_position": matched_difference(by_position),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--module-lrs",
        type=float,
        nargs="+",
        default=[1e-5, 1e-3],
        help="curiosity.lr: the authors' 1e-5, and more",
    )
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.set_num_threads(2)
    start = sft_start()
    lines = [
        "| module lr | seed | gate agrees with a full forward's top-1 | states vs a separate reference forward "
        "(max abs) | whitening recomputed (max abs) | gated share | module error: step 1 / last | mean z of "
        "gated tokens: step 1 / last 10 steps | mean z: gated / top-1 | raw error: gated / top-1 | gated - "
        "top-1 z, matched by token id | matched by position |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for module_lr in args.module_lrs:
        for seed in args.seeds:
            a = analyse(run_seed(seed, start, args.steps, module_lr))
            matched = [
                f"{v:+.2f}" if v is not None else "-" for v in (a["matched_by_id"], a["matched_by_position"])
            ]
            lines.append(
                f"| {module_lr:g} | {seed} | {100 * a['gate_agreement']:.2f}% | {a['state_diff']:.1e} "
                f"| {a['whitening_diff']:.1e} | {100 * a['gated_share']:.1f}% "
                f"| {a['error_first']:.3f} / {a['error_last']:.3f} | {a['gated_first']:+.2f} / {a['gated_last']:+.2f} "
                f"| {a['gated_z']:+.2f} / {a['greedy_z']:+.2f} | {a['gated_error']:.3f} / {a['greedy_error']:.3f} "
                f"| {matched[0]} | {matched[1]} |"
            )
            print(lines[-1], flush=True)
    body = "\n".join(lines)
    print(body)
    if not args.no_record:
        command = "python benchmarks/studies/curiosity_gate.py " + " ".join(sys.argv[1:])
        append_results("CD-RLHF: the curiosity signal on gated tokens taken apart (sums task)", command, body)


if __name__ == "__main__":
    main()

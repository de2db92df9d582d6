"""Held-out evaluation of a GRPO or PPO run, as TRL evaluates: greedy completions of the eval split
scored by every reward the run trains on (functions and reward model). The run (rlhf/run.py) calls
it before training, every `eval.every` steps and at the end; the recipe prints `description` at
its start: what is evaluated, or why nothing is."""

from __future__ import annotations

from typing import Any

from rlhf.eval.accuracy import BatchScorer, greedy_evaluation


class HeldoutEvaluation:
    """`eval/reward`, `eval/reward/<name>` and (with `reward.accuracy_reward` among the rewards)
    `eval/accuracy` of the policy on the first `eval.num_samples` eval rows. `score` is the
    recipe's own scoring of a batch; `reward_names` are the names it returns."""

    def __init__(
        self,
        eval_rows: Any,
        cfg: Any,
        rollout: Any,
        score: BatchScorer,
        reward_names: list[str],
        agent: Any = None,
    ):
        self.enabled = eval_rows is not None and len(eval_rows) > 0 and bool(reward_names)
        accuracy = cfg.reward.accuracy_reward if cfg.reward.accuracy_reward in reward_names else None
        if eval_rows is not None:
            eval_rows = eval_rows.select(range(min(cfg.eval.num_samples, len(eval_rows))))
        self.rows, self.cfg, self.rollout, self.score, self.accuracy = (
            eval_rows,
            cfg,
            rollout,
            score,
            accuracy,
        )
        self.agent = agent  # tools and environments: greedy episodes
        self.description = _describe(eval_rows, cfg, reward_names, accuracy, self.enabled)

    def __call__(self, step: int) -> dict[str, float]:
        """The scores of the policy after `step` updates (what `Run.evaluate_with` calls)."""
        return greedy_evaluation(
            self.rollout,
            self.rows,
            self.score,
            accuracy_reward=self.accuracy,
            prompt_column=self.cfg.data.prompt_column,
            batch_size=self.cfg.eval.batch_size,
            max_new_tokens=self.cfg.eval.max_new_tokens,
            weights_version=step,  # updates so far: a vLLM engine syncs once per set of weights
            agent=self.agent,
        )


def _describe(eval_rows: Any, cfg: Any, reward_names: list[str], accuracy: str | None, enabled: bool) -> str:
    if eval_rows is None or len(eval_rows) == 0:
        return "evaluation: none (the data has no eval split)"
    if not enabled:
        return "evaluation: none (no reward function or reward model to score completions)"
    cadence = (
        f"every {cfg.eval.every} steps and at the end" if cfg.eval.every else "before and after training"
    )
    scored = ", ".join(reward_names)
    text = f"evaluation: {len(eval_rows)} held-out prompts {cadence}, greedy, scored by {scored} (eval/reward"
    if accuracy:
        text += f"; eval/accuracy: fraction where {accuracy} is 1"
    return text + ")"

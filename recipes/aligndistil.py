"""AlignDistil: RLHF as token-level adaptive policy distillation (Zhang et al. 2025, arXiv 2503.02832).

The policy is distilled, token by token and over the full vocabulary, toward a teacher built from two
frozen models: a DPO model and a reverse-DPO model (trained with chosen and rejected swapped:
`python -m recipes.dpo loss.reverse=true`). The teacher extrapolates the DPO logits away from the
reverse model by a token-adaptive weight w_t = beta2 * TVD_t + 1e-3, and each token's loss is
(beta / w_t) * KL(pi_theta || pi*) (`loss.variant=aligndistil`); `loss.variant=theorem1` is the
paper's fixed interpolation of the DPO and reference logits. Formulas: rlhf/losses/distill.py.
The KL is computed `loss.chunk_tokens` response tokens at a time inside checkpointed pieces, so no
[rows, tokens, vocab] logits are kept for the backward (rlhf.models.forward.chunked_token_loss).

Modes (`train.mode`), as in the authors' code: off_policy trains on the chosen responses of the
preference data (rejected ones are unused); on_policy samples one response per prompt from the
current policy (rollout.*: temperature 1, transformers generate or rollout.engine=vllm) and trains on
it. Each row's loss is its token mean; rows are averaged over the step (`--reward_len_norm`).
Where we differ from the authors' code: the loss covers the distributions that predict each response
token (their mask, built from unshifted labels, skips the first response token's prediction and
includes the one after the last).

Launch:  python -m recipes.aligndistil model=pretrained model.name_or_path=<sft export> \
             teacher.dpo_model=<dpo export> teacher.reverse_dpo_model=<reverse dpo export> data.source=<pairs>
         torchrun --nproc_per_node 2 -m recipes.aligndistil distributed=zero2 ...
"""

from __future__ import annotations

from rlhf.overrides import check_recipe_command_line

if __name__ == "__main__":  # a wrong key is refused in seconds, before the heavy imports below
    check_recipe_command_line("aligndistil", __file__)


import time
from functools import partial

import hydra
import torch
from omegaconf import DictConfig

from rlhf.config import AlignDistilConfig, ConfigError, plan_sft_batches, register_configs
from rlhf.data.chat import CHOSEN_IDS, PROMPT_IDS, PROMPT_TEXT, prepare_splits
from rlhf.data.load import load_task_data
from rlhf.data.sampler import EpochSampler, rank_slice
from rlhf.distributed import build_engine, launcher_env, run_entry_point
from rlhf.distributed.collectives import mean_over_ranks
from rlhf.eval.accuracy import heldout_accuracy
from rlhf.losses.distill import distill_token_loss, get_distill_teacher
from rlhf.losses.reduce import get_reduction
from rlhf.metrics import MetricAccumulator
from rlhf.models.forward import chunked_token_loss, response_head_inputs
from rlhf.models.load import load_frozen, load_policy, load_reference, load_tokenizer, model_context
from rlhf.models.options import ForwardOptions
from rlhf.plots import plot_metrics
from rlhf.rollout.engine import build_rollout_engine, rollout_rows
from rlhf.rollout.prompts import rl_prompts
from rlhf.rollout.sampling import SamplingParams, pad_prompts, pad_targets
from rlhf.run import Run, recipe_config
from rlhf.scoring import task_reward
from rlhf.types import LossOutput
from rlhf.update import micro_batches


def train(cfg: AlignDistilConfig) -> dict[str, float | str]:
    """Distil the policy toward the contrastive teacher; returns the final metrics, the last
    checkpoint and the run directory."""
    # Setup: validate before loading anything heavy.
    env = launcher_env()
    plan = plan_sft_batches(cfg, env.world_size)
    _validate(cfg)
    on_policy = cfg.train.mode == "on_policy"
    accuracy_fn = task_reward(cfg.eval.accuracy_reward)
    train_rows, eval_rows = load_task_data(cfg.data, needs_pairs=not on_policy)
    total_steps = cfg.train.total_steps(len(train_rows))
    run = Run.open("aligndistil", cfg, env, total_steps)
    if on_policy:  # prompts (with the vLLM engine's checks)
        tokenizer, train_rows, eval_rows = rl_prompts(cfg, train_rows, eval_rows)
    else:
        tokenizer = load_tokenizer(cfg.model)
        train_rows, eval_rows = prepare_splits(
            "pairs", train_rows, eval_rows, tokenizer, cfg.data, context=model_context(cfg.model)
        )
    policy = build_engine(
        lambda: load_policy(cfg.model, tokenizer, seed=cfg.seed),
        cfg.optim,
        cfg.distributed,
        total_steps,
        plan.micro_batch_size,
        cfg.train.precision,
    )
    dpo = load_frozen(policy, cfg.teacher.dpo_model, tokenizer, cfg.model)
    if cfg.loss.variant == "aligndistil":
        other = load_frozen(policy, cfg.teacher.reverse_dpo_model, tokenizer, cfg.model)
    elif cfg.teacher.reference_model:
        other = load_frozen(policy, cfg.teacher.reference_model, tokenizer, cfg.model)
    else:  # theorem1 against the student's starting weights
        other = load_reference(cfg.model, tokenizer, policy, seed=cfg.seed)
    distill = Distillation(cfg, policy, dpo, other)
    sampling = SamplingParams.from_config(cfg.rollout)
    sampler = EpochSampler(len(train_rows), seed=cfg.seed)
    run.attach(policy, tokenizer, {"sampler": sampler})
    # samples on-policy responses and the held-out completions (the transformers engine off-policy)
    rollout = build_rollout_engine(cfg, policy, tokenizer, env.rank)

    run.evaluate_with(
        lambda step: _evaluate(cfg, distill, rollout, eval_rows, accuracy_fn, step), cfg.eval.every
    )
    metrics: dict[str, float] = {}
    with run:
        run.on_close(rollout.close)
        result: dict[str, float | str] = dict(run.evaluate_before())
        for step in run.steps():
            started = time.perf_counter()
            # 1 responses: this rank's share of the step's rows; the chosen responses (off-policy)
            #   or one sample per prompt from the current policy (on-policy)
            indices = rank_slice(sampler.next_indices(cfg.train.batch_size), env.rank, env.world_size)
            rows = train_rows.select(indices)
            if on_policy:
                batch, metrics = rollout_rows(
                    rollout,
                    rows,
                    prompt_column=cfg.data.prompt_column,
                    group_size=1,
                    sampling=sampling,
                    weights_version=step - 1,
                    seed=run.sampling_seed(step),
                )
                metrics.pop("rollout/tokens")
                tensors = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
            else:
                metrics, tensors = {}, _chosen_tensors(rows, tokenizer.pad_token_id, policy.device)
            normalizer = policy.all_reduce_sum(torch.tensor(float(len(indices)), device=policy.device))
            # 2 distillation loss per micro-batch (teachers frozen), gradients accumulated
            accumulator = MetricAccumulator()
            step_loss = torch.zeros((), device=policy.device)
            tokens = (tensors[1].sum(-1) + tensors[3].sum(-1)).cpu()
            budget = cfg.train.max_tokens_per_micro_batch
            for micro in micro_batches(
                policy, torch.arange(len(indices)), plan.micro_batch_size, budget, tokens
            ):
                out = distill(*(t[micro.to(t.device)] for t in tensors), normalizer=normalizer)
                policy.backward(out.loss)
                step_loss += out.loss.detach()
                accumulator.add(out.metrics, weight=float(tensors[3][micro].sum()))
            # 3 optimizer step, log, evaluate (checkpoints and stops: in run.steps)
            metrics.update(
                {"loss": float(policy.all_reduce_sum(step_loss)), **accumulator.compute(), **policy.step()}
            )
            metrics["time/step"] = time.perf_counter() - started
            metrics = mean_over_ranks(metrics, policy)
            run.end_step(step, metrics)  # evaluated every eval.every steps, logged by logger.log_every
        run.finish()
        result.update(run.evaluate_after(metrics))
    if env.is_main:
        plot_metrics(
            run.dir,
            ["loss", "distill/kl", "distill/scale", "eval/loss", "eval/accuracy"],
            "aligndistil_curves.png",
            f"AlignDistil ({cfg.loss.variant}, {cfg.train.mode})",
        )
    return run.result(metrics, result)


class Distillation:
    """The loss of one micro-batch: the three models' LM-head inputs at the response positions, then
    the per-token distillation loss a chunk of tokens at a time, each row's token mean summed over
    the rows and divided by the step's row count."""

    def __init__(self, cfg: AlignDistilConfig, policy, dpo, other):
        self.cfg, self.policy, self.dpo, self.other = cfg, policy, dpo, other
        self.options = ForwardOptions.from_config(cfg.model)  # the layout of every model's pass
        self.reduction = get_reduction("sequence_mean_token_mean")
        self.token_loss = partial(
            distill_token_loss,
            teacher=get_distill_teacher(cfg.loss.variant),
            beta=cfg.loss.beta,
            beta2=cfg.loss.beta2,
            temperature=cfg.loss.temperature,
            floor=cfg.loss.floor,
        )

    def __call__(self, prompt_ids, prompt_mask, response_ids, response_mask, *, normalizer):
        tensors = (prompt_ids, prompt_mask, response_ids, response_mask)
        hidden = [response_head_inputs(self.policy.model, *tensors, self.options)]
        with torch.no_grad():
            hidden += [
                response_head_inputs(model, *tensors, self.options) for model in (self.dpo, self.other)
            ]
        per_token, stats = chunked_token_loss(
            [self.policy.model, self.dpo, self.other], hidden, self.cfg.loss.chunk_tokens, self.token_loss
        )
        loss = self.reduction.reduce(per_token, response_mask, normalizer=normalizer)
        tokens = response_mask.sum().clamp(min=1)
        metrics = {
            name: torch.where(response_mask, v.detach(), 0.0).sum() / tokens for name, v in stats.items()
        }
        return LossOutput(loss, metrics)


def _chosen_tensors(rows, pad_token_id: int, device) -> tuple[torch.Tensor, ...]:
    """(prompt_ids, prompt_mask, response_ids, response_mask) of the rows' chosen responses."""
    prompt_ids, prompt_mask = pad_prompts(list(rows[PROMPT_IDS]), pad_token_id, device)
    response_ids, response_mask = pad_targets(list(rows[CHOSEN_IDS]), pad_token_id, device)
    return prompt_ids, prompt_mask, response_ids, response_mask


@torch.no_grad()
def _evaluate(cfg: AlignDistilConfig, distill: Distillation, rollout, eval_rows, accuracy_fn, step):
    """Held-out distillation loss on the chosen responses (off-policy data), and greedy task
    accuracy with `eval.accuracy_reward`."""
    results: dict[str, float] = {}
    if eval_rows is None:
        return results
    policy = distill.policy
    rows = eval_rows.select(range(min(cfg.eval.num_samples, len(eval_rows))))
    if CHOSEN_IDS in rows.column_names:
        shard = len(rows) // policy.world_size  # equal shares: every rank runs the same forwards
        total = torch.zeros((), device=policy.device)
        for start in range(policy.rank * shard, (policy.rank + 1) * shard, cfg.eval.batch_size):
            part = rows.select(range(start, min(start + cfg.eval.batch_size, (policy.rank + 1) * shard)))
            tensors = _chosen_tensors(part, rollout.tokenizer.pad_token_id, policy.device)
            total += distill(*tensors, normalizer=1.0).loss
        results["eval/loss"] = float(policy.all_reduce_sum(total)) / max(shard * policy.world_size, 1)
    if accuracy_fn is not None:
        first_of_prompt = {text: i for i, text in reversed(list(enumerate(rows[PROMPT_TEXT])))}
        task = rows.select(sorted(first_of_prompt.values()))
        results["eval/accuracy"] = heldout_accuracy(
            rollout, task, accuracy_fn, cfg.data, cfg.eval, weights_version=step
        )
    return results


def _validate(cfg: AlignDistilConfig) -> None:
    if not cfg.teacher.dpo_model:
        raise ConfigError("teacher.dpo_model is required: a DPO-trained policy (python -m recipes.dpo)")
    if cfg.loss.variant == "aligndistil" and not cfg.teacher.reverse_dpo_model:
        raise ConfigError(
            "loss.variant=aligndistil needs teacher.reverse_dpo_model: a DPO model trained with chosen and "
            "rejected swapped (python -m recipes.dpo loss.reverse=true)"
        )
    if cfg.rollout.max_staleness:
        raise ConfigError(
            "rollout.max_staleness: generation ahead of the trainer is built for GRPO and PPO, not AlignDistil"
        )
    if cfg.rollout.engine != "hf" and cfg.train.mode != "on_policy":
        raise ConfigError(
            f"rollout.engine={cfg.rollout.engine} samples responses: it needs train.mode=on_policy"
        )


@hydra.main(config_path="../configs", config_name="aligndistil", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    cfg: AlignDistilConfig = recipe_config(AlignDistilConfig, dict_cfg)
    result = train(cfg)
    if launcher_env().is_main:
        print(f"AlignDistil finished at step {result['step']}; checkpoint: {result['checkpoint']}")


register_configs()

if __name__ == "__main__":
    run_entry_point(main)

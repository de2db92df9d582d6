"""GRPO: group-relative policy optimisation with verifiable rewards (no critic), and its family.

Papers: GRPO, DeepSeekMath (arXiv 2402.03300); Dr.GRPO (arXiv 2503.20783); DAPO (arXiv 2503.14476:
clip-higher, token-mean aggregation, dynamic sampling, overlong shaping). Each step samples G
completions for each of P prompts, scores them with the reward functions, computes advantages with
the registered `advantage.estimator` (group_relative for GRPO / Dr.GRPO, rloo, reinforce_pp,
reinforce_pp_baseline; rlhf/advantages.py), and takes `num_minibatches x updates_per_rollout` policy-gradient
steps on the rollout (old logprobs kept) with the registered `loss.policy_loss` (clipped, gspo,
gspo_token, luspo, cispo, sapo, vespo, gtpo; rlhf/losses/policy.py). Options (all in config): loss
aggregation token_mean / sequence_mean_token_mean / sequence_mean_token_sum_norm /
sequence_mean_token_sum; asymmetric and dual clipping; KL estimators k1/k2/k3 in the loss or in the
reward (no reference model is loaded when kl_coef is 0 unless loss.log_kl measures it); dropping zero-variance groups (their rows
stay in the batch with an empty mask, so every rank runs the same micro-batches) or replacing them
by new prompts' groups (dynamic sampling); DAPO's overlong penalty and truncation mask; NTHR's
token scaling; two-sided clipping, the top-entropy token mask, the off-policy sequence mask, the
entropy bonus, the KL reweighted to the current policy and batch-std advantages (TRL's options);
a reference that moves toward the policy (TR-DPO, reference.sync); micro-batches by token budget.
Temperature, top-k, top-p and min-p are applied identically in sampling and in every logprob pass.
Generation: the rollout engine of `rollout.engine` (transformers generate, or a colocated vLLM engine).

Launch:  python -m recipes.grpo [overrides...]
         torchrun --nproc_per_node 2 -m recipes.grpo distributed=zero2
         deepspeed --num_gpus 2 --module recipes.grpo distributed=zero3 +experiment=grpo_dr_grpo
"""

from __future__ import annotations

from rlhf.overrides import check_recipe_command_line

if __name__ == "__main__":  # a wrong key is refused in seconds, before the heavy imports below
    check_recipe_command_line("grpo", __file__)


import dataclasses
import math
import time

import hydra
import torch
from omegaconf import DictConfig

from rlhf import advantages as adv
from rlhf.agents.agent import build_agent
from rlhf.config import GRPOConfig, plan_grpo_batches, register_configs
from rlhf.data.load import load_task_data
from rlhf.data.sampler import EpochSampler, rank_slice
from rlhf.distributed import build_engine, launcher_env, run_entry_point
from rlhf.distributed.collectives import mean_over_ranks
from rlhf.eval.heldout import HeldoutEvaluation
from rlhf.losses.kl import get_kl_estimator
from rlhf.losses.reduce import get_reduction
from rlhf.metrics import token_mean_weights
from rlhf.models.forward import response_logprobs
from rlhf.models.load import load_policy, load_reference
from rlhf.models.options import ForwardOptions
from rlhf.models.reference import ReferenceSync
from rlhf.models.token_scorers import nthr_token_scale
from rlhf.ops import masked_mean, masked_sum
from rlhf.plots import plot_metrics
from rlhf.rollout.ahead import rollout_of_step, start_rollouts_ahead, take_rollout
from rlhf.rollout.engine import build_rollout_engine
from rlhf.rollout.prompts import rl_prompts
from rlhf.rollout.records import log_rollout_sample, sample_rows
from rlhf.rollout.sampling import SamplingParams
from rlhf.run import Run, RunValues, recipe_config
from rlhf.scoring import build_rewards, score_metrics, score_rollout
from rlhf.shaping import EntropyCoefficient, kl_token_penalty, overlong_penalty
from rlhf.types import RolloutBatch
from rlhf.update import (
    PolicyGradientObjective,
    UpdatePlan,
    apply_rollout_correction,
    rollout_micro_batches,
    run_update,
)


def train(cfg: GRPOConfig) -> dict[str, float | str]:
    """Run GRPO; returns the last step's metrics, the final checkpoint and the run directory."""
    # Setup: validate batch arithmetic, rewards and data before any model loads.
    env = launcher_env()
    plan = plan_grpo_batches(cfg, env.world_size)
    reduction = get_reduction(cfg.loss.aggregation)
    kl_estimator = get_kl_estimator(cfg.loss.kl_estimator)
    train_rows, eval_rows = load_task_data(cfg.data)
    rewards = build_rewards(cfg.reward, cfg.data, {"train": train_rows, "eval": eval_rows})
    run = Run.open("grpo", cfg, env, cfg.train.total_steps(len(train_rows)))
    tokenizer, train_rows, eval_rows = rl_prompts(cfg, train_rows, eval_rows)
    agent = build_agent(cfg, tokenizer, train_rows, rewards)  # tools and environments: episodes
    optimizer_steps = run.total_steps * cfg.train.num_minibatches * cfg.train.updates_per_rollout
    engine = build_engine(
        lambda: load_policy(cfg.model, tokenizer, seed=cfg.seed),  # built partitioned under ZeRO-3
        cfg.optim,
        cfg.distributed,
        optimizer_steps,
        plan.micro_batch_size,
        cfg.train.precision,
    )
    reference = None
    if (
        cfg.loss.kl_coef != 0.0 or cfg.loss.log_kl
    ):  # the initial policy (adapters off under LoRA), also when resuming
        reference = load_reference(cfg.model, tokenizer, engine, seed=cfg.seed)
    reference_sync = None
    if cfg.reference.sync:
        reference_sync = ReferenceSync(engine, reference, cfg.reference.mixup_alpha, cfg.reference.sync_steps)
    sampling = SamplingParams.from_config(cfg.rollout)
    options = ForwardOptions.from_config(cfg.model, sampling.warp())  # every logprob pass's layout and warp
    sampler = EpochSampler(len(train_rows), seed=cfg.seed)
    remembered = RunValues()  # run-level values kept in checkpoints (GTPO's initial entropy)
    entropy_coef = EntropyCoefficient.from_config(cfg.loss)  # the entropy bonus, adaptive with a target
    stateful = {"sampler": sampler, "entropy_coef": entropy_coef, "remembered": remembered}
    if reference_sync:
        stateful["reference"] = reference_sync
    run.attach(engine, tokenizer, stateful)  # restores all of them when resuming
    rollout = build_rollout_engine(cfg, engine, tokenizer, env.rank)  # rollout.engine
    heldout = HeldoutEvaluation(
        eval_rows,
        cfg,
        rollout,
        lambda batch: score_rollout(rewards, batch, cfg.reward)[:3],
        [r.name for r in rewards],
        agent,
    )
    run.evaluate_with(heldout if heldout.enabled else None, cfg.eval.every)
    metrics: dict[str, float] = {}
    with run:
        run.on_close(rollout.close)
        run.message(heldout.description)
        result = run.evaluate_before()
        ahead = start_rollouts_ahead(cfg, run, rollout, train_rows, sampler, sampling, agent)
        for step in run.steps():
            started = time.perf_counter()
            # 1-2 rollout and score: G samples for each of this rank's prompts with the policy's
            #   weights after the last update, weighted reward functions (rows no reward could score
            #   are excluded); with dynamic sampling, groups without signal are replaced by groups of
            #   new prompts
            batch, scores, valid, per_reward, metrics = _sample(
                cfg, run, rollout, train_rows, sampler, sampling, rewards, step, agent, ahead
            )
            raw_scores = torch.where(valid, scores, torch.nan)
            rollout_tokens = metrics.pop("rollout/tokens")

            # 3 logprob passes (no grad): old policy when it will drift, reference when KL is on
            passes_started = time.perf_counter()
            token_penalty = _logprob_passes(
                cfg, engine, reference, batch, plan, kl_estimator, options, metrics
            )
            metrics["time/logprob_passes"] = time.perf_counter() - passes_started

            # 4 advantages (advantage.estimator); rows without signal can leave the loss mask
            rollout_mask = batch.response_mask  # the sample log shows dropped groups' tokens too
            reward_weights = torch.tensor([r.weight for r in rewards], dtype=torch.float32)
            _advantages(
                cfg, engine, batch, scores, valid, token_penalty, options, metrics, per_reward, reward_weights
            )

            # 5 update: minibatches x updates_per_rollout optimizer steps, micro-batches accumulate
            update_started = time.perf_counter()
            objective = PolicyGradientObjective(
                cfg,
                engine,
                reduction,
                options,
                kl_estimator=kl_estimator if cfg.loss.kl_placement == "loss" else None,
                loss_args=_policy_loss_args(cfg, engine, batch, plan, options, remembered, metrics),
                entropy_coef=entropy_coef,
            )
            metrics.update(run_update(batch, objective, UpdatePlan.from_config(cfg, plan), reduction))
            metrics["time/update"] = time.perf_counter() - update_started
            if reference_sync:  # TR-DPO: the reference moves toward the updated policy
                metrics.update(reference_sync.after_step(step))
            if ahead is not None:  # the servers get the new weights now, while they generate
                metrics["time/weight_sync"] = rollout.sync_weights(step)
                ahead.publish(step)

            # 6 log, evaluate (checkpoints, time limit and preemption: between steps, in run.steps)
            metrics["time/step"] = time.perf_counter() - started
            metrics["tokens_per_s"] = rollout_tokens * env.world_size / metrics["time/step"]
            metrics = mean_over_ranks(metrics, engine, token_mean_weights(metrics, rollout_mask.sum()))
            if run.end_step(step, metrics):  # evaluated every eval.every steps, logged by logger.log_every
                sampled = dataclasses.replace(batch, response_mask=rollout_mask)
                _log_sample(run.loggers, cfg, sampled, tokenizer, step, raw_scores, engine, options)
        run.finish()
        result.update(run.evaluate_after(metrics))
    if env.is_main:
        plot_metrics(
            run.dir,
            ["reward/mean", "accuracy", "eval/accuracy", "kl/mean", "response/length_mean"],
            "grpo_curves.png",
            "GRPO",
        )
    return run.result(metrics, result)


def _sample(
    cfg: GRPOConfig, run, rollout, train_rows, sampler, sampling, rewards, step: int, agent=None, ahead=None
):
    """Rollout rounds of this rank's share of `prompts_per_step` new prompts, scored (with DAPO's
    overlong penalty when set). One round, or with `advantage.dynamic_sampling` rounds until every
    rank holds its share of groups whose scores differ (all ranks run the same rounds), at most
    `max_sampling_rounds`; groups still missing are filled with flat ones marked invalid. Reward
    metrics describe the first round (the policy's own accuracy, before any selection)."""
    g = cfg.rollout.group_size
    rounds = cfg.advantage.max_sampling_rounds if cfg.advantage.dynamic_sampling else 1
    parts, metrics = [], {}
    for round_index in range(rounds):
        started = time.perf_counter()
        indices = sampler.next_indices(cfg.train.prompts_per_step)
        if ahead is not None:  # generated on the other thread, from weights at most max_staleness old
            batch, rollout_metrics = take_rollout(ahead, step, indices)
        else:
            rows = train_rows.select(rank_slice(indices, run.env.rank, run.env.world_size))
            batch, rollout_metrics = rollout_of_step(
                cfg, run, rollout, rows, sampling, agent, step, step - 1, round_index=round_index
            )
        elapsed = time.perf_counter() - started
        scores, valid, per_reward, reward_metrics = score_rollout(rewards, batch, cfg.reward)
        device = rollout.policy.device
        scores, valid = scores.to(device), valid.to(device)
        per_reward_values = torch.stack([per_reward[r.name] for r in rewards], -1).to(device)
        penalty = overlong_penalty(
            batch.response_mask.sum(-1),
            max_new_tokens=cfg.rollout.max_new_tokens,
            buffer=cfg.reward.overlong_buffer,
            penalty=cfg.reward.overlong_penalty,
        ).to(device)
        scores = scores + penalty
        if batch.turn_rewards is not None:  # an environment's per-turn rewards: their sum, in GRPO
            scores = scores + batch.turn_rewards.sum(-1).to(device)
        parts.append((batch, scores, valid, per_reward_values))
        if round_index == 0:
            metrics = {**rollout_metrics, **reward_metrics, "time/generate": elapsed}
            metrics.update(score_metrics(scores, valid, per_reward, cfg.reward.accuracy_reward))
            if cfg.reward.overlong_buffer:
                metrics["reward/overlong_penalty_mean"] = float(penalty.mean())
        else:
            metrics["time/generate"] += elapsed
            metrics["rollout/tokens"] += rollout_metrics["rollout/tokens"]
        if not cfg.advantage.dynamic_sampling:
            return batch, scores, valid, per_reward_values, metrics
        have = sum(int((~adv.zero_variance_groups(s, v, group_size=g)).sum()) // g for _, s, v, _ in parts)
        missing = rollout.policy.all_reduce_sum(torch.tensor(float(max(0, len(rows) - have)), device=device))
        if round_index == 0:
            metrics["dynamic_sampling/signal_fraction"] = have / max(len(rows), 1)
        if missing.item() == 0:
            break
    metrics["dynamic_sampling/rounds"] = float(len(parts))
    batch, scores, valid, per_reward_values, filled = _groups_with_signal(
        parts, len(rows), g, rollout.tokenizer.pad_token_id
    )
    metrics["dynamic_sampling/filled_fraction"] = filled
    return batch, scores, valid, per_reward_values, metrics


def _groups_with_signal(parts, groups: int, g: int, pad_token_id: int):
    """The first `groups` groups with differing scores across the rounds' (batch, scores, valid,
    per-reward values); missing ones are filled with flat groups whose rows are marked invalid."""
    signal, flat = [], []
    for batch, scores, valid, per_reward in parts:
        flat_rows = adv.zero_variance_groups(scores, valid, group_size=g)
        for start in range(0, batch.batch_size, g):
            rows = slice(start, start + g)
            group = (batch.select(list(range(start, start + g))), scores[rows], valid[rows], per_reward[rows])
            (flat if bool(flat_rows[start]) else signal).append(group)
    chosen = signal[:groups]
    fillers = [(b, s, torch.zeros_like(v), r) for b, s, v, r in flat[: groups - len(chosen)]]
    chosen += fillers
    batch = RolloutBatch.concat([c[0] for c in chosen], pad_token_id)
    joined = [torch.cat([c[i] for c in chosen]) for i in (1, 2, 3)]
    return batch, *joined, len(fillers) / groups


@torch.no_grad()
def _logprob_passes(cfg: GRPOConfig, engine, reference, batch, plan, kl_estimator, options, metrics: dict):
    """Old logprobs when the rollout is trained on more than once (then a vLLM engine's mismatch is
    measured and corrected here; with one update, in the update itself), reference logprobs when KL
    is on; with the KL in the reward, returns each token's penalty kl_coef * KL_t [B, T] (else None)."""
    micro = rollout_micro_batches(
        engine,
        batch,
        torch.arange(batch.batch_size),
        plan.micro_batch_size,
        cfg.train.max_tokens_per_micro_batch,
    )
    if cfg.train.num_minibatches * cfg.train.updates_per_rollout > 1:
        batch.old_logprobs = _batched_logprobs(engine.model, batch, micro, options)
        apply_rollout_correction(cfg.rollout.vllm, batch, metrics)
    if reference is None:
        return None
    batch.ref_logprobs = _batched_logprobs(reference, batch, micro, options)
    if cfg.loss.kl_coef != 0.0 and cfg.loss.kl_placement != "reward":
        return None
    behaviour = batch.old_logprobs
    if behaviour is None:
        behaviour = _batched_logprobs(engine.model, batch, micro, options)
    if cfg.loss.kl_coef == 0.0:  # loss.log_kl: measured, not penalised
        metrics["kl/mean"] = float(masked_mean(behaviour - batch.ref_logprobs, batch.response_mask))
        return None
    penalty, kl_metrics = kl_token_penalty(
        behaviour,
        batch.ref_logprobs,
        batch.response_mask,
        kl_coef=cfg.loss.kl_coef,
        estimator=kl_estimator,
        log_ratio_clamp=cfg.loss.kl_log_ratio_clamp,
    )
    metrics.update({f"reward_{k}": float(v) for k, v in kl_metrics.items()})
    return penalty


def _advantages(
    cfg: GRPOConfig,
    engine,
    batch,
    scores,
    valid,
    token_penalty,
    options,
    metrics: dict,
    per_reward=None,
    reward_weights=None,
) -> None:
    """Advantages of the registered `advantage.estimator` into the batch (the KL-in-reward penalty
    per token for REINFORCE++, summed into the score for the others); GTPO's conflict weights; NTHR's
    per-token scaling (advantages become [B, T]); rows no reward scored, and with `advantage.drop_zero_variance_groups` / `loss.mask_truncated` flat
    groups / truncated responses, leave the loss mask."""
    g = cfg.rollout.group_size
    estimator = adv.get_advantage_estimator(cfg.advantage.estimator, "groups")
    if token_penalty is not None and estimator.name != "reinforce_pp":
        scores = scores - masked_sum(token_penalty, batch.response_mask, dim=-1)
    inputs = adv.OutcomeInputs(
        scores,
        valid,
        batch.response_mask,
        g,
        token_penalty=token_penalty,
        all_reduce_sum=engine.all_reduce_sum if engine.world_size > 1 else None,
        per_reward=per_reward,
        reward_weights=reward_weights,
    )
    batch.advantages = estimator.compute(inputs, cfg.advantage)
    if cfg.loss.policy_loss == "gtpo":
        weights = cfg.advantage.gtpo
        batch.token_weights = adv.gtpo_conflict_weights(
            batch.response_ids,
            batch.response_mask & valid.unsqueeze(-1),
            batch.advantages,
            group_size=g,
            amplify=weights.amplify,
            runs=weights.runs,
            divide_by_conflicts=weights.divide_by_conflicts,
        )
    if cfg.advantage.nthr:  # per-token advantages from the old policy's hidden states
        with engine.gathered_parameters():  # ranks skip different groups: no collective per forward
            scale, nthr_metrics = nthr_token_scale(
                engine.model,
                batch,
                batch.advantages,
                group_size=g,
                beta=cfg.advantage.nthr_beta,
                options=options,
            )
        advantages = batch.advantages
        batch.advantages = (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages) * scale
        metrics.update(nthr_metrics)
    keep = valid.clone()
    if cfg.advantage.drop_zero_variance_groups:
        flat = adv.zero_variance_groups(scores, valid, group_size=g)
        metrics["groups/zero_variance_fraction"] = float(flat.float().mean())
        keep &= ~flat
    if cfg.loss.mask_truncated:
        metrics["loss/masked_truncated_fraction"] = float(batch.truncated.float().mean())
        keep &= ~batch.truncated.to(keep.device)
    batch.response_mask = batch.response_mask & keep.unsqueeze(-1)


def _log_sample(loggers, cfg: GRPOConfig, batch, tokenizer, step: int, scores, engine, options) -> None:
    """A sample of the rollout for rollouts.jsonl and wandb, with per-token logprobs: those of the
    rollout when they were computed, else a pass over the sampled rows on every rank (ZeRO-3 gathers
    need all of them)."""
    if cfg.logger.rollout_samples <= 0:
        return
    logprobs = batch.old_logprobs
    if logprobs is None:
        rows = sample_rows(batch.batch_size, cfg.logger.rollout_samples, step)
        with torch.no_grad():
            sampled = _batched_logprobs(engine.model, batch.select(rows), [torch.arange(len(rows))], options)
        logprobs = torch.zeros_like(batch.response_mask, dtype=sampled.dtype)
        logprobs[torch.as_tensor(rows, device=logprobs.device)] = sampled
    kl = None if batch.ref_logprobs is None else logprobs - batch.ref_logprobs
    advantages = batch.advantages
    if advantages is not None and advantages.dim() == 1:
        advantages = advantages.reshape(-1, 1).expand_as(logprobs)
    per_token = {
        "logprobs": logprobs,
        "ref_logprobs": batch.ref_logprobs,
        "kl": kl,
        # one per row: the first token's (a row's only value for group baselines; REINFORCE++'s
        # return-to-go from the start)
        "advantage": None if advantages is None else advantages[:, 0],
        # the same per-token field as PPO's, so one heatmap call works on both recipes' rollouts
        "advantages": advantages,
    }
    log_rollout_sample(loggers, cfg.logger, batch, tokenizer, step, scores, per_token)


def _batched_logprobs(model, batch, micro_batches: list[torch.Tensor], options) -> torch.Tensor:
    """No-grad per-token logprobs of the whole rollout, micro-batch by micro-batch (in row order)."""
    return torch.cat([_logprobs(model, batch.select(rows), options)[0] for rows in micro_batches])


def _logprobs(model, rows, options, **entropy):
    """`response_logprobs` of a (selected) rollout's rows."""
    return response_logprobs(
        model, rows.prompt_ids, rows.prompt_mask, rows.response_ids, rows.attended_mask, options, **entropy
    )


def _policy_loss_args(cfg: GRPOConfig, engine, batch, plan, options, remembered: dict, metrics: dict):
    """The chosen objective's `loss.args`. GTPO with `advantage.gtpo.entropy_filter=initial` (the
    paper): the filter is off for the whole run when the starting policy's mean token entropy,
    measured once on the first rollout (all ranks) and remembered in checkpoints, is above the
    threshold; the authors' code keeps it always on."""
    args = cfg.loss.policy_loss_options()
    if cfg.loss.policy_loss != "gtpo" or cfg.advantage.gtpo.entropy_filter != "initial":
        return args
    if "gtpo_initial_entropy" not in remembered:
        total = torch.zeros(2, dtype=torch.float64, device=engine.device)
        with torch.no_grad():
            for rows in rollout_micro_batches(
                engine,
                batch,
                torch.arange(batch.batch_size),
                plan.micro_batch_size,
                cfg.train.max_tokens_per_micro_batch,
            ):
                mb = batch.select(rows)
                _, entropy = _logprobs(engine.model, mb, options, with_entropy=True)
                total += torch.stack(
                    [(entropy * mb.response_mask).sum().double(), mb.response_mask.sum().double()]
                )
        total = engine.all_reduce_sum(total)
        remembered["gtpo_initial_entropy"] = float(total[0] / total[1].clamp(min=1))
    metrics["gtpo/initial_entropy"] = remembered["gtpo_initial_entropy"]
    if remembered["gtpo_initial_entropy"] > args["entropy_threshold"]:
        args["entropy_threshold"] = math.inf
    return args


@hydra.main(config_path="../configs", config_name="grpo", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    cfg: GRPOConfig = recipe_config(GRPOConfig, dict_cfg)
    result = train(cfg)
    if launcher_env().is_main:
        print(f"GRPO finished at step {result['step']}; checkpoint: {result['checkpoint']}")
        if "eval/accuracy" in result:
            print(
                f"held-out accuracy: {result.get('eval/accuracy_before', float('nan')):.3f} -> {result['eval/accuracy']:.3f}"
            )


register_configs()

if __name__ == "__main__":
    run_entry_point(main)

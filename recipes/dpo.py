"""Direct preference optimisation and its family, with token-level weights and regularisers.

Loss (`loss.type`): DPO (sigmoid; conservative DPO with label smoothing; Rafailov et al., arXiv
2305.18290), IPO (arXiv 2310.12036), hinge (SLiC, arXiv 2305.10425), robust DPO (arXiv 2403.00409) and
reference-free SimPO (arXiv 2405.14734). Chosen and rejected go through one forward. The reference's
per-token logprobs come from a frozen copy (the LoRA-disabled policy under LoRA) on the fly, or are
computed once before training and cached on disk (`reference.precompute=true`). With
`reference.sync=true` the reference moves toward the policy every `reference.sync_steps` steps (TR-DPO,
arXiv 2404.09656; TRL's sync_ref_model).

Token-level options, all on the same path (per-token log-ratios, then weights, then the loss):
  token_weights.method=tgdpo  TGDPO: weights 1 +- alpha*beta*log(pi_guide/pi_ref) from a frozen
                              DPO-trained guide (token_weights.guide_model), floored
  token_weights.method=cdpo   cDPO: rejected-token weights 1 - s_t from contrastive estimation with
                              a positive and a negative model (recipes/cdpo_models.py trains them)
  token_weights.method=uniform  every rejected token weighted by token_weights.uniform_rejected_weight:
                              cDPO's control (its mean weight, no token credit)
  treg.alpha>0                T-REG: token rewards from contrastive prompting of a frozen model,
                              a weighted token-level regulariser added to the loss
Formulas, defaults and where we follow the authors' code: rlhf/losses/preference.py.

Launch:  python -m recipes.dpo model=pretrained model.name_or_path=<sft export> data.source=<pairs>
         torchrun --nproc_per_node 2 -m recipes.dpo distributed=zero2 ...
"""

from __future__ import annotations

from rlhf.overrides import check_recipe_command_line

if __name__ == "__main__":  # a wrong key is refused in seconds, before the heavy imports below
    check_recipe_command_line("dpo", __file__)


import dataclasses
import os
import time

import hydra
import torch
from omegaconf import DictConfig

from rlhf.config import ConfigError, DPOConfig, check_reference_sync, plan_sft_batches, register_configs
from rlhf.config.preference import TOKEN_WEIGHT_METHODS
from rlhf.data.chat import (
    PROMPT_TEXT,
    is_templated,
    prepare_splits,
    rewritten_prompt_ids,
    swap_chosen_rejected,
)
from rlhf.data.collate import collate_pairs, pair_tokens
from rlhf.data.load import load_task_data, warn_unknown_tokens
from rlhf.data.sampler import EpochSampler, rank_slice
from rlhf.data.token_cache import cached_token_values, pad_token_values, token_cache_key
from rlhf.distributed import build_engine, launcher_env, run_entry_point
from rlhf.distributed.collectives import mean_over_ranks
from rlhf.eval.accuracy import heldout_accuracy
from rlhf.losses.preference import (
    cdpo_token_weights,
    preference_loss,
    sequence_logratios,
    tgdpo_token_weights,
    token_reward_regularizer,
    treg_loss,
)
from rlhf.metrics import MetricAccumulator
from rlhf.models.forward import response_logprobs
from rlhf.models.load import load_frozen, load_policy, load_reference, load_tokenizer, model_context
from rlhf.models.options import ForwardOptions
from rlhf.models.reference import ReferenceSync
from rlhf.models.token_scorers import PairTokenScorer
from rlhf.plots import plot_metrics
from rlhf.rollout.hf import TransformersEngine
from rlhf.rollout.sampling import pad_prompts
from rlhf.run import Run, recipe_config
from rlhf.scoring import task_reward
from rlhf.update import micro_batches


def train(cfg: DPOConfig) -> dict[str, float | str]:
    """Train with the configured DPO-family loss; returns the final metrics, the last checkpoint
    and the run directory."""
    # Setup: validate before loading anything heavy.
    env = launcher_env()
    plan = plan_sft_batches(cfg, env.world_size)
    loss_fn, needs_reference = preference_loss(
        cfg.loss.type,
        beta=cfg.loss.beta,
        label_smoothing=cfg.loss.label_smoothing,
        simpo_gamma=cfg.loss.simpo_gamma,
    )
    _validate(cfg, needs_reference)
    accuracy_fn = task_reward(cfg.eval.accuracy_reward)
    train_rows, eval_rows = load_task_data(cfg.data, needs_pairs=True)
    total_steps = cfg.train.total_steps(len(train_rows))
    run = Run.open("dpo", cfg, env, total_steps)
    tokenizer = load_tokenizer(cfg.model)
    train_rows, eval_rows = prepare_splits(
        "pairs", train_rows, eval_rows, tokenizer, cfg.data, context=model_context(cfg.model)
    )
    warn_unknown_tokens(
        tokenizer, train_rows, [PROMPT_TEXT, cfg.data.chosen_column, cfg.data.rejected_column]
    )
    if cfg.loss.reverse:  # reverse DPO: every metric below is then about the swapped pairs
        train_rows, eval_rows = swap_chosen_rejected(train_rows), swap_chosen_rejected(eval_rows)
    policy = build_engine(
        lambda: load_policy(cfg.model, tokenizer, seed=cfg.seed),
        cfg.optim,
        cfg.distributed,
        total_steps,
        plan.micro_batch_size,
        cfg.train.precision,
    )
    templated = is_templated(train_rows, cfg.data)
    pairs = PairLoss(
        cfg, tokenizer, policy, loss_fn, _build_scorer(cfg, tokenizer, policy, needs_reference, templated)
    )
    sampler = EpochSampler(len(train_rows), seed=cfg.seed)
    reference_sync = None
    if cfg.reference.sync:  # TR-DPO: the reference moves toward the policy
        r = cfg.reference
        reference_sync = ReferenceSync(policy, pairs.scorer.reference, r.mixup_alpha, r.sync_steps)
    run.attach(
        policy, tokenizer, {"sampler": sampler, **({"reference": reference_sync} if reference_sync else {})}
    )

    run.evaluate_with(lambda step: _evaluate(cfg, pairs, eval_rows, accuracy_fn), cfg.eval.every)
    metrics: dict[str, float] = {}
    with run:
        # Frozen models' token values: precomputed once (then the models are dropped) or per micro-batch.
        if cfg.reference.precompute and pairs.scorer.columns:
            for split, rows in (("train", train_rows), ("eval", eval_rows)):
                if rows is not None:
                    pairs.caches[split] = _precompute(cfg, split, rows, pairs, run.dir)
            pairs.scorer = PairTokenScorer(
                options=pairs.scorer.options
            )  # the frozen models are no longer needed
        result: dict[str, float | str] = dict(run.evaluate_before())
        for step in run.steps():
            started = time.perf_counter()
            # 1 batch: this rank's share of the step's pairs; one normalizer for the whole step
            indices = rank_slice(sampler.next_indices(cfg.train.batch_size), env.rank, env.world_size)
            # 2-3 one forward per micro-batch for chosen and rejected, frozen token values, the loss
            step_loss, accumulator = _accumulate_gradients(cfg, pairs, policy, train_rows, indices, plan)
            # 4 optimizer step, log, evaluate (checkpoints and stops: in run.steps)
            metrics = {
                "loss": float(policy.all_reduce_sum(step_loss)),
                **accumulator.compute(),
                **policy.step(),
                **(reference_sync.after_step(step) if reference_sync else {}),
            }
            metrics["time/step"] = time.perf_counter() - started
            metrics = mean_over_ranks(metrics, policy)
            run.end_step(step, metrics)  # evaluated every eval.every steps, logged by logger.log_every
        run.finish()
        result.update(run.evaluate_after(metrics))
    if env.is_main:
        plot_metrics(
            run.dir,
            ["loss", "rewards/margin", "rewards/accuracy", "eval/reward_accuracy", "eval/accuracy"],
            "dpo_curves.png",
            f"DPO family ({cfg.loss.type}, token weights: {cfg.token_weights.method})",
        )
    return run.result(metrics, result)


class PairLoss:
    """Steps 2-3 for one micro-batch of pairs: collate chosen and rejected, the policy's logprobs
    (with gradient), the frozen models' token values (cached or computed), token weights, the loss."""

    def __init__(self, cfg: DPOConfig, tokenizer, policy, loss_fn, scorer: PairTokenScorer):
        self.cfg, self.tokenizer, self.policy, self.loss_fn, self.scorer = (
            cfg,
            tokenizer,
            policy,
            loss_fn,
            scorer,
        )
        self.caches: dict[str, dict[str, list[torch.Tensor]]] = {}

    def collate(self, rows):
        """The rows' raw prompts (twice: chosen rows, then rejected rows) and the pair tensors."""
        prompts = list(rows[self.cfg.data.prompt_column])
        return prompts + prompts, collate_pairs(rows, self.tokenizer.pad_token_id, self.policy.device)

    def token_values(self, split, row_ids, tensors, prompts) -> dict[str, torch.Tensor]:
        if split not in self.caches:
            return self.scorer(prompts, *tensors)
        cache, mask = self.caches[split], tensors[3]
        out = {}
        for name in ("ref_logprobs", "guide_logprobs", "contrast_scores", "treg_rewards"):
            if f"chosen/{name}" in cache:
                values = [cache[f"chosen/{name}"][i] for i in row_ids] + [
                    cache[f"rejected/{name}"][i] for i in row_ids
                ]
                out[name] = pad_token_values(values, mask, column=name, row_ids=row_ids + row_ids)
        return out

    def __call__(self, split, rows, row_ids, normalizer):
        cfg, w = self.cfg, self.cfg.token_weights
        prompts, tensors = self.collate(rows)
        mask = tensors[3]
        logprobs, _ = response_logprobs(self.policy.model, *tensors, self.scorer.options)
        values = self.token_values(split, row_ids, tensors, prompts)
        p = len(row_ids)
        c, r = slice(0, p), slice(p, 2 * p)
        ref = values.get("ref_logprobs")
        weights = [None, None]
        metrics = {}
        if w.method == "tgdpo":
            guide_ratio = values["guide_logprobs"] - ref
            weights[0], weights[1], metrics = tgdpo_token_weights(
                guide_ratio[c],
                guide_ratio[r],
                mask[c],
                mask[r],
                alpha=w.alpha,
                beta=cfg.loss.beta,
                floor=w.floor,
            )
        elif w.method == "cdpo":
            scores = values["contrast_scores"]
            weights[1] = cdpo_token_weights(scores[r], mask[r], rejected=True)
            if w.weight_chosen:
                weights[0] = cdpo_token_weights(scores[c], mask[c], rejected=False)
            metrics = {"cdpo/rejected_weight_mean": weights[1].sum() / mask[r].sum().clamp(min=1)}
        elif w.method == "uniform":
            weights[1] = torch.where(mask[r], w.uniform_rejected_weight, 0.0)
            metrics = {"uniform/rejected_weight": w.uniform_rejected_weight}
        chosen = sequence_logratios(logprobs[c], ref[c] if ref is not None else None, mask[c], weights[0])
        rejected = sequence_logratios(logprobs[r], ref[r] if ref is not None else None, mask[r], weights[1])
        lengths = mask.sum(-1)
        out = self.loss_fn(
            chosen, rejected, chosen_lengths=lengths[c], rejected_lengths=lengths[r], normalizer=normalizer
        )
        if cfg.treg.alpha:
            rewards = values["treg_rewards"]
            out = treg_loss(
                out,
                chosen,
                rejected,
                token_reward_regularizer(logprobs[c], rewards[c], mask[c], beta=cfg.loss.beta),
                token_reward_regularizer(logprobs[r], rewards[r], mask[r], beta=cfg.loss.beta),
                alpha=cfg.treg.alpha,
                beta=cfg.loss.beta,
                normalizer=normalizer,
            )
        sums = torch.where(mask, logprobs.detach(), 0.0).sum(-1)
        out.metrics.update(metrics)
        out.metrics["logprobs/chosen"] = sums[c].mean()
        out.metrics["logprobs/rejected"] = sums[r].mean()
        return out


@torch.no_grad()
def _evaluate(cfg: DPOConfig, pairs: PairLoss, eval_rows, accuracy_fn) -> dict[str, float]:
    """Held-out implicit-reward pair accuracy, and greedy task accuracy with `eval.accuracy_reward`."""
    results: dict[str, float] = {}
    if eval_rows is None:
        return results
    policy = pairs.policy
    rows = eval_rows.select(range(min(cfg.eval.num_samples, len(eval_rows))))
    shard = len(rows) // policy.world_size  # equal shares: every rank runs the same forwards
    correct = torch.zeros((), device=policy.device)
    for start in range(policy.rank * shard, (policy.rank + 1) * shard, cfg.eval.batch_size):
        ids = list(range(start, min(start + cfg.eval.batch_size, (policy.rank + 1) * shard)))
        correct += pairs("eval", rows.select(ids), ids, 1.0).metrics["rewards/accuracy"] * len(ids)
    results["eval/reward_accuracy"] = float(policy.all_reduce_sum(correct)) / max(
        shard * policy.world_size, 1
    )
    if accuracy_fn is not None:
        first_of_prompt = {text: i for i, text in reversed(list(enumerate(rows[PROMPT_TEXT])))}
        task = rows.select(sorted(first_of_prompt.values()))
        results["eval/accuracy"] = heldout_accuracy(
            TransformersEngine(policy, pairs.tokenizer), task, accuracy_fn, cfg.data, cfg.eval
        )
    return results


def _accumulate_gradients(cfg: DPOConfig, pairs, policy, train_rows, indices: list[int], plan):
    """This rank's share of a step's pairs in micro-batches (rows, or a token budget), forward and
    backward each with one normaliser for the whole step; (the summed loss, the metrics)."""
    normalizer = policy.all_reduce_sum(torch.tensor(float(len(indices)), device=policy.device))
    accumulator = MetricAccumulator()
    step_loss = torch.zeros((), device=policy.device)
    budget = cfg.train.max_tokens_per_micro_batch
    tokens = pair_tokens(train_rows.select(indices)) if budget else None
    for micro in micro_batches(policy, torch.arange(len(indices)), plan.micro_batch_size, budget, tokens):
        ids = [indices[i] for i in micro.tolist()]
        out = pairs("train", train_rows.select(ids), ids, normalizer)
        policy.backward(out.loss)
        step_loss += out.loss.detach()
        accumulator.add(out.metrics, weight=len(ids))
    return step_loss, accumulator


def _validate(cfg: DPOConfig, needs_reference: bool) -> None:
    w = cfg.token_weights
    if w.method not in TOKEN_WEIGHT_METHODS:
        raise ConfigError(f"token_weights.method={w.method!r}; choose one of {TOKEN_WEIGHT_METHODS}")
    if w.method == "tgdpo" and not w.guide_model:
        raise ConfigError("token_weights.method=tgdpo needs token_weights.guide_model (a DPO-trained policy)")
    if w.method == "tgdpo" and not needs_reference:
        raise ConfigError(
            f"token_weights.method=tgdpo needs a reference model; loss.type={cfg.loss.type} has none"
        )
    if w.method == "cdpo" and not (w.positive_model and w.negative_model):
        raise ConfigError(
            "token_weights.method=cdpo needs token_weights.positive_model and token_weights.negative_model "
            "(python -m recipes.cdpo_models trains them)"
        )
    check_reference_sync(cfg, needs_reference, f"loss.type={cfg.loss.type} is reference-free")
    if cfg.reference.sync and cfg.reference.precompute:
        raise ConfigError(
            "reference.sync=true moves the reference during training; reference.precompute=true caches its "
            "logprobs once before it: pick one"
        )
    if cfg.treg.alpha < 0:
        raise ConfigError(f"treg.alpha={cfg.treg.alpha} must be >= 0")
    if cfg.treg.alpha and not needs_reference and not cfg.treg.model:
        raise ConfigError(
            f"treg.alpha > 0 with loss.type={cfg.loss.type} (no reference model) needs treg.model, the frozen "
            "model to prompt for token rewards"
        )


def _build_scorer(
    cfg: DPOConfig, tokenizer, policy, needs_reference: bool, templated: bool
) -> PairTokenScorer:
    w = cfg.token_weights
    reference = load_reference(cfg.model, tokenizer, policy, seed=cfg.seed) if needs_reference else None
    scorer = PairTokenScorer(reference=reference, options=ForwardOptions.from_config(cfg.model))
    if w.method == "tgdpo":
        scorer.guide = load_frozen(policy, w.guide_model, tokenizer, cfg.model)
    if w.method == "cdpo":
        scorer.positive = load_frozen(policy, w.positive_model, tokenizer, cfg.model)
        scorer.negative = load_frozen(policy, w.negative_model, tokenizer, cfg.model)
        scorer.contrast_beta = w.contrast_beta
    if cfg.treg.alpha:
        scorer.treg_model = (
            load_frozen(policy, cfg.treg.model, tokenizer, cfg.model) if cfg.treg.model else reference
        )
        scorer.better_template, scorer.worse_template = cfg.treg.better_template, cfg.treg.worse_template
        scorer.rewrite_prompts = lambda prompts, template: pad_prompts(
            [
                rewritten_prompt_ids(tokenizer, p, lambda text: template.format(prompt=text), templated)
                for p in prompts
            ],
            tokenizer.pad_token_id,
            policy.device,
        )
    return scorer


def _precompute(cfg: DPOConfig, split, rows, pairs: PairLoss, run_dir: str) -> dict:
    """The frozen models' token values of every pair of `rows`, from the disk cache or computed now."""
    key = token_cache_key(
        split=split,
        rows=len(rows),
        fingerprint=getattr(rows, "_fingerprint", None),
        data=dataclasses.asdict(cfg.data),
        model=dataclasses.asdict(cfg.model),
        columns=pairs.scorer.columns,
        token_weights=dataclasses.asdict(cfg.token_weights),
        treg=dataclasses.asdict(cfg.treg) if cfg.treg.alpha else None,
    )
    directory = os.path.join(cfg.reference.cache_dir or os.path.join(run_dir, "token_cache"), key)

    def compute(indices: list[int]) -> dict[str, list[torch.Tensor]]:
        prompts, tensors = pairs.collate(rows.select(indices))
        values = pairs.scorer(prompts, *tensors)
        mask, p = tensors[3], len(indices)
        out = {}
        for name, tensor in values.items():
            per_row = [tensor[i][mask[i]].float().cpu() for i in range(2 * p)]
            out[f"chosen/{name}"], out[f"rejected/{name}"] = per_row[:p], per_row[p:]
        return out

    def progress(done: int, total: int) -> None:
        print(f"[dpo] precomputing token values ({split}): {done}/{total} pairs", flush=True)

    return cached_token_values(
        len(rows),
        compute,
        directory=directory,
        engine=pairs.policy,
        batch_size=cfg.reference.batch_size,
        progress=progress,
    )


@hydra.main(config_path="../configs", config_name="dpo", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    cfg: DPOConfig = recipe_config(DPOConfig, dict_cfg)
    result = train(cfg)
    if launcher_env().is_main:
        print(f"DPO finished at step {result['step']}; checkpoint: {result['checkpoint']}")
        for key in ("eval/reward_accuracy", "eval/accuracy"):
            if key in result:
                print(f"{key}: {result.get(key + '_before', float('nan')):.3f} -> {result[key]:.3f}")


register_configs()

if __name__ == "__main__":
    run_entry_point(main)

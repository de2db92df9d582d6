"""One GRPO optimizer step on a fixed synthetic rollout, for the data-parallel invariance tests.

Run under torchrun (each rank takes its contiguous share of the rollout) or as one process (the
whole rollout). Rank 0 writes the full updated weights to OUT and the update's metrics to
OUT.metrics.json. Usage:
    python tests/distributed/grpo_update_worker.py OUT DISTRIBUTED MICRO_BATCH [AGGREGATION [TOP_ENTROPY_QUANTILE]]
"""

from __future__ import annotations

import json
import sys

import torch

from rlhf.config import DistributedConfig, GRPOConfig, OptimConfig, plan_grpo_batches
from rlhf.distributed import build_engine, launcher_env, run_entry_point
from rlhf.losses.kl import k3
from rlhf.losses.reduce import get_reduction
from rlhf.models.options import ForwardOptions
from rlhf.models.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_causal_lm
from rlhf.rollout.vllm import policy_weight_shapes, policy_weights
from rlhf.types import RolloutBatch
from rlhf.update import PolicyGradientObjective, UpdatePlan, run_update

ROWS, PROMPT, RESPONSE = 8, 5, 6


def fixed_rollout(vocab: int) -> RolloutBatch:
    generator = torch.Generator().manual_seed(123)
    lengths = torch.randint(1, RESPONSE + 1, (ROWS,), generator=generator)
    response_mask = torch.arange(RESPONSE).unsqueeze(0) < lengths.unsqueeze(1)
    return RolloutBatch(
        prompt_ids=torch.randint(4, vocab, (ROWS, PROMPT), generator=generator),
        prompt_mask=torch.ones(ROWS, PROMPT, dtype=torch.bool),
        response_ids=torch.randint(4, vocab, (ROWS, RESPONSE), generator=generator),
        response_mask=response_mask,
        group_ids=torch.arange(ROWS) // 4,
        truncated=torch.zeros(ROWS, dtype=torch.bool),
        old_logprobs=-torch.rand(ROWS, RESPONSE, generator=generator) * 3,
        ref_logprobs=-torch.rand(ROWS, RESPONSE, generator=generator) * 3,
        advantages=torch.randn(ROWS, generator=generator),
    )


def main() -> None:
    out, backend, micro, aggregation = (
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        (sys.argv[4] if len(sys.argv) > 4 else "token_mean"),
    )
    quantile = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
    env = launcher_env()
    dist = (
        DistributedConfig(backend="single")
        if backend == "single"
        else DistributedConfig(backend="deepspeed", zero_stage=int(backend[-1]))
    )
    # eps=1 makes Adam's first step ~ lr * g (linear in the gradient), so a wrong gradient scale shows
    cfg = GRPOConfig(distributed=dist, optim=OptimConfig(lr=1.0, eps=1.0, max_grad_norm=None))
    cfg.train.prompts_per_step, cfg.rollout.group_size, cfg.train.micro_batch_size = 2, 4, micro
    cfg.loss.aggregation, cfg.loss.kl_coef, cfg.train.num_minibatches = aggregation, 0.05, 1
    cfg.rollout.max_new_tokens = RESPONSE
    cfg.loss.top_entropy_quantile = quantile
    plan = plan_grpo_batches(cfg, env.world_size)
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(
        TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tokenizer, seed=0
    )
    engine = build_engine(
        model, cfg.optim, cfg.distributed, total_steps=1, micro_batch_size=plan.micro_batch_size
    )
    share = ROWS // env.world_size
    batch = (
        fixed_rollout(len(tokenizer))
        .select(range(env.rank * share, (env.rank + 1) * share))
        .to(engine.device)
    )
    reduction = get_reduction(aggregation)
    options = ForwardOptions(warp={"temperature": 1.0, "top_k": 0, "top_p": 1.0})
    objective = PolicyGradientObjective(cfg, engine, reduction, options, kl_estimator=k3)
    metrics = run_update(batch, objective, UpdatePlan.from_config(cfg, plan), reduction)
    # what a weight sync to vLLM servers declares (NCCL sizes its buffers from it) is what it
    # sends: under ZeRO-3 the shapes come from the partitions' ds_shape, nothing gathered
    declared = policy_weight_shapes(engine)
    sent = [(name, tuple(tensor.shape)) for name, tensor in policy_weights(engine)]
    assert declared == sent, f"declared {declared} but sent {sent}"
    weights = engine.full_state_dict()
    if env.is_main:
        torch.save({k: v.detach().cpu().float() for k, v in weights.items()}, out)
        with open(out + ".metrics.json", "w") as handle:
            json.dump(metrics, handle)


if __name__ == "__main__":
    run_entry_point(main)

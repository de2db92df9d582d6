"""Output diversity and reward of a policy, as CD-RLHF evaluates them: sample N completions for each
of P prompts, score them with a reward function, and report Diversity, EAD, Self-BLEU and (with
--sentbert) SentBERT similarity per prompt, averaged (rlhf/eval/diversity.py).

Usage: python -m recipes.diversity_eval MODEL_DIR [--data sums] [--split eval] [--reward sum_to_target]
       [--samples 10] [--prompts 500] [--temperature 1.0] [--max-new-tokens 16] [--sentbert] [--seed 1234]
       [--engine vllm]
The defaults follow the authors' protocol (10 samples at T = 1.0, prompts shuffled with seed 1234).
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from rewards import REWARD_FUNCTIONS
from rlhf.config import DataConfig, ModelConfig
from rlhf.data.chat import prepare_prompts
from rlhf.data.load import load_splits
from rlhf.eval.diversity import evaluate_diversity, load_minilm
from rlhf.models.load import load_causal_lm, load_tokenizer
from rlhf.rollout.engine import closing_engine, engine_for_model
from rlhf.rollout.sampling import SamplingParams
from rlhf.scoring import resolve_reward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--data", default="sums")
    parser.add_argument("--split", default="eval")
    parser.add_argument("--reward", default="sum_to_target")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--sentbert", action="store_true")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    args = parser.parse_args()
    model_cfg = ModelConfig(source="pretrained", name_or_path=args.model_dir)
    tokenizer = load_tokenizer(model_cfg)
    model = load_causal_lm(model_cfg, tokenizer).eval()
    data_cfg = DataConfig(source=args.data)
    rows = load_splits(data_cfg)[args.split]
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    rows = prepare_prompts(
        rows.select(order[: args.prompts]),
        tokenizer,
        data_cfg,
        f"{args.data} {args.split}",
        response_budget=args.max_new_tokens,
    )
    torch.manual_seed(args.seed)
    with closing_engine(
        engine_for_model(args.engine, model, tokenizer, args.max_new_tokens, args.seed)
    ) as engine:
        result = evaluate_diversity(
            engine,
            rows,
            resolve_reward(args.reward, REWARD_FUNCTIONS),
            samples=args.samples,
            sampling=SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature),
            encoder=load_minilm() if args.sentbert else None,
            seed=args.seed,
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

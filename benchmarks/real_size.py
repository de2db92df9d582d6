"""GRPO and DPO steps at a real model's shapes: ours, each memory/compute feature off and on,
against TRL 1.16's trainers on the same model, data and work.

Model: a random-init Llama with hidden 256, 4 layers, 4 heads (head_dim 64), MLP 1024 and a
32,000-word vocabulary (a word-level tokenizer built here: no download), saved to a local directory
that every side loads. Prompts are random words; the data holds exactly one step's prompts, so every
step of every side does the same work, and their lengths differ as real rows do: GRPO's two prompts
are 1,024 and 2,048 tokens, DPO's four 1,024, 1,365, 1,706 and 2,048 (--prompt-lengths sets the range).
- GRPO: 2 prompts x G=8, 64 new tokens (a random model never samples EOS), a shaped reward (the share
  of words with an even number), no KL, one optimizer step per rollout, all 16 rows in one
  micro-batch. Sides: TRL as shipped; ours padded; with `model.padding_free`; with
  `model.shared_prefix` (each prompt encoded once per group in the prefill and in every training
  forward); with both and `model.logprob_chunk_tokens=64`.
- DPO: 4 pairs, chosen and rejected 32-128 tokens, sigmoid loss, the reference on the fly. Sides: TRL
  as shipped (`max_length` large enough that nothing is truncated: checked); ours padded; with
  `model.padding_free`; with `model.shared_prefix` (the pair's prompt once).
fp32, 2 torch threads. The sides are interleaved (each side once per repeat), the first step of each
run dropped; medians and ranges of seconds per step are reported.

Usage: python benchmarks/real_size.py [--recipes grpo dpo] [--repeats 2] [--steps 4] [--no-record]
       [--prompt-lengths 1024 2048]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import random
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import append_results, median_range, step_timer  # noqa: E402

VOCAB, HIDDEN, LAYERS, HEADS, MLP = 32_000, 256, 4, 4, 1024
GROUP, PROMPTS, NEW_TOKENS, PAIRS = 8, 2, 64, 4
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

GRPO_SIDES = {
    "ours padded": [],
    "ours padding-free": ["model.padding_free=true"],
    "ours shared prefix": ["model.shared_prefix=true"],
    "ours shared prefix + padding-free + chunked": [
        "model.shared_prefix=true",
        "model.padding_free=true",
        "model.logprob_chunk_tokens=64",
    ],
}
DPO_SIDES = {
    "ours padded": [],
    "ours padding-free": ["model.padding_free=true"],
    "ours shared prefix": ["model.shared_prefix=true"],
}


def even_word_share(prompts, completions, **_):
    """A shaped reward: the share of words whose number is even (advantages are never all zero)."""
    words = [c.split() for c in completions]
    return [sum(w[1:].isdigit() and int(w[1:]) % 2 == 0 for w in ws) / max(len(ws), 1) for ws in words]


def save_model(directory: str) -> str:
    """The random-init Llama and its word-level tokenizer (special tokens first, then w0, w1, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"w{i}": len(specials) + i for i in range(VOCAB - len(specials))})
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _text(rng: random.Random, tokens: int) -> str:
    return " ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(tokens))


def make_rows(kind: str, low: int, high: int, seed: int = 0) -> list[dict[str, str]]:
    """One step's rows: GRPO's prompts, or DPO's pairs, with lengths spread evenly over [low, high]."""
    count = PROMPTS if kind == "grpo" else PAIRS
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        row = {"prompt": _text(rng, low + round(i * (high - low) / (count - 1)))}
        if kind == "dpo":
            row["chosen"] = " " + _text(rng, rng.randint(32, 128))
            row["rejected"] = " " + _text(rng, rng.randint(32, 128))
        rows.append(row)
    return rows


def run_ours(
    recipe: str, model_dir: str, data: str, steps: int, extra: list[str], workdir: str
) -> list[float]:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import rewards
    from recipes import dpo, grpo
    from rlhf.config import register_configs
    from rlhf.loggers import read_metrics

    rewards.REWARD_FUNCTIONS["even_word_share"] = even_word_share
    register_configs()
    run_dir = tempfile.mkdtemp(dir=workdir)
    common = [
        f"run_dir={run_dir}",
        "model=pretrained",
        f"model.name_or_path={model_dir}",
        f"data.source={data}",
        "data.eval_split=null",
        "data.completion_column=null",
        "data.max_prompt_length=null",
        "data.max_length=null",
        f"train.steps={steps}",
        "optim.lr=1e-5",
        "checkpoint.every=0",
        "checkpoint.save_final=false",
        "logger=quiet",
        *extra,
    ]
    if recipe == "grpo":
        common += [
            "reward.functions=[{name: even_word_share, weight: 1.0}]",
            "reward.accuracy_reward=null",
            f"train.prompts_per_step={PROMPTS}",
            f"rollout.group_size={GROUP}",
            f"rollout.max_new_tokens={NEW_TOKENS}",
            f"train.micro_batch_size={PROMPTS * GROUP}",
            "loss.kl_coef=0.0",
            "eval.every=0",
        ]
    else:
        common += [
            f"train.batch_size={PAIRS}",
            f"train.micro_batch_size={PAIRS}",
            "loss.beta=0.1",
            "eval.every=0",
        ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose(recipe, overrides=common))
    (grpo if recipe == "grpo" else dpo).train(cfg)
    return [r["time/step"] for r in read_metrics(run_dir) if "time/step" in r][1:]


def run_trl(recipe: str, model_dir: str, rows: list[dict], steps: int, workdir: str) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    times: list[float] = []
    shared = dict(
        output_dir=tempfile.mkdtemp(dir=workdir),
        gradient_accumulation_steps=1,
        learning_rate=1e-5,
        max_steps=steps,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    if recipe == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(
            **shared,
            per_device_train_batch_size=PROMPTS * GROUP,  # counts completions, not prompts
            num_generations=GROUP,
            max_completion_length=NEW_TOKENS,
            beta=0.0,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            loss_type="grpo",
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[even_word_share],
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[step_timer(times)],
        )
    else:
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(
            **shared,
            per_device_train_batch_size=PAIRS,
            beta=0.1,
            loss_type=["sigmoid"],
            max_length=4096,
            precompute_ref_log_probs=False,
            dataloader_num_workers=0,
        )
        trainer = DPOTrainer(
            model=model,
            ref_model=copy.deepcopy(model),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[step_timer(times)],
        )
        if len(trainer.train_dataset) != len(rows):
            raise RuntimeError(
                f"TRL kept {len(trainer.train_dataset)} of {len(rows)} pairs; raise max_length"
            )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", choices=["grpo", "dpo"], default=["grpo", "dpo"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompt-lengths", type=int, nargs=2, default=[1024, 2048], metavar=("LOW", "HIGH"))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    os.environ.setdefault("WANDB_MODE", "disabled")
    workdir = tempfile.mkdtemp(prefix="real_size_")
    model_dir = save_model(os.path.join(workdir, "model"))
    lines = []
    for recipe in args.recipes:
        rows = make_rows(recipe, *args.prompt_lengths)
        data = os.path.join(workdir, f"{recipe}.jsonl")
        with open(data, "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
        sides = {"TRL": functools.partial(run_trl, recipe, model_dir, rows, args.steps, workdir)}
        for name, extra in (GRPO_SIDES if recipe == "grpo" else DPO_SIDES).items():
            sides[name] = functools.partial(run_ours, recipe, model_dir, data, args.steps, extra, workdir)
        times: dict[str, list[float]] = {name: [] for name in sides}
        for repeat in range(args.repeats):
            for name, run in sides.items():
                found = run()
                times[name] += found
                print(
                    f"{recipe} repeat {repeat} {name}: median {statistics.median(found):.2f} s/step",
                    flush=True,
                )
        trl = statistics.median(times["TRL"])
        lines += [
            "",
            f"{recipe.upper()} step, prompts of {args.prompt_lengths[0]}-{args.prompt_lengths[1]} tokens:",
            "",
            "| side | s/step (median, range) | TRL / side |",
            "|---|---|---|",
        ]
        lines += [
            f"| {n} | {median_range(t)} | {trl / statistics.median(t):.2f}x |" for n, t in times.items()
        ]
    body = "\n".join(lines)
    print(body)
    if not args.no_record:
        command = "python benchmarks/real_size.py " + " ".join(sys.argv[1:])
        append_results("GRPO and DPO steps at hidden 256, vocabulary 32k, prompts 1-2k tokens", command, body)


if __name__ == "__main__":
    main()

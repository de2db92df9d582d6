"""GRPO and DPO steps at a real model's shapes: ours, each memory/compute feature off and on,
against TRL 1.16's trainers on the same model, data and work.

Model (`--shape small`, the default): a random-init Llama with hidden 256, 4 layers, 4 heads
(head_dim 64), MLP 1024 and a 32,000-word vocabulary (a word-level tokenizer built here: no
download), saved to a local directory that every side loads. Prompts are random words; the data holds exactly one step's prompts, so every
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

`--timing update` times the update alone: for ours the logprob passes and the optimizer step's
forward and backward (`time/logprob_passes` + `time/update`), for TRL the step less the time in its
`_generate` (generation and tool calls); GPU runs then also report the update's peak memory (the
highest allocation between the end of one generation and the start of the next). `--group` sets
G, `--sides` picks sides by name. The FlexAttention side (`model.attn_implementation=flex_attention`)
runs on CUDA only (torch has no FlexAttention backward on CPU).

`--largest-group START CAP` finds, for each chosen side, the largest G that trains (two GRPO steps,
so the optimizer's state is held in the second) without running out of memory: G = START,
2 START, ... up to CAP, each in a fresh process over the same saved model, stopping at the first
that runs out of memory. The answer's resolution is that factor of two: the table names the first G
that did not fit. A failure other than out-of-memory stops the search with its error.

On a GPU (`--device cuda`), every side trains in bf16 mixed precision (TRL `bf16=True`, ours
`train.precision=bf16`), and `--shape qwen2-0.5b` / `qwen2-1.5b` builds a random-init model with
those checkpoints' dimensions and 151,936-word vocabulary. GPU runs also report tokens per
second (prompt and response tokens of the step's rows) and the step's model FLOPs utilisation:
6 x parameters x tokens (one forward and backward; generation and the frozen passes are not
counted, so it understates the work done) over the GPU's dense bf16 peak (989 TFLOP/s, H100/H200).

Usage: python benchmarks/speed/real_size.py [--recipes grpo dpo] [--repeats 2] [--steps 4] [--no-record]
       [--prompt-lengths 1024 2048] [--device cpu|cuda] [--shape small|qwen2-0.5b|qwen2-1.5b]
       [--prompts 2] [--group 8] [--new-tokens 64] [--timing step|update] [--sides NAME ...]
       [--largest-group START CAP]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.common import append_results, median_range, step_timer  # noqa: E402

PAIRS = 4
PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM dense bf16


@dataclass(frozen=True)
class Shape:
    arch: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int


SHAPES = {
    "small": Shape("llama", 32_000, 256, 4, 4, 4, 1024),
    # Qwen2's dimensions and q/k/v biases in Llama's block: transformers would load a qwen2 model type's
    # tokenizer as Qwen2's BPE class, which cannot read the word-level tokenizer built here
    "qwen2-0.5b": Shape("qwen2", 151_936, 896, 24, 14, 2, 4864),
    "qwen2-1.5b": Shape("qwen2", 151_936, 1536, 28, 12, 2, 8960),
}
# set from the command line in main(): the model's shape, prompts per GRPO step, new tokens per
# response, device, and whether whole steps or updates alone are timed
SHAPE, PROMPTS, NEW_TOKENS, DEVICE, TIMING = SHAPES["small"], 2, 64, "cpu", "step"
GROUP, CHECKPOINTING = 8, False  # G, and activation checkpointing on both sides (--gradient-checkpointing)
CONFIG_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)

# the sides without a chunk keep the whole-logits pass (logprob_chunk_tokens=0), as measured before
# the chunk became automatic by size
WHOLE = "model.logprob_chunk_tokens=0"
GRPO_SIDES = {
    "ours padded": [WHOLE],
    "ours padding-free": ["model.padding_free=true", WHOLE],
    "ours shared prefix": ["model.shared_prefix=true", WHOLE],
    "ours shared prefix + padding-free + chunked": [
        "model.shared_prefix=true",
        "model.padding_free=true",
        "model.logprob_chunk_tokens=64",
    ],
    "ours shared prefix + padding-free + chunked, flex": [
        "model.attn_implementation=flex_attention",
        "model.shared_prefix=true",
        "model.padding_free=true",
        "model.logprob_chunk_tokens=64",
    ],
}
DPO_SIDES = {
    "ours padded": [WHOLE],
    "ours padding-free": ["model.padding_free=true", WHOLE],
    "ours shared prefix": ["model.shared_prefix=true", WHOLE],
    "ours shared prefix + padding-free, flex": [
        "model.attn_implementation=flex_attention",
        "model.shared_prefix=true",
        "model.padding_free=true",
        WHOLE,
    ],
}


class UpdateMemory:
    """Wraps a side's generation call: the peak allocation since the last generation ended (the
    update's, with its logprob passes) is read when the next one starts; seconds spent generating
    are kept per call."""

    def __init__(self, generate):
        self.generate, self.peaks_gb, self.seconds = generate, [], []

    def __call__(self, *args, **kwargs):
        import time

        if DEVICE == "cuda":
            self.peaks_gb.append(torch.cuda.max_memory_allocated() / 2**30)
        started = time.perf_counter()
        result = self.generate(*args, **kwargs)
        self.seconds.append(time.perf_counter() - started)
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return result

    def peak_gb(self) -> float | None:
        if DEVICE != "cuda":
            return None
        self.peaks_gb.append(torch.cuda.max_memory_allocated() / 2**30)  # the last update's
        return max(self.peaks_gb[1:]) if len(self.peaks_gb) > 1 else None


def even_word_share(prompts, completions, **_):
    """A shaped reward: the share of words whose number is even (advantages are never all zero)."""
    words = [c.split() for c in completions]
    return [sum(w[1:].isdigit() and int(w[1:]) % 2 == 0 for w in ws) / max(len(ws), 1) for ws in words]


def save_model(directory: str) -> str:
    """The random-init model of SHAPE and its word-level tokenizer (special tokens, then w0, w1, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"w{i}": len(specials) + i for i in range(SHAPE.vocab - len(specials))})
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=SHAPE.vocab,
        hidden_size=SHAPE.hidden,
        intermediate_size=SHAPE.mlp,
        num_hidden_layers=SHAPE.layers,
        num_attention_heads=SHAPE.heads,
        num_key_value_heads=SHAPE.kv_heads,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
        attention_bias=SHAPE.arch == "qwen2",  # Llama's flag also gives o_proj a bias: 0.02% more parameters
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _text(rng: random.Random, tokens: int) -> str:
    return " ".join(f"w{rng.randrange(SHAPE.vocab - 4)}" for _ in range(tokens))


def make_rows(kind: str, low: int, high: int, seed: int = 0) -> list[dict[str, str]]:
    """One step's rows: GRPO's prompts, or DPO's pairs, with lengths spread evenly over [low, high]."""
    count = PROMPTS if kind == "grpo" else PAIRS
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        row = {"prompt": _text(rng, low + round(i * (high - low) / max(count - 1, 1)))}  # one prompt: LOW
        if kind == "dpo":
            row["chosen"] = " " + _text(rng, rng.randint(32, 128))
            row["rejected"] = " " + _text(rng, rng.randint(32, 128))
        rows.append(row)
    return rows


def run_ours(
    recipe: str, model_dir: str, data: str, steps: int, extra: list[str], workdir: str
) -> tuple[list[float], float | None]:
    """Seconds per step (or per update, with --timing update) after the first, and the update's peak
    GPU memory in GiB (None on CPU)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import rewards
    from recipes import dpo, grpo
    from rlhf.config import register_configs
    from rlhf.loggers import read_metrics
    from rlhf.rollout import ahead as rollout_steps  # every GRPO rollout goes through its rollout_rows

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
        *(["train.precision=bf16"] if DEVICE == "cuda" else []),
        *(["model.gradient_checkpointing=true"] if CHECKPOINTING else []),
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
    generation = UpdateMemory(rollout_steps.rollout_rows)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rollout_steps.rollout_rows = generation
    try:
        (grpo if recipe == "grpo" else dpo).train(cfg)
    finally:
        rollout_steps.rollout_rows = generation.generate
    rows = [r for r in read_metrics(run_dir) if "time/step" in r]
    if TIMING == "update" and recipe == "grpo":  # DPO generates nothing: its step is its update
        return [r["time/logprob_passes"] + r["time/update"] for r in rows][1:], generation.peak_gb()
    return [r["time/step"] for r in rows][1:], generation.peak_gb()


def run_trl(
    recipe: str, model_dir: str, rows: list[dict], steps: int, workdir: str
) -> tuple[list[float], float | None]:
    """As `run_ours`, for TRL's trainer."""
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
        bf16=DEVICE == "cuda",
        use_cpu=DEVICE == "cpu",
        gradient_checkpointing=CHECKPOINTING,
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
    if recipe == "grpo":
        trainer._generate = generation = UpdateMemory(trainer._generate)
    else:
        generation = UpdateMemory(None)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if TIMING == "update" and recipe == "grpo":  # one generation per step (steps_per_generation 1)
        times = [step - generate for step, generate in zip(times, generation.seconds, strict=True)]
    return times[1:], generation.peak_gb()


def step_tokens(recipe: str, rows: list[dict], model_dir: str) -> int:
    """Prompt and response tokens in one step's rows (GRPO responses run to max_new_tokens)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    if recipe == "grpo":
        return sum(GROUP * (count(r["prompt"]) + NEW_TOKENS) for r in rows)
    return sum(2 * count(r["prompt"]) + count(r["chosen"]) + count(r["rejected"]) for r in rows)


def throughput_lines(
    recipe: str, rows: list[dict], model_dir: str, times: dict[str, list[float]]
) -> list[str]:
    """Tokens per second and model FLOPs utilisation of each side's median step (GPU runs)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    parameters = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    tokens = step_tokens(recipe, rows, model_dir)
    lines = [
        "",
        f"{recipe.upper()} throughput: {parameters / 1e6:.0f}M parameters, {tokens} tokens per step",
        "",
        "| side | tokens/s | MFU (6 N T / t / 989 TFLOP/s) |",
        "|---|---|---|",
    ]
    for name, found in times.items():
        seconds = statistics.median(found)
        mfu = 6 * parameters * tokens / seconds / PEAK_BF16_FLOPS
        lines.append(f"| {name} | {tokens / seconds:,.0f} | {100 * mfu:.1f}% |")
    return lines


def largest_fitting(fits, start: int, cap: int) -> tuple[int | None, int | None]:
    """Doubling G from `start` while `fits(G)` and G <= cap: the largest G that fit (None if `start`
    did not) and the first that did not (None if every G up to `cap` fit)."""
    if start < 1 or cap < start:
        raise ValueError(f"--largest-group: need 1 <= START <= CAP, got {start} and {cap}")
    largest, group = None, start
    while group <= cap:
        if not fits(group):
            return largest, group
        largest, group = group, group * 2
    return largest, None


def ran_out_of_memory(returncode: int, stderr: str) -> bool:
    """Whether a child run failed by running out of GPU memory; any other failure is raised."""
    if returncode == 0:
        return False
    if "OutOfMemoryError" in stderr or "CUDA out of memory" in stderr:
        return True
    raise RuntimeError(
        f"a --largest-group try failed (rc {returncode}) for another reason:\n{stderr[-3000:]}"
    )


def fits_at(
    group: int, side: str, model_dir: str, args: argparse.Namespace, workdir: str
) -> tuple[bool, float | None]:
    """One side's two GRPO steps at G = group, in a fresh process: whether it fit, and its peak GiB."""
    result = os.path.join(workdir, f"fit_{abs(hash(side))}_{group}.json")
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--recipes", "grpo", "--timing", "update", "--steps", "2", "--repeats", "1", "--no-record",
        "--device", args.device, "--shape", args.shape, "--prompts", str(args.prompts),
        "--new-tokens", str(args.new_tokens), "--prompt-lengths", *map(str, args.prompt_lengths),
        "--group", str(group), "--sides", side, "--model-dir", model_dir, "--result-json", result,
        *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if ran_out_of_memory(done.returncode, done.stderr):
        print(f"largest group: {side} at G={group}: out of memory", flush=True)
        return False, None
    with open(result) as handle:
        peak_gb = json.load(handle)[side]["peak_gb"]
    peak = f", peak {peak_gb:.1f} GiB" if peak_gb is not None else ""
    print(f"largest group: {side} at G={group}: fits{peak}", flush=True)
    return True, peak_gb


def largest_group_lines(
    sides: list[str], model_dir: str, args: argparse.Namespace, workdir: str
) -> list[str]:
    """The --largest-group table: per side, the largest G that fit, its peak, the first that did not."""
    start, cap = args.largest_group
    lines = [
        "",
        f"Largest G that trains, GRPO, prompts of {args.prompt_lengths[0]}-{args.prompt_lengths[1]} tokens, "
        f"{args.prompts} prompt(s), {args.new_tokens} new tokens, G doubled from {start} up to {cap}:",
        "",
        "| side | largest G that fits | its update's peak GiB | first G out of memory |",
        "|---|---|---|---|",
    ]
    for side in sides:
        peaks: dict[int, float | None] = {}

        def fits(group: int, side: str = side, peaks: dict = peaks) -> bool:
            fit, peaks[group] = fits_at(group, side, model_dir, args, workdir)
            return fit

        largest, failed = largest_fitting(fits, start, cap)
        peak = peaks.get(largest) if largest is not None else None
        lines.append(
            f"| {side} | {largest if largest is not None else f'none (G={start} did not fit)'} | "
            f"{f'{peak:.1f}' if peak is not None else '-'} | {failed if failed is not None else f'none up to {cap}'} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", choices=["grpo", "dpo"], default=["grpo", "dpo"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompt-lengths", type=int, nargs=2, default=[1024, 2048], metavar=("LOW", "HIGH"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--prompts", type=int, default=2, help="GRPO prompts per step")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--group", type=int, default=8, help="GRPO samples per prompt (G)")
    parser.add_argument("--timing", choices=["step", "update"], default="step")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    parser.add_argument("--sides", nargs="+", default=None, help="only these sides (TRL included by name)")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument(
        "--largest-group", type=int, nargs=2, metavar=("START", "CAP"), default=None,
        help="GRPO: the largest G that fits for each side, doubling from START up to CAP",
    )  # fmt: skip
    parser.add_argument("--model-dir", default=None, help="a model saved by an earlier run (same --shape)")
    parser.add_argument("--result-json", default=None, help="write each side's seconds and peak GiB here")
    args = parser.parse_args()
    if args.largest_group and args.recipes != ["grpo"]:
        parser.error("--largest-group measures GRPO only: pass --recipes grpo")
    global SHAPE, PROMPTS, NEW_TOKENS, DEVICE, TIMING, GROUP, CHECKPOINTING
    SHAPE, PROMPTS, NEW_TOKENS, DEVICE = SHAPES[args.shape], args.prompts, args.new_tokens, args.device
    TIMING, GROUP, CHECKPOINTING = args.timing, args.group, args.gradient_checkpointing
    if DEVICE == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    torch.set_num_threads(2)
    os.environ.setdefault("WANDB_MODE", "disabled")
    workdir = tempfile.mkdtemp(prefix="real_size_")
    model_dir = args.model_dir or save_model(os.path.join(workdir, "model"))
    lines = []
    for recipe in args.recipes:
        rows = make_rows(recipe, *args.prompt_lengths)
        data = os.path.join(workdir, f"{recipe}.jsonl")
        with open(data, "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
        sides = {"TRL": functools.partial(run_trl, recipe, model_dir, rows, args.steps, workdir)}
        for name, extra in (GRPO_SIDES if recipe == "grpo" else DPO_SIDES).items():
            if DEVICE == "cpu" and "model.attn_implementation=flex_attention" in extra:
                continue  # no FlexAttention backward on CPU
            sides[name] = functools.partial(run_ours, recipe, model_dir, data, args.steps, extra, workdir)
        unknown = sorted(set(args.sides or []) - set(sides))
        if unknown and len(args.recipes) == 1:
            parser.error(f"--sides: no side named {unknown} for {recipe}; there are {sorted(sides)}")
        sides = {name: run for name, run in sides.items() if args.sides is None or name in args.sides}
        if args.largest_group:
            lines += largest_group_lines(list(sides), model_dir, args, workdir)
            continue
        times: dict[str, list[float]] = {name: [] for name in sides}
        peaks: dict[str, float] = {}
        for repeat in range(args.repeats):
            for name, run in sides.items():
                found, peak_gb = run()
                times[name] += found
                if peak_gb is not None:
                    peaks[name] = max(peak_gb, peaks.get(name, 0.0))
                print(
                    f"{recipe} repeat {repeat} {name}: median {statistics.median(found):.2f} s/step",
                    flush=True,
                )
        unit = "update" if TIMING == "update" and recipe == "grpo" else "step"
        trl = statistics.median(times["TRL"]) if "TRL" in times else None
        group_shape = f", G={GROUP}, {NEW_TOKENS} new tokens" if recipe == "grpo" else ""
        memory = (" peak GiB of the update |", "---|") if peaks else ("", "")
        lines += [
            "",
            f"{recipe.upper()} {unit}, prompts of {args.prompt_lengths[0]}-{args.prompt_lengths[1]} tokens{group_shape}:",
            "",
            f"| side | s/{unit} (median, range) | TRL / side |{memory[0]}",
            f"|---|---|---|{memory[1]}",
        ]
        for name, found in times.items():
            ratio = f"{trl / statistics.median(found):.2f}x" if trl else "-"
            peak = f" {peaks[name]:.1f} |" if name in peaks else (" - |" if peaks else "")
            lines.append(f"| {name} | {median_range(found)} | {ratio} |{peak}")
        if DEVICE == "cuda":
            lines += throughput_lines(recipe, rows, model_dir, times)
        if args.result_json:
            with open(args.result_json, "w") as handle:
                json.dump(
                    {name: {"seconds": times[name], "peak_gb": peaks.get(name)} for name in times}, handle
                )
    body = "\n".join(lines)
    print(body)
    if not args.no_record:
        command = "python benchmarks/speed/real_size.py " + " ".join(sys.argv[1:])
        shape = f"{args.shape} shape ({SHAPE.hidden} hidden, vocabulary {SHAPE.vocab:,})"
        measured = "The largest GRPO group that trains" if args.largest_group else "GRPO and DPO steps"
        append_results(
            f"{measured} at the {shape}, on {DEVICE}, prompts {args.prompt_lengths[0]}-{args.prompt_lengths[1]} tokens",
            command,
            body,
        )


if __name__ == "__main__":
    main()

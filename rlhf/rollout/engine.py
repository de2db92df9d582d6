"""Rollout engines behind one interface, chosen once from `rollout.engine`.

An engine samples token ids for token-id prompts; everything around that (prompt preparation,
response masks, stop strings, decoding, the RolloutBatch) is the same for every engine and lives
here and in rlhf/rollout/sampling.py. Recipes, evaluation and the sampling tools hold a
`RolloutEngine` and never ask which one it is.

The contract:
- `ready(weights_version)` is a context manager inside which the engine samples with the policy's
  weights of that version (the number of optimizer steps taken): the transformers engine gathers
  ZeRO-3 parameters for the whole block; the vLLM engine streams the weights in once per version
  and frees its memory afterwards when asked to. Every rank enters it together (it may be
  collective); inside it a rank may call `sample` any number of times, or not at all. It yields a
  dict of timings for the step's metrics.
- `sample(prompt_token_ids, group_size, sampling, ...)` returns `Samples`: G rows per prompt,
  contiguous, with the engine's own logprobs when it has them (they feed the mismatch metrics and
  the importance-sampling correction).
- `close()` releases what the engine holds; safe to call twice.

Adding an engine: a class with these three methods, a `from_config(cfg, policy, tokenizer, rank)`
constructor, and one line in `ENGINES`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from rlhf.config import ConfigError
from rlhf.rollout.sampling import Samples, SamplingParams, collate_rollout, prompt_inputs
from rlhf.types import RolloutBatch

# rollout.engine -> "module:class"; imported only when chosen, so vLLM loads only when asked for
ENGINES: dict[str, str] = {
    "hf": "rlhf.rollout.hf:TransformersEngine",
    "vllm": "rlhf.rollout.vllm:VllmEngine",
    "vllm_server": "rlhf.rollout.server:VllmServerEngine",
}


class RolloutEngine(Protocol):
    tokenizer: PreTrainedTokenizerBase
    policy: Any  # the TrainEngine (or FrozenPolicy) whose weights it samples: device, rank, collectives

    def ready(self, weights_version: int) -> contextlib.AbstractContextManager[dict[str, float]]: ...

    def sample(
        self,
        prompt_token_ids: list[list[int]],
        group_size: int,
        sampling: SamplingParams,
        *,
        do_sample: bool = True,
        record_topk: int | None = None,
        seed: int = 0,
    ) -> Samples: ...

    def close(self) -> None: ...


def engine_class(name: str) -> Any:
    """The class registered for `rollout.engine=name`; an unknown name lists the known ones."""
    if name not in ENGINES:
        raise ConfigError(f"rollout.engine={name!r} is unknown; known engines: {', '.join(sorted(ENGINES))}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_rollout_engine(
    cfg: Any, policy: Any, tokenizer: PreTrainedTokenizerBase, rank: int
) -> RolloutEngine:
    """This rank's engine for a recipe config (`cfg.rollout.engine`), sampling `policy`'s weights.
    Starting an engine leaves the training RNG where it was (vLLM draws from torch's generator while
    it starts, which a resumed run, restored before the engine starts, would otherwise not match)."""
    with torch.random.fork_rng():
        return engine_class(cfg.rollout.engine).from_config(cfg, policy, tokenizer, rank)


def check_rollout_engine(
    cfg: Any, model_config: Any, prompt_ids: list[list[int]], eval_prompt_ids: list[list[int]] | None = None
) -> None:
    """Before any model loads: refuse what the chosen engine cannot do with these training and
    evaluation prompts (an engine class may define `check(cfg, model_config, longest training
    prompt, longest evaluation prompt or None)`)."""
    check = getattr(engine_class(cfg.rollout.engine), "check", None)
    if check is not None:
        longest_eval = None if eval_prompt_ids is None else max((len(p) for p in eval_prompt_ids), default=0)
        check(cfg, model_config, max((len(p) for p in prompt_ids), default=0), longest_eval)


class FrozenPolicy:
    """A plain model in the place of a TrainEngine, for sampling outside training (inspection, the
    diversity evaluation, samplers): one process, nothing sharded."""

    world_size, rank, is_main = 1, 0, True

    def __init__(self, model: torch.nn.Module):
        self.module = model
        self.device = next(model.parameters()).device

    def gathered_parameters(self, parameters: Any = None) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def all_gather_object(self, value: Any) -> list[Any]:
        return [value]

    def barrier(self) -> None:
        pass


def engine_for_model(
    name: str, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, seed: int = 0
) -> RolloutEngine:
    """An engine of kind `name` sampling a plain (not training) model."""
    return engine_class(name).for_model(model, tokenizer, max_new_tokens=max_new_tokens, seed=seed)


@torch.no_grad()
def generate_rollouts(
    engine: RolloutEngine,
    prompts: list[Any],
    columns: dict[str, list[Any]],
    *,
    group_size: int,
    sampling: SamplingParams,
    prompt_token_ids: list[list[int]] | None = None,
    prompt_texts: list[str] | None = None,
    conversational: bool = False,
    do_sample: bool = True,
    record_topk: int | None = None,
    seed: int = 0,
) -> RolloutBatch:
    """Sample `group_size` completions for each prompt with `engine` (inside its `ready` block);
    rows of one prompt are contiguous. The prompts are fed as `prompt_token_ids` (prepared by
    rlhf.data.chat) or, without them, as plain text with the tokenizer's own special tokens. With
    `record_topk`, `outside_topk` marks the sampled tokens outside the k most likely ones of the
    distribution they were drawn from. `seed` seeds the engines that take per-request seeds."""
    tokenizer = engine.tokenizer
    if prompt_token_ids is None:
        prompt_token_ids = [tokenizer(p)["input_ids"] for p in prompts]
        prompt_texts = list(prompts)
    samples = engine.sample(
        prompt_token_ids, group_size, sampling, do_sample=do_sample, record_topk=record_topk, seed=seed
    )
    return collate_rollout(
        samples,
        tokenizer,
        prompt_token_ids,
        prompts,
        columns,
        group_size=group_size,
        stop=sampling.stop,
        prompt_texts=prompt_texts,
        conversational=conversational,
    )


def rollout_rows(
    engine: RolloutEngine,
    rows: Any,
    *,
    prompt_column: str,
    group_size: int,
    sampling: SamplingParams,
    record_topk: int | None = None,
    weights_version: int = 0,
    seed: int = 0,
    agent: Any = None,
) -> tuple[RolloutBatch, dict[str, float]]:
    """Step 1 of an RL loop: `group_size` samples for each dataset row with the policy's weights
    after `weights_version` updates, every other column handed on to the rewards; with an `agent`
    (rlhf/agents), multi-turn episodes with its tools and environments. Returns the batch and its
    length statistics (and the engine's and the episodes' metrics). `response/length_mean` counts
    the tokens the model generated."""
    with engine.ready(weights_version) as metrics:
        if agent is not None:
            assert not record_topk, "curiosity on episodes is refused when the agent is built"
            batch, episodes = agent.rollout(
                engine, rows, prompt_column=prompt_column, group_size=group_size, sampling=sampling, seed=seed
            )
            metrics = {**metrics, **episodes}
        else:
            batch = generate_rollouts(
                engine,
                **prompt_inputs(rows, prompt_column),
                group_size=group_size,
                sampling=sampling,
                record_topk=record_topk,
                seed=seed,
            )
    lengths = batch.response_mask.sum(-1).float()
    return batch, {
        **metrics,
        "response/length_mean": float(lengths.mean()),
        "response/truncated_fraction": float(batch.truncated.float().mean()),
        "rollout/tokens": float(batch.prompt_mask.sum() + batch.attended_mask.sum()),
    }


@contextlib.contextmanager
def closing_engine(engine: RolloutEngine) -> Iterator[RolloutEngine]:
    """`engine`, closed when the block ends (for the sampling tools)."""
    try:
        yield engine
    finally:
        engine.close()

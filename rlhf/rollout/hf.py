"""The transformers rollout engine (`rollout.engine=hf`): sampling with `generate` on the policy
itself, under ZeRO-3 with its parameters gathered for the whole rollout.

Sampling uses an explicit GenerationConfig (temperature, top-k, top-p, min-p and nothing else), and
the model's own generation defaults are set aside while it runs (transformers would otherwise fill
every field we leave unset from them: a chat model's repetition penalty, say), so they never change
the distribution the logprob passes score. A repetition penalty (`rollout.repetition_penalty`) is
applied by our own logits processor over each row's real context, with the same functions as the
logprob passes (transformers' own would also penalise the pad token of left-padded rows). Stop
strings end a row through a stopping criterion. A shared-prefix forward prefills each prompt once
per group (see `generate_groups`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from rlhf.intrinsic import TopKRecorder
from rlhf.models.options import ForwardOptions
from rlhf.ops import first_seen_positions, seen_in_context, warp_logits
from rlhf.rollout.engine import FrozenPolicy
from rlhf.rollout.sampling import Samples, SamplingParams, pad_prompts


class TransformersEngine:
    """Samples with the policy's own `generate` (`policy`: a TrainEngine or FrozenPolicy); with
    the forward options' shared prefix, each prompt is prefilled once per group."""

    def __init__(
        self, policy: Any, tokenizer: PreTrainedTokenizerBase, options: ForwardOptions | None = None
    ):
        self.policy, self.tokenizer = policy, tokenizer
        self.options = options or ForwardOptions()

    @classmethod
    def from_config(cls, cfg: Any, policy: Any, tokenizer: PreTrainedTokenizerBase, rank: int):
        return cls(policy, tokenizer, ForwardOptions.from_config(cfg.model))

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        options: ForwardOptions | None = None,
        **unused: Any,
    ):
        return cls(FrozenPolicy(model), tokenizer, options)

    @contextlib.contextmanager
    def ready(self, weights_version: int) -> Iterator[dict[str, float]]:
        """The policy's current weights are the ones sampled; ZeRO-3 parameters gathered once for
        the whole block (collective)."""
        with self.policy.gathered_parameters():
            yield {}

    def close(self) -> None:
        """Nothing to release: the engine is the policy."""

    def sample(
        self,
        prompt_token_ids: list[list[int]],
        group_size: int,
        sampling: SamplingParams,
        *,
        do_sample: bool = True,
        record_topk: int | None = None,
        seed: int = 0,
    ) -> Samples:
        """`group_size` samples per prompt from the global torch random stream (`seed` is not
        used: transformers' sampling takes no per-request seed)."""
        model, tokenizer = self.policy.module, self.tokenizer
        device = next(model.parameters()).device
        prompt_ids, prompt_mask = pad_prompts(prompt_token_ids, tokenizer.pad_token_id, device)
        was_training = model.training
        model.eval()
        processors: list[Any] = []
        if do_sample and sampling.repetition_penalty != 1.0:
            processors.append(
                ContextRepetitionPenalty(sampling.repetition_penalty, prompt_ids, prompt_mask, group_size)
            )
        recorder = TopKRecorder(record_topk) if record_topk else None
        processors += [recorder] if recorder else []  # after the penalty: it records the sampled distribution
        extra: dict[str, Any] = {"logits_processor": LogitsProcessorList(processors)} if processors else {}
        if sampling.stop:
            extra["stopping_criteria"] = StoppingCriteriaList(
                [StopStrings(tokenizer, sampling.stop, prompt_ids.shape[1])]
            )
        try:
            output = generate_groups(
                model,
                prompt_ids,
                prompt_mask,
                group_size,
                sampling.generation_config(tokenizer, do_sample),
                shared_prefix=self.options.shared_prefix,
                **extra,
            )
        finally:
            model.train(was_training)
        response_ids = output[:, prompt_ids.shape[1] :]
        return Samples(response_ids, outside_topk=recorder.outside(response_ids) if recorder else None)


class StopStrings(StoppingCriteria):
    """Ends a row once its response's text contains a stop string. It decodes the response's last
    few tokens with the tokenizer itself (transformers' own stop-string matcher needs a vocabulary
    it can map to bytes, which not every tokenizer has)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...], prompt_length: int):
        self.tokenizer, self.stop, self.prompt_length = tokenizer, stop, prompt_length
        self.window = max(len(s) for s in stop) + 1  # tokens: each covers at least one character

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        tails = input_ids[:, max(self.prompt_length, input_ids.shape[1] - self.window) :].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([any(s in text for s in self.stop) for text in texts], device=input_ids.device)


def generate_groups(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    group_size: int,
    generation_config: GenerationConfig,
    shared_prefix: bool = False,
    **generate_kwargs,
):
    """`group_size` continuations of each (left-padded) prompt, rows of one prompt contiguous.

    With `shared_prefix` (the forward options' shared-prefix layout), each prompt but its last
    token is prefilled once and its key/value cache repeated for the group, instead of prefilling G
    copies; generate then feeds the last prompt token, so the first sampled token sees the same
    logits. (A plain prefill: any model can take it.)"""
    repeated_ids = prompt_ids.repeat_interleave(group_size, dim=0)
    repeated_mask = prompt_mask.repeat_interleave(group_size, dim=0).long()
    if shared_prefix and group_size > 1 and prompt_ids.shape[1] > 1:
        head_mask = prompt_mask[:, :-1].long()
        prefill = model(
            input_ids=prompt_ids[:, :-1],
            attention_mask=head_mask,
            position_ids=(head_mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
        )
        cache = prefill.past_key_values
        cache.batch_repeat_interleave(group_size)
        generate_kwargs["past_key_values"] = cache
    with _only_generation_config(model, generation_config):
        return model.generate(
            input_ids=repeated_ids,
            attention_mask=repeated_mask,
            generation_config=generation_config,
            **generate_kwargs,
        )


@contextlib.contextmanager
def _only_generation_config(model: PreTrainedModel, generation_config: GenerationConfig):
    """Make `generation_config` the model's own while generate runs: transformers fills the fields a
    passed config leaves unset from the model's defaults (generation_config.json), which would put
    sampling settings that no logprob pass knows of into the rollout."""
    owner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = owner.generation_config
    owner.generation_config = generation_config
    try:
        yield
    finally:
        owner.generation_config = saved


class ContextRepetitionPenalty(LogitsProcessor):
    """The repetition penalty (CTRL's, as transformers and vLLM define it) over each row's real
    context, as the logprob passes define it (`first_seen_positions`: the prompt without its left
    pads and the tokens generated so far) and through their own `warp_logits`. Rows come as
    generate gets them: each prompt `group_size` times."""

    def __init__(self, penalty: float, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int):
        self.penalty = penalty
        self.prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)
        self.prompt_mask = prompt_mask.bool().repeat_interleave(group_size, dim=0)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_ids.shape[1] :]
        first = first_seen_positions(
            self.prompt_ids, self.prompt_mask, generated, torch.ones_like(generated, dtype=torch.bool)
        )
        next_position = torch.tensor([generated.shape[1]], device=scores.device)
        seen = seen_in_context(first, next_position, scores.shape[-1])[:, 0]
        return warp_logits(scores, repetition_penalty=self.penalty, seen=seen).to(scores.dtype)

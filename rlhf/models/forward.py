"""Per-token log-probabilities, values and scores of responses: every forward pass of training.

Input rows are [left-padded prompt; right-padded response]. Position ids count only real tokens
(as `generate` does for left padding), and the LM head runs only on the positions that predict
response tokens. Logits are warped exactly as in sampling (repetition penalty, temperature, top-k,
top-p, min-p) before the log-softmax, so log pi(a_t) is the probability of the distribution the
token was drawn from.

Every pass takes a `ForwardOptions` (rlhf/models/options.py) that says how its rows go through
the model: packed per shared prompt (Prefix Grouper, rlhf.models.shared_prefix), packed without
pads (`PackedRows`), or padded; and for logprobs whether the LM head, warp and log-softmax run a
chunk of response tokens at a time (each chunk under activation checkpointing, so only one
chunk's [rows, n, vocab] logits exist at a time, in the forward and in the backward). Every
layout returns the same values. Nothing about the layout is read from the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from rlhf.models.flex import FlexDocuments
from rlhf.models.options import DEFAULT, ForwardOptions
from rlhf.models.shared_prefix import (
    SUPPORTED_FAMILIES,
    SharedPrefixLayout,
    build_layout,
    model_config,
    uses_packed_flex,
)
from rlhf.ops import entropy_from_logits, logprobs_from_logits, penalty_context, penalty_mask, warp_logits


def response_logprobs(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    options: ForwardOptions = DEFAULT,
    *,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(response_t | prompt, response_<t) [B, T] in float32 under `options.warp`, and
    optionally the entropy [B, T] (with gradient only with `entropy_grad`).

    Values at masked response positions are finite but meaningless; mask them downstream.
    """
    warp = options.warp
    first_seen = penalty_context(
        prompt_ids, prompt_mask, response_ids, response_mask, warp.get("repetition_penalty", 1.0)
    )
    chunk = logprob_chunk(model, options, response_ids)
    if chunk:
        with _head_as_identity(model):  # the "logits" are the head's inputs
            hidden = _response_forward(model, prompt_ids, prompt_mask, response_ids, response_mask, options)[
                0
            ]
        return chunked_logprobs(
            output_head(model),
            hidden,
            response_ids,
            response_mask,
            chunk,
            warp,
            with_entropy=with_entropy,
            entropy_grad=entropy_grad,
            first_seen=first_seen,
        )
    logits = response_logits(model, prompt_ids, prompt_mask, response_ids, response_mask, options)
    logits = warp_logits(logits, **warp, seen=penalty_mask(first_seen, logits))
    # Tokens outside the kept support (possible only at masked positions) would give -inf.
    safe_ids = torch.where(response_mask, response_ids, logits.argmax(-1))
    logprobs = logprobs_from_logits(logits, safe_ids)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):  # grad only for a bonus
            entropy = entropy_from_logits(logits)
    return logprobs, entropy


def response_logits(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    options: ForwardOptions = DEFAULT,
) -> torch.Tensor:
    """[B, T, V] raw next-token logits at the positions that predict each response token (for
    scores that combine two models' distributions, such as cDPO's contrastive estimation)."""
    return _response_forward(model, prompt_ids, prompt_mask, response_ids, response_mask, options)[0]


def response_logprobs_and_states(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    options: ForwardOptions = DEFAULT,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log pi(response_t) [B, T], states [B, T, h], next states [B, T, h]) from one forward: the
    last hidden state (the LM head's input) where token t is predicted, and where it is read.
    With a logprob chunk the logprobs come from those states a chunk at a time."""
    warp = options.warp
    first_seen = penalty_context(
        prompt_ids, prompt_mask, response_ids, response_mask, warp.get("repetition_penalty", 1.0)
    )
    chunk = logprob_chunk(model, options, response_ids)
    with _head_as_identity(model) if chunk else contextlib.nullcontext():
        logits, (states, next_states) = _response_forward(
            model, prompt_ids, prompt_mask, response_ids, response_mask, options, with_states=True
        )
    if chunk:  # the "logits" are the head's inputs
        logprobs, _ = chunked_logprobs(
            output_head(model), logits, response_ids, response_mask, chunk, warp, first_seen=first_seen
        )
        return logprobs, states, next_states
    logits = warp_logits(logits, **warp, seen=penalty_mask(first_seen, logits))
    safe_ids = torch.where(response_mask, response_ids, logits.argmax(-1))
    return logprobs_from_logits(logits, safe_ids), states, next_states


def logprob_chunk(model: torch.nn.Module, options: ForwardOptions, response_ids: torch.Tensor) -> int:
    """The response-token chunk `options` give a pass of `model` over `response_ids` (0: whole)."""
    owner = _head_owner(model)
    vocab = owner.get_output_embeddings().weight.shape[0]
    return options.chunk_tokens(response_ids.shape[0], response_ids.shape[1], vocab, owner.config)


def _response_forward(
    model,
    prompt_ids,
    prompt_mask,
    response_ids,
    response_mask,
    options: ForwardOptions,
    with_states: bool = False,
):
    """Logits predicting each response token, and with `with_states` the hidden states around it."""
    layout = _shared_layout(options, prompt_ids, prompt_mask, response_ids, response_mask)
    with _head_inputs(model, with_states) as hidden:
        if layout is not None:
            # only columns from the earliest prefix end on can predict a response token
            first_kept = int(layout.prefix_len.min()) - 1
            logits = _packed_forward(model, layout, logits_to_keep=layout.width - first_kept).logits
            rows = layout.group_of_row[:, None]
            predict, token = layout.predict_index - first_kept, layout.token_index - first_kept
            logits = logits[rows, predict]
        elif options.padding_free and not with_states:
            logits = _padding_free_logits(model, prompt_ids, prompt_mask, response_ids, response_mask)
        else:
            input_ids, attention_mask, position_ids = _joined(
                prompt_ids, prompt_mask, response_ids, response_mask
            )
            outputs = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                logits_to_keep=response_ids.shape[1] + 1,
                use_cache=False,
            )
            logits = outputs.logits[:, :-1]  # position i predicts token i + 1
    if not with_states:
        return logits, None
    if layout is not None:
        return logits, (hidden[0][rows, predict], hidden[0][rows, token])
    return logits, (hidden[0][:, :-1], hidden[0][:, 1:])


def chunked_logprobs(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    chunk: int,
    warp: dict[str, float],
    *,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    first_seen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`response_logprobs` from the LM head's inputs `hidden` [B, T, h], `chunk` tokens at a time.
    With gradient, each chunk is checkpointed: its logits are recomputed in the backward instead of
    kept, so no more than one chunk's logits ever exist. `first_seen` (`first_seen_positions`) is
    needed with a repetition penalty."""
    grad = torch.is_grad_enabled()

    def piece(
        states: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(states)
        logits = warp_logits(logits, **warp, seen=penalty_mask(first_seen, logits, start))
        logprobs = logprobs_from_logits(logits, torch.where(mask, ids, logits.argmax(-1)))
        if not with_entropy:
            return logprobs, logprobs.new_zeros(())
        with torch.set_grad_enabled(entropy_grad and grad):
            return logprobs, entropy_from_logits(logits)

    parts = []
    for start in range(0, response_ids.shape[1], chunk):
        window = slice(start, start + chunk)
        args = (hidden[:, window], response_ids[:, window], response_mask[:, window], start)
        parts.append(checkpoint(piece, *args, use_reentrant=False) if grad else piece(*args))
    logprobs = torch.cat([p[0] for p in parts], dim=1)
    entropy = torch.cat([p[1] for p in parts], dim=1) if with_entropy else None
    return logprobs, entropy


def response_head_inputs(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    options: ForwardOptions = DEFAULT,
) -> torch.Tensor:
    """[B, T, h] the LM head's inputs at the positions that predict each response token (the
    model's forward with the head passed through, so no [B, T, V] logits are made)."""
    with _head_as_identity(model):
        return _response_forward(model, prompt_ids, prompt_mask, response_ids, response_mask, options)[0]


def chunked_token_loss(
    models: list[torch.nn.Module],
    hidden: list[torch.Tensor],
    chunk: int,
    loss: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]],
    per_token: tuple[torch.Tensor, ...] = (),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss(*logits) [B, T] for distribution-level losses over several models' full-vocabulary
    logits, `chunk` response tokens at a time: each model's head runs on its `hidden` [B, T, h]
    slice inside a checkpointed piece, so one chunk's logits exist at a time in the forward and
    the backward. The first model's hidden states may carry gradient; per-token statistics
    returned by `loss` are concatenated likewise. `per_token` tensors [B, T, ...] (token ids...) are
    sliced with the chunk and passed to `loss` after the logits."""
    heads = [output_head(m) for m in models]
    grad = torch.is_grad_enabled()
    names: list[str] = []  # the statistics' names, from the first piece (run in the forward)

    def piece(*states: torch.Tensor):
        logits = [head(s) for head, s in zip(heads, states[: len(heads)])]
        value, stats = loss(*logits, *states[len(heads) :])
        names[:] = list(stats)
        return value, *stats.values()

    parts = []
    for start in range(0, hidden[0].shape[1], chunk):
        window = [h[:, start : start + chunk] for h in (*hidden, *per_token)]
        parts.append(checkpoint(piece, *window, use_reentrant=False) if grad else piece(*window))
    values = torch.cat([p[0] for p in parts], dim=1)
    stats = {name: torch.cat([p[i + 1] for p in parts], dim=1) for i, name in enumerate(names)}
    return values, stats


def output_head(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The LM head of `model` as a function of the last hidden states, for passes that apply it
    outside the model call. For an adapter-disabled view (the LoRA reference) it runs with the
    adapters disabled too: a LoRA adapter on `lm_head` would otherwise be applied to the
    reference's logits."""
    head = _head_owner(model).get_output_embeddings()
    view = _adapter_disabled_view(model)
    if view is None:
        return head

    def without_adapters(states: torch.Tensor) -> torch.Tensor:
        with view.peft_model.disable_adapter():
            return head(states)

    return without_adapters


def _adapter_disabled_view(model: torch.nn.Module) -> torch.nn.Module | None:
    """The AdapterDisabledView in `model`'s wrapper chain (under a DeepSpeed engine), or None."""
    owner = model
    while not hasattr(owner, "get_output_embeddings"):
        if hasattr(owner, "peft_model"):
            return owner
        owner = owner.module
    return None


def _head_owner(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model under a DeepSpeed engine or an adapter-disabled view."""
    owner = model
    while not hasattr(owner, "get_output_embeddings"):  # DeepSpeed engine, adapter-disabled view
        owner = getattr(owner, "module", None) or owner.peft_model
    return owner


@contextlib.contextmanager
def _head_as_identity(model: torch.nn.Module) -> Iterator[None]:
    """The LM head passes its input through for the length of the block (its hooks still run)."""
    head = _head_owner(model).get_output_embeddings()
    previous = head.__dict__.get("forward")  # an instance-level forward someone else installed
    head.forward = lambda states: states
    try:
        yield
    finally:
        if previous is None:
            del head.forward  # back to the class's forward
        else:
            head.forward = previous


@contextlib.contextmanager
def _head_inputs(model: torch.nn.Module, active: bool) -> Iterator[list[torch.Tensor]]:
    """Captures the LM head's input (the last hidden states, after the final norm) when `active`."""
    captured: list[torch.Tensor] = []
    if not active:
        yield captured
        return
    head = _head_owner(model).get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0]))
    try:
        yield captured
    finally:
        handle.remove()


def _shared_layout(
    options: ForwardOptions, prompt_ids, prompt_mask, response_ids, response_mask
) -> SharedPrefixLayout | None:
    """The packed layout when the options ask for it and some prompt repeats."""
    if not options.shared_prefix:
        return None
    layout = build_layout(prompt_ids, prompt_mask, response_ids, response_mask)
    return layout if layout.num_groups < response_ids.shape[0] else None


def _packed_forward(model, layout: SharedPrefixLayout, **kwargs):
    if uses_packed_flex(model):  # given a block mask, transformers builds none of its own
        kwargs["attention_mask"] = layout.flex_documents.block_mask(None)
    outputs = model(
        input_ids=layout.input_ids,
        position_ids=layout.position_ids,
        use_cache=False,
        shared_prefix_layout=layout,
        **kwargs,
    )
    if not layout.attended:  # another attention ignored the layout: rows attended to each other
        raise ValueError(
            "the forward options ask for the shared-prefix layout, but this model's attention does not "
            "take it: load the model with model.shared_prefix=true"
        )
    return outputs


@dataclass
class PackedRows:
    """Rows (their valid prompt and response tokens) packed first-fit, longest first, into sequences
    no longer than the longest row, positions restarting at 0 per row. Given positions and no
    attention mask, transformers builds block-diagonal causal attention from the restarts (its
    packed-sequence format). Packing into sequences of the longest row's length, not one long
    sequence, keeps dense-mask attention (SDPA, eager) no costlier than the padded batch's."""

    input_ids: torch.Tensor  # [bins, capacity]
    position_ids: torch.Tensor  # [bins, capacity]
    bin_of_row: torch.Tensor  # [B]
    start_of_row: torch.Tensor  # [B] column of the row's first token in its bin
    prompt_lengths: torch.Tensor  # [B] valid prompt tokens
    capacity: int
    segment_ids: torch.Tensor  # [bins, capacity]: row + 1 for each row's tokens, -1 for the free tail

    def response_columns(self, response_width: int) -> torch.Tensor:
        """[B, T] column whose output predicts response token t (clamped where the response is
        shorter than T: those positions are masked downstream)."""
        offsets = torch.arange(response_width, device=self.input_ids.device)
        columns = (self.start_of_row + self.prompt_lengths - 1).unsqueeze(-1) + offsets
        return columns.clamp(max=self.capacity - 1)

    def forward(self, model, **kwargs):
        attention_mask = None  # transformers builds block-diagonal attention from restarting positions
        if uses_packed_flex(_packable(model)):  # our block mask: transformers builds none of its own
            documents = FlexDocuments.from_packed(self.segment_ids, self.position_ids)
            kwargs["flex_documents"], attention_mask = documents, documents.block_mask(None)
        return model(
            input_ids=self.input_ids,
            position_ids=self.position_ids,
            attention_mask=attention_mask,
            use_cache=False,
            **kwargs,
        )


def _packable(model: torch.nn.Module) -> torch.nn.Module:
    """`model`, after refusing a family whose attention does not build the block-diagonal mask
    from restarting positions (packed rows would attend to each other)."""
    family = getattr(model_config(model), "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"the forward options ask for padding-free rows, which the {family!r} family does not support "
            f"(tested: {', '.join(SUPPORTED_FAMILIES)}); set model.padding_free=false"
        )
    return model


def pack_rows(prompt_ids, prompt_mask, response_ids, response_mask) -> PackedRows:
    input_ids, attention_mask, _ = _joined(prompt_ids, prompt_mask, response_ids, response_mask)
    valid = attention_mask.bool()
    lengths = valid.sum(-1).tolist()
    capacity = max(lengths)
    bins: list[list[int]] = []  # row indices per packed sequence
    room: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        target = next((b for b, free in enumerate(room) if free >= lengths[row]), None)
        if target is None:
            bins.append([]), room.append(capacity)
            target = len(bins) - 1
        bins[target].append(row)
        room[target] -= lengths[row]
    device = input_ids.device
    packed_ids = torch.zeros(len(bins), capacity, dtype=input_ids.dtype, device=device)
    positions = torch.zeros(len(bins), capacity, dtype=torch.long, device=device)
    segments = torch.full((len(bins), capacity), -1, dtype=torch.long, device=device)
    bin_of_row = torch.zeros(len(lengths), dtype=torch.long, device=device)
    start_of_row = torch.zeros(len(lengths), dtype=torch.long, device=device)
    for b, rows in enumerate(bins):
        offset = 0
        for row in rows:
            n = lengths[row]
            packed_ids[b, offset : offset + n] = input_ids[row][valid[row]]
            positions[b, offset : offset + n] = torch.arange(n, device=device)
            segments[b, offset : offset + n] = row + 1
            bin_of_row[row], start_of_row[row] = b, offset
            offset += n
        # the free tail is a segment of its own (positions restart), attended by nothing valid
        positions[b, offset:] = torch.arange(capacity - offset, device=device)
    return PackedRows(
        packed_ids, positions, bin_of_row, start_of_row, prompt_mask.sum(-1), capacity, segments
    )


def _padding_free_logits(model, prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor:
    """`_response_forward`'s logits [B, T, V] without computing pads (`PackedRows`); the head runs
    only where a response token is predicted."""
    packed = pack_rows(prompt_ids, prompt_mask, response_ids, response_mask)
    with _head_as_identity(model):
        hidden = packed.forward(model).logits
    states = hidden[packed.bin_of_row.unsqueeze(-1), packed.response_columns(response_ids.shape[1])]
    return output_head(model)(states)


def _joined(prompt_ids, prompt_mask, response_ids, response_mask):
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def sequence_scores(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    options: ForwardOptions = DEFAULT,
) -> torch.Tensor:
    """[B] scalar score of a sequence-classification model (reward model) for prompt + response.

    The score is the head's output at the response's last valid token (the prompt's last token for
    an empty response), found from the masks: the pooling of transformers looks for the last token
    that is not the pad id, which misreads a response that ends in EOS when EOS is the pad token,
    or one that sampled the pad id.
    """
    layout = _shared_layout(options, prompt_ids, prompt_mask, response_ids, response_mask)
    with _head_outputs(model) as per_column:
        if layout is not None:
            _packed_forward(model, layout)
            rows, columns = layout.group_of_row, layout.last_index
        elif options.padding_free:
            packed = pack_rows(prompt_ids, prompt_mask, response_ids, response_mask)
            packed.forward(model)
            rows = packed.bin_of_row
            columns = packed.start_of_row + packed.prompt_lengths + response_mask.sum(1) - 1
        else:
            input_ids, attention_mask, position_ids = _joined(
                prompt_ids, prompt_mask, response_ids, response_mask
            )
            model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
            rows = torch.arange(response_ids.shape[0], device=response_ids.device)
            columns = prompt_ids.shape[1] + response_mask.sum(1) - 1
    return per_column[0][rows, columns].float().squeeze(-1)


def token_values(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    options: ForwardOptions = DEFAULT,
) -> torch.Tensor:
    """[B, T] value V(s_t) of a token-classification model (critic) for each response token:
    read at the position whose hidden state predicts that token, as the logprobs are."""
    layout = _shared_layout(options, prompt_ids, prompt_mask, response_ids, response_mask)
    if layout is not None:
        logits = _packed_forward(model, layout).logits
        return logits[layout.group_of_row[:, None], layout.predict_index, 0].float()
    if options.padding_free:
        packed = pack_rows(prompt_ids, prompt_mask, response_ids, response_mask)
        logits = packed.forward(model).logits
        return logits[packed.bin_of_row[:, None], packed.response_columns(response_ids.shape[1]), 0].float()
    input_ids, attention_mask, position_ids = _joined(prompt_ids, prompt_mask, response_ids, response_mask)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).logits
    num_response = response_ids.shape[1]
    return logits[:, -num_response - 1 : -1, 0].float()


@contextlib.contextmanager
def _head_outputs(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Captures the per-position output of the scalar head (`score`) of a sequence classifier,
    before transformers pools it."""
    heads = [m for name, m in model.named_modules() if name.split(".")[-1] == "score"]
    if len(heads) != 1:
        raise ValueError(f"expected one `score` head in the reward model, found {len(heads)}")
    captured: list[torch.Tensor] = []
    handle = heads[0].register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        yield captured
    finally:
        handle.remove()

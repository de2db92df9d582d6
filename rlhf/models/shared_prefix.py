"""Shared-prefix forward (Prefix Grouper, arXiv 2506.05433): rows that share a prompt are packed
into one sequence [prefix; suffix_1; ...; suffix_G] so the prompt is encoded once per group.

Embeddings, norms, MLPs and projections act per token, so only attention changes: the prefix
attends causally to itself, and every suffix attends to the prefix plus its own causal past, never
to another suffix. Suffix positions restart at the prefix length, so each token sees exactly what
it sees in the repeated layout [prompt; response_i]; the output at the prefix's last token predicts
every suffix's first.

With SDPA or eager that is two calls of the model's own attention function with dense masks. With
FlexAttention it is one call over the packed batch with a block-sparse mask (rlhf.models.flex).
With FlashAttention-2 it is one variable-length call without masks: the sequences are every group's
prefix (keys: itself) and every suffix (keys: its group's prefix, then itself); FlashAttention
aligns a causal mask to the bottom right when a sequence has more keys than queries, which is
exactly "the whole prefix plus my own past".

Sliding-window layers (Mistral, Phi3, the sliding layers of Qwen2 and Qwen3, which pass the window
to the attention function) keep their window with SDPA, eager and FlexAttention: a query at
position q sees keys at positions k with q - k < window, the rule of transformers' own masks,
applied to the masks from the packed positions. Families are refused unless tested here (SUPPORTED_FAMILIES); so are logit
soft-capping (Gemma2/3) and a window on the FlashAttention-2 path, which have no test.

The attention function is registered with transformers' attention interface under
`rlhf_shared_prefix_<base>` (`rlhf_shared_prefix_fa2` for FlashAttention-2); a model loaded with
that implementation behaves exactly like `<base>` unless a forward passes `shared_prefix_layout=`
(which `rlhf.models.forward` does when the rows of a batch repeat a prompt) or, on the flex path,
`flex_documents=` (padding-free bins). No modeling file is copied or patched.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers.modeling_flash_attention_utils as flash_utils
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.flash_attention import get_target_dtype
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from rlhf.models.flex import FlexDocuments, packed_flex_attention

PREFIX = "rlhf_shared_prefix_"
FLASH = "flash_attention_2"
FLEX = "flex_attention"
SUPPORTED_BASES = ("sdpa", "eager", FLASH, FLEX)
# Model families whose attention the equivalence tests cover (tests/unit/test_shared_prefix*.py).
SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3")
# transformers treats any implementation named "*flash*" as a flash kernel to import, so ours is "fa2"
REGISTERED_NAMES = {
    "sdpa": PREFIX + "sdpa",
    "eager": PREFIX + "eager",
    FLASH: PREFIX + "fa2",
    FLEX: PREFIX + "flex",
}


@dataclass
class SharedPrefixLayout:
    """Where every token of a batch [N rows of prompt + response] sits in the packed batch.

    Packed row g holds group g: its prompt's valid tokens at 0..prefix_len[g]-1, then each member
    row's valid response tokens in row order, then padding up to `width`.
    """

    input_ids: torch.Tensor  # [B, width] packed tokens
    position_ids: torch.Tensor  # [B, width]: prefix 0..p-1, every suffix p..p+len-1
    group_of_row: torch.Tensor  # [N] packed row of each original row
    prefix_len: torch.Tensor  # [B]
    prefix_width: int  # longest prefix: the prefix attention call covers packed columns [0, prefix_width)
    prefix_mask: torch.Tensor  # [B, 1, P, P] causal and key inside the prefix
    prefix_put: tuple[torch.Tensor, torch.Tensor]  # (packed row, column) of every prefix token
    suffix_index: torch.Tensor  # [N, S] packed column of each response token (clamped past the end)
    suffix_mask: torch.Tensor  # [N, 1, S, P + S] keys: the group's prefix, then its own causal past
    suffix_take: tuple[torch.Tensor, torch.Tensor]  # (row, token) of every valid response token
    suffix_put: tuple[torch.Tensor, torch.Tensor]  # their (packed row, column)
    predict_index: torch.Tensor  # [N, T] packed column whose output predicts response token t
    token_index: torch.Tensor  # [N, T] packed column of response token t itself (clamped past the end)
    last_index: torch.Tensor  # [N] packed column of each row's last valid token
    segment_ids: torch.Tensor  # [B, width]: 0 for a prefix token, row + 1 for a suffix token, -1 for padding
    # set by the shared-prefix attention when it takes the layout: a forward whose attention left it
    # unset attended across rows (the model was not loaded with model.shared_prefix=true)
    attended: bool = False

    @property
    def num_groups(self) -> int:
        return self.input_ids.shape[0]

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    @functools.cached_property
    def flex_documents(self) -> FlexDocuments:
        """The FlexAttention path's per-token view (built once, used by every layer)."""
        return FlexDocuments.from_packed(self.segment_ids, self.position_ids)

    @functools.cached_property
    def varlen(self) -> VarlenSequences:
        """The variable-length sequences of the FlashAttention path (built once, used by every layer)."""
        return varlen_sequences(self)


@dataclass
class VarlenSequences:
    """FlashAttention's variable-length view of a packed batch: every group's prefix, then every
    non-empty suffix, as sequences over tokens flattened to `packed row * width + column`."""

    query_index: torch.Tensor  # [total queries] flat packed position of each query token
    key_index: torch.Tensor  # [total keys] flat packed position of each key token
    cu_query: torch.Tensor  # [sequences + 1] int32 query offsets
    cu_key: torch.Tensor  # [sequences + 1] int32 key offsets
    max_query: int
    max_key: int


def varlen_sequences(layout: SharedPrefixLayout) -> VarlenSequences:
    width = layout.width
    prefix_rows, prefix_cols = layout.prefix_put  # group-major, columns 0..prefix_len-1 ascending
    prefix_flat = prefix_rows * width + prefix_cols
    take_rows, _ = layout.suffix_take  # row-major, steps ascending
    put_rows, put_cols = layout.suffix_put
    suffix_flat = put_rows * width + put_cols
    suffix_len = torch.bincount(take_rows, minlength=layout.group_of_row.shape[0])
    rows = (suffix_len > 0).nonzero().squeeze(1)  # FlashAttention gets no empty sequences
    group = layout.group_of_row[rows]
    query_len = suffix_len[rows]
    key_len = layout.prefix_len[group] + query_len
    # key i of suffix sequence n: prefix column i while i < prefix_len, else its own token i - prefix_len
    sequence = torch.repeat_interleave(torch.arange(rows.shape[0], device=rows.device), key_len)
    step = torch.arange(sequence.shape[0], device=rows.device) - (key_len.cumsum(0) - key_len)[sequence]
    prefix_len = layout.prefix_len[group][sequence]
    own = layout.suffix_index[rows[sequence], (step - prefix_len).clamp(min=0)]
    suffix_keys = group[sequence] * width + torch.where(step < prefix_len, step, own)

    def offsets(lengths: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))

    query_lengths = torch.cat([layout.prefix_len, query_len])
    key_lengths = torch.cat([layout.prefix_len, key_len])
    return VarlenSequences(
        query_index=torch.cat([prefix_flat, suffix_flat]),
        key_index=torch.cat([prefix_flat, suffix_keys]),
        cu_query=offsets(query_lengths),
        cu_key=offsets(key_lengths),
        max_query=int(query_lengths.max()),
        max_key=int(key_lengths.max()),
    )


def _suffix_offsets(group_of_row, suffix_len, prefix_len, num_groups: int) -> torch.Tensor:
    """[N] packed column where each row's suffix starts: after its prefix and the suffixes of the
    earlier rows of its group."""
    num_rows, device = len(group_of_row), group_of_row.device
    rows = torch.arange(num_rows, device=device)
    order = torch.argsort(group_of_row * num_rows + rows)
    sorted_len = suffix_len[order]
    before = sorted_len.cumsum(0) - sorted_len
    group_first_sorted = torch.zeros(num_groups, dtype=torch.long, device=device).scatter_reduce(
        0, group_of_row[order], rows, "amin", include_self=False
    )
    within = before - before[group_first_sorted[group_of_row[order]]]
    offset = torch.empty_like(suffix_len)
    offset[order] = prefix_len[group_of_row[order]] + within
    return offset


def _attention_masks(prefix_len, prefix_width: int, group_of_row, suffix_valid):
    """([B, 1, P, P] causal within each prefix, [N, 1, S, P + S] the group's prefix then the row's
    own causal past)."""
    device = prefix_len.device
    prefix_cols = torch.arange(prefix_width, device=device)
    prefix_key_valid = prefix_cols < prefix_len[:, None]  # [B, P]
    causal_prefix = prefix_cols[None, :] <= prefix_cols[:, None]  # [P, P] key <= query
    prefix_mask = (causal_prefix[None] & prefix_key_valid[:, None, :])[:, None]
    steps = torch.arange(suffix_valid.shape[1], device=device)
    causal_suffix = steps[None, :] <= steps[:, None]  # [S, S]
    suffix_keys = causal_suffix[None] & suffix_valid[:, None, :]  # [N, S, S]
    group_prefix = prefix_key_valid[group_of_row][:, None, :].expand(-1, suffix_valid.shape[1], -1)
    return prefix_mask, torch.cat([group_prefix, suffix_keys], dim=2)[:, None]


def build_layout(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    pad_token_id: int = 0,
) -> SharedPrefixLayout:
    """Group rows with identical prompts (any order, any padding) and pack each group.

    `response_mask` must mark a prefix of each row (right padding), as rollouts and tokenized
    preference data do; each prompt needs at least one token.
    """
    device = prompt_ids.device
    num_rows, num_response = response_ids.shape
    prompt_mask, response_mask = prompt_mask.bool(), response_mask.bool()
    suffix_len = response_mask.sum(1)
    if not torch.equal(response_mask, torch.arange(num_response, device=device) < suffix_len[:, None]):
        raise ValueError("shared-prefix forward: response_mask must be right-padded (True, then False)")
    key = torch.where(prompt_mask, prompt_ids, torch.full_like(prompt_ids, -1))
    _, group_of_row = torch.unique(key, dim=0, return_inverse=True)
    num_groups = int(group_of_row.max()) + 1
    rows = torch.arange(num_rows, device=device)
    first_row = torch.full((num_groups,), num_rows, device=device).scatter_reduce(
        0, group_of_row, rows, "amin"
    )
    prefix_valid_src = prompt_mask[first_row]
    prefix_len = prefix_valid_src.sum(1)
    if int(prefix_len.min()) < 1:
        raise ValueError("shared-prefix forward: every prompt needs at least one token")
    prefix_width = int(prefix_len.max())

    offset = _suffix_offsets(group_of_row, suffix_len, prefix_len, num_groups)
    group_len = prefix_len.scatter_add(0, group_of_row, suffix_len)
    width = int(group_len.max())

    input_ids = torch.full((num_groups, width), pad_token_id, dtype=prompt_ids.dtype, device=device)
    position_ids = torch.zeros(num_groups, width, dtype=torch.long, device=device)
    prefix_rows, prefix_cols = prefix_valid_src.nonzero(as_tuple=True)
    prefix_slot = (prefix_valid_src.cumsum(1) - 1)[prefix_rows, prefix_cols]
    input_ids[prefix_rows, prefix_slot] = prompt_ids[first_row][prefix_rows, prefix_cols]
    position_ids[prefix_rows, prefix_slot] = prefix_slot

    suffix_width = max(int(suffix_len.max()), 1)
    steps = torch.arange(suffix_width, device=device)
    suffix_valid = steps < suffix_len[:, None]
    suffix_index = (offset[:, None] + steps).clamp(max=width - 1)
    take_rows, take_steps = suffix_valid.nonzero(as_tuple=True)
    put_rows, put_cols = group_of_row[take_rows], suffix_index[take_rows, take_steps]
    input_ids[put_rows, put_cols] = response_ids[take_rows, take_steps]
    position_ids[put_rows, put_cols] = prefix_len[put_rows] + take_steps
    segment_ids = torch.full((num_groups, width), -1, dtype=torch.long, device=device)
    segment_ids[prefix_rows, prefix_slot], segment_ids[put_rows, put_cols] = 0, take_rows + 1

    prefix_mask, suffix_mask = _attention_masks(prefix_len, prefix_width, group_of_row, suffix_valid)

    response_steps = torch.arange(num_response, device=device)
    predict_index = torch.where(
        response_steps[None, :] == 0,
        prefix_len[group_of_row][:, None] - 1,
        offset[:, None] + response_steps[None, :] - 1,
    ).clamp(max=width - 1)
    token_index = (offset[:, None] + response_steps[None, :]).clamp(max=width - 1)
    last_index = torch.where(suffix_len > 0, offset + suffix_len - 1, prefix_len[group_of_row] - 1)
    return SharedPrefixLayout(
        input_ids=input_ids,
        position_ids=position_ids,
        group_of_row=group_of_row,
        prefix_len=prefix_len,
        prefix_width=prefix_width,
        prefix_mask=prefix_mask,
        prefix_put=(prefix_rows, prefix_slot),
        suffix_index=suffix_index,
        suffix_mask=suffix_mask,
        suffix_take=(take_rows, take_steps),
        suffix_put=(put_rows, put_cols),
        predict_index=predict_index,
        token_index=token_index,
        last_index=last_index,
        segment_ids=segment_ids,
    )


AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def grouped_attention(
    attend: AttentionFn,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: SharedPrefixLayout,
    additive_mask: bool,
    sliding_window: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """Attention over a packed batch, [B, H, L, D] in and [B, L, H, D] out (transformers' layout).

    `attend` is the base attention function; it gets boolean masks, or additive float masks when
    `additive_mask` (eager adds the mask to the scores). With `sliding_window`, a key more than
    `sliding_window - 1` positions before its query is masked too."""
    prefix_allowed, suffix_allowed = layout.prefix_mask, layout.suffix_mask
    if sliding_window:
        prefix_window, suffix_window = window_masks(layout, sliding_window)
        prefix_allowed, suffix_allowed = prefix_allowed & prefix_window, suffix_allowed & suffix_window

    def mask(allowed: torch.Tensor) -> torch.Tensor:
        if not additive_mask:
            return allowed
        blocked = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        return blocked.masked_fill(~allowed, torch.finfo(query.dtype).min)

    width = layout.prefix_width
    prefix_out, _ = attend(
        module,
        query[:, :, :width],
        key[:, :, :width],
        value[:, :, :width],
        mask(prefix_allowed),
        **kwargs,
    )  # [B, P, H, D]
    # Suffix rows: their own tokens as queries; the group's prefix (one copy per member, whose
    # gradients autograd sums into the single prefix) and their own tokens as keys.
    # index_select, not advanced indexing: its backward is an index_add, several times faster on
    # CPU than the accumulating index_put that `prefix[group_of_row]` backpropagates through.
    group, index = layout.group_of_row[:, None], layout.suffix_index

    def suffix_rows(states: torch.Tensor) -> torch.Tensor:
        return states.transpose(1, 2)[group, index].transpose(1, 2)  # [N, H, S, D]

    def group_prefix(states: torch.Tensor) -> torch.Tensor:
        return states[:, :, :width].index_select(0, layout.group_of_row)  # [N, H, P, D]

    suffix_out, _ = attend(
        module,
        suffix_rows(query),
        torch.cat([group_prefix(key), suffix_rows(key)], dim=2),
        torch.cat([group_prefix(value), suffix_rows(value)], dim=2),
        mask(suffix_allowed),
        **kwargs,
    )  # [N, S, H, D]
    batch, heads, length, _ = query.shape
    out = prefix_out.new_zeros(batch, length, *prefix_out.shape[2:])
    out = out.index_put(layout.prefix_put, prefix_out[layout.prefix_put])
    return out.index_put(layout.suffix_put, suffix_out[layout.suffix_take])


def window_masks(layout: SharedPrefixLayout, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([1, 1, P, P], [N, 1, S, P + S]) True where query position - key position < window. Prefix
    tokens sit at positions 0..p-1 in columns 0..p-1; suffix token t of a row at p + t."""
    width = layout.prefix_width
    steps = layout.suffix_index.shape[1]
    device = layout.prefix_len.device
    prefix_pos = torch.arange(width, device=device)
    prefix_window = (prefix_pos[:, None] - prefix_pos[None, :] < window)[None, None]
    query_pos = layout.prefix_len[layout.group_of_row][:, None] + torch.arange(steps, device=device)  # [N, S]
    key_pos = torch.cat([prefix_pos.expand(len(query_pos), width), query_pos], dim=1)  # [N, P + S]
    suffix_window = (query_pos[:, :, None] - key_pos[:, None, :] < window)[:, None]
    return prefix_window, suffix_window


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: SharedPrefixLayout,
    **kwargs,
) -> torch.Tensor:
    """FlashAttention-2 over a packed batch in one variable-length call, [B, H, L, D] in and
    [B, L, H, D] out. A suffix's key sequence repeats its group's prefix keys (one gather per
    member, whose gradients autograd sums into the single prefix); no mask is materialised."""
    if flash_utils.flash_attn_supports_top_left_mask():
        raise ValueError(
            "shared-prefix forward with flash_attention_2 needs a kernel that aligns causal masks to the "
            "bottom right (flash-attn 2.1 or newer)"
        )
    sequences = layout.varlen
    batch, _, width, _ = query.shape

    def tokens(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        flat = states.transpose(1, 2).reshape(batch * width, states.shape[1], states.shape[-1])
        return flat.index_select(0, index).transpose(0, 1)[None]  # [1, H, T, D]

    out, _ = flash_attention(
        module,
        tokens(query, sequences.query_index),
        tokens(key, sequences.key_index),
        tokens(value, sequences.key_index),
        None,
        is_causal=True,
        cu_seq_lens_q=sequences.cu_query,
        cu_seq_lens_k=sequences.cu_key,
        max_length_q=sequences.max_query,
        max_length_k=sequences.max_key,
        **kwargs,
    )  # [1, total queries, H, D]
    packed = out.new_zeros(batch * width, *out.shape[2:])
    return packed.index_put((sequences.query_index,), out[0]).view(batch, width, *out.shape[2:])


def flash_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' FlashAttention-2 call with the implementation named explicitly: its own wrapper
    reads the name from the model config, which carries ours."""
    out = flash_utils._flash_attention_forward(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        attention_mask,
        query_length=query.shape[2],
        is_causal=module.is_causal if is_causal is None else is_causal,
        dropout=dropout,
        softmax_scale=scaling,
        sliding_window=sliding_window,
        softcap=softcap,
        use_top_left_mask=flash_utils.flash_attn_supports_top_left_mask(),
        target_dtype=get_target_dtype(query, module),
        attn_implementation=FLASH,
        **kwargs,
    )
    return out, None


def _base_attention(base: str, module: torch.nn.Module) -> AttentionFn:
    if base == "eager":  # the model's own eager function (it lives in its modeling module)
        return sys.modules[type(module).__module__].eager_attention_forward
    if base == FLASH:
        return flash_attention
    return ALL_ATTENTION_FUNCTIONS[base]


def _make_attention(base: str) -> AttentionFn:
    def attention(module, query, key, value, attention_mask, **kwargs):
        layout = kwargs.pop("shared_prefix_layout", None)
        documents = kwargs.pop("flex_documents", None)  # padding-free bins, on the flex path
        attend = _base_attention(base, module)
        if layout is None and documents is None:
            return attend(module, query, key, value, attention_mask, **kwargs)
        # Mistral and Phi3 pass the window as an argument; Qwen2/3 also set it on their sliding layers
        window = kwargs.pop("sliding_window", None) or getattr(module, "sliding_window", None)
        if kwargs.get("softcap") is not None:
            raise ValueError("packed rows do not support attention logit soft-capping (Gemma2/3)")
        kwargs.pop("is_causal", None)  # the masks carry the causal structure
        if layout is None:
            return packed_flex_attention(module, query, key, value, documents, window, **kwargs), None
        layout.attended = True
        if base == FLEX:
            return packed_flex_attention(
                module, query, key, value, layout.flex_documents, window, **kwargs
            ), None
        if base == FLASH:
            if window:
                raise ValueError(
                    "shared-prefix forward with flash_attention_2 does not support sliding-window layers; "
                    "use attn_implementation=sdpa"
                )
            return varlen_attention(module, query, key, value, layout, **kwargs), None
        out = grouped_attention(
            attend, module, query, key, value, layout, base == "eager", sliding_window=window, **kwargs
        )
        return out, None

    return attention


def shared_prefix_attention(base: str) -> str:
    """Register (once) the shared-prefix attention over `base` and return its name, for
    `attn_implementation=` in from_pretrained or a model config."""
    if base.startswith(PREFIX):
        return base
    if base not in SUPPORTED_BASES:
        raise ValueError(
            f"model.shared_prefix works with attn_implementation in {list(SUPPORTED_BASES)}, not {base!r}"
        )
    if base == FLASH:
        try:  # what transformers does when it loads a flash model: fail now, not at the first forward
            flash_utils.lazy_import_flash_attention(FLASH)
        except (ImportError, ValueError) as error:
            raise ValueError(
                "model.shared_prefix with attn_implementation=flash_attention_2 needs the flash-attn package "
                f"(2.1 or newer) or a FlashAttention-2 kernel from the kernels package: {error}"
            ) from error
    name = REGISTERED_NAMES[base]
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_attention(base))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def uses_packed_flex(model: torch.nn.Module) -> bool:
    """Whether `model` was loaded with the FlexAttention path for packed rows."""
    return getattr(model_config(model), "_attn_implementation", None) == REGISTERED_NAMES[FLEX]


def model_config(model: torch.nn.Module):
    """The transformers config behind wrappers (DeepSpeed engine, peft, adapter views), or None."""
    seen = 0
    while model is not None and seen < 8:
        config = getattr(model, "config", None)
        if isinstance(config, PretrainedConfig):
            return config
        model = getattr(model, "module", None) or getattr(model, "peft_model", None)
        seen += 1
    return None


def check_family(model: torch.nn.Module) -> None:
    """Refuse a model family whose attention the shared-prefix tests do not cover."""
    config = model_config(model)
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"model.shared_prefix supports the model families {list(SUPPORTED_FAMILIES)} (tested equal to the "
            f"repeated layout), not {family!r}; set model.shared_prefix=false for this model"
        )

"""Shared-prefix forward equals the repeated layout: logits, values, scores and every gradient, for
Llama and Qwen2, SDPA, eager and FlashAttention-2, mixed prompt and response lengths, padding,
groups of any size.

FlashAttention has no CPU kernel, so on CPU its path runs against a plain-torch kernel with
flash-attn's contract (variable-length sequences, causal masks aligned to the bottom right); the
GPU-marked test runs the real one."""

from __future__ import annotations

import pytest
import torch
import transformers.modeling_flash_attention_utils as flash_utils

from rlhf.config import ModelConfig
from rlhf.models.forward import response_logits, response_logprobs, sequence_scores, token_values
from rlhf.models.load import load_causal_lm, load_scorer
from rlhf.models.options import ForwardOptions
from rlhf.models.shared_prefix import build_layout, shared_prefix_attention
from rlhf.models.tiny import build_char_tokenizer

TOKENIZER = build_char_tokenizer()
PLAIN, SHARED = ForwardOptions(), ForwardOptions(shared_prefix=True)
TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64}


def model_config(arch: str, attention: str, shared: bool) -> ModelConfig:
    cfg = ModelConfig(attn_implementation=attention, shared_prefix=shared)
    for name, value in {**TINY, "arch": arch}.items():
        setattr(cfg.tiny, name, value)
    return cfg


def grouped_batch(group_of_row, prompt_lengths, response_lengths, prompt_width=9, response_width=7, seed=0):
    """Left-padded prompts (rows of a group share one), right-padded responses of the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    vocab = len(TOKENIZER)
    prompts = [torch.randint(4, vocab, (n,), generator=generator) for n in prompt_lengths]
    rows = len(group_of_row)
    prompt_ids = torch.zeros(rows, prompt_width, dtype=torch.long)
    prompt_mask = torch.zeros(rows, prompt_width, dtype=torch.bool)
    response_ids = torch.zeros(rows, response_width, dtype=torch.long)
    response_mask = torch.zeros(rows, response_width, dtype=torch.bool)
    for row, group in enumerate(group_of_row):
        prompt = prompts[group]
        prompt_ids[row, prompt_width - len(prompt) :] = prompt
        prompt_mask[row, prompt_width - len(prompt) :] = True
        length = response_lengths[row]
        response_ids[row, :length] = torch.randint(4, vocab, (length,), generator=generator)
        response_mask[row, :length] = True
    return prompt_ids, prompt_mask, response_ids, response_mask


# groups of 3, 1 and 2 rows, interleaved; one empty response; prompts of 5, 1 and 9 tokens
MIXED = grouped_batch([0, 2, 0, 1, 2, 0], [5, 1, 9], [7, 3, 0, 4, 1, 5])
CASES = [(arch, attention) for arch in ("llama", "qwen2") for attention in ("sdpa", "eager")]


def weighted_backward(model, batch=MIXED, options=PLAIN) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Log-probs of `batch`, and every parameter's gradient of a fixed random weighting of them."""
    mask = batch[3]
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))
    logprobs, _ = response_logprobs(model, *batch, options)
    (logprobs * weights * mask).sum().backward()
    return logprobs, {name: p.grad for name, p in model.named_parameters()}


def assert_same_gradients(shared: dict[str, torch.Tensor], plain: dict[str, torch.Tensor]) -> None:
    for name, grad in plain.items():
        # fp32 sums in another order: the prefix's gradient is one sum instead of G copies
        torch.testing.assert_close(shared[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def generate_groups_of_three(model, prompt_ids, prompt_mask, shared_prefix=False):
    """Greedy rollout of 3 samples per prompt, 4 tokens, with the logits of every step."""
    from transformers import GenerationConfig

    from rlhf.rollout.hf import generate_groups

    config = GenerationConfig(
        do_sample=False, max_new_tokens=4, pad_token_id=TOKENIZER.pad_token_id, eos_token_id=-1
    )
    return generate_groups(
        model,
        prompt_ids,
        prompt_mask,
        3,
        config,
        shared_prefix=shared_prefix,
        output_logits=True,
        return_dict_in_generate=True,
    )


@pytest.mark.parametrize("arch,attention", CASES)
def test_logits_and_every_gradient_equal_the_repeated_layout(arch, attention):
    plain = load_causal_lm(model_config(arch, attention, False), TOKENIZER, seed=3)
    shared = load_causal_lm(model_config(arch, attention, True), TOKENIZER, seed=3)
    with pytest.raises(ValueError, match="load the model with model.shared_prefix=true"):
        response_logits(plain, *MIXED, SHARED)  # its attention would let rows attend to each other
    mask = MIXED[3]
    plain_logits, shared_logits = response_logits(plain, *MIXED), response_logits(shared, *MIXED, SHARED)
    # fp32: the packed layout adds the same attention terms in another order (a few ulps apart)
    torch.testing.assert_close(shared_logits[mask], plain_logits[mask], rtol=1e-5, atol=1e-5)
    assert_same_gradients(weighted_backward(shared, options=SHARED)[1], weighted_backward(plain)[1])


def reference_flash_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False,
):  # fmt: skip
    """flash_attn_varlen_func in plain torch: [tokens, heads, dim] sequences cut at the offsets;
    a causal query i of a sequence with more keys than queries sees keys up to i + keys - queries."""
    assert dropout_p == 0.0 and window_size == (-1, -1) and not softcap
    outputs = []
    for start_q, end_q, start_k, end_k in zip(
        cu_seqlens_q[:-1], cu_seqlens_q[1:], cu_seqlens_k[:-1], cu_seqlens_k[1:]
    ):
        queries, keys, values = (
            x.transpose(0, 1) for x in (q[start_q:end_q], k[start_k:end_k], v[start_k:end_k])
        )
        allowed = None
        if causal:
            num_q, num_k = queries.shape[1], keys.shape[1]
            allowed = torch.arange(num_k)[None, :] <= torch.arange(num_q)[:, None] + (num_k - num_q)
        out = torch.nn.functional.scaled_dot_product_attention(
            queries, keys, values, attn_mask=allowed, scale=softmax_scale, enable_gqa=True
        )
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


def reference_flash(q, k, v, **kwargs):
    """flash_attn_func: [batch, length, heads, dim], every row one sequence."""
    batch, length = q.shape[:2]
    offsets = torch.arange(batch + 1, dtype=torch.int32) * length
    flat = (x.reshape(batch * length, *x.shape[2:]) for x in (q, k, v))
    return reference_flash_varlen(*flat, offsets, offsets, **kwargs).view(q.shape)


@pytest.fixture
def reference_flash_kernels(monkeypatch):
    """transformers' FlashAttention-2 path, with the plain-torch kernels in place of flash-attn's."""
    process = flash_utils._lazy_define_process_function(reference_flash_varlen)
    kernels = (
        reference_flash,
        reference_flash_varlen,
        None,
        flash_utils._pad_input,
        flash_utils._unpad_input,
    )
    monkeypatch.setattr(
        flash_utils, "lazy_import_flash_attention", lambda *a, **k: (kernels, (process, dict))
    )
    monkeypatch.setattr(flash_utils, "flash_attn_supports_top_left_mask", lambda: False)


def test_varlen_sequences_repeat_the_prefix_keys_for_each_suffix():
    # one prompt of 2 tokens, responses of 2, 1 and 0 tokens: packed [p0 p1 a0 a1 b0]
    prompt_ids = torch.tensor([[5, 6]] * 3)
    response_ids = torch.tensor([[7, 8], [9, 0], [0, 0]])
    response_mask = torch.tensor([[True, True], [True, False], [False, False]])
    layout = build_layout(
        prompt_ids, torch.ones_like(prompt_ids, dtype=torch.bool), response_ids, response_mask
    )
    sequences = layout.varlen
    assert sequences.query_index.tolist() == [0, 1, 2, 3, 4]
    assert sequences.key_index.tolist() == [0, 1, 0, 1, 2, 3, 0, 1, 4]  # the empty response has no sequence
    assert sequences.cu_query.tolist() == [0, 2, 4, 5]
    assert sequences.cu_key.tolist() == [0, 2, 6, 9]
    assert (sequences.max_query, sequences.max_key) == (2, 4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_flash_attention_path_equals_the_repeated_layout(arch, reference_flash_kernels):
    plain = load_causal_lm(model_config(arch, "sdpa", False), TOKENIZER, seed=3)
    shared = load_causal_lm(model_config(arch, "flash_attention_2", True), TOKENIZER, seed=3)
    mask = MIXED[3]
    plain_logprobs, plain_grads = weighted_backward(plain)
    shared_logprobs, shared_grads = weighted_backward(shared, options=SHARED)
    # fp32: per-sequence attention against SDPA over the padded rows, same terms in another order
    torch.testing.assert_close(shared_logprobs[mask], plain_logprobs[mask], rtol=1e-5, atol=1e-5)
    assert_same_gradients(shared_grads, plain_grads)
    # outside a packed forward it is transformers' FlashAttention-2 path (padding unpadded), and the
    # rollout's prefill-once generation runs on it unchanged
    prompt_ids, prompt_mask, _, _ = grouped_batch([0, 1], [3, 6], [0, 0])
    kwargs = dict(attention_mask=prompt_mask.long(), max_new_tokens=5, do_sample=False)
    assert torch.equal(shared.generate(prompt_ids, **kwargs), plain.generate(prompt_ids, **kwargs))
    plain_out = generate_groups_of_three(plain.eval(), prompt_ids, prompt_mask)
    shared_out = generate_groups_of_three(shared.eval(), prompt_ids, prompt_mask, shared_prefix=True)
    # fp32, unpadded per-sequence attention against padded SDPA: the same sums in another order
    torch.testing.assert_close(shared_out.logits[0], plain_out.logits[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(shared_out.sequences, plain_out.sequences)


def test_flash_attention_without_a_kernel_is_a_clear_error(monkeypatch):
    def missing(*args, **kwargs):
        raise ImportError("No module named 'flash_attn'")

    monkeypatch.setattr(flash_utils, "lazy_import_flash_attention", missing)
    with pytest.raises(ValueError, match="flash_attention_2 needs the flash-attn package"):
        shared_prefix_attention("flash_attention_2")


def test_layout_packs_each_prompt_once_with_restarting_positions():
    layout = build_layout(*MIXED)
    assert layout.num_groups == 3
    # the group of the 5-token prompt holds rows 0, 2 and 5: 5 + 7 + 0 + 5 tokens
    group = int(layout.group_of_row[0])
    assert int(layout.prefix_len[group]) == 5
    positions = layout.position_ids[group].tolist()
    assert positions[:17] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9]
    # the first response token of every row is predicted from its prompt's last token
    assert layout.predict_index[:, 0].tolist() == (layout.prefix_len[layout.group_of_row] - 1).tolist()


def test_groups_of_one_equal_the_plain_forward():
    """Every prompt distinct: the forward takes the ordinary path, and the packed one agrees too."""
    batch = grouped_batch([0, 1, 2], [3, 6, 2], [4, 7, 2], seed=5)
    plain = load_causal_lm(model_config("llama", "sdpa", False), TOKENIZER, seed=0)
    shared = load_causal_lm(model_config("llama", "sdpa", True), TOKENIZER, seed=0)
    mask = batch[3]
    layout = build_layout(*batch)
    packed = shared(
        input_ids=layout.input_ids,
        position_ids=layout.position_ids,
        shared_prefix_layout=layout,
        use_cache=False,
    ).logits[layout.group_of_row[:, None], layout.predict_index]
    expected = response_logits(plain, *batch)
    torch.testing.assert_close(packed[mask], expected[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(response_logits(shared, *batch, SHARED)[mask], expected[mask])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_critic_values_and_reward_scores_equal(attention):
    _, _, _, mask = MIXED
    for per_token in (True, False):
        plain, shared = (
            load_scorer(model_config("qwen2", attention, on), TOKENIZER, seed=2, per_token=per_token).eval()
            for on in (False, True)
        )  # eval: the token-classification head has dropout
        # fp32, the packed layout's attention sums in another order: measured up to 3e-8 (values and
        # scores); attending across rows would move them by 1e-2 or more
        if per_token:
            torch.testing.assert_close(
                token_values(shared, *MIXED, SHARED)[mask],
                token_values(plain, *MIXED)[mask],
                rtol=1e-5,
                atol=1e-5,
            )
        else:
            torch.testing.assert_close(
                sequence_scores(shared, *MIXED, SHARED), sequence_scores(plain, *MIXED), rtol=1e-5, atol=1e-5
            )


def test_generation_with_the_shared_prefix_attention_is_unchanged():
    """Outside a packed forward the registered attention is the base one (generation, padding)."""
    plain = load_causal_lm(model_config("llama", "eager", False), TOKENIZER, seed=4)
    shared = load_causal_lm(model_config("llama", "eager", True), TOKENIZER, seed=4)
    prompt_ids, prompt_mask, _, _ = grouped_batch([0, 1], [3, 6], [0, 0])
    kwargs = dict(attention_mask=prompt_mask.long(), max_new_tokens=5, do_sample=False)
    assert torch.equal(shared.generate(prompt_ids, **kwargs), plain.generate(prompt_ids, **kwargs))


def test_bad_inputs_are_named():
    prompt_ids, prompt_mask, response_ids, response_mask = MIXED
    holes = response_mask.clone()
    holes[0, 1] = False
    with pytest.raises(ValueError, match="right-padded"):
        build_layout(prompt_ids, prompt_mask, response_ids, holes)
    with pytest.raises(ValueError, match="at least one token"):
        build_layout(prompt_ids, torch.zeros_like(prompt_mask), response_ids, response_mask)
    with pytest.raises(ValueError, match="attn_implementation"):
        shared_prefix_attention("flash_attention_3")


def test_grpo_loss_and_one_optimizer_step_equal():
    """The GRPO update (policy logprobs with gradient, KL to the reference, Adam step) is the same
    with the packed layout; groups of 4 rows share a prompt, as in a rollout."""
    from rlhf.config import GRPOConfig, OptimConfig, plan_grpo_batches
    from rlhf.distributed import build_engine
    from rlhf.losses.kl import k3
    from rlhf.losses.reduce import get_reduction
    from rlhf.types import RolloutBatch
    from rlhf.update import PolicyGradientObjective, UpdatePlan, run_update

    prompt_ids, prompt_mask, response_ids, response_mask = grouped_batch(
        [0, 0, 0, 0, 1, 1, 1, 1], [4, 8], [7, 2, 5, 0, 3, 7, 6, 1], seed=9
    )
    cfg = GRPOConfig(optim=OptimConfig(lr=1.0, eps=1.0, max_grad_norm=None))
    cfg.train.prompts_per_step, cfg.rollout.group_size, cfg.train.micro_batch_size = 2, 4, 8
    cfg.loss.kl_coef, cfg.train.num_minibatches = 0.05, 1
    plan = plan_grpo_batches(cfg, 1)
    weights = []
    for shared in (False, True):
        model = load_causal_lm(model_config("qwen2", "sdpa", shared), TOKENIZER, seed=6)
        engine = build_engine(model, cfg.optim, cfg.distributed, total_steps=1, micro_batch_size=8)
        batch = RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            group_ids=torch.arange(8) // 4,
            truncated=torch.zeros(8, dtype=torch.bool),
            old_logprobs=-torch.rand(8, 7, generator=torch.Generator().manual_seed(11)) * 3,
            ref_logprobs=-torch.rand(8, 7, generator=torch.Generator().manual_seed(12)) * 3,
            advantages=torch.randn(8, generator=torch.Generator().manual_seed(13)),
        ).to(engine.device)  # the rollout hands the update its batch on the engine's device
        torch.manual_seed(0)  # the minibatch order
        warp = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
        reduction = get_reduction("token_mean")
        options = ForwardOptions(shared_prefix=shared, warp=warp)
        objective = PolicyGradientObjective(cfg, engine, reduction, options, kl_estimator=k3)
        stats = run_update(batch, objective, UpdatePlan.from_config(cfg, plan), reduction)
        weights.append(({n: p.detach().clone() for n, p in model.named_parameters()}, stats))
    (plain, plain_stats), (shared, shared_stats) = weights
    for name, value in plain.items():
        torch.testing.assert_close(shared[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert plain_stats.keys() == shared_stats.keys()
    for key, value in plain_stats.items():  # loss, clip fractions, ratio, KL, entropy
        assert shared_stats[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rollout_prefills_each_prompt_once_with_the_same_first_step_logits(arch):
    prompt_ids, prompt_mask, _, _ = grouped_batch([0, 1, 2], [4, 9, 1], [0, 0, 0], seed=3)
    plain = load_causal_lm(model_config(arch, "sdpa", False), TOKENIZER, seed=8).eval()
    shared = load_causal_lm(model_config(arch, "sdpa", True), TOKENIZER, seed=8).eval()
    calls = []
    hook = shared.model.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True
    )
    outputs = [
        generate_groups_of_three(plain, prompt_ids, prompt_mask),
        generate_groups_of_three(shared, prompt_ids, prompt_mask, shared_prefix=True),
    ]
    hook.remove()
    assert calls[0] == (3, prompt_ids.shape[1] - 1)  # one prefill row per prompt, not per sample
    assert all(shape[1] == 1 for shape in calls[1:])  # then one token at a time for 9 rows
    torch.testing.assert_close(outputs[1].logits[0], outputs[0].logits[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(outputs[1].sequences, outputs[0].sequences)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["sdpa", "eager", "flash_attention_2"])
def test_bf16_on_gpu_matches_the_repeated_layout(attention):
    """bf16 kernels on CUDA: logits and every gradient within bf16 rounding of the repeated layout."""
    if attention == "flash_attention_2":
        pytest.importorskip("flash_attn")
    batch = tuple(
        t.cuda()
        for t in grouped_batch(
            [0, 0, 0, 0, 1, 1, 1, 1],
            [40, 17],
            [30, 2, 25, 0, 9, 30, 14, 1],
            prompt_width=48,
            response_width=30,
        )
    )
    mask = batch[3]
    results = []
    for shared in (False, True):
        cfg = model_config("qwen2", attention, shared)
        cfg.tiny.hidden_size, cfg.tiny.num_layers, cfg.tiny.intermediate_size = 256, 4, 512
        cfg.dtype = "bfloat16"
        model = load_causal_lm(cfg, TOKENIZER, seed=5).cuda()
        logprobs, _ = response_logprobs(model, *batch, ForwardOptions(shared_prefix=shared))
        (logprobs * mask).sum().backward()
        results.append((logprobs.float(), {n: p.grad.float() for n, p in model.named_parameters()}))
    (plain, plain_grads), (shared, shared_grads) = results
    torch.testing.assert_close(shared[mask], plain[mask], rtol=2e-2, atol=5e-2)
    for name, grad in plain_grads.items():
        error = (shared_grads[name] - grad).norm() / grad.norm().clamp(min=1e-6)
        assert error < 5e-2, (name, float(error))


def test_states_for_curiosity_come_with_the_logprob_pass():
    """The last hidden states before and at each response token, from the same forward, packed or not,
    equal transformers' `output_hidden_states` at those positions."""
    from rlhf.models.forward import response_logprobs_and_states

    plain = load_causal_lm(model_config("llama", "sdpa", False), TOKENIZER, seed=2).eval()
    shared = load_causal_lm(model_config("llama", "sdpa", True), TOKENIZER, seed=2).eval()
    prompt_ids, prompt_mask, response_ids, mask = MIXED
    joined = torch.cat([prompt_mask, mask], 1).long()
    hidden = plain(
        input_ids=torch.cat([prompt_ids, response_ids], 1),
        attention_mask=joined,
        position_ids=(joined.cumsum(1) - 1).clamp(min=0),
        output_hidden_states=True,
    ).hidden_states[-1]
    width = prompt_ids.shape[1]
    expected_states = hidden[:, width - 1 : -1]
    expected_next = hidden[:, width:]
    for model, options in ((plain, PLAIN), (shared, SHARED)):
        logprobs, states, next_states = response_logprobs_and_states(model, *MIXED, options)
        torch.testing.assert_close(
            logprobs[mask], response_logprobs(plain, *MIXED)[0][mask], rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(states[mask], expected_states[mask], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(next_states[mask], expected_next[mask], rtol=1e-5, atol=1e-5)

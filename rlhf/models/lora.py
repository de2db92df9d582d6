"""LoRA through peft: adapters on the policy, the adapter-free view as reference, merged export.

With adapters, the reference policy is the same module with its adapters disabled, so no second
copy of the weights is held. Checkpoints export the merged model (loads with from_pretrained like
any causal LM) and the adapter on its own.
"""

from __future__ import annotations

import os

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from rlhf.config import LoraConfig

ADAPTER_DIR = "adapter"


def apply_lora(model: PreTrainedModel, cfg: LoraConfig) -> PeftModel:
    config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


class AdapterDisabledView(torch.nn.Module):
    """Calls the wrapped peft model with its adapters disabled: the base model, no extra weights."""

    def __init__(self, model: PeftModel):
        super().__init__()
        self.peft_model = model

    def forward(self, *args, **kwargs):
        with torch.no_grad(), self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)


def export_pretrained(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], directory: str) -> None:
    """save_pretrained of the full model; for peft models the merged weights plus the adapter."""
    if not isinstance(model, PeftModel):
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        return
    # Rebuild on CPU from the (possibly ZeRO-gathered) state dict: the live module may be sharded.
    fresh = get_peft_model(
        AutoModelForCausalLM.from_config(model.get_base_model().config), model.peft_config["default"]
    )
    fresh.load_state_dict({k: v.float() for k, v in state_dict.items()})
    fresh.save_pretrained(os.path.join(os.path.dirname(directory), ADAPTER_DIR))
    fresh.merge_and_unload().save_pretrained(directory, safe_serialization=True)

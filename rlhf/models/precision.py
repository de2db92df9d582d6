"""Training precision: `train.precision=fp32|bf16`.

bf16 is mixed precision, as every peer trains: the weights the optimizer updates and its state stay
float32 (the master copy), the forward and backward run in bfloat16. In one process that is
`torch.autocast` around the model's forward (generation included, so the sampler and the logprob
passes see the same numbers); under DeepSpeed it is DeepSpeed's bf16 mode, which keeps the fp32
master weights inside its ZeRO optimizer (rlhf/distributed). Either way logits are cast to float32
before any log-softmax, and KL, advantages and losses are computed in float32.

Pure bf16 weights (`model.dtype=bfloat16` on the trained model) are an explicit opt-in with a
warning: an Adam update of lr 1e-4 on a weight of magnitude 1 is below bfloat16's resolution
(2^-8 = 0.004), so small updates are rounded away; measured, it cost about 14 points of held-out
accuracy in 200 GRPO steps of the demo task (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
import warnings

import torch

PRECISIONS = ("fp32", "bf16")


def autocast_forward(model: torch.nn.Module, device: torch.device | str, dtype: torch.dtype = torch.bfloat16):
    """Run `model.forward` under autocast from now on (weights untouched); returns the model."""
    if getattr(model, "_rlhf_autocast", None) is not None:
        return model
    forward = model.forward
    device_type = torch.device(device).type

    @functools.wraps(forward)
    def autocast(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return forward(*args, **kwargs)

    model.forward = autocast
    model._rlhf_autocast = dtype
    return model


def innermost_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (whose forward generation calls too)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def warn_pure_low_precision(model: torch.nn.Module) -> None:
    """A trained model whose weights are bf16 or fp16 has no float32 master copy: say so, and what
    to use instead."""
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    low = sorted(str(d) for d in dtypes if d in (torch.bfloat16, torch.float16))
    if not low:
        return
    warnings.warn(
        f"training pure {', '.join(low)} weights with no float32 master copy (model.dtype): small updates "
        "are rounded away (about 14 points less held-out accuracy than float32 in the demo's 200 GRPO "
        "steps). For mixed precision keep model.dtype=float32 and set train.precision=bf16.",
        stacklevel=3,
    )

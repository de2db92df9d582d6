"""One training step of a ~136M-parameter Llama (545 MB in fp32) under a given engine; reports,
for this rank, the bytes of parameters, gradients and optimizer state it holds and its peak RSS.

Run by benchmarks/speed/zero_memory.py (one process, or torchrun with 2 CPU ranks).
    python benchmarks/speed/zero_memory_worker.py OUT.json ENGINE MODEL_DIR     ENGINE: single | zero0..zero3
"""

from __future__ import annotations

import json
import resource
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf.config import DistributedConfig, OptimConfig
from rlhf.distributed import build_engine, launcher_env

VOCAB, SEQ, BATCH = 32000, 64, 2


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def held(engine) -> dict[str, int]:
    """Bytes this rank holds now, by kind (shared storages counted once)."""
    module = engine.module
    params = [getattr(p, "ds_tensor", p) for p in module.parameters()]
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wraps the torch optimizer
    state = [v for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    masters = [p for group in inner.param_groups for p in group["params"]]
    # DeepSpeed keeps gradients outside .grad: per-parameter accumulators and partition buffers
    grads += [p.grad_accum for p in module.parameters() if getattr(p, "grad_accum", None) is not None]
    for name in ("averaged_gradients", "all_grad_tensors"):
        extra = getattr(optimizer, name, None)
        if isinstance(extra, dict):
            for value in extra.values():
                grads += value if isinstance(value, list) else [value]
    grads += [p.grad for p in masters if p.grad is not None]
    param_bytes = tensor_bytes(params)
    master_bytes = (
        tensor_bytes(masters)
        if tensor_bytes(masters)
        and masters[0].untyped_storage().data_ptr() not in {p.untyped_storage().data_ptr() for p in params}
        else 0
    )
    return {
        "params": param_bytes,
        "grads": tensor_bytes(grads),
        "optimizer": tensor_bytes(state) + master_bytes,
    }


def save_model(directory: str) -> None:
    """The benchmark model, saved once so every configuration loads it like a real run."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)


def main() -> None:
    out, kind, model_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    env = launcher_env()
    if kind == "single":
        dist = DistributedConfig(backend="single")
    else:
        dist = DistributedConfig(backend="deepspeed", zero_stage=int(kind[-1]))
    # a factory calling from_pretrained: under ZeRO-3 the model is partitioned while it loads
    engine = build_engine(
        lambda: LlamaForCausalLM.from_pretrained(model_dir),
        OptimConfig(lr=1e-4),
        dist,
        total_steps=1,
        micro_batch_size=BATCH,
    )
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(env.rank))
    loss = engine.model(input_ids=ids, labels=ids).loss / env.world_size
    engine.backward(loss)
    after_backward = held(engine)
    engine.step()
    after_step = held(engine)
    report = {
        "rank": env.rank,
        "params_MB": after_step["params"] / 2**20,
        "grads_MB": after_backward["grads"] / 2**20,
        "optimizer_MB": after_step["optimizer"] / 2**20,
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "num_params": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()),
    }
    with open(f"{out}.rank{env.rank}", "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main()

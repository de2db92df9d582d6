"""A vLLM weight-transfer engine that works without GPUs: weights handed over as a safetensors file.

vLLM 0.32's servers take new weights through a pluggable weight-transfer protocol
(`/init_weight_transfer_engine`, `/start_weight_update`, `/update_weights`, `/finish_weight_update`),
with engines registered in `vllm.distributed.weight_transfer.factory`. Its built-in engines need
CUDA (NCCL, CUDA IPC). This one needs only a directory both sides can read: the trainer writes the
policy's weights once per version as one safetensors file (in /dev/shm by default, which is memory,
or on a shared filesystem for servers on other machines), and every server's worker loads it with
vLLM's layerwise in-place reload, the same path its NCCL engine takes. CI exercises the same
protocol and the same server routes a GPU run uses.

Registered as backend "rlhf_file" by `register()`, which vLLM calls in every process it starts
through the `vllm.general_plugins` entry point in pyproject.toml.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine

BACKEND = "rlhf_file"


def register() -> None:
    """vLLM general plugin: make the `rlhf_file` backend known to this process's factory (vLLM may
    call plugins more than once per process)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "FileWeightTransferEngine")


def write_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], directory: str, version: int) -> str:
    """The weights as one safetensors file in `directory`, written under a temporary name and
    renamed, so a reader never sees half a file; returns its path. A tensor tied to one already
    written (the output projection tied to the embeddings) is written again as a copy: safetensors
    stores no shared tensors, and vLLM's CPU layers keep a separately packed copy of a tied output
    projection that is refreshed only when its own name arrives."""
    from safetensors.torch import save_file

    tensors, written = {}, set()
    for name, tensor in named_tensors:
        tensor = tensor.detach().to("cpu")
        tensors[name] = tensor.clone() if tensor.data_ptr() in written else tensor.contiguous()
        written.add(tensor.data_ptr())
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"weights-{version:08d}.safetensors")
    handle, partial = tempfile.mkstemp(dir=directory, suffix=".partial")
    os.close(handle)
    save_file(tensors, partial)
    os.replace(partial, path)
    return path


@dataclass
class FileInitInfo:
    """Nothing to rendezvous: the file's path comes with each update."""


@dataclass
class FileUpdateInfo:
    path: str  # a safetensors file of Hugging Face-named tensors, readable by the server


class FileWeightTransferEngine(WeightTransferEngine):
    """The worker side: `update_weights({"path": ...})` loads the file's tensors into the model
    between `start_weight_update` and `finish_weight_update` (vLLM's layerwise reload: checkpoint
    names and shapes in, the model's fused and repacked layout out)."""

    init_info_cls = FileInitInfo
    update_info_cls = FileUpdateInfo

    def init_transfer_engine(self, init_info: Any) -> None:
        pass

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class synchronizes the accelerator afterwards; loading here is synchronous and
        # a CPU-only process has no accelerator to synchronize.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: FileUpdateInfo) -> None:
        from safetensors import safe_open

        with safe_open(update_info.path, framework="pt", device="cpu") as handle:
            self.model.load_weights((name, handle.get_tensor(name).to(self.device)) for name in handle.keys())

    def shutdown(self) -> None:
        pass

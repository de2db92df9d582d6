"""Weights to vLLM servers over NCCL (`rollout.server.weight_transfer=nccl`), on GPUs.

vLLM 0.32 ships both ends: the server's NCCL weight-transfer engine (`--weight-transfer-config
'{"backend": "nccl"}'`) and the trainer's (`NCCLTrainerWeightTransferEngine`), which opens an NCCL
group with each server's workers (trainer rank 0 is its rank 0) and, per update, broadcasts the
weights while the server's `/update_weights` receives them. This module gives that engine what it
needs from us: the policy as a `WeightSource` (Hugging Face names, one module gathered at a time
under ZeRO-3, LoRA merged, cast to the servers' dtype) and a control-plane client over our HTTP calls
(named errors and timeouts, the trainer's weight version). One group per server, opened on its first
update; the rlhf_file engine (rlhf/rollout/weight_transfer.py) is the same protocol without CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource


class PolicyWeightSource(WeightSource):
    """The policy's weights in the servers' dtype on this rank's GPU: `metadata()` from the
    parameters' shapes (nothing gathered), each pass a fresh `policy_weights` (collective under
    ZeRO-3: every rank makes the same passes)."""

    def __init__(self, policy: Any, dtype: torch.dtype, device: torch.device):
        self.policy, self.dtype, self.device = policy, dtype, device

    def metadata(self) -> list[ParamMeta]:
        from rlhf.rollout.vllm import policy_weight_shapes

        return [ParamMeta(name, self.dtype, shape) for name, shape in policy_weight_shapes(self.policy)]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        from rlhf.rollout.vllm import policy_weights

        for name, tensor in policy_weights(self.policy):
            yield name, tensor.to(device=self.device, dtype=self.dtype).contiguous()


class ServerWeightClient:
    """vLLM's weight-sync control plane (its `VLLMWeightSyncClient` protocol) for one server, over
    `post(url, path, body)`; an update is finished under the version `version()` names."""

    def __init__(self, post: Callable[[str, str, dict | None], Any], url: str, version: Callable[[], str]):
        self.post, self.url, self.version = post, url, version

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.post(self.url, "init_weight_transfer_engine", {"init_info": init_info})

    def start_weight_update(self) -> None:
        self.post(self.url, "start_weight_update", None)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.post(self.url, "update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.post(self.url, "finish_weight_update", {"weight_version": weight_version or self.version()})


class NcclServerTransfer:
    """Rank 0's NCCL groups, one per server: `open(url)` opens the server's group (its worker count
    from `/get_world_size`, the rendezvous at `host`:`port`), `send(url)` broadcasts the weights,
    `forget(url)` drops the group of a server that was restarted."""

    def __init__(
        self,
        source: WeightSource,
        post: Callable[[str, str, dict | None], Any],
        get: Callable[[str, str], Any],
        version: Callable[[], str],
        host: str,
        ports: Callable[[], int],
    ):
        self.source, self.post, self.get, self.version = source, post, get, version
        self.host, self.ports = host, ports
        self.engines: dict[str, Any] = {}

    def open(self, url: str) -> None:
        """The server's group, opened once (the server's workers wait in the rendezvous meanwhile)."""
        if url not in self.engines:
            from vllm.distributed.weight_transfer.nccl_engine import (
                NCCLTrainerInitInfo,
                NCCLTrainerWeightTransferEngine,
            )

            workers = int(self.get(url, "get_world_size")["world_size"])
            init_info = NCCLTrainerInitInfo(
                master_address=self.host, master_port=self.ports(), world_size=1 + workers, rank=0
            )
            client = ServerWeightClient(self.post, url, self.version)
            self.engines[url] = NCCLTrainerWeightTransferEngine.trainer_init(
                init_info, client=client, source=self.source
            )

    def send(self, url: str) -> None:
        self.open(url)
        self.engines[url].send_weights()

    def forget(self, url: str) -> None:
        engine = self.engines.pop(url, None)
        if engine is not None:
            engine.shutdown()

    def close(self) -> None:
        for url in list(self.engines):
            self.forget(url)

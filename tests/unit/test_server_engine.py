"""The trainer's side of rollout.engine=vllm_server against a stand-in server on the loopback: the
weight-update protocol it drives, requests spread over servers, and the faults it must name (a
server that does not answer in time, answers with an error, or samples with weights other than the
ones sent). The real server is tested in tests/vllm/test_vllm_server.py."""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest
import torch

pytest.importorskip("vllm")

from rlhf.config import ConfigError, ServerConfig  # noqa: E402
from rlhf.models.load import load_causal_lm, load_tokenizer  # noqa: E402
from rlhf.rollout.engine import FrozenPolicy  # noqa: E402
from rlhf.rollout.sampling import SamplingParams  # noqa: E402
from rlhf.rollout.server import ServerError, VllmServerEngine  # noqa: E402
from tests.recipes.conftest import compose_recipe_config  # noqa: E402


class StandIn(http.server.ThreadingHTTPServer):
    """Records every request; answers generate with `tokens` labelled `version` after `delay_s`."""

    def __init__(self, status: int = 200, delay_s: float = 0.0, version: str | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.status, self.delay_s, self.version = status, delay_s, version
        self.calls_version: str | None = None  # the version of the last finished weight update
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        server: StandIn = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or "null")
        server.calls.append((self.path, body))
        time.sleep(server.delay_s)
        answer: dict = {}
        if self.path == "/inference/v1/generate":
            params = body["sampling_params"]
            version = server.version or server.calls_version
            answer = {
                "choices": [
                    {
                        "index": i,
                        "token_ids": [5, 6],
                        "logprobs": {
                            "content": [{"token_id": 5, "logprob": -0.5}, {"token_id": 6, "logprob": -1.0}]
                        },
                        "weight_versions": [{"version": version, "start": 0, "end": 2}],
                    }
                    for i in range(params["n"])
                ]
            }
        if self.path == "/finish_weight_update":
            server.calls_version = body["weight_version"]
        payload = json.dumps(answer).encode()
        self.send_response(server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:  # the NCCL transfer asks for a server's worker count
        self.server.calls.append((self.path, None))  # type: ignore[attr-defined]
        payload = json.dumps({"world_size": 1} if self.path == "/get_world_size" else {}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture(scope="module")
def policy():
    cfg = compose_recipe_config("grpo", ["logger=quiet"])
    tokenizer = load_tokenizer(cfg.model)
    return FrozenPolicy(load_causal_lm(cfg.model, tokenizer, seed=0)), tokenizer


def _engine(policy, tmp_path, servers: list[StandIn], *overrides: str) -> VllmServerEngine:
    urls = ",".join(s.url for s in servers)
    cfg = compose_recipe_config(
        "grpo",
        [
            "logger=quiet",
            "rollout.engine=vllm_server",
            f"rollout.server.urls=[{urls}]",
            f"rollout.server.transfer_dir={tmp_path}",
            f"run_dir={tmp_path}",
            *overrides,
        ],
    )
    model, tokenizer = policy
    return VllmServerEngine(cfg, model, tokenizer, seed=0, dtype="float32")


def test_weights_go_through_the_update_protocol_and_requests_spread(policy, tmp_path):
    servers = [StandIn(), StandIn()]
    engine = _engine(policy, tmp_path, servers)
    with engine.ready(3):
        samples = engine.sample([[1, 2], [3], [4], [5, 6, 7]], 2, SamplingParams(max_new_tokens=4), seed=1)
    with engine.ready(3):  # once per version
        pass
    engine.close()
    # requests in flight held while the weights change (they continue with the new ones)
    protocol = ["/init_weight_transfer_engine", "/pause?mode=keep", "/start_weight_update", "/update_weights"]
    protocol += ["/finish_weight_update", "/reset_prefix_cache", "/resume"]
    for server in servers:
        paths = [path for path, _ in server.calls]
        assert paths[:7] == protocol and paths[7:] == ["/inference/v1/generate"] * 2
        update = dict(server.calls)["/update_weights"]["update_info"]
        assert update["path"].startswith(str(tmp_path)) and update["path"].endswith(".safetensors")
        assert dict(server.calls)["/finish_weight_update"] == {"weight_version": "3"}
    prompts = [body["token_ids"] for s in servers for path, body in s.calls if path.endswith("generate")]
    assert sorted(prompts) == [[1, 2], [3], [4], [5, 6, 7]]
    assert samples.response_ids.shape == (8, 2)
    assert torch.equal(samples.logprobs[0], torch.tensor([-0.5, -1.0]))


def test_the_weight_file_holds_the_policy_and_only_the_newest_is_kept(policy, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    seen = {}
    server = StandIn()
    engine = _engine(policy, tmp_path, [server])
    original = engine._post

    def post(url, path, body=None):
        if path == "update_weights":
            seen.update(load_file(body["update_info"]["path"]))
        return original(url, path, body)

    monkeypatch.setattr(engine, "_post", post)
    with engine.ready(1):
        pass
    state = policy[0].module.state_dict()  # tied tensors under each of their names
    assert set(seen) == set(state) and "lm_head.weight" in seen
    for name, tensor in state.items():
        assert torch.equal(seen[name], tensor)
    with engine.ready(2):  # the newest file stays for a server restarted before the next version
        pass
    assert [p.name for p in tmp_path.glob("rlhf-weights-*/*.safetensors")] == ["weights-00000002.safetensors"]
    engine.close()
    assert not list(tmp_path.glob("rlhf-weights-*/*.safetensors"))


def test_requests_to_a_server_that_went_away_go_to_the_others(policy, tmp_path):
    alive, gone = StandIn(), StandIn()
    engine = _engine(policy, tmp_path, [gone, alive])
    with engine.ready(1):
        gone.shutdown()
        gone.server_close()
        samples = engine.sample([[1, 2], [3], [4]], 2, SamplingParams(max_new_tokens=4))
    assert samples.response_ids.shape == (6, 2)
    assert len([p for p, _ in alive.calls if p.endswith("generate")]) == 3
    alive.shutdown()
    alive.server_close()
    with pytest.raises(ServerError, match="no vLLM server could take the request"):
        with engine.ready(1):
            engine.sample([[1, 2]], 2, SamplingParams(max_new_tokens=4))
    engine.close()


def test_a_server_that_does_not_answer_in_time_is_named(policy, tmp_path):
    slow = StandIn(delay_s=2.0)
    engine = _engine(policy, tmp_path, [slow], "rollout.server.request_timeout_s=0.5")
    with pytest.raises(
        ServerError, match=f"{slow.url} did not answer .* \\(rollout.server.request_timeout_s\\)"
    ):
        with engine.ready(1):
            pass
    engine.close()


def test_an_error_answer_is_reported_with_its_status(policy, tmp_path):
    failing = StandIn(status=500)
    engine = _engine(policy, tmp_path, [failing])
    with pytest.raises(ServerError, match="answered init_weight_transfer_engine with 500"):
        with engine.ready(1):
            pass
    engine.close()


def test_samples_from_other_weights_are_refused(policy, tmp_path):
    engine = _engine(policy, tmp_path, [StandIn(version="7")])
    with pytest.raises(
        ServerError, match=r"weight versions \['7'\] this trainer never sent \(it sent \['2'\]\)"
    ):
        with engine.ready(2):
            engine.sample([[1, 2]], 2, SamplingParams(max_new_tokens=4))
    engine.close()


def test_nccl_transfer_drives_vllms_trainer_engine_through_the_protocol(policy, tmp_path, monkeypatch):
    """rollout.server.weight_transfer=nccl with vLLM's own trainer engine, on CPU: everything but the
    NCCL kernels (the group and the broadcast are stand-ins). The server is told its group (its
    workers after trainer rank 0), each update runs pause, start, update (the names, dtypes and
    shapes our weight source declares, checked by vLLM against what it yields), finish under the
    trainer's version, then resume; the broadcast carries the policy's weights."""
    from vllm.distributed.weight_transfer import nccl_engine

    groups, broadcast = [], {}

    class Group:
        def destroy(self) -> None:
            groups.remove(self)

    def open_group(init_info):
        groups.append(Group())
        return groups[-1]

    def producer(iterator, group, src, post_iter_func, buffer_size_bytes, num_buffers):
        assert group is groups[-1] and src == 0
        broadcast.update((name, tensor.clone()) for name, tensor in iterator)

    monkeypatch.setattr(nccl_engine, "open_trainer_endpoint", open_group)
    monkeypatch.setattr(nccl_engine, "packed_nccl_broadcast_producer", producer)
    server = StandIn()
    with pytest.raises(ConfigError, match="weight_transfer=nccl needs CUDA"):
        _engine(policy, tmp_path, [server], "rollout.server.weight_transfer=nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    engine = _engine(
        policy, tmp_path, [server], "rollout.server.weight_transfer=nccl", "rollout.server.nccl_port=29731"
    )
    monkeypatch.undo()  # the rest runs as on a CPU machine, tensors on the CPU
    monkeypatch.setattr(nccl_engine, "open_trainer_endpoint", open_group)
    monkeypatch.setattr(nccl_engine, "packed_nccl_broadcast_producer", producer)
    engine.nccl.source.device = torch.device("cpu")
    with engine.ready(3):
        pass
    paths = [path for path, _ in server.calls]
    update = ["/pause?mode=keep", "/start_weight_update", "/update_weights", "/finish_weight_update"]
    assert paths == [
        "/get_world_size",
        "/init_weight_transfer_engine",
        *update,
        "/reset_prefix_cache",
        "/resume",
    ]
    calls = dict(server.calls)
    init = calls["/init_weight_transfer_engine"]["init_info"]
    assert (init["world_size"], init["rank_offset"], init["master_port"]) == (2, 1, 29731)
    assert calls["/finish_weight_update"] == {"weight_version": "3"}
    declared = calls["/update_weights"]["update_info"]
    state = policy[0].module.state_dict()
    assert declared["names"] == list(broadcast) and set(broadcast) <= set(state)
    assert all(torch.equal(broadcast[name], state[name]) for name in broadcast)
    assert declared["shapes"] == [list(state[name].shape) for name in declared["names"]]
    assert set(declared["dtype_names"]) == {"float32"}
    server.calls.clear()
    with engine.ready(4):  # the group stays open: no new rendezvous
        pass
    assert [path for path, _ in server.calls] == [*update, "/reset_prefix_cache", "/resume"]
    engine.close()
    assert not groups  # closed with the engine


def test_declared_shapes_are_the_full_ones_of_partitioned_parameters():
    """Under ZeRO-3 a rank holds a partition of each large parameter (its full shape in ds_shape):
    the shapes the NCCL transfer declares are the full ones, as the gathered tensors will be.
    (The two-rank ZeRO-3 worker checks names and order; its tiny parameters stay whole.)"""
    from rlhf.rollout.vllm import policy_weight_shapes

    cfg = compose_recipe_config("grpo", ["logger=quiet"])
    model = load_causal_lm(cfg.model, load_tokenizer(cfg.model), seed=0)
    full = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}  # the tied head too
    for param in model.parameters():  # what a rank holds of a partitioned parameter
        param.ds_shape = param.shape
        param.data = torch.empty(0)
    assert dict(policy_weight_shapes(FrozenPolicy(model))) == full


def test_server_settings_are_checked():
    with pytest.raises(ConfigError, match="launch servers or reach running ones"):
        ServerConfig(launch=True, urls=["http://a:8000"])
    with pytest.raises(ConfigError, match="one per server"):
        ServerConfig(num_servers=2, devices=["0"])
    assert ServerConfig().launches and not ServerConfig(urls=["http://a:8000"]).launches
    with pytest.raises(ConfigError, match="rollout.server.weight_transfer"):
        ServerConfig(weight_transfer="gloo")

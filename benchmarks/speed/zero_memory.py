"""Per-rank memory of parameters, gradients and optimizer state under ZeRO 0/1/2/3, 2 CPU ranks.

Each configuration loads a ~136M-parameter Llama (545 MB of fp32 weights) with from_pretrained, as
a run does (under ZeRO-3 it is partitioned while it loads), and runs one training step in a fresh
set of processes (benchmarks/speed/zero_memory_worker.py) and reports what rank 0 holds, as
ratios to one process without DeepSpeed. Byte counts come from the tensors each rank holds
(parameters, or ZeRO-3's partitions; gradients right after backward; Adam moments plus any fp32
master copy); peak RSS is the whole process. A GPU run adds a single-GPU ZeRO-3 offload figure.

Usage: python benchmarks/speed/zero_memory.py [--no-record]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.common import append_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "benchmarks", "speed", "zero_memory_worker.py")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(kind: str, nproc: int, workdir: str, model_dir: str) -> dict:
    out = os.path.join(workdir, kind)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    if nproc == 1:
        command = [sys.executable, WORKER, out, kind, model_dir]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={_port()}",
            WORKER,
            out,
            kind,
            model_dir,
        ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-4000:]}")
    with open(f"{out}.rank0") as handle:
        return json.load(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="zero_memory_")
    from benchmarks.speed.zero_memory_worker import save_model

    model_dir = os.path.join(workdir, "model")
    save_model(model_dir)
    baseline = run("single", 1, workdir, model_dir)
    rows = [("one process (no DeepSpeed)", baseline)]
    rows += [(f"ZeRO-{s}, 2 ranks", run(f"zero{s}", 2, workdir, model_dir)) for s in range(4)]
    lines = [
        f"Model: Llama, {baseline['num_params'] / 1e6:.0f}M parameters, fp32, AdamW; one step, batch 2 x 64 tokens per rank. "
        "MB held by rank 0, ratio to one process in brackets.\n",
        "| configuration | parameters MB | gradients MB | optimizer state MB | peak RSS MB |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows:
        cells = [
            f"{r[k]:.0f} ({r[k] / baseline[k]:.2f}x)" if baseline[k] else f"{r[k]:.0f}"
            for k in ("params_MB", "grads_MB", "optimizer_MB", "peak_rss_MB")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        append_results("ZeRO memory per rank, 2 CPU ranks", "python benchmarks/speed/zero_memory.py", table)


if __name__ == "__main__":
    main()

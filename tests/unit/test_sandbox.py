"""The code sandbox against hostile programs: each is contained and reported as an error result,
and the caller goes on. What only holds when the trainer runs as root (an unprivileged user, no
network) is checked where it holds and skipped, saying so, elsewhere."""

from __future__ import annotations

import os
import socket
import time

import pytest

from rewards import REWARD_FUNCTIONS
from rlhf.agents.sandbox import SandboxLimits, code_block, isolation, python, run_python

QUICK = SandboxLimits(wall_s=3.0, cpu_s=2, memory_mb=256, file_mb=0.1, processes=16, output_chars=500)
# started by root, the sandbox must drop to `nobody` and cut the network; elsewhere it cannot
AS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not AS_ROOT, reason="the trainer is not root here: no user to drop to, no namespace"
)


@needs_root
def test_started_by_root_the_code_runs_as_nobody_without_network():
    assert isolation() == {"unprivileged_user": True, "no_network": True}


def test_a_program_runs_and_its_output_comes_back():
    result = run_python("import sys\nprint(6 * 7)\nprint('warn', file=sys.stderr)", QUICK)
    assert result.ok and result.stdout == "42\n" and result.stderr == "warn\n"
    assert python("print(sum(range(10)))") == "45"
    assert python("raise ValueError('bad')").endswith("ValueError: bad\n[exit code 1]".split("\n")[-1])


def test_an_infinite_loop_is_killed_at_the_time_limit():
    started = time.monotonic()
    result = run_python("while True:\n    pass", SandboxLimits(wall_s=1.5, cpu_s=30))
    assert result.timed_out and not result.ok and time.monotonic() - started < 5
    assert "[killed: time limit]" in result.as_tool_output()


def test_cpu_time_is_limited_even_before_the_wall_clock():
    result = run_python("while True:\n    pass", SandboxLimits(wall_s=20, cpu_s=1))
    assert not result.timed_out and result.exit_code is not None and result.exit_code < 0  # SIGXCPU/SIGKILL


def test_a_memory_hog_fails_inside_the_sandbox():
    result = run_python("block = bytearray(2 * 1024 ** 3)\nprint('allocated')", QUICK)
    assert not result.ok and "MemoryError" in result.stderr and "allocated" not in result.stdout


def test_huge_output_is_cut_and_the_file_size_is_bounded():
    result = run_python("while True:\n    print('x' * 1000)", QUICK)
    assert not result.ok and result.truncated and len(result.stdout) <= QUICK.output_chars


@needs_root
def test_a_fork_bomb_is_bounded_and_leaves_no_process_behind():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = run_python(code, QUICK)
    assert not result.ok
    time.sleep(0.2)
    survivors = [p for p in os.listdir("/proc") if p.isdigit() and _owner(p) == _nobody_uid()]
    assert survivors == []


def _owner(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return None


def _nobody_uid() -> int:
    import pwd

    return pwd.getpwnam("nobody").pw_uid


@needs_root
def test_files_outside_its_directory_cannot_be_written(tmp_path):
    target = tmp_path / "project.txt"
    target.write_text("mine")
    os.chmod(tmp_path, 0o755)
    result = run_python(f"open({str(target)!r}, 'w').write('pwned')", QUICK)
    assert not result.ok and "PermissionError" in result.stderr and target.read_text() == "mine"


def test_the_trainer_s_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("RLHF_TEST_SECRET", "hunter2")
    result = run_python(
        "import os\nprint(sorted(os.environ))\nprint(open(f'/proc/{os.getppid()}/environ').read())", QUICK
    )
    assert "RLHF_TEST_SECRET" not in result.stdout and "hunter2" not in result.stdout
    assert "hunter2" not in result.stderr


@needs_root
def test_a_socket_to_this_machine_is_refused():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        result = run_python(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 2)\nprint('in')", QUICK
        )
    finally:
        listener.close()
    assert (
        not result.ok and "in" not in result.stdout and "OSError" in result.stderr or "Error" in result.stderr
    )


def test_the_code_tests_reward_and_code_blocks():
    reward = REWARD_FUNCTIONS["code_tests"]
    completions = [
        "Here:\n```python\ndef add(a, b):\n    return a + b\n```",
        "```python\ndef add(a, b):\n    return a - b\n```",
        "```python\nwhile True: pass\n```",
        [{"role": "assistant", "content": "```python\ndef add(a, b):\n    return b + a\n```"}],
    ]
    tests = ["assert add(2, 3) == 5"] * 4
    started = time.monotonic()
    assert reward(["p"] * 4, completions, tests=tests) == [1.0, 0.0, 0.0, 1.0]
    assert time.monotonic() - started < 30
    assert code_block("print(1)") == "print(1)"


def test_the_python_tool_runs_as_a_rollout_tool():
    from rlhf.agents.tools import Toolbox, load_tools

    toolbox = Toolbox(load_tools(["rlhf.agents.sandbox:python"]), timeout_s=30)
    assert toolbox.schemas()[0]["function"]["parameters"]["required"] == ["code"]
    result = toolbox.call(
        {"type": "function", "function": {"name": "python", "arguments": {"code": "print(2**10)"}}}
    )
    assert result.content == "1024" and not result.error

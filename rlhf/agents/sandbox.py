"""Running untrusted model code: a built-in `python` tool and the process sandbox behind it (the
`code_tests` reward runs in it too).

Each run is a fresh `python -I` process in a private temporary directory, with a scrubbed
environment (PATH, HOME and TMPDIR only: the trainer's variables, tokens included, are not
passed), stdin closed, and these limits, each enforced by the kernel:
- wall clock: the whole process group is killed (SIGKILL) at `wall_s`, and after every run;
- CPU time (RLIMIT_CPU), address space (RLIMIT_AS), size of any file written, its output
  included (RLIMIT_FSIZE: a flood of output is cut there), open files (RLIMIT_NOFILE), no core
  dumps; output read back is capped at `output_chars`.
Started by root (as on these machines), the process also gets a network namespace of its own
(no network at all, loopback included) and runs as the unprivileged user `nobody` with at most
`processes` processes (RLIMIT_NPROC does not bind root, so this is what stops a fork bomb): it
cannot read the trainer's files or /proc/<pid>/environ, nor write where `nobody` may not.
Started by another user, neither holds: the process runs as that user with the network, and
only the wall-clock kill bounds a fork bomb. What this does not give, on any machine: a private
filesystem (world-writable places such as /tmp stay writable) and a syscall filter. On a shared
cluster, run the trainer in a container (or give the sandbox a seccomp profile and a user of its
own) for those. `isolation()` says what holds on the machine at hand.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 1024
    file_mb: float = 1.0
    processes: int = 32
    open_files: int = 64
    output_chars: int = 4000


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None  # negative: killed by that signal
    timed_out: bool
    truncated: bool  # output past `output_chars` was dropped

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def as_tool_output(self) -> str:
        """What the model reads: the output, and why the program stopped when it did not finish."""
        text = self.stdout + (f"\n[stderr]\n{self.stderr}" if self.stderr else "")
        if self.truncated:
            text += "\n[output truncated]"
        if self.timed_out:
            text += "\n[killed: time limit]"
        elif self.exit_code not in (0, None):
            text += f"\n[exit code {self.exit_code}]"
        return text.strip() or "[no output]"


def _nobody() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _world_executable(path: str) -> bool:
    """Whether any user may run `path`: the file and every folder above it are open to others."""
    path = os.path.realpath(path)
    if not os.path.isfile(path) or not os.stat(path).st_mode & 0o001:
        return False
    folder = os.path.dirname(path)
    while folder != os.path.dirname(folder):
        if not os.stat(folder).st_mode & 0o001:
            return False
        folder = os.path.dirname(folder)
    return True


def interpreter(unprivileged: bool) -> str:
    """The Python that runs the code: this one, or (when `nobody` may not reach it, as for a
    virtual environment under /root) the system's python3; the code gets the standard library."""
    if not unprivileged or _world_executable(sys.executable):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""):
        if candidate and _world_executable(candidate):
            return candidate
    raise RuntimeError("the sandbox found no Python that the unprivileged user `nobody` may run")


def _unshare_network() -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) == 0
    except (OSError, AttributeError):
        return False


def isolation() -> dict[str, bool]:
    """What holds here: the process runs as `nobody` (file access, process count) and has no network."""
    probe = run_python(
        "import os, socket\n"
        "try:\n    socket.create_connection(('127.0.0.1', 9), 1)\n    print('net')\n"
        "except OSError as e:\n    print('net' if e.errno == 111 else 'nonet')\n"
        "print(os.getuid())",
        SandboxLimits(wall_s=20),
    )
    lines = probe.stdout.split()
    nobody = _nobody()
    return {
        "unprivileged_user": bool(nobody) and lines[-1:] == [str(nobody[0])],
        "no_network": lines[:1] == ["nonet"],
    }


def _limit(kind: int, value: int) -> None:
    resource.setrlimit(kind, (value, value))


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` as a Python program under the limits; never raises for what the code does."""
    limits = limits or SandboxLimits()
    workdir, outdir = tempfile.mkdtemp(prefix="rlhf-sandbox-"), tempfile.mkdtemp(prefix="rlhf-output-")
    user = _nobody()
    try:
        with open(os.path.join(workdir, "main.py"), "w") as handle:
            handle.write(code)
        if user:
            os.chown(workdir, *user)
            os.chown(os.path.join(workdir, "main.py"), *user)
        os.chmod(workdir, 0o700)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}

        def confine() -> None:  # in the child, before exec
            os.setsid()
            if user:
                _unshare_network()
            _limit(resource.RLIMIT_CPU, limits.cpu_s)
            _limit(resource.RLIMIT_AS, limits.memory_mb * 2**20)
            _limit(resource.RLIMIT_FSIZE, int(limits.file_mb * 2**20))
            _limit(resource.RLIMIT_NOFILE, limits.open_files)
            _limit(resource.RLIMIT_CORE, 0)
            if user:
                _limit(resource.RLIMIT_NPROC, limits.processes)
                os.setgroups([])
                os.setgid(user[1])
                os.setuid(user[0])

        with open(os.path.join(outdir, "out"), "wb") as out, open(os.path.join(outdir, "err"), "wb") as err:
            process = subprocess.Popen(
                [interpreter(bool(user)), "-I", "-B", "main.py"],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=confine,  # noqa: PLW1509 - the limits must be set in the child
                close_fds=True,
            )
            timed_out = _wait(process, limits.wall_s)
        stdout, cut_out = _read(os.path.join(outdir, "out"), limits.output_chars)
        stderr, cut_err = _read(os.path.join(outdir, "err"), limits.output_chars)
        return SandboxResult(stdout, stderr, process.returncode, timed_out, cut_out or cut_err)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(outdir, ignore_errors=True)


def _wait(process: subprocess.Popen, wall_s: float) -> bool:
    """Wait up to `wall_s`; then (and in any case) kill the whole process group. True on timeout."""
    try:
        process.wait(timeout=wall_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children left behind die with the group
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()
    deadline = time.monotonic() + 5.0  # until the kernel has taken every member of the group
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.02)
    return timed_out


def _read(path: str, limit: int) -> tuple[str, bool]:
    with open(path, "rb") as handle:
        data = handle.read(limit * 4 + 4)
    text = data.decode("utf-8", errors="replace")
    return text[:limit], len(text) > limit or os.path.getsize(path) > len(data)


def python(code: str) -> str:
    """Run a Python program and return what it prints (stdout, then stderr).

    Args:
        code: the complete program; print the values you need
    """
    return run_python(code).as_tool_output()


def code_block(text: Any) -> str:
    """The last ```python fenced block of a completion (its text, or its last message's content), or
    the whole text when it has none."""
    if isinstance(text, list):
        text = text[-1].get("content", "") if text else ""
    text = str(text)
    if "```" not in text:
        return text
    blocks = text.split("```")[1::2]
    block = blocks[-1] if blocks else text
    return block.split("\n", 1)[1] if block.split("\n", 1)[0].strip().isidentifier() else block

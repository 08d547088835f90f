"""``python -m recsys.<stage> ...`` in a real child process, without paying the interpreter's imports each time.

A CLI run of the suite is a separate process with its own exit status, stdout and stderr, killable with a real
SIGKILL: that is what the refusal, crash and resume tests check. What they do not check is that a fresh
interpreter can import torch, torchrec and the stack (``tests/test_packaging.py`` and the ``torchrun`` tests do,
with real ``python -m`` commands). Those imports take 8-12 s of CPU per process on a 2-core box, most of the
suite's wall time. So the children are forked from a *fork server* (``multiprocessing``'s ``forkserver``) that
imported the heavy modules once per pytest worker and never ran any work: no thread pool (OpenMP, polars,
arrow) has started in it, so a fork of it is as clean as a new interpreter, minus the import time.

The child then does what ``python -m <module>`` does: ``sys.argv``, environment and working directory of the
command, ``runpy`` of the package's ``__main__``, exit status from ``SystemExit`` (a traceback and status 1 on an
uncaught exception), ``atexit`` handlers at the end.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import resource
import runpy
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ["torch", "torchrec", "polars", "pyarrow.parquet", "hydra", "recsys.train.loop", "recsys.serving.job",
           "recsys.data.prepare", "recsys.retrieval.train_hooks"]
"""Imported once by the fork server (what every ``recsys`` stage imports first)."""

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)


def _exit_status(code: object) -> int:
    """What the interpreter makes of ``SystemExit(code)``: None -> 0, an int as is, anything else printed, 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _redirect(fd: int, path: str) -> None:
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(target, fd)
    os.close(target)


def _child(target: str, args: list[str], env: dict[str, str], cwd: str, out: str, err: str,
           rlimits: dict[int, int]) -> None:
    """Runs in the forked child: ``python -m target *args`` (``python target *args`` for a ``.py`` path) with
    ``env`` in ``cwd``, output to the files."""
    _redirect(1, out)
    _redirect(2, err)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's own stdout)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for which, soft in rlimits.items():  # this process only, like a preexec_fn's setrlimit
        resource.setrlimit(which, (soft, resource.getrlimit(which)[1]))
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    sys.argv = [target, *args]
    try:
        if target.endswith(".py"):
            sys.path.insert(0, os.path.dirname(target))  # what the interpreter puts first for a script
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as e:
        status = _exit_status(e.code)
    except BaseException:  # noqa: BLE001 (what the interpreter does with an uncaught exception)
        traceback.print_exc()
        status = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class CliProcess:
    """A running ``python -m <target>`` (``python <target>`` for a ``.py`` path): the parts of
    :class:`subprocess.Popen` the tests use."""

    def __init__(self, target: str, args: list[str], env: dict[str, str], cwd: Path,
                 rlimits: dict[int, int] | None = None) -> None:
        self.args = [sys.executable, *([] if target.endswith(".py") else ["-m"]), target, *args]
        self._dir = tempfile.TemporaryDirectory(prefix="cli-")
        self._out, self._err = (os.path.join(self._dir.name, n) for n in ("stdout", "stderr"))
        self._proc = _context.Process(target=_child, args=(target, list(args), env, str(cwd), self._out, self._err,
                                                           dict(rlimits or {})), daemon=False)
        self._proc.start()
        self.pid: int = self._proc.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not self._proc.is_alive():
            self._proc.join()
            self.returncode = self._proc.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """(stdout, stderr) once the process has ended."""
        self.wait(timeout)
        out, err = (Path(p).read_text(errors="replace") for p in (self._out, self._err))
        self._dir.cleanup()
        return out, err

    def kill(self) -> None:
        if self.poll() is None:
            self._proc.kill()


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a suite CLI run: this one's, one thread, no fault armed, plus ``env``."""
    full = {**os.environ, "OMP_NUM_THREADS": "1"}
    full.pop("RECSYS_FAULT", None)
    full.pop("PYTEST_XDIST_WORKER", None)
    return {**full, **(env or {})}


def launch_cli(module: str, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT,
               rlimits: dict[int, int] | None = None) -> CliProcess:
    """Start ``python -m <module> <args...>`` (see the module docstring); ``env`` on top of :func:`cli_env`;
    ``rlimits``: soft ``resource`` limits of that process only (``{resource.RLIMIT_FSIZE: bytes}``)."""
    return CliProcess(module, list(args), cli_env(env), cwd, rlimits)


def run_cli(module: str, *args: str, timeout: float = 240, env: dict[str, str] | None = None, cwd: Path = ROOT,
            rlimits: dict[int, int] | None = None) -> subprocess.CompletedProcess:
    """``python -m <module> <args...>`` to the end, output captured as text (``subprocess.run``'s result)."""
    proc = launch_cli(module, *args, env=env, cwd=cwd, rlimits=rlimits)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target: str, *args: str, nproc: int = 2, env: dict[str, str] | None = None, timeout: float = 240
              ) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node <nproc> [-m] <target> <args...>`` as the ranks see it: one child per rank with
    torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR/PORT``, ...: ``env://`` rendezvous), and like
    torchrun the others are killed when one fails. Stdout / stderr of the ranks in rank order; the status is the
    first failing rank's (0 when all succeed). Real ``torchrun`` commands (its launcher, its messages) are
    tested in ``tests/dist/test_distributed_cli.py`` and ``tests/serving/test_distributed_job.py``."""
    port = str(free_port())
    ranks = [CliProcess(target, list(args), cli_env({
        **(env or {}), "RANK": str(r), "LOCAL_RANK": str(r), "GROUP_RANK": "0", "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}), ROOT)
        for r in range(nproc)]
    deadline, status = time.monotonic() + timeout, 0
    try:
        while status == 0 and any(p.poll() is None for p in ranks):
            status = next((c for c in (p.poll() for p in ranks) if c not in (None, 0)), 0)  # a failed rank: the
            if time.monotonic() > deadline:  # others would wait for it in a collective
                raise subprocess.TimeoutExpired([target, *args], timeout)
            time.sleep(0.05)
        status = status or next((p.returncode for p in ranks if p.returncode != 0), 0)
    finally:
        for p in ranks:
            p.kill()
    outputs = [p.communicate(timeout=30) for p in ranks]
    return subprocess.CompletedProcess([target, *args], status, "".join(o for o, _ in outputs),
                                       "".join(e for _, e in outputs))

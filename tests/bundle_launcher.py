"""`python -m monai.bundle` for the tests, forked from a process that has already imported torch and MONAI.

A tiny bundle run in the suite takes seconds, but starting Python and importing torch, MONAI, ignite and MLflow
takes about ten more on 2 cores, and the suite starts dozens of runs. `BundleLauncher` keeps one server process
with those imports done; each run is a fork of it that then does what `python -m monai.bundle ...` does: its own
working directory, environment, `sys.argv` and standard output and error, the same exit status, and an uncaught
error reported through `sys.excepthook` (which the bundles' error summary replaces) before exit status 1.

Forking is safe while the server has neither started CUDA nor run a parallel region, so the launcher is used only
where CUDA is absent; GPU machines and `torchrun` runs start a fresh interpreter as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence

_SERVER = r"""
import atexit, json, os, runpy, sys
import fire, ignite.engine, mlflow, monai, monai.bundle.scripts, monai.engines, monai.handlers  # the slow imports
import nibabel, torch.utils.tensorboard

for line in sys.stdin:
    request = json.loads(line)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    pid = os.fork()
    if pid == 0:
        os.setpgrp()  # the parent can stop the run and whatever it started
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[0] = os.getcwd()  # as `python -m` sets it
        sys.argv = ["monai.bundle"] + request["args"]
        code = 0
        try:
            runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        try:
            atexit._run_exitfuncs()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(out)
    os.close(err)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""


def _kill_group(pid: int) -> None:
    """SIGKILLs the process group `pid` leads; one that has just ended is left alone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


class StartedRun:
    """A `python -m monai.bundle` run in progress, its output going to two files: read it, kill it, wait for it.

    Args:
        command: the command line it stands for (as `subprocess` reports it).
        folder: the temporary folder with its `stdout` and `stderr` files, removed once it has ended.
        kill: stops the run and whatever it started.
        wait: blocks until the run ends or `timeout` s pass (None: no limit); returns its exit status, or None.
    """

    def __init__(
        self,
        command: list[str],
        folder: tempfile.TemporaryDirectory,
        kill: Callable[[], None],
        wait: Callable[[float | None], int | None],
    ) -> None:
        self.command, self._folder, self.kill, self._wait = command, folder, kill, wait
        self.stdout, self.stderr = os.path.join(folder.name, "stdout"), os.path.join(folder.name, "stderr")
        self.returncode: int | None = None

    def poll(self, timeout: float | None = 0.0) -> int | None:
        """The run's exit status once it has ended (waiting up to `timeout` s, None: no limit), else None."""
        if self.returncode is None:
            self.returncode = self._wait(timeout)
        return self.returncode

    def output(self) -> str:
        """What the run has printed so far, standard output then standard error."""
        text = []
        for path in (self.stdout, self.stderr):
            with open(path, errors="replace") as f:
                text.append(f.read())
        return "".join(text)

    def wait(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Waits for the run's end and returns it as `subprocess.run` would, with its output as text; raises
        `subprocess.TimeoutExpired` (after killing it) when it runs past `timeout` s."""
        timed_out = self.poll(timeout) is None
        if timed_out:
            self.kill()
            self.poll(None)
        try:
            if timed_out:
                raise subprocess.TimeoutExpired(self.command, timeout)
            with open(self.stdout, errors="replace") as out, open(self.stderr, errors="replace") as err:
                return subprocess.CompletedProcess(self.command, self.returncode, out.read(), err.read())
        finally:
            self._folder.cleanup()


def start_process(args: Sequence[str], env: dict[str, str], cwd: str) -> StartedRun:
    """`python -m monai.bundle ARGS` in a fresh interpreter (where forking is unsafe), as a `StartedRun`."""
    folder = tempfile.TemporaryDirectory()
    command = [sys.executable, "-m", "monai.bundle", *args]
    with open(os.path.join(folder.name, "stdout"), "w") as out, open(os.path.join(folder.name, "stderr"), "w") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True)

    def wait(timeout: float | None) -> int | None:
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    return StartedRun(command, folder, lambda: _kill_group(proc.pid), wait)


class BundleLauncher:
    """Runs `python -m monai.bundle ARGS` as forks of one server process that has the slow imports done.

    Args:
        env: the server's environment (thread counts and other settings read once, at import, come from it).
        cwd: the server's working directory.
    """

    def __init__(self, env: dict[str, str], cwd: str) -> None:
        self.server = subprocess.Popen(
            [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=cwd,
            bufsize=0,
        )  # fmt: skip

    def _reply(self, timeout: float | None = None) -> dict | None:
        ready, _, _ = select.select([self.server.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.server.stdout.readline()
        if not line:
            raise RuntimeError(f"the bundle launcher's server ended (exit {self.server.poll()})")
        return json.loads(line)

    def start(self, args: Sequence[str], env: dict[str, str], cwd: str) -> StartedRun:
        """Starts `python -m monai.bundle ARGS` in `cwd` with `env` as a fork of the server; returns it running. The
        server takes the next run once this one has been waited for."""
        folder = tempfile.TemporaryDirectory()
        stdout, stderr = (os.path.join(folder.name, name) for name in ("stdout", "stderr"))
        request = {"args": list(args), "env": env, "cwd": cwd, "stdout": stdout, "stderr": stderr}
        self.server.stdin.write((json.dumps(request) + "\n").encode())
        pid = self._reply(timeout=60)["pid"]  # the server has created both files

        def wait(timeout: float | None) -> int | None:
            reply = self._reply(timeout)
            return None if reply is None else reply["returncode"]

        command = [sys.executable, "-m", "monai.bundle", *args]
        return StartedRun(command, folder, lambda: _kill_group(pid), wait)

    def run(self, args: Sequence[str], env: dict[str, str], cwd: str, timeout: float) -> subprocess.CompletedProcess:
        """Runs `python -m monai.bundle ARGS` in `cwd` with `env`; returns it as `subprocess.run` would, with its
        output as text; raises `subprocess.TimeoutExpired` (after stopping it) when it runs past `timeout` s."""
        return self.start(args, env, cwd).wait(timeout)

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)

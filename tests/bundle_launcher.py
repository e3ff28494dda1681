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

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence

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

    def run(self, args: Sequence[str], env: dict[str, str], cwd: str, timeout: float) -> subprocess.CompletedProcess:
        """Runs `python -m monai.bundle ARGS` in `cwd` with `env`; returns it as `subprocess.run` would, with its
        output as text; raises `subprocess.TimeoutExpired` (after stopping it) when it runs past `timeout` s."""
        with tempfile.TemporaryDirectory() as folder:
            stdout, stderr = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
            request = {"args": list(args), "env": env, "cwd": cwd, "stdout": stdout, "stderr": stderr}
            self.server.stdin.write((json.dumps(request) + "\n").encode())
            pid = self._reply(timeout=60)["pid"]
            reply = self._reply(timeout)
            command = [sys.executable, "-m", "monai.bundle", *args]
            if reply is None:
                os.killpg(pid, signal.SIGKILL)
                self._reply()
                raise subprocess.TimeoutExpired(command, timeout)
            with open(stdout, errors="replace") as out, open(stderr, errors="replace") as err:
                return subprocess.CompletedProcess(command, reply["returncode"], out.read(), err.read())

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)

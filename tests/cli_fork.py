"""The CLI as a user runs it, in its own process, without paying the imports each time.

:class:`ForkedCli` starts one server process that imports the command line (torch, transformers and every
family's modelling code) and then, for each request, forks a child that changes to the request's directory, takes
its environment and argv, points file descriptors 1 and 2 at files and runs ``main``. Each run is a separate process
with its own exit status, output streams, working directory and any file it writes, as a ``python -m
alibi_surgery.cli`` subprocess is, at the cost of a fork (about 0.1 s) instead of the imports (4-8 s on 2 cores).

Limits: POSIX only; the server never computes anything before it forks (no thread pool exists to be copied into
a child); variables read at import time (``HF_HUB_OFFLINE``, ``TRITON_INTERPRET``) come from the server's own
environment, fixed when it starts (:data:`SERVER_ENV`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_SERVER = r"""
import json, os, signal, sys, traceback
from alibi_surgery.cli.main import main
from alibi_surgery.families import FAMILIES
for family in FAMILIES.values():  # the modelling code of every family, imported once here
    family.model_class()
import transformers.models.llama.modeling_llama  # noqa: the attention-interface cases
reply = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # anything the server itself prints goes to stderr, never into the replies


def child(req):
    code = 1
    try:
        os.chdir(req["cwd"])
        os.environ.clear(); os.environ.update(req["env"])
        if req["ignore_sigint"]:  # as a child started by a shell in the background inherits it
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
        code = main(req["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)


for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "start":
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(req)
        answer = {"pid": pid}
    else:  # "wait": block, or only look (WNOHANG)
        done, status = os.waitpid(req["pid"], 0 if req["block"] else os.WNOHANG)
        answer = {"code": os.waitstatus_to_exitcode(status) if done else None}
    reply.write(json.dumps(answer) + "\n"); reply.flush()
"""

# A user's run: no Triton interpreter, nothing downloaded, one thread (surgery_runs.cli_env is this, less the hook).
SERVER_ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "HF_HUB_OFFLINE": "1",
              "OMP_NUM_THREADS": "1"}
PREFIX = [sys.executable, "-m", "alibi_surgery.cli"]


class ForkedCli:
    """``run(args, cwd, env)`` -> ``subprocess.CompletedProcess`` and ``popen(args, cwd, env)`` -> a
    :class:`ForkedProcess`, for ``alibi-surgery *args`` in a forked child. ``args`` may start with ``python -m
    alibi_surgery.cli`` (:data:`PREFIX`, dropped). ``env``: the child's whole environment (default
    :data:`SERVER_ENV`); ``ignore_sigint``: the child starts with SIGINT ignored, as a shell's background job."""

    def __init__(self):
        self._proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env=SERVER_ENV, text=True)
        self._tmp = tempfile.TemporaryDirectory()
        self._count = 0

    def _ask(self, request: dict) -> dict:
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the CLI server died (exit {self._proc.wait()})")
        return json.loads(line)

    def popen(self, args: list, cwd: Path | None = None, env: dict | None = None,
              ignore_sigint: bool = False) -> "ForkedProcess":
        args = [str(a) for a in args]
        if args[:3] == PREFIX:
            args = args[3:]
        self._count += 1
        out, err = (Path(self._tmp.name) / f"{self._count}.{name}" for name in ("stdout", "stderr"))
        pid = self._ask({"op": "start", "argv": args, "cwd": str(cwd or os.getcwd()), "env": env or SERVER_ENV,
                         "stdout": str(out), "stderr": str(err), "ignore_sigint": ignore_sigint})["pid"]
        return ForkedProcess(self, pid, ["alibi-surgery", *args], out, err)

    def run(self, args: list, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        proc = self.popen(args, cwd, env)
        stdout, stderr = proc.communicate()
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait(timeout=60)
        self._tmp.cleanup()


class ForkedProcess:
    """The part of ``subprocess.Popen`` the tests use: ``pid``, ``poll()``, ``send_signal()``, ``communicate()``
    (waits, with no timeout; returns the child's stdout and stderr) and ``returncode`` (negative: killed by that
    signal)."""

    def __init__(self, server: ForkedCli, pid: int, args: list, out: Path, err: Path):
        self._server, self.pid, self.args, self._out, self._err = server, pid, args, out, err
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            self.returncode = self._server._ask({"op": "wait", "pid": self.pid, "block": False})["code"]
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        if self.returncode is None:
            self.returncode = self._server._ask({"op": "wait", "pid": self.pid, "block": True})["code"]
        return self._out.read_text(), self._err.read_text()

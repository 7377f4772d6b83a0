"""Start N processes of one command on this machine as one JAX multi-controller run: the local stand-in for one
command per host on a TPU pod slice or a GPU cluster (docs/MULTIHOST.md).

    python -m jq.apps.launch -n 2 --cpu-devices 4 -- python -m jq qat --model tiny --steps 2 ...
    python scripts/launch_local.py -n 2 --cpu-devices 4 -- python my_script.py

Each process gets JAX_COORDINATOR_ADDRESS=localhost:PORT (a free port), JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i, which
`jq.qat.maybe_initialize_distributed` (called by `jq qat`) reads; with `--cpu-devices D` also JAX_PLATFORMS=cpu and
D fake CPU devices per process (XLA_FLAGS), whose collectives run over gloo. Output lines are prefixed with
`[i]`; when one process fails the others are stopped (they would wait for it forever in a collective) and the
launcher returns the first non-zero exit status.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

__all__ = ["free_port", "launch", "main", "process_env"]


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def process_env(index: int, n: int, port: int, cpu_devices: int | None = None,
                base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of process `index` of `n` (coordinator on localhost:`port`); `cpu_devices` fake CPU
    devices per process (replacing any device-count flag in XLA_FLAGS) when given."""
    env = dict(os.environ if base is None else base)
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(index))
    if cpu_devices is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
        env["JAX_PLATFORMS"] = "cpu"
        env.setdefault("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo")
    return env


class _Null:
    def write(self, _s: str) -> None:
        pass

    def flush(self) -> None:
        pass


def _pump(index: int, stream, sink, lines: list[str]) -> None:
    for line in iter(stream.readline, ""):
        lines.append(line)
        sink.write(f"[{index}] {line}")
        sink.flush()
    stream.close()


def launch(command: Sequence[str], n: int, *, cpu_devices: int | None = None, timeout: float | None = None,
           env: dict[str, str] | None = None, cwd: str | None = None, echo: bool = True) -> tuple[int, list[str]]:
    """Run `command` as processes 0..n-1 of one JAX run; returns (exit status, each process's output).

    The status is 0 when all exit 0, else the first failure's (124 after `timeout` seconds). A failed process
    stops the others (SIGTERM, then SIGKILL after 5 s): a multi-controller run cannot finish without all of them.
    Output (stdout and stderr merged) is kept per process and, with `echo`, printed prefixed with `[i]`.
    """
    if n < 1:
        raise ValueError(f"launch: -n {n} must be >= 1")
    if not command:
        raise ValueError("launch: no command given; put it after --, e.g. -- python -m jq qat ...")
    port = free_port()
    procs, outs, pumps = [], [[] for _ in range(n)], []
    sink = sys.stderr if echo else _Null()
    for i in range(n):
        p = subprocess.Popen(list(command), env=process_env(i, n, port, cpu_devices, env), cwd=cwd, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        t = threading.Thread(target=_pump, args=(i, p.stdout, sink, outs[i]), daemon=True)
        t.start()
        pumps.append(t)
    status, deadline = 0, None if timeout is None else time.monotonic() + timeout
    try:
        while None in [p.poll() for p in procs]:  # poll every process (not any(): it would stop at the first)
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed or (deadline is not None and time.monotonic() > deadline):
                status = failed[0] if failed else 124
                break
            time.sleep(0.05)
    finally:
        _stop(procs)
        for t in pumps:
            t.join(timeout=5)
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode), 0)
    return status, ["".join(o) for o in outs]


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM the still-running processes (their whole session: the command's children too), SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        while any(p.poll() is None for p in alive) and time.monotonic() < end:
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    """`python -m jq.apps.launch -n N [--cpu-devices D] [--timeout S] -- COMMAND ...`; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(prog="jq.apps.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--num-processes", type=int, required=True, help="processes to start")
    p.add_argument("--cpu-devices", type=int, help="fake CPU devices per process (JAX_PLATFORMS=cpu, gloo)")
    p.add_argument("--timeout", type=float, help="stop every process after this many seconds (status 124)")
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if not command:
        p.error("no command given; put it after --, e.g. -- python -m jq qat ...")
    status, _ = launch(command, args.num_processes, cpu_devices=args.cpu_devices, timeout=args.timeout)
    return status


if __name__ == "__main__":
    sys.exit(main())

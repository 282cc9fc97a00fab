"""Slurm glue for the sbatch scripts: node lists, hostfiles, rendezvous, processes per node.

    python -m recdistill.launcher.slurm hosts            # one hostname a line, from SLURM_JOB_NODELIST
    python -m recdistill.launcher.slurm hostfile         # DeepSpeed hostfile: `host slots=N`
    python -m recdistill.launcher.slurm master-addr      # the first node's address (NodeAddr)
    python -m recdistill.launcher.slurm free-port        # a free TCP port on this (the first) node
    python -m recdistill.launcher.slurm procs-per-node   # GPUs per node (or RECDISTILL_PROCS_PER_NODE)
    python -m recdistill.launcher.slurm interface-to ADDR  # this node's interface towards ADDR

Every value comes from the Slurm environment of the job, so the scripts work unchanged on 1 or
many nodes. Expand per-node values (SLURM_NODEID) inside `srun bash -c '...'`, never in the batch
script itself, where every node would read the first node's value.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compact node list (`gpu[01-03,07],cpu5`) as hostnames, in order."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?(?:,|$)", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if not prefix and not ranges:
            continue
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            if not last:
                hosts.append(prefix + first)
                continue
            width = len(first)
            hosts.extend(
                f"{prefix}{number:0{width}d}" for number in range(int(first), int(last) + 1)
            )
    return hosts


def job_hosts(environ: dict | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        return [socket.gethostname()]
    if shutil.which("scontrol") and environ is os.environ:
        result = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True
        )
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.split()
    return expand_nodelist(nodelist)


def node_address(host: str, environ: dict | None = None) -> str:
    """The address Slurm reaches a node at (its NodeAddr), which is what the other nodes can
    connect to; the hostname itself where scontrol is not available."""
    if shutil.which("scontrol") and (environ is None or environ is os.environ):
        result = subprocess.run(
            ["scontrol", "-o", "show", "node", host], capture_output=True, text=True
        )
        for field in result.stdout.split():
            if field.startswith("NodeAddr="):
                return field.split("=", 1)[1]
    return host


def procs_per_node(environ: dict | None = None) -> int:
    """Training processes per node: an explicit override, else the GPUs Slurm gave this node,
    else the GPUs visible, else 1."""
    environ = os.environ if environ is None else environ
    for key in ("RECDISTILL_PROCS_PER_NODE", "SLURM_GPUS_ON_NODE"):
        if environ.get(key, "").isdigit() and int(environ[key]) > 0:
            return int(environ[key])
    per_node = environ.get("SLURM_GPUS_PER_NODE", "")  # e.g. "8" or "a100:8"
    if per_node.split(":")[-1].isdigit():
        return int(per_node.split(":")[-1])
    visible = environ.get("CUDA_VISIBLE_DEVICES", "")
    if visible and visible != "NoDevFiles":
        return len([d for d in visible.split(",") if d])
    if shutil.which("nvidia-smi"):
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        gpus = [line for line in result.stdout.splitlines() if line.startswith("GPU ")]
        if gpus:
            return len(gpus)
    return 1


def interface_towards(address: str) -> str:
    """The network interface this node reaches `address` through (the interface holding it when
    it is this node's own), for GLOO_SOCKET_IFNAME: Gloo otherwise binds to whatever the hostname
    resolves to, often 127.0.x.x, which other nodes cannot reach. Empty when unknown."""
    if not shutil.which("ip"):
        return ""
    try:
        address = socket.gethostbyname(address)
    except OSError:
        return ""
    own = subprocess.run(
        ["ip", "-o", "addr", "show", "to", address], capture_output=True, text=True
    ).stdout.split()
    if len(own) > 1:
        return own[1]
    route = subprocess.run(
        ["ip", "route", "get", address], capture_output=True, text=True
    ).stdout.split()
    return route[route.index("dev") + 1] if "dev" in route else ""


def hostfile(hosts: list[str], slots: int) -> str:
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {
        "hosts": lambda: "\n".join(job_hosts()),
        "hostfile": lambda: hostfile(job_hosts(), procs_per_node()).rstrip("\n"),
        "master-addr": lambda: node_address(job_hosts()[0]),
        "free-port": lambda: str(free_port()),
        "procs-per-node": lambda: str(procs_per_node()),
        "interface-to": lambda: interface_towards(argv[1]),
    }
    if not argv or argv[0] not in commands or len(argv) != (2 if argv[0] == "interface-to" else 1):
        print(__doc__, file=sys.stderr)
        return 2
    print(commands[argv[0]]())
    return 0


if __name__ == "__main__":
    sys.exit(main())

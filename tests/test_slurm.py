"""Slurm: the launcher helpers, and the sbatch scripts on a real single-node Slurm cluster that the
test installs (Debian's slurm-wlm and munge), starts in a temp folder and stops again."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recdistill.launcher.slurm import expand_nodelist, hostfile, procs_per_node

from .conftest import ROOT, read_jsonl


def test_expand_nodelist():
    assert expand_nodelist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[8-10]") == ["a8", "a9", "a10"]


def test_procs_per_node_and_hostfile():
    assert procs_per_node({"RECDISTILL_PROCS_PER_NODE": "2", "SLURM_GPUS_ON_NODE": "8"}) == 2
    assert procs_per_node({"SLURM_GPUS_ON_NODE": "8"}) == 8
    assert procs_per_node({"SLURM_GPUS_PER_NODE": "a100:4"}) == 4
    assert procs_per_node({"CUDA_VISIBLE_DEVICES": "0,1,2"}) == 3
    assert hostfile(["n1", "n2"], 8) == "n1 slots=8\nn2 slots=8\n"


# ---- a real cluster ----------------------------------------------------------------------------


# Seconds a requeued job stays held before the test releases it (slurmd's cleanup of the last run).
REQUEUE_SETTLE_S = 10


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _install_slurm() -> None:
    if (
        shutil.which("slurmctld")
        and shutil.which("slurmd")
        and shutil.which("munged")
        and shutil.which("sbatch")
    ):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(
        ["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=600
    )
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "munge", "slurmctld", "slurmd", "slurm-client"],
        check=True,
        env=env,
        capture_output=True,
        timeout=900,
    )


def _pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text(errors="replace").split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


class Cluster:
    """slurmctld + one slurmd per node. With `hosts=N > 1` each node is a network namespace of its
    own (a veth into a test bridge, addresses 10.231.x.0/24 used only by these namespaces), so a
    multi-node job really crosses a network between hosts."""

    def __init__(self, folder: Path, hosts: int = 1):
        self.folder, self.hosts = folder, hosts
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.started_munged = False
        self.tag = f"rd{os.getpid() % 10000}"
        self.namespaces: list[str] = []
        self.bridge = None

    def _network(self) -> list[tuple[str, str | None, str | None]]:
        """(node name, NodeAddr, netns) per node; builds the namespaces for multi-host clusters."""
        if self.hosts == 1:
            return [(socket.gethostname().split(".")[0], None, None)]
        subnet = f"10.231.{os.getpid() % 200 + 10}"
        self.bridge = f"{self.tag}br"
        run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True)  # noqa: E731
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "addr", "add", f"{subnet}.1/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        nodes = []
        for index in range(1, self.hosts + 1):
            netns, outside = f"{self.tag}n{index}", f"{self.tag}v{index}"
            run("ip", "netns", "add", netns)
            self.namespaces.append(netns)
            run("ip", "link", "add", outside, "type", "veth", "peer", "name", "rdnet")
            run("ip", "link", "set", outside, "master", self.bridge)
            run("ip", "link", "set", outside, "up")
            run("ip", "link", "set", "rdnet", "netns", netns)
            run(
                "ip",
                "netns",
                "exec",
                netns,
                "ip",
                "addr",
                "add",
                f"{subnet}.{10 + index}/24",
                "dev",
                "rdnet",
            )
            run("ip", "netns", "exec", netns, "ip", "link", "set", "rdnet", "up")
            run("ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up")
            nodes.append((f"{self.tag}n{index}", f"{subnet}.{10 + index}", netns))
        self.controller_addr = f"{subnet}.1"
        return nodes

    def start(self) -> None:
        host = socket.gethostname().split(".")[0]
        nodes = self._network()
        (self.folder / "state").mkdir()
        f = self.folder
        controller = f"{host}({self.controller_addr})" if self.hosts > 1 else host
        node_lines = "\n".join(
            f"NodeName={name}"
            + (f" NodeAddr={addr}" if addr else "")
            + f" CPUs={os.cpu_count()} State=UNKNOWN"
            for name, addr, _ in nodes
        )
        self.conf.write_text(f"""ClusterName=recdistilltest
SlurmctldHost={controller}
SlurmUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool-%n
SlurmctldPidFile={f}/slurmctld.pid
SlurmdPidFile={f}/slurmd-%n.pid
SlurmctldLogFile={f}/slurmctld.log
SlurmdLogFile={f}/slurmd-%n.log
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        if _pid(Path("/run/munge/munged.pid")) is None:
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["munged", "--force"], check=True, capture_output=True)
            self.started_munged = True
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        for name, _, netns in nodes:
            # nsenter --net keeps the mounts (`ip netns exec` remounts /sys, hiding the cgroup fs)
            prefix = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
            subprocess.run(
                [*prefix, "slurmd", "-N", name, "-f", str(self.conf)], check=True, env=self.env
            )
        self.node_names = [name for name, _, _ in nodes]
        deadline = time.time() + 60
        while time.time() < deadline:
            states = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env
            ).stdout.split()
            if states == ["idle"] * len(nodes):
                return
            time.sleep(1)
        raise RuntimeError(f"slurm nodes never became idle: {states!r}; see {self.folder}/*.log")

    def stop(self) -> None:
        pids = [_pid(p) for p in self.folder.glob("slurmd-*.pid")] + [
            _pid(self.folder / "slurmctld.pid")
        ]
        if self.started_munged:
            pids.append(_pid(Path("/run/munge/munged.pid")))
        for pid in filter(None, pids):
            os.kill(pid, 15)
        for pid in filter(None, pids):
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
        for netns in self.namespaces:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        if self.bridge:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def sbatch(self, script: str, *args: str, output: Path, nodes: int = 1) -> str:
        env = {
            **self.env,
            "DS_ACCELERATOR": "cpu",
            "ACCELERATE_USE_CPU": "true",
            "RECDISTILL_PROCS_PER_NODE": str(2 // nodes),  # 2 ranks in all
            "PYTHON": sys.executable,
        }
        # This cluster has no GPUs: the scripts' `--gpus-per-node=8` header is overridden.
        result = subprocess.run(
            [
                "sbatch",
                "--parsable",
                f"--nodes={nodes}",
                "--gpus-per-node=0",
                f"--cpus-per-task={os.cpu_count()}",
                f"--output={output}",
                script,
                *args,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        out = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=self.env
        ).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait(
        self, job_id: str, timeout: float = 600, release_requeued: bool = False
    ) -> dict[str, str]:
        deadline = time.time() + timeout
        held_since = None
        while time.time() < deadline:
            job = self.job(job_id)
            if job.get("JobState") in (
                "COMPLETED",
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
            ):
                return job
            held = job.get("JobState") == "PENDING" and job.get("Reason") == "BeginTime"
            held_since = (held_since or time.time()) if held else None
            if release_requeued and held and time.time() - held_since >= REQUEUE_SETTLE_S:
                # Slurm holds a requeued job for 2 minutes; the test waits only until slurmd has
                # cleaned up the previous run (released at once, the new run was refused with
                # "Job credential revoked" and the job ended FAILED).
                subprocess.run(
                    ["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                    env=self.env,
                    check=True,
                )
            time.sleep(1)
        raise TimeoutError(
            f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout}s"
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("running munged, slurmctld and slurmd needs root")
    _install_slurm()
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slurm
def test_sbatch_teacher(cluster, demo_data, tmp_path):
    out = tmp_path / "teacher"
    job = cluster.sbatch(
        "slurm/teacher.sh",
        "configs/teacher_demo.yaml",
        f"data.dir={demo_data}",
        f"train.output_dir={out}",
        "train.max_steps=20",
        "train.eval_every=10",
        output=tmp_path / "log",
    )
    state = cluster.wait(job)
    log = (tmp_path / "log").read_text(errors="replace")
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log[-3000:]
    assert "1 node(s) x 2 processes" in log
    from recdistill.models.teacher import LLMRecTeacher

    model = LLMRecTeacher.from_pretrained(out / "final")
    assert model.config.num_items > 0 and (out / "final/model.safetensors").is_file()


@pytest.mark.slurm
def test_usr1_checkpoints_requeues_and_resumes(cluster, demo_data, tmp_path):
    out = tmp_path / "teacher"
    job = cluster.sbatch(
        "slurm/teacher.sh",
        "configs/teacher_demo.yaml",
        f"data.dir={demo_data}",
        f"train.output_dir={out}",
        "train.max_steps=300",
        "train.eval_every=1000",
        "train.save_every=1000",
        "train.log_every=1",
        output=tmp_path / "log",
    )
    deadline = time.time() + 300
    while time.time() < deadline:  # let it train a little
        if (out / "metrics.jsonl").is_file() and len(read_jsonl(out / "metrics.jsonl")) >= 20:
            break
        time.sleep(0.5)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster.env, check=True)
    state = cluster.wait(job, release_requeued=True)
    log = (tmp_path / "log").read_text(errors="replace")
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-3000:]
    assert "stop requested: checkpointed step" in log and "resumed from step" in log
    steps = {r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r}
    assert steps == set(range(1, 301)) and (out / "final/model.safetensors").is_file()


@pytest.mark.slurm
def test_sbatch_distill(cluster, pipeline, tmp_path):
    out = tmp_path / "student"
    job = cluster.sbatch(
        "slurm/distill.sh",
        "configs/distill_demo.yaml",
        f"data.dir={pipeline['data']}",
        f"shards.dir={pipeline['shards']}",
        f"train.output_dir={out}",
        "train.max_steps=30",
        output=tmp_path / "log",
    )
    state = cluster.wait(job)
    log = (tmp_path / "log").read_text(errors="replace")
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log[-3000:]
    assert (out / "final/metrics.json").is_file()


@pytest.fixture(scope="module")
def two_hosts(cluster, tmp_path_factory):
    """A second cluster whose two nodes are two network namespaces (two hosts on one machine)."""
    cluster.stop()  # one cluster at a time: both would share munged
    two = Cluster(tmp_path_factory.mktemp("slurm2"), hosts=2)
    try:
        two.start()
        yield two
    finally:
        two.stop()


@pytest.mark.slurm
def test_two_node_deepspeed_and_accelerate(two_hosts, pipeline, tmp_path):
    """--nodes=2: ZeRO-3 and DDP across two hosts (1 process each), rendezvous over the network."""
    teacher = tmp_path / "teacher"
    job = two_hosts.sbatch(
        "slurm/teacher.sh",
        "configs/teacher_demo.yaml",
        f"data.dir={pipeline['data']}",
        f"train.output_dir={teacher}",
        "train.max_steps=12",
        "train.eval_every=100",
        output=tmp_path / "teacher.log",
        nodes=2,
    )
    state = two_hosts.wait(job)
    log = (tmp_path / "teacher.log").read_text(errors="replace")
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert "2 node(s) x 1 processes" in log and "nnodes=2" in log
    assert (teacher / "final/model.safetensors").is_file()

    student = tmp_path / "student"
    job = two_hosts.sbatch(
        "slurm/distill.sh",
        "configs/distill_demo.yaml",
        f"data.dir={pipeline['data']}",
        f"shards.dir={pipeline['shards']}",
        f"train.output_dir={student}",
        "train.max_steps=20",
        output=tmp_path / "distill.log",
        nodes=2,
    )
    state = two_hosts.wait(job)
    assert state["JobState"] == "COMPLETED", (tmp_path / "distill.log").read_text(errors="replace")[
        -3000:
    ]
    assert (student / "final/metrics.json").is_file()

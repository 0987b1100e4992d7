"""The workflow on a real Slurm cluster: the two-node test cluster of tests/slurm/cluster.sh, through
profiles/slurm-local. Run by `make test-slurm` (which brings the cluster up first); skipped otherwise.

Every job here is a real sbatch job of slurmctld, run by the slurmd of n1 or n2 (each in a network
namespace of its own, so the two nodes have their own addresses), and accounted by slurmdbd."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest
from conftest import REPO, default_config, write_config

pytestmark = pytest.mark.skipif(os.environ.get("LORAPIPE_TEST_SLURM") != "1",
                                reason="needs the test Slurm cluster: run `make test-slurm`")

PROFILE = REPO / "profiles" / "slurm-local"
HCCN_CONF = Path(__file__).parent / "hccn.conf"
NODE_IP = {"n1": "10.213.7.1", "n2": "10.213.7.2"}   # tests/slurm/cluster.sh
DETERMINISTIC = ("tiny_base", "ckpt", "data")       # tiny base, conversion, MindRecord


def env():
    # The executor plugin reads $USER (to guess the account); CI may not set it.
    return dict(os.environ, USER=os.environ.get("USER") or "root",
                PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")


def snakemake_cmd(workdir, configfile, *args):
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
            f"--configfile={configfile}", *args]


def run(workdir, configfile, *args, profile=True, check=True):
    cmd = snakemake_cmd(workdir, configfile, *args, *(["--profile", str(PROFILE)] if profile else []))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=workdir)
    (Path(workdir) / "snakemake.out").write_text(proc.stdout + proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-10000:]}")
    return proc


def run_id(output):
    """The plugin's run ID: every sbatch job of one Snakemake run has it as its job name."""
    return re.search(r"SLURM run ID: (\S+)", output).group(1)


def accounted_jobs(uuid):
    """[{rule, partition, nodes, nodelist, state}] of a run, from slurmdbd (sacct)."""
    out = subprocess.run(["sacct", "-a", "-X", "-n", "-P", f"--name={uuid}", "--starttime=now-1days",
                          "--format=Comment,Partition,NNodes,NodeList,State,End,AllocTRES"],
                         capture_output=True, text=True, check=True).stdout
    return [dict(zip(("rule", "partition", "nodes", "nodelist", "state", "end", "tres"), line.split("|")))
            for line in out.splitlines() if line]


def planned_rules(output):
    """The rules of Snakemake's "Job stats" table at the start of a run."""
    table = output.split("Job stats:")[1].split("total")[0]
    return {m[1] for m in re.finditer(r"^(\w+)\s+\d+$", table, re.M)}


def queued(uuid):
    return subprocess.run(["squeue", "-h", f"--name={uuid}", "-o", "%i %T"], capture_output=True,
                          text=True, check=True).stdout.strip()


def files(root):
    """{relative path: bytes} of the outputs under root (manifests hold run times: left out)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*"))
            if p.is_file() and not p.name.endswith(".manifest.json")}


@pytest.fixture(scope="module")
def cluster():
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    assert ping.returncode == 0 and "UP" in ping.stdout, \
        f"the test cluster is not up (bash tests/slurm/cluster.sh up): {ping.stdout}{ping.stderr}"


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    """The whole tiny default as Slurm jobs through profiles/slurm-local."""
    workdir = tmp_path_factory.mktemp("slurm")
    configfile = write_config(workdir / "config.yaml", default_config())
    start = time.time()
    proc = run(workdir, configfile)
    print(f"tiny default through profiles/slurm-local: {time.time() - start:.0f} s")
    return workdir, configfile, proc.stdout + proc.stderr


def test_tiny_default_runs_as_slurm_jobs(slurm_run):
    workdir, configfile, output = slurm_run
    results = workdir / "results/tiny"
    metrics = json.loads((results / "evaluate/metrics.json").read_text())
    assert metrics["finetuned"]["loss"] < metrics["base"]["loss"] - 0.5
    assert (results / "report/summary.html").exists() and (results / "hf/model.safetensors").exists()
    jobs = accounted_jobs(run_id(output))
    rules = {j["rule"].removeprefix("rule_"): j for j in jobs}
    # every planned rule but `all` was a Slurm job, and slurmdbd has it as completed
    assert {"tiny_base", "ckpt", "mindrecord", "finetune", "merged_ckpt", "report"} <= set(rules)
    assert set(rules) == planned_rules(output) - {"all"} and len(jobs) == len(rules), jobs
    assert all(j["state"] == "COMPLETED" for j in jobs), jobs
    assert rules["finetune"]["partition"] == "ascend" and rules["ckpt"]["partition"] == "cpu"
    assert not queued(run_id(output))
    # Nothing is stale afterwards, with or without the profile.
    assert "Nothing to be done" in run(workdir, configfile, "-n").stdout


def test_deterministic_artifacts_equal_a_local_run(slurm_run, tmp_path):
    workdir, _, _ = slurm_run
    configfile = write_config(tmp_path / "config.yaml", default_config())
    run(tmp_path, configfile, "--cores", "2", "tiny_base", "ckpt", "mindrecord", profile=False)
    for step in DETERMINISTIC:
        local, slurm = files(tmp_path / "results/tiny" / step), files(workdir / "results/tiny" / step)
        assert local and sorted(local) == sorted(slurm), step
        assert [name for name in local if local[name] != slurm[name]] == [], step


def copy_of_run(slurm_run, dest, cfg):
    """The Slurm run's workdir with another config: only what the change affects is out of date. The
    training state is dropped, so that a finetune trains from scratch."""
    workdir, _, _ = slurm_run
    shutil.copytree(workdir, dest, symlinks=True, dirs_exist_ok=True)
    shutil.rmtree(dest / "results/tiny/.finetune_state")
    return write_config(dest / "changed.yaml", cfg)


def two_node_copy(slurm_run, dest):
    cfg = default_config()
    cfg["parallel"].update(workers=1, nodes=2, data_parallel=2)
    return copy_of_run(slurm_run, dest, cfg)


def test_an_ascend_finetune_asks_slurm_for_its_npus(slurm_run, tmp_path):
    """device_target Ascend: the job gets gres/npu=<workers> from the scheduler (the test cluster counts 2
    NPUs per node) in partition ascend, then stops with one line, as there is no NPU on this machine."""
    cfg = default_config()
    cfg["device_target"] = "Ascend"
    proc = run(tmp_path, copy_of_run(slurm_run, tmp_path, cfg), "finetune", check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    [job] = [j for j in accounted_jobs(run_id(output)) if j["rule"] == "rule_finetune"]
    assert "gres/npu=2" in job["tres"] and "cpu=2" in job["tres"], job
    assert (job["partition"], job["nodes"], job["state"]) == ("ascend", "1", "FAILED"), job
    assert "has no Ascend device" in output, output[-3000:]


def test_rank_table_for_two_nodes_is_written_on_each_node_and_merged(cluster, tmp_path):
    cfg = default_config()
    cfg["parallel"].update(workers=8, nodes=2, data_parallel=16, visible_devices="0,1,2,3,4,5,6,7",
                           hccn_conf=str(HCCN_CONF))
    proc = run(tmp_path, write_config(tmp_path / "c.yaml", cfg), "rank_table")
    table = json.loads((tmp_path / "results/tiny/rank_table.json").read_text())
    # each node's hccl_tools resolved its own address: the node's IP is its server_id
    assert [s["server_id"] for s in table["server_list"]] == [NODE_IP["n1"], NODE_IP["n2"]]
    devices = [d for s in table["server_list"] for d in s["device"]]
    assert [d["rank_id"] for d in devices] == [str(r) for r in range(16)]
    assert [d["device_ip"] for d in devices] == [f"192.98.{i}.10" for i in range(8)] * 2
    [job] = accounted_jobs(run_id(proc.stdout + proc.stderr))
    assert (job["nodes"], job["nodelist"], job["state"]) == ("2", "n[1-2]", "COMPLETED")


def test_two_nodes_one_worker_each_srun_msrun(slurm_run, tmp_path):
    """srun starts one msrun per node; only node rank 0 (n1, master_addr's owner) runs the scheduler."""
    configfile = two_node_copy(slurm_run, tmp_path)
    proc = run(tmp_path, configfile, "finetune")
    output = proc.stdout + proc.stderr
    [job] = [j for j in accounted_jobs(run_id(output)) if j["rule"] == "rule_finetune"]
    assert (job["nodes"], job["nodelist"], job["state"], job["partition"]) == ("2", "n[1-2]", "COMPLETED", "ascend")
    finetune = tmp_path / "results/tiny/finetune"
    assert sorted(p.name for p in (finetune / "checkpoint_network").glob("rank_*")) == ["rank_0", "rank_1"]
    logs = finetune / "rank_logs"
    srun_log = (logs / "srun.log").read_text()
    # msrun on n1 started the scheduler and rank 0; msrun on n2 only rank 1, against n1's address
    assert srun_log.count("Start scheduler process") == 1, srun_log
    launch = (tmp_path / "results/tiny/logs/finetune.log").read_text()
    assert "--master_addr=n1" in launch and "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --overlap" in launch
    assert "Start worker process with rank id:0" in srun_log and "Start worker process with rank id:1" in srun_log
    # each rank on its own node, with that node's address (MindFormers logs where it runs)
    for rank, node in ((0, "n1"), (1, "n2")):
        assert f"host_name: {node}, host_ip: {NODE_IP[node]}" in (logs / f"worker_{rank}.log").read_text()
    loss = (finetune / "loss.tsv").read_text().splitlines()
    assert len(loss) > 10


def test_a_rank_dying_under_slurm_fails_the_job_quickly(slurm_run, tmp_path):
    """SIGKILL rank 1 (on n2) mid-training: the job fails, Snakemake's error carries rank 1's log tail,
    and Slurm holds no allocation afterwards."""
    configfile = two_node_copy(slurm_run, tmp_path)
    cfg_text = configfile.read_text().replace("epochs: 3", "epochs: 60")  # long enough to be killed mid-way
    configfile.write_text(cfg_text)
    out = open(tmp_path / "snakemake.out", "w")
    snake = subprocess.Popen(snakemake_cmd(tmp_path, configfile, "finetune", "--profile", str(PROFILE)),
                             stdout=out, stderr=subprocess.STDOUT, env=env(), cwd=tmp_path, text=True)
    try:
        rank1 = wait_for_training_rank(tmp_path, 1, timeout=420)
        rank1_log = next((tmp_path / "results/tiny/.finetune_state").glob("*/logs/worker_1.log"))
        killed = time.time()
        rank1.send_signal(signal.SIGKILL)
        snake.wait(timeout=300)
        elapsed = time.time() - killed
    finally:
        if snake.poll() is None:
            snake.send_signal(signal.SIGINT)  # Snakemake cancels its Slurm jobs
            snake.wait(timeout=120)
        out.close()
    output = (tmp_path / "snakemake.out").read_text()
    assert snake.returncode != 0
    uuid = run_id(output)
    [job] = [j for j in accounted_jobs(uuid) if j["rule"] == "rule_finetune"]
    assert job["state"] == "FAILED", job
    # Slurm ends the job within seconds; Snakemake hears of it at the plugin's next sacct poll, whose
    # interval grows by 10 s per poll up to 180 s (snakemake-executor-plugin-slurm 1.9.2).
    job_end = datetime.fromisoformat(job["end"]).timestamp() - killed
    print(f"rank 1 killed -> Slurm job ended after {job_end:.0f} s, Snakemake failed after {elapsed:.0f} s")
    assert job_end < 30 and elapsed < 200, (job_end, elapsed)
    assert "Error in rule finetune" in output
    assert "rank 1 failed; srun stopped the ranks of the other nodes" in output, output[-5000:]
    tail = [line for line in rank1_log.read_text().splitlines() if line.strip()][-3:]
    assert all(line in output for line in tail), (tail, output[-5000:])
    assert not queued(uuid), "an allocation is still held"
    assert not training_ranks(tmp_path), "a rank is still running"


def training_ranks(workdir):
    """{rank: process} of the finetune workers of this workdir (msrun sets MS_ROLE and RANK_ID)."""
    ranks = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(workdir) in " ".join(p.info["cmdline"] or []) and "finetune_worker.py" in " ".join(p.info["cmdline"]):
                e = p.environ()
                if e.get("MS_ROLE") == "MS_WORKER":
                    ranks[int(e["RANK_ID"])] = p
        except (psutil.Error, KeyError, ValueError):
            continue
    return ranks


def wait_for_training_rank(workdir, rank, timeout):
    """The process of `rank`, once it has logged a training step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        tsv = list((workdir / "results/tiny/.finetune_state").glob(f"*/train_log_rank_{rank}.tsv"))
        if tsv and len(tsv[0].read_text().splitlines()) > 2:
            ranks = training_ranks(workdir)
            if rank in ranks:
                return ranks[rank]
        time.sleep(1)
    raise AssertionError(f"rank {rank} did not start training within {timeout} s")


# Half the profile's finetune memory, so that two finetune jobs fit on the 10 GB test nodes (the orphan test).
SMALL_FINETUNE = ["--set-resources", "finetune:slurm_partition=ascend", "finetune:mem_mb=4000", "finetune:runtime=60"]


def start_long_finetune(slurm_run, tmp_path, cpus_per_task=2, *extra):
    """The two-node finetune (60 epochs, so that it is mid-training when stopped) under the profile,
    once rank 1 (on n2) trains: (Snakemake, its output file, the finetune's Slurm job id)."""
    configfile = two_node_copy(slurm_run, tmp_path)
    configfile.write_text(configfile.read_text().replace("epochs: 3", "epochs: 60")
                          .replace("cpus_per_task: 2", f"cpus_per_task: {cpus_per_task}"))
    snake = subprocess.Popen(snakemake_cmd(tmp_path, configfile, "finetune", "--profile", str(PROFILE), *extra),
                             stdout=open(tmp_path / "snakemake.out", "w"), stderr=subprocess.STDOUT, env=env(),
                             cwd=tmp_path, text=True, start_new_session=True)
    wait_for_training_rank(tmp_path, 1, timeout=420)
    uuid = run_id((tmp_path / "snakemake.out").read_text())
    [job] = queued(uuid).split()[:1]
    return snake, configfile, job


def processes_of(workdir, snake=None):
    """Live processes, on either node, with `workdir` on their command line: msrun, its scheduler, the
    ranks, and the launcher; not the Snakemake client `snake` on the submit host, nor what it runs."""
    client = set()
    if snake is not None and psutil.pid_exists(snake.pid):
        client = {snake.pid, *(c.pid for c in psutil.Process(snake.pid).children(recursive=True))}
    return [p for p in psutil.process_iter(["cmdline", "status"])
            if str(workdir) in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE
            and p.pid not in client]


def test_scancel_of_the_finetune_job_leaves_nothing_running(slurm_run, tmp_path):
    """Issue 22: scancel ends the job's steps, and with them msrun; the ranks, which msrun starts in
    sessions of their own, die with it on n1 and on n2."""
    snake, _, job = start_long_finetune(slurm_run, tmp_path)
    try:
        assert processes_of(tmp_path, snake)  # the job's processes, on n1 and n2
        subprocess.run(["scancel", job], check=True)
        deadline = time.time() + 60
        while processes_of(tmp_path, snake) and time.time() < deadline:
            time.sleep(1)
        assert not processes_of(tmp_path, snake), [p.info["cmdline"][:4] for p in processes_of(tmp_path, snake)]
    finally:
        os.killpg(snake.pid, signal.SIGKILL)
        snake.wait()


def test_a_rerun_after_snakemake_was_killed_cancels_the_orphaned_job_and_resumes(slurm_run, tmp_path):
    """Killing Snakemake does not end the Slurm job it submitted: the job trains on. The rerun's launcher
    finds that job in the training state (its lock and its process records), scancels it, and resumes
    from the last checkpoint; two trainings never share the state. (One CPU per node, so that the rerun's
    job finds room beside the orphan on the two test nodes; were they full, the rerun would wait for the
    orphan to finish and collect its training, as the 8 GB per node of profiles/slurm-local once made it.)"""
    snake, configfile, job = start_long_finetune(slurm_run, tmp_path, 1, *SMALL_FINETUNE)
    state = next((tmp_path / "results/tiny/.finetune_state").glob("*"))
    while not list(state.glob("output/checkpoint/rank_1/*.ckpt")):
        time.sleep(1)
    os.killpg(snake.pid, signal.SIGKILL)
    snake.wait()
    assert job in subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    run(tmp_path, configfile, "--unlock")
    proc = run(tmp_path, configfile, "finetune", *SMALL_FINETUNE, check=False)
    log = (tmp_path / "results/tiny/logs/finetune.log").read_text()
    assert f"cancelling Slurm {job}" in log and "resuming from global step" in log, log[-3000:]
    assert proc.returncode == 0, log[-3000:]
    state_of_old = subprocess.run(["sacct", "-n", "-X", "-j", job, "-o", "State"], capture_output=True,
                                  text=True).stdout.split()
    assert state_of_old and state_of_old[0].startswith("CANCELLED"), state_of_old
    assert not processes_of(tmp_path)


def test_two_experiments_finetune_side_by_side(cluster, tmp_path):
    """Issue 34: with experiments, each experiment's finetune is a Slurm job of its own on the ascend
    partition (profiles/slurm-local's set-resources name the plain rule), the shared steps run once, and the
    cluster runs the two finetunes at the same time, one on each node."""
    cfg = default_config() | {"experiments": {"r8": {}, "r16": {"lora": {"rank": 16, "alpha": 32}}}}
    configfile = write_config(tmp_path / "experiments.yaml", cfg)
    proc = run(tmp_path, configfile, *(f"results/tiny/experiments/{n}/finetune/loss.tsv" for n in ("r8", "r16")))
    out = subprocess.run(["sacct", "-a", "-X", "-n", "-P", f"--name={run_id(proc.stdout + proc.stderr)}",
                          "--starttime=now-1days", "--format=Comment,Partition,NodeList,State,Start,End"],
                         capture_output=True, text=True, check=True).stdout
    jobs = [dict(zip(("rule", "partition", "node", "state", "start", "end"), line.split("|")))
            for line in out.splitlines() if line]
    rules = [j["rule"].removeprefix("rule_") for j in jobs]
    assert sorted(r.split("_", 1)[1] for r in rules if r.endswith(("_ckpt", "_mindrecord", "_tiny_base"))) == \
        ["ckpt", "mindrecord", "tiny_base"], rules  # the shared steps once
    finetunes = [j for j in jobs if j["rule"] in ("rule_r8_finetune", "rule_r16_finetune")]
    assert len(finetunes) == 2 and all(j["partition"] == "ascend" and j["state"] == "COMPLETED" for j in finetunes), jobs
    assert {j["node"] for j in finetunes} == {"n1", "n2"}, finetunes
    (a, b) = ((datetime.fromisoformat(j["start"]), datetime.fromisoformat(j["end"])) for j in finetunes)
    assert a[0] < b[1] and b[0] < a[1], finetunes  # their times overlap: side by side

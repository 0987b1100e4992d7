"""The finetune stage: YAML rendering, rank supervision, and a real resumed run on the tiny default."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import conftest
import psutil
import pytest
from conftest import REPO, default_config, write_config

from lorapipe.config import load_config
from lorapipe.train.launch import launch, log_tail
from lorapipe.train.processes import (
    LaunchError,
    process_of,
    read_process_records,
    record_process,
    stop_earlier_launch,
)

HF_CONFIG = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 176,
             "vocab_size": 1000, "rms_norm_eps": 1e-6}


def render(cfg, tokenizer):
    return conftest.render(cfg, HF_CONFIG, tokenizer)


def test_render_tiny_cpu(tiny_base_dir):
    y = render(default_config(), tiny_base_dir / "tokenizer.model")
    assert y["model"]["arch"]["type"] == "Baichuan2ForCausalLM"
    assert y["model"]["model_config"]["pet_config"] == {"pet_type": "lora", "lora_rank": 8, "lora_alpha": 16,
                                                        "lora_dropout": 0.0, "target_modules": ".*wq|.*wk|.*wv"}
    mc = y["model"]["model_config"]
    assert (mc["seq_length"], mc["hidden_size"], mc["num_layers"], mc["vocab_size"]) == (64, 64, 2, 1000)
    assert mc["use_flash_attention"] is False and mc["fused_rms_norm"] is False and mc["use_rope_slice"] is True
    assert y["context"]["device_target"] == "CPU" and y["parallel"]["parallel_mode"] == 0
    assert y["runner_wrapper"]["type"] == "CpuTrainOneStepCell"
    # the folder that holds the complete checkpoint: loaded before any parallel compile
    assert y["load_checkpoint"] == "ckpt/rank_0" and y["auto_trans_ckpt"] is False
    assert y["processor"]["tokenizer"]["vocab_file"] == str(tiny_base_dir / "tokenizer.model")
    assert y["runner_config"]["sink_mode"] is False  # MindSpore has no sink mode on CPU
    assert y["train_dataset"]["data_loader"]["dataset_dir"] == "data/belle.mindrecord"


def test_render_real_recipe(tiny_base_dir):
    real = load_config(REPO / "config/baichuan2_7b_910b.yaml")
    y = render(real, tiny_base_dir / "tokenizer.model")  # the key-by-key check is tests/test_golden_yaml.py
    assert y["context"] == {"mode": 0, "device_target": "Ascend", "max_call_depth": 10000, "save_graphs": False,
                            "enable_graph_kernel": False, "max_device_memory": "59GB"}
    assert (y["runner_config"]["sink_mode"], y["runner_config"]["sink_size"]) == (True, 2)
    assert y["model"]["model_config"]["fused_rms_norm"] is True
    assert y["parallel"]["parallel_mode"] == 1 and y["parallel_config"]["data_parallel"] == 8
    assert y["runner_wrapper"]["scale_sense"] == {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 65536,
                                                  "scale_factor": 2, "scale_window": 1000}
    assert y["lr_schedule"] == {"type": "CosineWithWarmUpLR", "learning_rate": 2e-5, "lr_end": 2e-6,
                                "warmup_ratio": 0.0, "total_steps": -1}
    assert y["model"]["model_config"]["pet_config"]["lora_rank"] == 1
    assert y["model"]["model_config"]["compute_dtype"] == "float16"
    assert y["runner_config"]["batch_size"] == 2 and y["runner_config"]["epochs"] == 1


WORKER = textwrap.dedent("""
    import os, sys, time
    import lorapipe.train.launch as launch
    import lorapipe.train.processes as processes
    if sys.argv[1] == "immortal":  # a rank whose death with its parent failed: what stop_earlier_launch is for
        processes._watch_parent = lambda pid: None
    processes.attach_to_launcher()
    if sys.argv[1] == "immortal":
        processes._prctl(processes.PR_SET_PDEATHSIG, 0)
    with launch.worker_status(int(os.environ["RANK_ID"])):
        if os.environ.get("MS_ROLE") != "MS_SCHED":
            print("rank", os.environ["RANK_ID"], "up", flush=True)
            if os.environ["RANK_ID"] == "1" and sys.argv[1] in ("raise", "crash"):
                time.sleep(1)
                if sys.argv[1] == "crash":
                    os._exit(139)  # dies without a Python exception
                raise RuntimeError("rank 1 broke")
            time.sleep(2 if sys.argv[1] in ("ok", "segfault_at_exit") else 300)
    if sys.argv[1] == "segfault_at_exit" and os.environ["RANK_ID"] == "0" and os.environ.get("MS_ROLE") != "MS_SCHED":
        import signal
        os.kill(os.getpid(), signal.SIGSEGV)  # after its work, as MindSpore's teardown once did on CI
""")


def no_workers_left(*markers):
    """No process left whose command line holds all `markers` (the script, and this test's folder:
    other runs on the machine are not this test's)."""
    return not [p for p in psutil.process_iter(["cmdline"])
                if all(str(m) in " ".join(p.info["cmdline"] or []) for m in markers)]


@pytest.mark.parametrize("launcher", ["msrun", "rank_table"])
@pytest.mark.parametrize("mode", ["raise", "crash"])
def test_a_failing_rank_stops_the_others_quickly(tmp_path, launcher, mode):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    start = time.time()
    with pytest.raises(LaunchError) as e:
        launch([str(script), mode], 2, tmp_path / "logs", launcher=launcher, rank_table=tmp_path / "t.json",
               env=env)
    assert time.time() - start < 60  # the healthy rank would sleep 300 s
    assert str(e.value).startswith("rank 1 failed") or "rank 1 did not finish" in str(e.value)
    assert "rank 1 up" in str(e.value)
    assert no_workers_left(script)


def test_multi_node_command_runs_one_msrun_per_node():
    from lorapipe.train.launch import srun_msrun_command

    cmd = srun_msrun_command(["run.py", "--config", "a b.yaml"], 8, 2, "node-a", 29500, "/shared/logs")
    assert cmd[:9] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--overlap", "--kill-on-bad-exit=1",
                       "--label", "bash", "-c"]
    # the shell exports its pid, which msrun keeps across exec: the pid its ranks watch as their parent
    assert cmd[9] == ("export LORAPIPE_PARENT_PID=$$; exec msrun --worker_num=16 --local_worker_num=8 "
                      "--node_rank=\"$SLURM_NODEID\" --master_addr=node-a --master_port=29500 --log_dir=/shared/logs "
                      "--join=True --tail_worker_log=-2 run.py --config 'a b.yaml'")
    node1 = subprocess.run(["bash", "-c", cmd[9].replace("exec msrun", "echo $LORAPIPE_PARENT_PID $$")],
                           env={"SLURM_NODEID": "1"}, capture_output=True, text=True).stdout
    assert "--node_rank=1 " in node1 and "a b.yaml" in node1
    assert node1.split()[0] == node1.split()[1]


def test_a_master_address_of_another_host_is_refused_before_any_rank(tmp_path):
    """Found by trying config mistakes: master_addr set to another host on one node left both ranks
    waiting for a scheduler that msrun starts only on the master (they timed out after 7 minutes)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with pytest.raises(LaunchError, match=r"parallel.master_addr 10.255.255.1 \(10.255.255.1\) is not an address of "
                                          r"this host"):
        launch([str(script), "ok"], 2, tmp_path / "logs", master_addr="10.255.255.1")
    assert not list((tmp_path / "logs").glob("worker_*.log"))
    launch([str(script), "ok"], 2, tmp_path / "logs", master_addr="127.0.0.1",
           env={"PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"})


def test_all_ranks_succeed(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    launch([str(script), "ok"], 2, tmp_path / "logs", env={"PATH": f"{os.path.dirname(sys.executable)}:"
                                                                   f"{os.environ['PATH']}"})
    assert sorted(p.name for p in (tmp_path / "logs").glob("done_rank_*")) == ["done_rank_0", "done_rank_1"]


def test_a_rank_that_crashes_after_it_reported_done_does_not_fail_the_training(tmp_path, caplog):
    """CI: both ranks trained, saved and reported done; rank 0 then died of SIGSEGV in MindSpore's
    interpreter teardown, msrun exited 1, and the finished training was reported as failed."""
    caplog.set_level("WARNING", logger="lorapipe")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    launch([str(script), "segfault_at_exit"], 2, tmp_path / "logs",
           env={"PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"})
    assert sorted(p.name for p in (tmp_path / "logs").glob("done_rank_*")) == ["done_rank_0", "done_rank_1"]
    assert "every rank had reported done" in caplog.text


LAUNCHER = textwrap.dedent("""
    import sys
    from lorapipe.train.launch import launch
    worker, mode, logs, launcher = sys.argv[1:]
    launch([worker, mode], 2, logs, launcher=launcher, rank_table=logs + "/t.json")
""")


def start_launcher(tmp_path, launcher, mode):
    """A launcher of two stand-in ranks in a session of its own (as Snakemake runs a job), once both
    ranks are up."""
    worker, runner, logs = tmp_path / "worker.py", tmp_path / "launcher.py", tmp_path / "logs"
    worker.write_text(WORKER)
    runner.write_text(LAUNCHER)
    proc = subprocess.Popen([sys.executable, str(runner), str(worker), mode, str(logs), launcher], start_new_session=True,
                            env=dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"))
    deadline = time.time() + 120
    while not all(f"rank {r} up" in log_tail(logs / f"worker_{r}.log") for r in (0, 1)):
        assert proc.poll() is None and time.time() < deadline, "the ranks never started"
        time.sleep(0.1)
    return proc, logs


def survivors(tmp_path, logs):
    """Live processes the launch recorded (same pid and start time), and any other with this test's
    folder on its command line (msrun's `tail -f` of a worker log, for one)."""
    found = {p.pid: p for r in read_process_records(logs) if (p := process_of(r))}
    for p in psutil.process_iter(["cmdline"]):
        if str(tmp_path) in " ".join(p.info["cmdline"] or []):
            found[p.pid] = p
    return list(found.values())


@pytest.mark.parametrize("launcher, sig", [("msrun", signal.SIGKILL), ("rank_table", signal.SIGKILL),
                                         ("msrun", signal.SIGTERM)])
def test_killing_the_launchers_process_group_leaves_nothing_running(tmp_path, launcher, sig):
    """Issue 22: the ranks (and msrun, and its scheduler) ran on in sessions of their own after a
    SIGKILL of the launcher's process group (a closed terminal, the OOM killer, kill -9 -PGID). SIGTERM
    is what Snakemake's job gets on Ctrl-C. (tests/test_workflow.py kills a whole training run.)"""
    proc, logs = start_launcher(tmp_path, launcher, "sleep")
    roles = sorted(r["role"] for r in read_process_records(logs))
    assert roles == (["launcher", "msrun", "rank", "rank", "scheduler"] if launcher == "msrun"
                     else ["launcher", "rank", "rank"])
    os.killpg(proc.pid, sig)
    proc.wait()
    deadline = time.time() + 5
    while survivors(tmp_path, logs) and time.time() < deadline:
        time.sleep(0.1)
    assert not survivors(tmp_path, logs)


@pytest.mark.parametrize("launcher", ["msrun", "rank_table"])
def test_a_launch_stops_the_ranks_an_earlier_launch_left_running(tmp_path, launcher, caplog):
    """Ranks that did not die with their launcher (here: they switched it off) are found from the
    launch's records, stopped, and only then does the next launch start its own."""
    caplog.set_level("INFO", logger="lorapipe")
    proc, logs = start_launcher(tmp_path, launcher, "immortal")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)
    left = [p for r in read_process_records(logs) if r["role"] == "rank" and (p := process_of(r))]
    assert len(left) == 2  # they outlived their launcher: the case the next launch must handle
    launch([str(tmp_path / "worker.py"), "ok"], 2, logs, launcher=launcher, rank_table=logs / "t.json",
           env={"PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"})
    assert not [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert "processes of an earlier launch of this training state" in caplog.text
    assert sorted(p.name for p in logs.glob("done_rank_*")) == ["done_rank_0", "done_rank_1"]


def test_a_reused_pid_is_not_taken_for_a_process_of_an_earlier_launch(tmp_path):
    record_process(tmp_path, os.getpid(), "rank", 0)  # this test's own process, as if it were a rank
    (record,) = read_process_records(tmp_path)
    assert process_of(record).pid == os.getpid()
    record["started"] -= 60  # the rank that had this pid started a minute before this process
    (tmp_path / "processes" / f"{record['host']}-{os.getpid()}.json").write_text(json.dumps(record))
    assert process_of(record) is None
    stop_earlier_launch(tmp_path)  # and it is left alone (else this test would not get past here)


def test_finetune_for_ascend_stops_at_once_on_a_host_without_npus(tmp_path):
    """The Ascend recipe on this CPU-only host: preflight passes what it can check here, then finetune
    stops with one line before starting any rank (not 8 ranks' "Unsupported device target" dumps)."""
    cfg = default_config()
    cfg["device_target"] = "Ascend"
    configfile = write_config(tmp_path / "c.yaml", cfg)
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "--cores", "2", "finetune", "--configfile", str(configfile)], capture_output=True, text=True,
                          env=dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"))
    assert proc.returncode != 0
    log = (tmp_path / "results/tiny/logs/finetune.log").read_text()
    assert "device_target Ascend needs devices [0, 1], but this host" in log and "no Ascend device" in log
    assert "Unsupported device target" not in log
    assert not list((tmp_path / "results/tiny/.finetune_state").rglob("worker_*.log"))  # no rank started
    assert json.loads((tmp_path / "results/tiny/preflight.json").read_text())["checks"][0]["status"] == "skipped"


def test_progress_rate_counts_from_the_first_logged_step(monkeypatch, caplog):
    """Issue 27: the first progress line of a finetune said "ETA 638 s" at step 6 of 108 (27 s at step 66):
    its rate counted the graph compile, and after a resume the steps done before it."""
    from lorapipe import progress

    clock = iter([0.0, 600.0, 610.0, 620.0])  # made at 0; the first step logged after a 600 s compile
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(time=lambda: next(clock)))
    caplog.set_level("INFO", logger="lorapipe")
    bar = progress.Progress("finetune", 108, every=0, from_first_update=True)
    bar.update(26)  # a resume from step 20: 26 is the first step this run logged
    bar.update(36)
    bar.update(46)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "finetune: 26/108 steps (24%)"  # no rate yet
    assert lines[1] == "finetune: 36/108 steps (33%), 1.0 steps/s, ETA 72 s"
    assert lines[2] == "finetune: 46/108 steps (43%), 1.0 steps/s, ETA 62 s"

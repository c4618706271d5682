"""Launch scripts: syntax, one pair per experiment config, end-to-end synthetic runs, launch errors."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "tool_train", "*", "*.sh")) +
                 glob.glob(os.path.join(ROOT, "tool_test", "*", "*.sh")))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "config", "*", "*.yaml")) if "/_base_/" not in p)


def launch_env(**env) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("NGPU", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")}
    e.update(OMP_NUM_THREADS="1", PYTHON=sys.executable, **env)
    return e


def launch(script, *args, cwd, **env):
    return subprocess.run(["sh", os.path.join(ROOT, script), *args], cwd=cwd, env=launch_env(**env),
                          capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("script", SCRIPTS + [os.path.join(ROOT, "tools", s) for s in ("launch.sh", "slurm_example.sh")],
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_shell_syntax(script):
    r = subprocess.run(["sh", "-n", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_one_train_and_one_test_script_per_experiment_config():
    expected = set()
    for cfg in CONFIGS:
        ds, name = os.path.basename(os.path.dirname(cfg)), os.path.splitext(os.path.basename(cfg))[0]
        assert name.startswith(ds + "_"), cfg
        for kind in ("tool_train", "tool_test"):
            script = os.path.join(ROOT, kind, ds, name[len(ds) + 1:] + ".sh")
            expected.add(script)
            with open(script) as f:
                text = f.read()
            verb = "train" if kind == "tool_train" else "test"
            assert f"\nlaunch {verb} {os.path.relpath(cfg, ROOT)} \"$@\"\n" in text, script
            assert '. "$(dirname "$0")/../../tools/launch.sh"' in text
    assert set(SCRIPTS) == expected  # and no script without a config


def tiny(tmp_path):
    return [f"exp_dir={tmp_path / 'exp'}", f"data.root={tmp_path / 'data'}", "data.synthetic.num_train=8",
            "data.synthetic.num_val=4", "data.synthetic.size=41", "data.crop_size=[33,33]", "data.workers=0",
            "model.width=0.25", "train.epochs=1", "train.batch_size=4", "train.val_batch_size=2", "test.batch_size=2",
            "test.attacks=[{name: pgd, steps: 1, alpha: 2.0}]", "test.save_images=false"]


def test_synthetic_train_then_test_end_to_end_from_another_directory(tmp_path):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    r = launch("tool_train/synthetic/pspnet18_none.sh", *tiny(tmp_path), cwd=elsewhere)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exp = tmp_path / "exp"
    assert sorted(os.listdir(exp / "model")) == ["epoch_1.pth", "last.pth"]
    logs = glob.glob(str(exp / "train-*.log"))
    assert len(logs) == 1 and "epoch 1/1 done" in open(logs[0]).read()
    # two CPU processes through torchrun (device=cpu), a free port picked by torchrun itself
    r = launch("tool_test/synthetic/pspnet18_none.sh", *tiny(tmp_path), "device=cpu", cwd=elsewhere, NGPU="2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.loads((exp / "result" / "metrics.json").read_text())
    assert m["num_images"] == 4 and set(m["attacks"]) == {"pgd@8"}
    # only the resolved config, the logs, model/, events/ and result/ in exp_dir
    assert sorted(os.listdir(exp)) == sorted(["config.yaml", "events", "model", "result", os.path.basename(logs[0]),
                                              *map(os.path.basename, glob.glob(str(exp / "test-*.log")))])
    assert len(glob.glob(str(exp / "test-*.log"))) == 1


@pytest.mark.parametrize("env,args,message", [
    ({"NGPU": "2"}, [], "error: NGPU=2 but no GPU is visible; add device=cpu to run 2 CPU process(es)"),
    ({"NGPU": "3"}, ["device=cpu"], "error: train.batch_size=4 is not divisible by the number of processes "
                                    "(3 per node x 1 node(s) = 3)"),
    ({}, ["train.resume=/nonexistent/last.pth"], "error: train.resume: checkpoint not found: /nonexistent/last.pth"),
    ({"NNODES": "2"}, [], "error: NNODES=2 needs MASTER_ADDR (the address of the NODE_RANK=0 machine)"),
    ({}, ["train.epoch=3"], "unknown config key 'train.epoch'"),
])
def test_bad_launch_is_one_line_error(tmp_path, env, args, message):
    if env.get("NGPU") == "2" and not args:
        import torch
        if torch.cuda.is_available():
            pytest.skip("a GPU is visible")
    r = launch("tool_train/synthetic/pspnet18_none.sh", *tiny(tmp_path), *args, cwd=tmp_path, **env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "exp").exists()  # nothing started, nothing written


def test_more_processes_than_gpus(monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import preflight
    from utils.errors import SetupError
    monkeypatch.setattr(preflight, "visible_gpus", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    cfg = os.path.join(ROOT, "config", "synthetic", "synthetic_pspnet18_none.yaml")
    with pytest.raises(SetupError, match=r"^NGPU=4 but only 2 GPU\(s\) are visible \(CUDA_VISIBLE_DEVICES=0,1\)$"):
        preflight.check("train", cfg, 4, 1, [])
    assert preflight.check("train", cfg, 2, 1, []) == "exp/synthetic/pspnet18_none"
    assert preflight.check("test", cfg, 2, 1, ["test.batch_size=10"]) == "exp/synthetic/pspnet18_none"
    with pytest.raises(SetupError, match=r"test.batch_size=10 is not divisible .* \(2 per node x 2 node\(s\) = 4\)"):
        preflight.check("test", cfg, 2, 2, [])


def test_preflight_refuses_a_fresh_run_into_an_exp_dir_with_checkpoints(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import preflight
    from utils.errors import SetupError
    cfg = os.path.join(ROOT, "config", "synthetic", "synthetic_pspnet18_none.yaml")
    exp = tmp_path / "exp"
    assert preflight.check("train", cfg, 1, 1, [f"exp_dir={exp}"]) == str(exp)  # nothing there yet
    os.makedirs(exp / "model")
    (exp / "model" / "epoch_3.pth").write_bytes(b"an earlier run")
    with pytest.raises(SetupError, match=r"already holds checkpoints of a run \(model/: epoch_3.pth\)"):
        preflight.check("train", cfg, 1, 1, [f"exp_dir={exp}"])
    for ok in (["train.resume=auto"], ["train.overwrite=true"]):
        assert preflight.check("train", cfg, 1, 1, [f"exp_dir={exp}", *ok]) == str(exp)
    assert preflight.check("test", cfg, 1, 1, [f"exp_dir={exp}"]) == str(exp)

def processes() -> dict:
    """{pid: (parent pid, state letter, command line)} from /proc."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        out[int(d)] = (int(fields[1]), fields[0], cmd)
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_killing_the_launcher_ends_every_rank(tmp_path):
    """torchrun starts each rank in a session of its own: when torchrun is SIGKILLed, the ranks must
    notice and end by themselves instead of training on (and writing checkpoints) as orphans."""
    exp = str(tmp_path / "exp")
    args = tiny(tmp_path) + ["device=cpu", "train.epochs=1000", "train.eval_freq=0"]
    job = subprocess.Popen(["sh", os.path.join(ROOT, "tool_train/synthetic/pspnet18_none.sh"), *args], cwd=tmp_path,
                           env=launch_env(NGPU="2"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    agent, ranks = None, []
    try:
        deadline = time.time() + 180
        while time.time() < deadline:  # both ranks started and rank 0 logging that it trains
            procs = processes()
            agent = next((p for p, (_, _, cmd) in procs.items() if "torch.distributed.run" in cmd and exp in cmd), None)
            ranks = [p for p, (pp, _, cmd) in procs.items() if pp == agent and "train.py" in cmd]
            logs = glob.glob(os.path.join(exp, "train-*.log"))
            if len(ranks) == 2 and logs and "training pspnet" in open(logs[0]).read():
                break
            assert job.poll() is None, "the launch ended early"
            time.sleep(0.5)
        assert agent and len(ranks) == 2, "the two ranks did not start training in time"
        os.kill(agent, signal.SIGKILL)
        deadline = time.time() + 20
        alive = ranks
        while alive and time.time() < deadline:
            time.sleep(0.2)
            procs = processes()
            alive = [p for p in ranks if p in procs and procs[p][1] != "Z"]
        assert not alive, f"rank processes {alive} survived their launcher"
    finally:
        for pid in ranks + ([agent] if agent else []):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except OSError:
            pass
        job.wait(timeout=30)

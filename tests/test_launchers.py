"""Launch scripts: syntax, one pair per experiment config, every pair end to end on tiny data, launch errors."""
import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest

import data_fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "tool_train", "*", "*.sh")) +
                 glob.glob(os.path.join(ROOT, "tool_test", "*", "*.sh")))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "config", "*", "*.yaml")) if "/_base_/" not in p)


def launch_env(**env) -> dict:
    e = {k: v for k, v in os.environ.items()
         if k not in ("NGPU", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ENDPOINT", "RDZV_ID", "RESTARTS")}
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
            "test.attacks=[{name: pgd, steps: 1, alpha: 2.0}]", "test.save_images=false",
            "test.plots=false"]


# ---------------------------------------------------------------- every launcher pair, end to end
MULTITASK_MODELS = ("drn_multitask", "taskonomy_resnet")  # evaluated per task, attacked with `multitask`
SEG = "segmentsemantic"
STEPS = 2
TORCHRUN_CONFIG = "synthetic_pspnet18_none.yaml"  # its tool_test runs as two torchrun processes
WORKERS = max(1, min(2, os.cpu_count() or 1))  # launches at a time (each runs one intra-op thread)


def experiment(config: str, *overrides: str):
    from utils.config import load_config
    return load_config(config, list(overrides))


def pair(config: str):
    """(train script, test script) of an experiment config, relative to the repository root."""
    ds, name = os.path.basename(os.path.dirname(config)), os.path.splitext(os.path.basename(config))[0]
    return tuple(os.path.join(kind, ds, name[len(ds) + 1:] + ".sh") for kind in ("tool_train", "tool_test"))


@dataclass
class Run:
    """One experiment launched end to end: its exp_dir, the overrides both launches got, and the two
    completed processes (test is None when training failed)."""
    exp: pathlib.Path
    args: list
    train: subprocess.CompletedProcess
    test: Optional[subprocess.CompletedProcess]


def attack_overrides(cfg) -> list:
    """The test launch's extra overrides: one cheap attack (the multitask one for multitask models)."""
    multitask = cfg.model.name in MULTITASK_MODELS
    attack = ("{name: multitask, steps: %d, alpha: 1.0}" if multitask else "{name: pgd, steps: %d, alpha: 2.0}") % STEPS
    return ["test.batch_size=4", "test.eps=[8]", f"test.attacks=[{attack}]", "test.plots=false"]


class Launches:
    """Every experiment's launcher pair (tool_train, then tool_test), run in the background on tiny data
    as many at a time as there are cores (each launch is single-threaded), in the order the tests ask for
    them; dataset fixtures are written once per dataset (synthetic: once per experiment)."""

    def __init__(self, base: pathlib.Path):
        self.base, self.roots, self.jobs = base, {}, {}
        self.pool = ThreadPoolExecutor(max_workers=WORKERS)

    def overrides(self, config: str) -> list:
        """Tiny data (an official-layout fixture, one tree per dataset, or a small synthetic set) and model."""
        cfg = experiment(config)
        name = cfg.data.name
        if name == "synthetic":  # written by its loader on first use: one root per experiment, no races
            root = self.base / "data" / ("synthetic-" + os.path.splitext(os.path.basename(config))[0])
            data = ["data.synthetic.num_train=4", "data.synthetic.num_val=4", "data.synthetic.size=41",
                    "data.crop_size=[33,33]"]
        else:
            if name not in self.roots:
                self.roots[name] = self.base / "data" / name
                fx.MAKERS[name](str(self.roots[name]))
            root = self.roots[name]
            crop = 33 if cfg.model.name == "upernet_convnext" else 17
            data = [f"data.crop_size=[{crop},{crop}]", "data.base_size=32", "data.eval_crop=[32,32]",
                    "data.taskonomy.size=32", *fx.MAKER_OVERRIDES.get(name, [])]
        # device=cpu: the same runs with or without a GPU (and no GPU probe by the launch check)
        return [f"data.root={root}", *data, "data.workers=0", *fx.TINY_MODELS[cfg.model.name], "device=cpu"]

    def start(self, configs) -> None:
        """Queue every config (fixtures are written here, in the calling thread)."""
        for config in configs:
            self.job(config)

    def job(self, config: str) -> Future:
        if config not in self.jobs:
            name = os.path.splitext(os.path.basename(config))[0]
            exp = self.base / "exp" / name
            args = [*self.overrides(config), f"exp_dir={exp}", "train.epochs=1", "train.batch_size=2",
                    "train.val_batch_size=4", "train.eval_freq=1", "train.save_freq=1", "train.print_freq=1"]
            self.jobs[config] = self.pool.submit(self._run, config, exp, args, self.base / "cwd" / name)
        return self.jobs[config]

    @staticmethod
    def _run(config: str, exp: pathlib.Path, args: list, cwd: pathlib.Path) -> Run:
        """tool_train from another working directory (2 iterations, one validation, one checkpoint), then
        tool_test from yet another one; the first synthetic experiment's test through torchrun with two
        CPU processes (the others single-process: each torchrun rank costs a torch import)."""
        (cwd / "train").mkdir(parents=True)
        (cwd / "test").mkdir()
        train = launch(pair(config)[0], *args, cwd=cwd / "train")
        if train.returncode:
            return Run(exp, args, train, None)
        cfg = experiment(config, *args)
        env = {"NGPU": "2"} if os.path.basename(config) == TORCHRUN_CONFIG else {}
        return Run(exp, args, train, launch(pair(config)[1], *args, *attack_overrides(cfg), cwd=cwd / "test", **env))

    def run(self, config: str) -> Run:
        return self.job(config).result()


def val_size(cfg) -> int:
    return cfg.data.synthetic.num_val if cfg.data.name == "synthetic" else fx.SPLIT_SIZE


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "config")))
def test_launcher_pair_end_to_end(config, launches):
    """tool_train then tool_test of one experiment on its official-layout fixture (mixed image sizes and
    orientations, the dataset's own eval transform) with a tiny model; metrics.json as documented."""
    run = launches.run(config)  # queued with the others at the session's start (conftest.py)
    exp, args, r = run.exp, run.args, run.train
    cfg = experiment(config, *args)
    multitask = cfg.model.name in MULTITASK_MODELS
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(os.listdir(exp / "model")) == ["epoch_1.pth", "last.pth"]
    logs = glob.glob(str(exp / "train-*.log"))
    assert len(logs) == 1
    log = open(logs[0]).read()
    assert "iter 2/2 " in log and "epoch 1/1 done" in log and log.count("| val mIoU") == 1, log[-2000:]

    r = run.test
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # only the resolved config, the two logs, model/, events/ and result/ in exp_dir
    test_logs = glob.glob(str(exp / "test-*.log"))
    assert len(test_logs) == 1
    assert sorted(os.listdir(exp)) == sorted(["config.yaml", "events", "model", "result", os.path.basename(logs[0]),
                                              os.path.basename(test_logs[0])])

    m = json.loads((exp / "result" / "metrics.json").read_text())
    n, key = val_size(cfg), ("multitask" if multitask else "pgd") + "@8"
    assert m["num_images"] == n and m["split"] == "val" and set(m["attacks"]) == {key}
    clean, attacked = m["clean"], m["attacks"][key]
    for result in (clean, attacked, m["worst_case"]["8"]):
        assert all(0 <= result[k] <= 1 for k in ("mIoU", "mAcc", "aAcc")), result
        assert len(result["iou_per_class"]) == cfg.data.classes
    assert attacked["forward_passes"] == attacked["backward_passes"] == STEPS * n
    if not multitask:
        assert "tasks" not in clean and "attacked_tasks" not in attacked
        return
    tasks = list(cfg.data.tasks) or [SEG]
    assert attacked["attacked_tasks"] == list(cfg.test.attack_tasks) == [SEG]
    for result in (clean, attacked):
        assert list(result["tasks"]) == tasks
        for t, tm in result["tasks"].items():
            if t == SEG:
                assert all(tm[k] == result[k] for k in ("mIoU", "mAcc", "aAcc"))
            else:  # errors over the valid pixels of every image
                assert all(np.isfinite(tm[k]) and tm[k] >= 0 for k in ("mae", "mse", "rmse")), (t, tm)
                assert tm["elements"] > 0 and np.isclose(tm["rmse"] ** 2, tm["mse"])
    for tm in attacked["tasks"].values():
        assert tm["forward_passes"] == tm["backward_passes"] == STEPS * n


def test_multitask_configs_train_every_output():
    """A multitask model's outputs are exactly the data tasks: an output without a target would never train
    (and stops DistributedDataParallel at the second iteration)."""
    for config in CONFIGS:
        cfg = experiment(config)
        if cfg.model.name in MULTITASK_MODELS:
            assert sorted(cfg.model.tasks) == sorted(cfg.data.tasks or [SEG]), config


MULTITASK_CONFIG = os.path.join(ROOT, "config", "cityscapes", "cityscapes_drn_multitask_none.yaml")


def test_multitask_attack_tasks_scored_per_task(launches, tmp_path):
    """test.attack_tasks on the Cityscapes multitask DRN: every task scored, clean and attacked; attacking
    depth as well as segmentation gives another depth error than attacking segmentation only."""
    from datasets import build_dataset
    from engine.evaluator import build_attack_runs, run_test
    from models import build_model
    run = launches.run(MULTITASK_CONFIG)
    exp, args, r = run.exp, run.args, run.train
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the experiment's own attacks (MTRobust's PGD and MIM on the segmentation output) build as configured
    cfg = experiment(MULTITASK_CONFIG, *args)
    runs = build_attack_runs(cfg, model=build_model(cfg), dataset=build_dataset(cfg, "val"))
    assert [(r.key, r.tasks) for r in runs] == [("pgd20@4", [SEG]), ("mim20@4", [SEG])]

    tasks = [SEG, "depth_zbuffer", "autoencoder"]
    results = {}
    for attacked in ([SEG], [SEG, "depth_zbuffer"]):
        out = tmp_path / "_".join(attacked)
        run_test(experiment(
            MULTITASK_CONFIG, *args, f"exp_dir={tmp_path / 'exp'}", f"test.checkpoint={exp / 'model' / 'last.pth'}",
            f"test.result_dir={out}", "test.batch_size=4", "test.eps=[8]", "test.save_images=false", "test.examples=0",
            "test.plots=false",
            "test.attacks=[{name: multitask, steps: 2, alpha: 2.0}]", f"test.attack_tasks=[{','.join(attacked)}]"))
        m = json.loads((out / "metrics.json").read_text())
        assert set(m["attacks"]) == {"multitask@8"}
        a = m["attacks"]["multitask@8"]
        assert a["attacked_tasks"] == attacked and m["num_images"] == fx.SPLIT_SIZE
        assert list(m["clean"]["tasks"]) == list(a["tasks"]) == tasks
        results[tuple(attacked)] = m
    seg_only, with_depth = results[(SEG,)], results[(SEG, "depth_zbuffer")]
    assert seg_only["clean"]["tasks"] == with_depth["clean"]["tasks"]  # same model, same images
    clean_depth = seg_only["clean"]["tasks"]["depth_zbuffer"]["mae"]
    depth = {k: m["attacks"]["multitask@8"]["tasks"]["depth_zbuffer"]["mae"] for k, m in results.items()}
    assert all(d != clean_depth for d in depth.values()), (clean_depth, depth)  # both attacks change the images
    assert depth[(SEG,)] != depth[(SEG, "depth_zbuffer")], depth


@pytest.mark.parametrize("env,args,message", [
    ({"NGPU": "2"}, [], "error: NGPU=2 but no GPU is visible; add device=cpu to run 2 CPU process(es)"),
    ({"NGPU": "3"}, ["device=cpu"], "error: train.batch_size=4 is not divisible by the number of processes "
                                    "(3 per node x 1 node(s) = 3)"),
    ({}, ["train.resume=/nonexistent/last.pth"], "error: train.resume: checkpoint not found: /nonexistent/last.pth"),
    ({"NNODES": "2"}, [], "error: NNODES=2 needs MASTER_ADDR (the address of the NODE_RANK=0 machine) or RDZV_ENDPOINT"),
    ({}, ["train.epoch=3"], "unknown config key 'train.epoch'"),
])
def test_bad_launch_is_one_line_error(tmp_path, env, args, message):
    r = launch("tool_train/synthetic/pspnet18_none.sh", *tiny(tmp_path), *args, cwd=tmp_path, **env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "exp").exists()  # nothing started, nothing written


def test_more_processes_than_gpus(monkeypatch, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import preflight
    from utils.errors import SetupError
    monkeypatch.setattr(preflight, "visible_gpus", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    cfg = os.path.join(ROOT, "config", "synthetic", "synthetic_pspnet18_none.yaml")
    exp = [f"exp_dir={tmp_path / 'exp'}"]  # not the config's own exp_dir, which may hold a real run
    with pytest.raises(SetupError, match=r"^NGPU=4 but only 2 GPU\(s\) are visible \(CUDA_VISIBLE_DEVICES=0,1\)$"):
        preflight.check("train", cfg, 4, 1, exp)
    assert preflight.check("train", cfg, 2, 1, exp) == str(tmp_path / "exp")
    assert preflight.check("test", cfg, 2, 1, ["test.batch_size=10"]) == "exp/synthetic/pspnet18_none"
    with pytest.raises(SetupError, match=r"test.batch_size=10 is not divisible .* \(2 per node x 2 node\(s\) = 4\)"):
        preflight.check("test", cfg, 2, 2, exp)


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

"""Runs at scale: evaluation progress kept across a change of batch size, evaluations split into
shards and merged, each process gathering its own rows after a resume (docs/scale.md)."""
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import rounding
from test_distributed import torchrun

from engine import eval_resume
from engine.cli import main
from engine.eval_resume import saved_counts
from engine.evaluator import RunStats, run_columns, run_test
from tests import faults
from utils import dist
from utils.config import load_config
from utils.logger import setup_logger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("test_entry", os.path.join(ROOT, "test.py"))
test_entry = importlib.util.module_from_spec(_spec)  # test.py: evaluate, or merge with --merge
_spec.loader.exec_module(test_entry)


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def metrics_of(folder) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def counts_of(folder) -> dict:
    return saved_counts(glob.glob(str(folder / "per_image" / "*.all.npz"))[0])


def without_timings(m: dict) -> dict:
    """metrics.json less what differs between two runs of one evaluation: wall times, the machine
    record and where the counts came from."""
    if isinstance(m, dict):
        return {k: without_timings(v) for k, v in m.items() if k not in ("seconds", "env", "merged_from")}
    return m


def test_killed_evaluation_resumed_with_another_batch_keeps_finished_images(trained_model, tmp_path, capsys):
    """Killed after 4 of 16 images (batch 2), resumed with batch 4: the 4 images are not redone (the
    log says so, the attack's passes add up to one run's) and the result is that of an uninterrupted
    run up to rounding."""
    path, ckpt = trained_model.config, trained_model.checkpoint
    common = [f"test.checkpoint={ckpt}", "test.save_images=false"]
    exp = tmp_path / "resumed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, *faults.runner(eval_flush_seconds=0, kill_at_eval_batch=2), "test.py",
                        "--config", path, f"exp_dir={exp}", "test.batch_size=2", *common],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr[-2000:]
    chunks = glob.glob(str(exp / "result.partial" / "per_image" / "*.npz"))
    first = {}
    for c in chunks:
        first.update({i: n for i, n in zip(saved_counts(c)["pgd@8"]["index"].tolist(), saved_counts(c)["pgd@8"]["inter"])})
    assert sorted(first) == [0, 1, 2, 3]
    capsys.readouterr()
    assert main("test", run_test, ["--config", path, f"exp_dir={exp}", "test.batch_size=4", *common]) == 0
    out = capsys.readouterr().out
    assert "resuming evaluation: 4 of 16 images already done" in out
    assert "the per-process batch changed (2 before, 4 now)" in out
    resumed, ref = metrics_of(exp / "result"), trained_model.metrics
    assert resumed["attacks"]["pgd@8"]["forward_passes"] == 16 * 3  # 4 + 12 images, none twice
    counts = counts_of(exp / "result")
    assert counts["clean"]["index"].tolist() == list(range(16))
    for i, inter in first.items():  # the finished images' counts are those the killed run wrote
        np.testing.assert_array_equal(counts["pgd@8"]["inter"][i], inter)
    fixture_result = os.path.join(os.path.dirname(os.path.dirname(ckpt)), "result")
    rounding.assert_agree_up_to_rounding(counts, saved_counts(glob.glob(fixture_result + "/per_image/*.all.npz")[0]),
                                         resumed, ref)


def test_three_shards_merge_to_the_unsharded_evaluation(trained_model, tmp_path, capsys):
    """3 shards (batch 1, 6 images) merged give the unsharded run's metrics.json (apart from timings)
    and its per-image counts bit for bit; a missing, repeated or foreign shard is refused in one line,
    before anything is written."""
    path = trained_model.config
    common = ["--config", path, f"test.checkpoint={trained_model.checkpoint}", "test.batch_size=1",
              "test.num_images=6"]
    assert main("test", test_entry.run, [*common, f"exp_dir={tmp_path / 'whole'}"]) == 0
    exp = tmp_path / "sharded"
    for i in range(3):
        assert main("test", test_entry.run, [*common, f"exp_dir={exp}", f"test.shard=[{i},3]"]) == 0
    shards = [str(exp / f"result-shard{i}of3") for i in range(3)]
    assert [saved_counts(glob.glob(s + "/per_image/*.all.npz")[0])["clean"]["index"].tolist() for s in shards] == \
        [[0, 3], [1, 4], [2, 5]]
    assert metrics_of(exp / "result-shard1of3")["shard"] == [1, 3]

    capsys.readouterr()
    assert main("test", test_entry.run, [*common, f"exp_dir={exp}", "--merge", *shards[:2]]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --merge: shard(s) 2 of 3 missing (images 2, 5, ...)"
    assert main("test", test_entry.run, [*common, f"exp_dir={exp}", "--merge", shards[0], *shards]) == 2
    assert "are both shard 0 of 3" in capsys.readouterr().err
    other = tmp_path / "other"  # a shard of another evaluation (another eps), faked by renaming its counts
    shutil.copytree(shards[2], other)
    f = glob.glob(str(other / "per_image" / "*.all.npz"))[0]
    os.rename(f, f.replace(".all.npz", "0.all.npz"))
    assert main("test", test_entry.run, [*common, f"exp_dir={exp}", "--merge", *shards[:2], str(other)]) == 2
    assert "are shards of different evaluations" in capsys.readouterr().err
    assert not (exp / "result").exists()

    assert main("test", test_entry.run, [*common, f"exp_dir={exp}", "--merge", *shards]) == 0
    whole, merged = metrics_of(tmp_path / "whole" / "result"), metrics_of(exp / "result")
    assert whole["attacks"]["pgd@8"]["mIoU"] < whole["clean"]["mIoU"] - 0.05  # the runs differ: a real comparison
    assert merged["merged_from"] == shards and merged["num_images"] == 6
    assert without_timings(merged) == without_timings(whole)
    a, b = counts_of(exp / "result"), counts_of(tmp_path / "whole" / "result")
    assert sorted(a) == sorted(b) == ["clean", "pgd@8"]
    for run in a:
        for col in a[run]:
            np.testing.assert_array_equal(a[run][col], b[run][col])


def test_resumed_process_gathers_only_its_own_earlier_rows(tiny_cfg, tmp_path, monkeypatch, capsys):
    """Counts of images 0-3 saved by one process (batch 2); resumed by 2 processes (batch 4 over 8
    images): rank r keeps the earlier rows of its own images r, r+2, ... only and evaluates the rest
    of them; the changed per-process batch is said once."""
    cfg = tiny_cfg(f"exp_dir={tmp_path}")
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(b"weights")
    cols = run_columns(3)
    first = eval_resume.EvalProgress(cfg, str(ckpt), 8, [], cols, batch=2)
    assert first.todo == list(range(8))
    stats = {"clean": RunStats(cols)}
    stats["clean"].add({"index": torch.arange(4), "inter": torch.arange(12).view(4, 3),
                        "union": torch.ones(4, 3, dtype=torch.long), "target": torch.ones(4, 3, dtype=torch.long)})
    first.flush(stats)
    setup_logger(str(tmp_path), "test")
    capsys.readouterr()
    for r in (0, 1):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        monkeypatch.setattr(dist, "world_size", lambda: 2)
        p = eval_resume.EvalProgress(cfg, str(ckpt), 8, [], cols, batch=2)
        assert p.done == {0, 1, 2, 3} and p.todo == [4 + r, 6 + r]
        kept = torch.cat([part["index"] for part in p.prior["clean"]]).tolist()
        assert kept == [r, 2 + r]
        assert torch.cat([part["inter"] for part in p.prior["clean"]]).tolist() == [[3 * i, 3 * i + 1, 3 * i + 2]
                                                                                     for i in kept]
    assert "per-process batch changed" not in capsys.readouterr().out
    monkeypatch.setattr(dist, "world_size", lambda: 1)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    eval_resume.EvalProgress(cfg, str(ckpt), 8, [], cols, batch=4)
    assert capsys.readouterr().out.count("the per-process batch changed (2 before, 4 now)") == 1


# ------------------------------------------------------------------------------ randomness per process
def record_masks(model: torch.nn.Module) -> list:
    """Where each training-mode forward of the first Dropout2d keeps a value: appended per call."""
    masks = []
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.Dropout2d))
    layer.register_forward_hook(lambda m, i, o: masks.append((o != 0).clone()) if m.training else None)
    return masks


def test_dropout_masks_differ_between_processes_and_repeat_after_a_resume(tiny_cfg, tmp_path, monkeypatch):
    """Trained 4 iterations, then resumed from the iteration-2 checkpoint: the resumed iterations 2 and 3
    draw the masks of the uninterrupted run; at one iteration with the same weights and batch, process
    rank 1 draws other masks than rank 0."""
    from engine.trainer import Trainer
    common = ("train.epochs=1", "train.save_iter_freq=2", "train.eval_freq=0")
    full = Trainer(tiny_cfg(f"exp_dir={tmp_path / 'full'}", *common))
    masks = record_masks(full.model)
    full.fit()
    assert len(masks) == 4 and not torch.equal(masks[2], masks[3])
    assert 0 < float(masks[2].float().mean()) < 1  # some values dropped
    resumed = Trainer(tiny_cfg(f"exp_dir={tmp_path / 'resumed'}", *common,
                               f"train.resume={tmp_path / 'full' / 'model' / 'iter_2.pth'}"))
    again = record_masks(resumed.model)
    torch.rand(100)  # other draws in between change nothing
    resumed.fit()
    assert len(again) == 2 and torch.equal(again[0], masks[2]) and torch.equal(again[1], masks[3])

    t = Trainer(tiny_cfg(f"exp_dir={tmp_path / 'ranks'}", *common))
    seen = record_masks(t.model)
    batch = next(iter(t.loader))
    start = {k: v.clone() for k, v in t.model.state_dict().items()}
    for r in (0, 1, 0):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        t.model.load_state_dict(start)
        t.train_step(batch)
    assert not torch.equal(seen[0], seen[1]) and torch.equal(seen[0], seen[2])


def test_drop_path_draws_per_process_and_iteration():
    from models.backbones.convnext import DropPath
    from utils.rng import seed_layers
    layer = DropPath(0.5).train()
    x = torch.ones(64, 1, 2, 2)

    def mask(rank, iteration):
        seed_layers(0, rank, iteration)
        return layer(x) != 0
    assert torch.equal(mask(0, 3), mask(0, 3))
    assert not torch.equal(mask(0, 3), mask(1, 3)) and not torch.equal(mask(0, 3), mask(0, 4))


# ------------------------------------------------------------------- SAT / DDC-AT split by the global batch
def test_process_clean_count_equals_dealing_out_the_global_batch():
    """Brute force: the global batch's positions dealt round robin; a process's clean images are the
    positions below the global clean count, and they are a prefix of its batch."""
    from defenses.sat import clean_count, process_clean_count
    for g in range(1, 9):
        for w in (w for w in range(1, g + 1) if g % w == 0):
            for f in (0.0, 0.25, 0.5, 0.75, 1.0):
                n = clean_count(g, f)
                for r in range(w):
                    clean = [r + j * w < n for j in range(g // w)]
                    assert clean == sorted(clean, reverse=True)
                    assert process_clean_count(g // w, f, r, w) == sum(clean), (g, w, f, r)


@pytest.mark.parametrize("method", ["sat", "ddcat"])
def test_sat_and_ddcat_attack_the_same_images_for_1_2_and_4_processes(method, tiny_cfg, monkeypatch):
    """Global batch 4 (adversarial share 0.5) dealt to 1, 2 and 4 processes as the sampler deals it:
    the same two images of each global batch are trained on adversarially (with 4 processes two of
    them hold clean images only, two adversarial ones only), with the same adversarial images, and the
    training loss summed over the labelled pixels of all processes is the same."""
    from defenses.sat import clean_count
    from engine.common import ResumableSampler
    from engine.trainer import Trainer
    extra = ("model.name=pspnet_ddcat",) if method == "ddcat" else ()
    t = Trainer(tiny_cfg(f"train.method={method}", *extra, "train.freeze_bn=true", "model.dropout=0.0",
                         "train.batch_size=4"))
    net, defense = t.model, t.defense
    net.train()
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()  # (as train.freeze_bn does): the outputs of an image do not depend on its batch
    inputs = []
    net.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()) if m.training else None)
    key = "loss_main" if method == "sat" else "loss_routed"
    results = {}
    for w in (1, 2, 4):
        monkeypatch.setattr(dist, "world_size", lambda w=w: w)
        attacked, trained, total = [], {}, 0.0
        for r in range(w):
            monkeypatch.setattr(dist, "rank", lambda r=r: r)
            order = list(ResumableSampler(t.train_set, num_replicas=w, rank=r, shuffle=True, seed=0, drop_last=True))
            batch = torch.utils.data.default_collate([t.train_set[i] for i in order[:4 // w]])  # first global batch
            inputs.clear()
            _, logs = defense.loss(net, batch)
            x = inputs[-1]
            for j, i in enumerate(batch["index"].tolist()):
                trained[i] = x[j]
                if not torch.equal(x[j], batch["image"][j]):
                    attacked.append(i)
            total += float(logs[key]) * int((batch["label"] != 255).sum())
        results[w] = (sorted(attacked), trained, total)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0)).tolist()
    assert results[1][0] == sorted(perm[clean_count(4, 0.5):4])  # the last half of the global batch
    for w in (2, 4):
        assert results[w][0] == results[1][0], w
        for i, x in results[1][1].items():
            assert float((results[w][1][i] - x).abs().gt(1e-4).float().mean()) < 1e-3, (w, i)
        assert results[w][2] == pytest.approx(results[1][2], rel=1e-4), w


# ------------------------------------------------------------------------- ranks agree on the checkpoint
def _resume_worker(rank: int, port: int, exp_dirs: list, out: str) -> None:
    """Rank `rank` of 2 gloo processes: resume 'auto' from its exp_dir (shared case), then with rank 1
    unable to read rank 0's choice (another host's file system, simulated)."""
    import datetime
    import torch.distributed as tdist
    from utils import checkpoint
    from utils.errors import SetupError
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                             timeout=datetime.timedelta(seconds=60))
    res = []
    for case in ("shared", "unshared"):
        if case == "unshared" and rank == 1:
            def unreadable(path):
                raise FileNotFoundError(2, "No such file or directory", path)
            checkpoint.file_digest = unreadable
        try:
            path, ckpt = checkpoint.shared_resume("auto", exp_dirs[rank], 1)
            res.append([path, int(ckpt["iteration"])])
        except SetupError as e:
            res.append(["error", str(e)])
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(res, f)
    tdist.destroy_process_group()


def test_processes_resume_from_the_checkpoint_rank_0_chooses(tmp_path):
    """Rank 0's exp_dir holds iteration 4, rank 1's (another host without a shared file system) only
    iteration 2: both resume from rank 0's file. When rank 1 cannot read that file, both stop with
    the same one line naming it and the shared file system."""
    import socket
    import torch.multiprocessing as mp
    from utils.checkpoint import save_checkpoint
    dirs = []
    for name, it in (("node0", 4), ("node1", 2)):
        save_checkpoint({"model": {}, "optimizer": {}, "scheduler": {}, "epoch": it, "iteration": it, "rng": {},
                         "config": {}}, str(tmp_path / name / "model" / "last.pth"))
        dirs.append(str(tmp_path / name))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_resume_worker, args=(port, dirs, str(tmp_path)), nprocs=2, join=True)
    res = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    chosen = str(tmp_path / "node0" / "model" / "last.pth")
    assert res[0][0] == res[1][0] == [chosen, 4]
    assert res[0][1] == res[1][1]
    assert res[0][1][0] == "error" and res[0][1][1].startswith(f"train.resume: rank 0 resumes from {chosen}, which on "
                                                               f"rank 1 cannot be read there")
    assert res[0][1][1].endswith("every process of a run must see exp_dir and train.resume on a shared file system")


# ------------------------------------------------------------------------- launchers: elastic, SLURM
def fake_tools(tmp_path) -> dict:
    """A PATH with fake `scontrol` (two hosts) and `srun` (prints its arguments and the launch
    variables), and a fake interpreter for tools/launch.sh (prints the exp_dir for the preflight, else
    its arguments)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {
        "scontrol": 'printf "nodeA\\nnodeB\\n"\n',
        "srun": 'echo "srun $*"\nenv | grep -E "^(NGPU|NNODES|MASTER_ADDR|MASTER_PORT|RDZV_ENDPOINT|RDZV_ID)=" | sort\n',
        "python": f'if [ "$1" = tools/preflight.py ]; then echo {tmp_path / "exp"}; else echo "python $*"; fi\n',
    }
    for name, body in tools.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NGPU", "NNODES", "MASTER_",
                                                                     "RDZV_", "RESTARTS", "NODE_RANK"))}
    return dict(keep, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python"))


def run_sh(args, env) -> dict:
    """Run a shell script; its output lines as {'srun'/'python': argument string, VAR: value}."""
    r = subprocess.run(["sh", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines():
        if line.startswith(("srun ", "python ")):
            out[line.split(" ", 1)[0]] = line.split(" ", 1)[1]
        elif "=" in line:
            out.update([line.split("=", 1)])
    return out


def test_slurm_example_takes_port_id_and_gpus_from_the_allocation(tmp_path):
    env = dict(fake_tools(tmp_path), SLURM_JOB_ID="123456", SLURM_NNODES="2", SLURM_JOB_NODELIST="node[A-B]",
               SLURM_GPUS_PER_NODE="a100:8", SLURM_CPUS_PER_TASK="16")
    out = run_sh(["tools/slurm_example.sh", "tool_train/synthetic/demo_none.sh", "train.epochs=1"], env)
    assert out["MASTER_ADDR"] == "nodeA" and out["MASTER_PORT"] == str(20000 + 123456 % 20000)
    assert out["RDZV_ENDPOINT"] == "nodeA:23456" and out["RDZV_ID"] == "slurm-123456"
    assert out["NGPU"] == "8" and out["NNODES"] == "2"
    assert out["srun"].startswith("--kill-on-bad-exit=1 --cpus-per-task=16 sh -c ")
    assert out["srun"].endswith("tool_train/synthetic/demo_none.sh train.epochs=1")
    # another job, one node, the GPU count of this node: its own id, and no fixed port
    env.update(SLURM_JOB_ID="777", SLURM_NNODES="1", SLURM_GPUS_ON_NODE="2")
    del env["SLURM_CPUS_PER_TASK"]
    out = run_sh(["tools/slurm_example.sh", "tool_train/synthetic/demo_none.sh"], env)
    assert out["NGPU"] == "2" and out["RDZV_ID"] == "slurm-777" and "MASTER_PORT" not in out
    assert "--cpus-per-task" not in out["srun"]


def test_launcher_uses_a_c10d_rendezvous_with_restarts(tmp_path):
    env = fake_tools(tmp_path)
    script = ["tool_train/synthetic/demo_none.sh", "train.epochs=1"]
    out = run_sh(script, dict(env, NGPU="4", NNODES="2", NODE_RANK="1", MASTER_ADDR="node0"))["python"]
    assert "--nproc_per_node=4 --nnodes=2 --rdzv_backend=c10d --rdzv_endpoint=node0:29500" in out
    assert "--rdzv_id=segrobust-" in out and "--max_restarts=3 train.py" in out and out.endswith("train.epochs=1")
    out = run_sh(script, dict(env, NNODES="2", RDZV_ENDPOINT="h:1", RDZV_ID="job7", RESTARTS="1"))["python"]
    assert "--rdzv_endpoint=h:1 --rdzv_id=job7 --max_restarts=1" in out
    out = run_sh(script, dict(env, NGPU="2"))["python"]  # one node: a free port, no restarts
    assert "--standalone --nproc_per_node=2 --max_restarts=0 train.py" in out
    out = run_sh(script, dict(env, RESTARTS="2"))["python"]  # one process that restarts
    assert "--standalone --nproc_per_node=1 --max_restarts=2 train.py" in out


# ------------------------------------------------------------------------------- smaller points
def test_aux_weight_zero_freezes_the_auxiliary_head(tiny_cfg, tmp_path):
    """Without an auxiliary loss the head would get no gradient, which DDP refuses: it is frozen, and
    after a step every trainable parameter has a gradient; with the loss, the head trains."""
    from engine.trainer import Trainer
    for weight in (0.0, 0.4):
        t = Trainer(tiny_cfg(f"exp_dir={tmp_path / str(weight)}", f"train.aux_weight={weight}"))
        t.train_step(next(iter(t.loader)))
        assert all(p.requires_grad == bool(weight) for p in t.model.aux.parameters())
        assert all(p.grad is not None for p in t.model.parameters() if p.requires_grad)


def test_launch_checks_attack_options_before_any_process_starts(tiny_config, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from preflight import check
    from utils.errors import SetupError
    path = tiny_config()
    with pytest.raises(SetupError, match="attack 'pgd': alpha must be a number or null, got 'fast'"):
        check("test", path, 1, 1, ["test.attacks=[{name: pgd, alpha: fast}]", "device=cpu"])
    with pytest.raises(SetupError, match="attack 'pgd' has no option 'stepz'"):
        check("train", path, 1, 1, ["train.method=sat", "train.attack={stepz: 3}", "device=cpu"])
    assert check("train", path, 1, 1, ["train.method=sat", "device=cpu"]) == str(tmp_path / "exp")
    # a transfer attack: its source files exist and its inner attack's options are valid, with no model loaded
    (tmp_path / "src.yaml").write_text("")
    (tmp_path / "src.pth").write_bytes(b"")
    src = f"source_config: {tmp_path / 'src.yaml'}, source_checkpoint: {tmp_path / 'src.pth'}"
    for entry, message in (("{name: transfer, steps: 1}", "attack 'transfer': transfer needs source_config and"),
                           (f"{{name: transfer, steps: 1, source_config: {tmp_path / 'src.yaml'}, "
                            f"source_checkpoint: {tmp_path / 'none.pth'}}}", "source_checkpoint '.*none.pth' is not a file"),
                           (f"{{name: transfer, {src}, inner: pgd, inner_options: {{stepz: 1}}}}",
                            "attack 'pgd' has no option 'stepz'")):
        with pytest.raises(SetupError, match=message):
            check("test", path, 1, 1, [f"test.attacks=[{entry}]", "device=cpu"])
    assert check("test", path, 1, 1, [f"test.attacks=[{{name: transfer, {src}, steps: 1}}]", "device=cpu"])


def test_a_config_error_is_printed_once_under_torchrun(tiny_config, tmp_path):
    r = torchrun(2, "train.py", "--config", tiny_config(), "device=cpu", "train.lr=-1")
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == ["error: command line: config key 'train.lr' must be a number > 0, got -1"], r.stderr[-2000:]


# -------------------------------------------------------- two nodes, one rank killed, restarted by itself
def test_two_node_launch_restarts_after_a_killed_rank_and_ends_with_uninterrupted_weights(tmp_path):
    """tools/launch.sh on 2 "nodes" of 1 CPU process (127.0.0.1, c10d rendezvous, RESTARTS=1; with
    train.aux_weight=0 under DDP): node 1's process is SIGKILLed at the end of iteration 3 of 4 (after
    the iteration-2 checkpoint; its launcher's PYTHON runs train.py under tests/faults.py); every
    process restarts, resumes from that checkpoint and ends with the weights of an uninterrupted
    2-process run, bit for bit."""
    import signal
    import socket
    from datasets import build_dataset
    from utils.checkpoint import load_checkpoint
    script, config = "tool_train/synthetic/pspnet18_none.sh", "config/synthetic/synthetic_pspnet18_none.yaml"
    args = [f"data.root={tmp_path / 'data'}", "data.synthetic.num_train=16", "data.synthetic.num_val=4",
            "data.synthetic.size=41", "data.crop_size=[33,33]", "data.workers=0", "model.width=0.25",
            "train.epochs=1", "train.batch_size=4", "train.eval_freq=0", "train.save_iter_freq=2", "train.print_freq=1",
            "train.aux_weight=0", "device=cpu"]
    build_dataset(load_config(config, args), "train")  # the data, written once before the processes read it
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NGPU", "NNODES", "NODE_RANK", "MASTER_", "RDZV_",
                                                                    "RESTARTS", "TORCHELASTIC"))}
    base.update(OMP_NUM_THREADS="1", PYTHON=sys.executable)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    elastic = dict(base, NGPU="1", NNODES="2", RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID="kill-test", RESTARTS="1")
    jobs = [(["sh", script, f"exp_dir={tmp_path / 'ref'}", *args], dict(base, NGPU="2")),
            (["sh", script, f"exp_dir={tmp_path / 'killed'}", *args], dict(elastic, NODE_RANK="0")),
            (["sh", script, f"exp_dir={tmp_path / 'killed'}", *args],
             dict(elastic, NODE_RANK="1", PYTHON=faults.launcher_python(str(tmp_path / "bin"), kill_at_iter=3)))]
    procs = []
    try:  # the reference and the two nodes at once
        for cmd, env in jobs:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, start_new_session=True))
        outs = [p.communicate(timeout=240)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-3000:] for o in outs)
    finally:
        for p in procs:  # the ranks end with their launcher (utils/dist.exit_with_parent)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    logs = "".join(open(f).read() for f in glob.glob(str(tmp_path / "killed" / "train-*.log"))) + "".join(outs[1:])
    assert "restart 1 of the job: continuing from the newest checkpoint" in logs
    assert "at epoch 0, iteration 2 (2 iterations into epoch 1)" in logs
    a, b = (load_checkpoint(str(tmp_path / d / "model" / "last.pth")) for d in ("ref", "killed"))
    assert a["iteration"] == b["iteration"] == 4
    init = load_checkpoint(str(tmp_path / "killed" / "model" / "iter_2.pth"))["model"]
    assert any(not torch.equal(v, init[k]) for k, v in a["model"].items())  # iterations 3-4 moved the weights
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

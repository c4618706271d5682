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

from engine import eval_resume
from engine.cli import main
from engine.eval_resume import saved_counts
from engine.evaluator import RunStats, run_columns, run_test
from utils import dist
from utils.logger import setup_logger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("test_entry", os.path.join(ROOT, "test.py"))
test_entry = importlib.util.module_from_spec(_spec)  # test.py: evaluate, or merge with --merge
_spec.loader.exec_module(test_entry)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    env = dict(os.environ, OMP_NUM_THREADS="1", SEGROBUST_TEST_EVAL_FLUSH_SECONDS="0",
               SEGROBUST_TEST_KILL_AT_EVAL_BATCH="2")
    r = subprocess.run([sys.executable, "test.py", "--config", path, f"exp_dir={exp}", "test.batch_size=2", *common],
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


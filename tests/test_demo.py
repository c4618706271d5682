"""tools/demo.py: stage reuse decisions, the finished-evaluation test and the table, on tiny fake inputs
(the real demo is never run here)."""
import copy
import io
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import demo  # noqa: E402

from utils.config import load_config  # noqa: E402


@pytest.fixture(scope="module")
def cfg():
    return load_config(demo.config_path("none")).to_dict()


def test_demo_configs_share_one_budget():
    """Same data, model size, epochs, optimiser and evaluation for every method; only what the method needs differs."""
    cfgs = {m: load_config(demo.config_path(m)).to_dict() for m, _ in demo.METHODS}
    ref = cfgs["none"]
    for m, c in cfgs.items():
        assert c["train"]["method"] == m
        assert c["data"] == ref["data"] and c["test"] == ref["test"] and c["seed"] == ref["seed"]
        assert {k: c["model"][k] for k in ("layers", "width")} == {k: ref["model"][k] for k in ("layers", "width")}
        for k in ("epochs", "batch_size", "lr", "optimizer", "scheduler"):
            assert c["train"][k] == ref["train"][k], (m, k)
        for kind in ("train", "test"):
            assert os.path.isfile(os.path.join(ROOT, demo.launcher(kind, m)))


def test_train_decision(cfg):
    assert demo.train_decision(cfg, None) == ("train", [])
    epochs = cfg["train"]["epochs"]
    done = {"epoch": epochs, "config": copy.deepcopy(cfg)}
    assert demo.train_decision(cfg, done) == ("reuse", [])
    # bookkeeping and evaluation settings do not make a finished training stale
    other = copy.deepcopy(done)
    other["config"]["train"].update(resume="auto", print_freq=1)
    other["config"]["test"]["num_images"] = 3
    assert demo.train_decision(cfg, other) == ("reuse", [])
    assert demo.train_decision(cfg, dict(done, epoch=epochs - 1)) == ("resume", ["train.resume=auto"])
    changed = copy.deepcopy(done)
    changed["config"]["train"]["lr"] = 0.123
    assert demo.train_decision(cfg, changed) == ("retrain", ["train.overwrite=true"])
    assert demo.train_decision(cfg, {"error": "truncated"}) == ("retrain", ["train.overwrite=true"])


def test_read_saved_training(tmp_path, cfg):
    assert demo.read_saved_training(str(tmp_path)) is None
    model = tmp_path / "model"
    model.mkdir()
    (model / "epoch_5.pth").write_bytes(b"x")
    assert "error" in demo.read_saved_training(str(tmp_path))
    (model / "last.pth").write_bytes(b"not a checkpoint")
    assert "error" in demo.read_saved_training(str(tmp_path))
    torch.save({"epoch": 3, "config": cfg, "model": {}}, model / "last.pth")
    assert demo.read_saved_training(str(tmp_path)) == {"epoch": 3, "config": cfg}


def test_eval_finished_needs_counts_of_this_checkpoint(tmp_path):
    from engine import eval_resume
    c = load_config(demo.config_path("none"), [f"exp_dir={tmp_path}"])
    ckpt = tmp_path / "model" / "last.pth"
    assert not demo.eval_finished(c)
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights")
    (tmp_path / "result").mkdir()
    (tmp_path / "result" / "metrics.json").write_text("{}")
    assert not demo.eval_finished(c)  # no per-image counts of this evaluation
    counts = eval_resume.merged_counts_path(c, str(ckpt), min(c.test.num_images, c.data.synthetic.num_val))
    os.makedirs(os.path.dirname(counts))
    open(counts, "w").close()
    assert demo.eval_finished(c)
    c2 = load_config(demo.config_path("none"), [f"exp_dir={tmp_path}", "test.eps=[2]"])
    assert not demo.eval_finished(c2)  # other attacks
    os.utime(ckpt, ns=(1, 1))
    assert not demo.eval_finished(c)  # retrained checkpoint


def fake_metrics(clean, **attacks):
    return {"clean": {"mIoU": clean}, "attacks": {k.replace("_", "@"): {"mIoU": v} for k, v in attacks.items()}}


def test_table_and_checks():
    cols = demo.table_columns([4.0, 8], ["bim2", "pgd10", "sea"])
    assert [k for k, _ in cols] == ["clean", "bim2@4", "pgd10@4", "sea@4", "bim2@8", "pgd10@8", "sea@8"]
    assert cols[-1][1] == "SEA 8/255"
    clean, robust = demo.METHODS[0][1], demo.METHODS[-1][1]
    rows = demo.table_rows({clean: fake_metrics(0.8, bim2_8=0.3, pgd10_8=0.1, sea_8=0.05),
                            robust: fake_metrics(0.7, bim2_8=0.5, pgd10_8=0.45, sea_8=0.35, sea_4=0.5)}, cols)
    assert rows[clean]["clean"] == pytest.approx(80.0) and rows[clean]["sea@4"] is None
    md = demo.markdown_table(rows, cols)
    lines = md.splitlines()
    assert lines[0].startswith("| method | clean | BIM-2 (DDC-AT) 4/255") and len(lines) == 4
    assert lines[2] == f"| {clean} | 80.00 | - | - | - | 30.00 | 10.00 | 5.00 |"
    assert all(ok for _, ok in demo.acceptance(rows))
    assert [c for c, _ in demo.acceptance(rows)][-1] == f"{robust}: SEA 8/255 >= {clean} + 10"
    rows[robust]["sea@8"] = 14.0   # 9 points above the clean model's
    rows[clean]["pgd10@8"] = 40.0  # PGD-10 weaker than BIM-2
    failed = [c for c, ok in demo.acceptance(rows) if not ok]
    assert len(failed) == 2 and failed[0].startswith(clean) and f"{robust}: SEA 8/255 >=" in failed[1]
    rows[robust]["sea@8"] = 15.5   # 10.5 above
    assert [c for c, ok in demo.acceptance(rows) if not ok] == failed[:1]
    assert demo.format_seconds(None) == "reused" and demo.format_seconds(75.25) == "1 min 15.2 s"
    assert demo.format_seconds(None, 3.0) == "reused (ran in 3.0 s)"


def test_cell_stats_within_and_reference_marks():
    runs = {0: {"a": {"clean": 80.0, "x": None}}, 1: {"a": {"clean": 84.0, "x": 1.0}}, 2: {"a": {"clean": 82.0, "x": 2.0}}}
    stats = demo.cell_stats(runs)
    assert stats == {"a": {"clean": [82.0, 2.0]}}          # sample std of 80, 84, 82; x is missing in seed 0
    assert demo.cell_stats({0: {"a": {"clean": 5.0}}}) == {"a": {"clean": [5.0, 0.0]}}
    # in: |value - mean| <= max(4 std, 2 points)
    assert demo.within(90.0, [82.0, 2.0]) and not demo.within(90.01, [82.0, 2.0])
    assert demo.within(84.0, [82.0, 0.1]) and not demo.within(84.01, [82.0, 0.1])
    ref = {"a": {"clean": [82.0, 2.0]}}
    cols = [("clean", "clean"), ("x", "X")]
    assert demo.markdown_table({"a": {"clean": 91.0, "x": 3.0}}, cols, ref).splitlines()[2] == "| a | 91.00 OUT | 3.00 |"
    assert demo.markdown_table({"a": {"clean": 81.0, "x": 3.0}}, cols, ref).splitlines()[2] == "| a | 81.00 in | 3.00 |"
    assert demo.stats_table(stats, cols).splitlines()[2] == "| a | 82.0 ± 2.0 | - |"


def _report_inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "OUT_DIR", str(tmp_path / "demo"))
    return load_config(demo.config_path("none")), demo.table_columns([8], ["pgd10"])


def test_write_report(tmp_path, monkeypatch):
    c, cols = _report_inputs(tmp_path, monkeypatch)
    # (a row without SEA and BIM-2 columns fails the attack-order check: nothing is taken for granted)
    assert not demo.write_report({0: {"a": {"clean": 50.0, "pgd10@8": 1.0}}}, cols, [demo.Stage("train none", "reuse")],
                                 2.0, c)
    out = json.loads((tmp_path / "demo" / "table.json").read_text())
    assert out["runs"][0]["cells"]["a"]["pgd10@8"] == {"value": 1.0, "reference_mean": None, "reference_std": None,
                                                      "within": None}
    assert out["stages"][0]["seconds"] is None and out["mean_std"] is None and out["checks_ok"] is False
    assert "| a | 50.00 | 1.00 |" in (tmp_path / "demo" / "table.md").read_text()
    # a reused stage keeps the time it took when it ran, over any number of re-runs
    demo.write_report({0: {}}, cols, [demo.Stage("train none", "train", 61.0)], 70.0, c)
    before = demo.earlier_times(str(tmp_path / "demo" / "table.json"))
    demo.write_report({0: {}}, cols, [demo.Stage("train none", "reuse", None, before["train none"])], 1.0, c)
    assert demo.earlier_times(str(tmp_path / "demo" / "table.json")) == {"train none": 61.0}
    assert "reused (ran in 1 min 01.0 s)" in (tmp_path / "demo" / "table.md").read_text()
    assert demo.earlier_times(str(tmp_path / "missing.json")) == {}


def test_write_report_marks_every_cell_against_the_reference(tmp_path, monkeypatch):
    c, cols = _report_inputs(tmp_path, monkeypatch)
    ref = {"seeds": [0, 1], "machine": "m", "rows": {"a": {"clean": [50.0, 1.0], "pgd10@8": [10.0, 0.25]}}}
    runs = {3: {"a": {"clean": 53.9, "pgd10@8": 12.5}}, 4: {"a": {"clean": 46.0, "pgd10@8": 8.0}}}
    demo.write_report(runs, cols, [], 1.0, c, reference=ref)
    out = json.loads((tmp_path / "demo" / "table.json").read_text())
    cells = {r["seed"]: r["cells"]["a"] for r in out["runs"]}
    assert cells[3]["clean"] == {"value": 53.9, "reference_mean": 50.0, "reference_std": 1.0, "within": True}
    assert cells[3]["pgd10@8"]["within"] is False and cells[4]["pgd10@8"]["within"] is True
    assert out["outside"] == ["seed 3 a / pgd10@8"]
    assert out["mean_std"]["a"]["clean"] == pytest.approx([49.95, (2 * 3.95 ** 2) ** 0.5])
    md = (tmp_path / "demo" / "table.md").read_text()
    assert "| a | 53.90 in | 12.50 OUT |" in md and "| a | 50.0 ± 1.0 | 10.0 ± 0.2 |" in md
    assert "1 cell(s) outside the reference range: seed 3 a / pgd10@8" in md


def test_a_failing_check_fails_the_demo_naming_it(tmp_path, monkeypatch, capsys):
    """The runner, fed finished stages whose table breaks a check, exits 1 and names the check."""
    monkeypatch.chdir(os.getcwd())  # main() moves to the repository root; undone after the test
    monkeypatch.setattr(demo, "OUT_DIR", str(tmp_path / "demo"))
    monkeypatch.setattr(demo, "read_saved_training", lambda exp_dir: {"epoch": 10 ** 6, "config": {}})
    monkeypatch.setattr(demo, "train_decision", lambda cfg, saved: ("reuse", []))
    monkeypatch.setattr(demo, "eval_finished", lambda cfg: True)
    monkeypatch.setattr(demo, "ensure_dataset", lambda cfg: None)
    values = {"none": (0.8, 0.3, 0.2, 0.05), "sat": (0.7, 0.5, 0.4, 0.3), "ddcat": (0.7, 0.5, 0.4, 0.3),
              "pirat": (0.7, 0.5, 0.4, 0.35)}

    def run(broken):
        metrics = {}
        for m, name in demo.METHODS:
            clean, bim, pgd, sea = values[m]
            if m == broken:
                pgd = bim + 0.1  # PGD-10 weaker than BIM-2
            metrics[m] = fake_metrics(clean, bim2_8=bim, pgd10_8=pgd, sea_8=sea)
        real_open = open

        def fake_open(path, *a, **k):
            for m, _ in demo.METHODS:
                if path.endswith(os.path.join(f"demo_{m}", "result", "metrics.json")):
                    return io.StringIO(json.dumps(metrics[m]))
            return real_open(path, *a, **k)
        monkeypatch.setattr("builtins.open", fake_open)
        try:
            return demo.main(["--jobs", "1"])
        finally:
            monkeypatch.setattr("builtins.open", real_open)
    assert run(None) == 0
    capsys.readouterr()
    assert run("sat") == 1
    err = capsys.readouterr().err
    assert "error: check failed, seed 0: SAT: SEA <= PGD-10 <= BIM-2 at 8/255" in err


def test_readme_demo_table_is_the_reference_file():
    """The README's demo table is tools/demo_reference.json, cell for cell (mean ± std, one decimal)."""
    ref = demo.read_reference(os.path.join(ROOT, demo.REFERENCE))
    assert ref is not None and len(ref["seeds"]) >= 5
    cfg = load_config(demo.config_path("none"))
    attacks = [a if isinstance(a, str) else a.get("label", a["name"]) for a in cfg.test.attacks]
    cols = demo.table_columns(cfg.test.eps, attacks)
    assert set(ref["rows"]) == {name for _, name in demo.METHODS}
    table = demo.stats_table(ref["rows"], cols)
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert table in readme
    # and every reference cell passes the demo's checks at its mean
    means = {name: {k: v[0] for k, v in row.items()} for name, row in ref["rows"].items()}
    assert all(ok for _, ok in demo.acceptance(means))


def test_seeds_parse_and_give_each_seed_its_folder():
    assert demo.parse_seeds("0-4") == [0, 1, 2, 3, 4] and demo.parse_seeds("0,2") == [0, 2]
    for bad in ("", "a", "1-", "0,0", "-1"):
        with pytest.raises(ValueError):
            demo.parse_seeds(bad)
    c0, c2 = demo.load_demo_config("sat", 0), demo.load_demo_config("sat", 2)
    assert c0.exp_dir == "exp/synthetic/demo_sat" and c0.seed == 0
    assert c2.exp_dir == "exp/synthetic/demo_sat_seed2" and c2.seed == 2
    assert demo.seed_overrides(2, c0.exp_dir) == ["seed=2", "exp_dir=exp/synthetic/demo_sat_seed2"]
    a, b = demo.training_identity(c0.to_dict()), demo.training_identity(c2.to_dict())
    assert a != b and {**b, "seed": 0, "exp_dir": a["exp_dir"]} == a   # only the seed and folder differ


def test_bad_config_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # main() moves to the repository root; undone after the test
    monkeypatch.setattr(demo, "config_path", lambda m: str(tmp_path / "missing.yaml"))
    assert demo.main(["--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.yaml" in err[0]
    assert demo.main(["--jobs", "0", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == "error: --jobs must be >= 1, got 0"


def test_help():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--dry-run" in r.stdout


def test_stage_fraction_reads_tqdm_lines():
    bar = "epoch 6/10:  50%|\u2588\u2588\u2588\u2588\u2588     | 25/50 [00:09<00:10,  2.43it/s]"
    assert demo.stage_fraction(bar) == pytest.approx(0.55)                  # 5 epochs done + half of the 6th
    assert demo.stage_fraction("eval: 100%|##########| 2/2 [00:40<00:00, 20.1s/it]") == 1.0
    assert demo.stage_fraction("eval:  0%|          | 0/2 [00:00<?, ?it/s]") == 0.0
    assert demo.stage_fraction("[2026-11-22 21:24:38 INFO] epoch 6 iter 275/500 lr 0.00146") is None
    two = "epoch 1/2:  10%|#| 5/50 [00:01<00:09]" + "epoch 2/2:  40%|#| 20/50 [00:01<00:09]"
    assert demo.stage_fraction(two) == pytest.approx(0.7)                   # the last bar counts


def _script(path, body):
    path.write_text("#!/bin/sh\n" + body)
    return str(path)


def test_runner_runs_jobs_side_by_side_in_order_with_one_thread(tmp_path):
    """3 chains of (train, test) on 2 lanes: at most 2 stages at once, each chain's test after its
    training, OMP_NUM_THREADS=1 in every stage, progress lines parsed without being kept as output."""
    log = tmp_path / "log"
    stage = _script(tmp_path / "stage.sh", f'echo "start $1 $(date +%s.%N) $OMP_NUM_THREADS" >> {log}\n'
                    'printf "epoch 1/1:  50%%|#    | 1/2 [00:00<00:00]\\r"\nsleep 0.6\n'
                    f'echo "end $1 $(date +%s.%N)" >> {log}\n')
    runner = demo.Runner(2)
    lanes = []

    def chain(name):
        def run(lane):
            lanes.append(lane)
            runner.launch(stage, [f"train-{name}"], f"train {name}", lane)
            runner.launch(stage, [f"test-{name}"], f"test {name}", lane)
        return run
    demo.run_chains(runner, [chain(n) for n in ("a", "b", "c")])
    events = [line.split() for line in log.read_text().splitlines()]
    assert len(events) == 12 and all(e[3] == "1" for e in events if e[0] == "start")
    times = {(e[0], e[1]): float(e[2]) for e in events}
    for n in "abc":
        assert times[("end", f"train-{n}")] <= times[("start", f"test-{n}")]
    spans = [(times[("start", k)], times[("end", k)]) for _, k in times if _ == "start"]
    most = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert most == 2 and sorted(set(lanes)) == [0, 1]


def test_runner_stops_the_others_when_a_stage_fails(tmp_path):
    slow = _script(tmp_path / "slow.sh", f"sleep 30\necho finished > {tmp_path / 'slow.done'}\n")
    bad = _script(tmp_path / "bad.sh", "echo 'error: something named here'\nexit 3\n")
    runner = demo.Runner(2)
    t = time.monotonic()
    with pytest.raises(demo.StageFailed) as e:
        demo.run_chains(runner, [lambda lane: runner.launch(slow, [], "slow", lane),
                                 lambda lane: (time.sleep(0.5), runner.launch(bad, ["x=1"], "bad", lane))])
    assert time.monotonic() - t < 20 and not (tmp_path / "slow.done").exists()
    assert e.value.code == 3 and "bad.sh x=1 failed (exit code 3)" in str(e.value)
    assert e.value.tail == ["error: something named here"]


def test_failing_stage_exits_with_its_code(monkeypatch, capsys):
    def fail(self, script, overrides, label, lane):
        raise demo.StageFailed(script, overrides, 3, ["Traceback ...", "SetupError: x"])
    monkeypatch.chdir(os.getcwd())  # main() moves to the repository root; undone after the test
    monkeypatch.setattr(demo.Runner, "launch", fail)
    monkeypatch.setattr(demo, "read_saved_training", lambda exp_dir: None)
    monkeypatch.setattr(demo, "ensure_dataset", lambda cfg: None)
    assert demo.main(["--jobs", "1"]) == 3
    err = capsys.readouterr().err.rstrip().splitlines()
    assert err[:2] == ["  | Traceback ...", "  | SetupError: x"] and len(err) == 3
    assert err[2].startswith("error: stage tool_train/synthetic/demo_") and "failed (exit code 3)" in err[2]

"""tools/attack_table.py: the table read back from metrics.json-shaped results, and its bad input."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import attack_table  # noqa: E402
from attacks import ensemble_members  # noqa: E402


def _metrics(base: float) -> dict:
    """A metrics.json of test.attacks [sea, rse, sea+] at eps 4 and 8 with distinct made-up values."""
    attacks, k = {}, 0
    for eps in ("4", "8"):
        for ens in ("sea", "rse", "sea+"):
            labels = [m[0] for m in ensemble_members(ens)]
            for lab in labels:
                k += 1
                attacks[f"{ens}/{lab}@{eps}"] = {"mIoU": base + k / 1000, "forward_passes": 10, "backward_passes": 6}
            attacks[f"{ens}@{eps}"] = {"mIoU": base - 0.1, "attacks": [f"{ens}/{lab}@{eps}" for lab in labels],
                                       "images_per_attack": list(range(len(labels))),
                                       "forward_passes": 10 * len(labels), "backward_passes": 6 * len(labels)}
    return {"clean": {"mIoU": 0.9}, "attacks": attacks, "num_images": 2, "worst_case": {"4": {}, "8": {}}}


def test_table_reads_back_every_cell():
    results = {"none": _metrics(0.5), "pirat": _metrics(0.6)}
    text = attack_table.table(results, images=2, steps=5)
    _, miou, _, counts, _, passes = text.strip().split("\n\n")

    def rows(table: str) -> dict:
        return {line.split(" | ")[0][2:]: line.strip("| ").split(" | ")[1:] for line in table.splitlines()[2:]}
    m = rows(miou)
    assert m["sea+/apgd-js"] == [f"{100 * results[k]['attacks'][f'sea+/apgd-js@{e}']['mIoU']:.1f}"
                                 for k in ("none", "pirat") for e in ("4", "8")]
    assert m["sea+/dag-001"][0] != m["sea+/apgd-js"][0]
    assert m["**sea+**"] == ["40.0", "40.0", "50.0", "50.0"] and len(m) == 11 + 3
    assert "first 2 val images" in text and "5 iterations" in text
    c = counts.splitlines()[2:]
    assert len(c) == 3 + 8 + 11 and c[-1] == "| sea+/dag-001 | 10 | 10 | 10 | 10 |"  # images_per_attack[10]
    assert rows(passes)["sea+"] == ["55 / 33"] * 4                               # 11 x 10 / 2 images

def test_missing_demo_model_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    real = attack_table.config_path("none")
    monkeypatch.setattr(attack_table, "ROOT", str(tmp_path))            # no trained model under it
    monkeypatch.setattr(attack_table, "config_path", lambda m: real)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert attack_table.main(["--methods", "none", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "last.pth" in err and "\n" not in err
    assert not out.exists()
    assert attack_table.main(["--steps", "0", "--out", str(out)]) == 2

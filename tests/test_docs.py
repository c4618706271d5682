"""The README's commands are the ones that run: quickstart (b) is what CI runs, and every script,
config and tool the README names exists."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def quickstart_commands() -> list:
    """The lines of the first code block under '## Quickstart'."""
    text = readme()
    section = text[text.index("## Quickstart"):]
    block = re.search(r"```\n(.*?)```", section, re.S)
    assert block, "no code block under ## Quickstart"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quickstart_has_two_one_line_commands_and_b_is_what_ci_runs():
    cmds = quickstart_commands()
    assert len(cmds) == 2, cmds                        # (a) the demo, (b) the tests: one line each
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == cmds[1].strip(), (ci[-1], cmds[1])
    assert "pytest" in cmds[1] and "requirements-test.txt" in cmds[1]
    assert cmds[0].startswith("python3 -m pip install -r requirements.txt && ")


def test_readme_says_pass_counts_are_totals():
    """metrics.json's pass counts are totals over the evaluated images (attacks.base.PassCounter), and the
    README says so where it defines them."""
    text = readme()
    sentence = text[text.index("Pass counts"):].split(". ")[0]
    assert "totals over the evaluated" in sentence and "are per image" not in sentence, sentence
    assert "passes per image" not in text


def test_known_deviations_list_taskonomy_scoring():
    """Taskonomy's unlabelled pixels are ignored (datasets/taskonomy.py, checked in test_datasets) where
    the original scored them as class 0: a deviation the README lists with the others."""
    text = readme()
    section = text[text.index("## Known deviations"):]
    section = section[:section.index("\n## ", 1)]
    assert "unlabelled pixels are ignore" in section and "class 0" in section


def test_every_path_the_readme_names_exists():
    pattern = r"`((?:tool_train|tool_test|config|tools|engine|attacks|defenses|models|datasets|utils|docs)/[\w./-]+\.(?:sh|yaml|py|md))`"
    paths = sorted(set(re.findall(pattern, readme())))
    assert len(paths) > 50                                 # the launcher table and more
    missing = [p for p in paths if not os.path.isfile(os.path.join(ROOT, p))]
    assert not missing, missing


def test_reproducibility_section_names_real_tests_and_the_tested_tolerances():
    """Each clause of README's Reproducibility contract names the tests that check it; they exist, and
    the tolerance it states is the one tests/rounding.py applies."""
    import ast
    import sys
    text = readme()
    section = text[text.index("## Reproducibility"):]
    section = section[:section.index("\n## ", 1)]
    clauses = [c for c in section.split("\n- ")[1:]]
    assert [c.split("**")[1] for c in clauses] == ["Bit for bit", "Equal up to float rounding", "Another draw"]
    defined = set()
    for name in os.listdir(os.path.join(ROOT, "tests")):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "tests", name)) as f:
                defined |= {n.name for n in ast.walk(ast.parse(f.read())) if isinstance(n, ast.FunctionDef)}
    for clause in clauses:
        named = re.findall(r"`(test_\w+)`", clause)
        assert named, clause[:60]
        assert set(named) <= defined, set(named) - defined
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import rounding
    assert f"no more than {100 * rounding.PIXEL_FRACTION:g} % of the labelled pixels, and mIoU within " \
           f"{rounding.MIOU:g}" in " ".join(section.split())

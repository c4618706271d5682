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


def test_every_path_the_readme_names_exists():
    pattern = r"`((?:tool_train|tool_test|config|tools|engine|attacks|defenses|models|datasets|utils|docs)/[\w./-]+\.(?:sh|yaml|py|md))`"
    paths = sorted(set(re.findall(pattern, readme())))
    assert len(paths) > 50                                 # the launcher table and more
    missing = [p for p in paths if not os.path.isfile(os.path.join(ROOT, p))]
    assert not missing, missing

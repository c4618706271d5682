"""The README and docs/ say what the code does: quickstart (b) is what CI runs, every script, config
and tool they name exists, every relative link resolves, and the README stays a short index of docs/."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 250
# paths the docs name in the original code of a paper, not in this repository
FOREIGN_PATHS = {"tools/train_rob_seg.py"}   # PIR-AT's training script (docs/segmenter.md)


def read(path: str) -> str:
    """The text of `path`, relative to the repository root."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def readme() -> str:
    return read("README.md")


def doc_files() -> list:
    """Every docs/*.md, relative to the repository root."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def markdown_files() -> list:
    return ["README.md"] + doc_files()


def without_code_blocks(text: str) -> str:
    """`text` with its fenced code blocks removed (links and headings inside them are not markdown)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchors(text: str) -> set:
    """GitHub's anchors of the headings of `text`: lower case, punctuation other than '-' and '_'
    dropped, spaces as '-', a repeated heading numbered -1, -2, ..."""
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", without_code_blocks(text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_anchors_follow_githubs_rule():
    text = "# The demo's wall time\n## Configs, outputs and launchers\n```\n# not a heading\n```\n## Configs, outputs and launchers\n"
    assert anchors(text) == {"the-demos-wall-time", "configs-outputs-and-launchers",
                             "configs-outputs-and-launchers-1"}


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


def test_readme_is_short_and_links_every_docs_page():
    text = readme()
    assert len(text.splitlines()) <= README_MAX_LINES, len(text.splitlines())
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)(?:#[\w-]*)?\)", without_code_blocks(text)))
    unlinked = [p for p in doc_files() if p not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


# every section of the README before it became an index, and the page that holds it now (the first three
# stay in the README)
FORMER_SECTIONS = {
    "Quickstart": "README.md", "Layout": "README.md", "Experiments": "README.md",
    "Reproducibility": "docs/reproducibility.md", "Configs": "docs/configs.md", "Outputs": "docs/configs.md",
    "Launchers": "docs/configs.md", "Models": "docs/models.md", "Data and checkpoints": "docs/data.md",
    "Attacks and evaluation": "docs/evaluation.md",
    "Evaluate a published checkpoint with SEA": "docs/evaluation.md",
    "Evaluation protocols vs the papers": "docs/protocols.md", "Evaluate your own model": "docs/your_own_model.md",
    "Performance": "docs/performance.md", "Training methods": "docs/training.md",
    "Known deviations from the original code": "docs/deviations.md", "Extending": "docs/extending.md",
}
RENAMED = {"Evaluate your own model": "Your own model and data"}


def test_every_former_readme_section_is_a_heading_of_a_linked_page():
    missing = [f"{title!r} in {page}" for title, page in FORMER_SECTIONS.items()
               if RENAMED.get(title, title) not in
               re.findall(r"^#{1,6} +(.+?) *#*$", without_code_blocks(read(page)), re.M)]
    assert not missing, missing
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", without_code_blocks(readme())))
    assert set(FORMER_SECTIONS.values()) - {"README.md"} <= linked


def test_outputs_say_pass_counts_are_totals():
    """metrics.json's pass counts are totals over the evaluated images (attacks.base.PassCounter), and
    docs/configs.md says so where it defines them."""
    text = read("docs/configs.md")
    sentence = text[text.index("Pass counts"):].split(". ")[0]
    assert "totals over the evaluated" in sentence and "are per image" not in sentence, sentence
    for path in ("README.md", "docs/configs.md"):
        assert "passes per image" not in read(path), path


def test_known_deviations_list_taskonomy_scoring():
    """Taskonomy's unlabelled pixels are ignored (datasets/taskonomy.py, checked in test_datasets) where
    the original scored them as class 0: a deviation docs/deviations.md lists with the others."""
    text = read("docs/deviations.md")
    section = text[text.index("MTRobust (Mao et al."):]
    section = section[:section.index("\nFPD (Li et al.")]
    assert "unlabelled pixels are ignore" in section and "class 0" in section


def test_every_path_the_readme_and_docs_name_exists():
    pattern = r"`((?:tool_train|tool_test|config|tools|engine|attacks|defenses|models|datasets|utils|docs|" \
              r"examples|tests)/[\w./-]+\.(?:sh|yaml|py|md))`"
    named = {path: sorted(set(re.findall(pattern, read(path)))) for path in markdown_files()}
    assert len(named["README.md"]) > 50                    # the experiments table and more
    missing = [f"{src}: {p}" for src, paths in named.items() for p in paths
               if p not in FOREIGN_PATHS and not os.path.isfile(os.path.join(ROOT, p))]
    assert not missing, missing


def test_every_relative_link_in_the_readme_and_docs_resolves():
    """[text](target) with a relative target names an existing file, and its #anchor, if any, a
    heading of that file; links inside code blocks are not links."""
    broken, count = [], 0
    for src in markdown_files():
        for target in re.findall(r"\]\(([^()\s]+)\)", without_code_blocks(read(src))):
            if re.match(r"[a-z]+:", target):                  # http:, https:, mailto:
                continue
            count += 1
            path, _, anchor = target.partition("#")
            file = os.path.normpath(os.path.join(os.path.dirname(src), path)) if path else src
            if not os.path.exists(os.path.join(ROOT, file)):
                broken.append(f"{src}: {target} (no file {file})")
            elif anchor and file.endswith(".md") and anchor not in anchors(read(file)):
                broken.append(f"{src}: {target} (no heading #{anchor} in {file})")
    assert count > 30
    assert not broken, broken


def test_reproducibility_names_real_tests_and_the_tested_tolerances():
    """Each clause of docs/reproducibility.md's contract names the tests that check it; they exist,
    and the tolerance it states is the one tests/rounding.py applies."""
    import ast
    import sys
    section = read("docs/reproducibility.md")
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

"""The documents cite the code, and the code the documents: every citation must resolve. A function
named in docs/ or README.md exists; a test named there exists; docs/METHOD.md's table of slide
equations points at the very line that computes each (file:line and the code it quotes); every
"PPO_DETAILS n" in the code is an item of docs/PPO_DETAILS.md, every quoted METHOD.md section a
heading of it; every command of README.md and RESULTS.md names a script and flags that exist."""
import importlib
import os
import re
import shlex

import pytest

from conftest import ROOT

DOCS = ["README.md", "RESULTS.md", "docs/METHOD.md", "docs/PPO_DETAILS.md", "docs/TOY_TASK.md", "bench/README.md"]
MODULES = ["data", "toy", "sft", "reward", "dpo", "groups", "ppo_gi", "evaluate", "plumbing", "study.ppo_variants", "study.gr_dpo",
           "study.reports", "study.diagnostics", "study.inspect_groups", "study.frontier"]


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def code_files():
    for where, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "__pycache__")]
        yield from (os.path.join(where, f) for f in files if f.endswith((".py", ".sh")))


@pytest.mark.parametrize("doc", DOCS)
def test_every_cited_function_and_test_exists(doc):
    text = read(doc)
    modules = {m.rsplit(".", 1)[-1] if m.startswith("study.") else m: m for m in MODULES if importlib.util.find_spec(m)}
    missing = []
    for mod, name in re.findall(r"`(\w+)\.(\w+)[`(\[ ]", text):
        if mod in modules and name not in ("py", "sh", "md", "json", "png") and not hasattr(importlib.import_module(modules[mod]), name):
            missing.append(f"{mod}.{name}")
    tests = "".join(read(os.path.relpath(p, ROOT)) for p in code_files() if "/tests/" in p)
    missing += [t for t in set(re.findall(r"\b(test_\w+)\b(?!\.py)", text)) if f"def {t}(" not in tests]
    assert not missing, f"{doc} cites what does not exist: {sorted(set(missing))}"


def test_the_slide_equations_table_points_at_the_lines_that_compute_them():
    rows = re.findall(r"\| `([\w/]+\.py):(\d+)` \| `([^`]+)` \|", read("docs/METHOD.md"))
    assert len(rows) >= 12, rows
    for path, line, code in rows:
        lines = read(path).splitlines()
        assert code in lines[int(line) - 1], f"{path}:{line} is {lines[int(line) - 1].strip()!r}, not {code!r}"
        assert lines[int(line) - 2].strip().startswith("#"), f"{path}:{line}: no equation comment above it"


def test_every_ppo_details_item_and_method_section_the_code_cites_exists():
    items = {int(n) for n in re.findall(r"^(\d+)\. \*\*", read("docs/PPO_DETAILS.md"), re.M)}
    sections = set(re.findall(r"^#+ (.+)$|\*\*([^*]+)\*\*", read("docs/METHOD.md"), re.M))
    sections = {s for pair in sections for s in pair if s}
    bad = []
    for path in code_files():
        text = open(path).read()
        bad += [f"{path}: PPO_DETAILS {n}" for n in re.findall(r"PPO_DETAILS (\d+)", text) if int(n) not in items]
        for title in re.findall(r'METHOD\.md, "([^"]+)"', text):
            if not any(s.startswith(title) for s in sections):
                bad.append(f"{path}: METHOD.md, \"{title}\"")
    assert not bad, bad


def declared_flags(script):
    """The --flags a stage script (its argparse lines, a parser it copies, the shared training flags) or
    a shell driver (plumbing/stages.sh's flag and switch lines) declares."""
    text = read(script)
    if script.endswith(".sh"):
        return {"--" + f for f in re.findall(r"^(?:flag|switch) (\w+)", text, re.M)}
    flags = set(re.findall(r"""add_argument\(\s*"(--[\w-]+)"(?:,\s*"(--[\w-]+)")?""", text))
    flags = {f for pair in flags for f in pair if f}
    for parent in re.findall(r"copy\.deepcopy\((\w+)\.parser\)", text):
        flags |= declared_flags(f"{parent}.py")
    if "add_training_flags(parser" in text:
        flags |= declared_flags("plumbing/training.py")
    return flags


@pytest.mark.parametrize("doc", ["README.md", "RESULTS.md", "docs/METHOD.md"])
def test_every_command_names_a_script_and_flags_that_exist(doc):
    """Each `python X.py …`, `./pipeline.sh …` or `study/*.sh …` line in a code block: the script is there
    and every --flag it passes is one the script declares."""
    bad = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```|^    ((?:python|\./pipeline|study/|for )[^\n]*)$", read(doc), re.S | re.M):
        for line in "\n".join(block).replace("\\\n", " ").splitlines():
            m = re.search(r"(?:python\s+(?:-m\s+\S+\s+)?|^|&&\s*|;\s*)((?:\./)?(?:study/|bench/)?\w+\.(?:py|sh))\b(.*)", line.split("#")[0])
            if not m or m.group(1).startswith(("pytest", "pip")):
                continue
            script = m.group(1).lstrip("./")
            if not os.path.exists(os.path.join(ROOT, script)):
                bad.append(f"{doc}: {script} does not exist")
                continue
            declared = declared_flags(script) | {"--help"}
            try:
                words = shlex.split(m.group(2))
            except ValueError:
                words = m.group(2).split()
            bad += [f"{doc}: {script} {w}" for w in words if w.startswith("--") and w.split("=")[0] not in declared]
    assert not bad, bad

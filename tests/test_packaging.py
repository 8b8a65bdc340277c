"""One import package, `limo`: the wheel, the names at the repository root, the entry points, and
transformers' model classes beside us (transformers 5.25 imports Hugging Face's own `kernels`,
which a top-level `kernels` of ours used to shadow)."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ROOT

OLD = ("tools", "kernels", "model", "data", "engine", "eval", "curate")
SUBPACKAGES = sorted(p.name for p in (ROOT / "limo").iterdir() if (p / "__init__.py").is_file())
BIN = Path(sys.executable).parent


def _clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH: what a user's shell outside the repository has."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _run(cmd: list[str], cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} (in {cwd}) failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def test_the_subpackages_are_the_layers():
    assert SUBPACKAGES == sorted(OLD)


def test_the_wheel_holds_one_top_level_package(tmp_path):
    """Built from a copy of the sources (the tree the user has, without venvs or runs): one
    top-level name, `limo`, with its package data; nothing of benchmarks/, tests/ or configs/."""
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".git", ".venv*", "runs", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache")
    shutil.copytree(ROOT, src, ignore=skip)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp_path / "out"), str(src)],
         cwd=tmp_path, timeout=300)  # fmt: skip
    (wheel,) = (tmp_path / "out").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"limo"}, f"{wheel.name} puts {sorted(top)} into site-packages"
    assert {f"limo/{p}/__init__.py" for p in SUBPACKAGES} | {"limo/__init__.py", "limo/data/long_cot_lengths.json"} <= set(names)
    (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    top_level = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "limo-train = limo.engine.train:main" in top_level and "limo-eval = limo.eval.run:main" in top_level


def test_no_folder_at_the_root_carries_an_installed_packages_import_name():
    """`python -m` from the root puts the root first on sys.path: a folder there named like a
    dependency's import (Hugging Face's `kernels`, say) would shadow it."""
    taken = {name for name, dists in importlib.metadata.packages_distributions().items() if set(dists) != {"limo-engine"}}
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and p.suffix != ".egg-info"}
    assert not folders & taken, f"root folders named like installed packages: {sorted(folders & taken)}"
    assert not folders & set(OLD), f"old top-level packages still at the root: {sorted(folders & set(OLD))}"


def test_transformers_model_classes_import_beside_ours_from_the_root_and_elsewhere(tmp_path):
    """The installed Hugging Face `kernels` (required by transformers 5.25) is the one `import
    kernels` finds, from the repository root and from any other folder."""
    code = (
        "import importlib.util, sys\n"
        "from transformers import Qwen2ForCausalLM\n"
        "import limo.kernels, limo.model.qwen2\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(limo.kernels.__file__)\n"
        "print(spec.origin if spec else None)\n"
    )
    for cwd in (ROOT, tmp_path):
        ours, theirs = _run([sys.executable, "-c", code], cwd=cwd).stdout.split()
        assert Path(ours).resolve().is_relative_to(ROOT / "limo")  # the editable install points here
        try:
            files = importlib.metadata.distribution("kernels").files
        except importlib.metadata.PackageNotFoundError:  # transformers < 5.25 does not need it
            assert theirs == "None", f"`import kernels` from {cwd} finds {theirs}, which no installed package provides"
        else:
            assert theirs != "None" and any(f.name == "__init__.py" and f.parts[0] == "kernels" and Path(f.locate()).resolve() == Path(theirs).resolve() for f in files)  # fmt: skip


def test_hf_parity_from_another_folder(tmp_path):
    """The HF parity check, run where nothing of the repository is on sys.path."""
    out = _run([sys.executable, "-m", "limo.model.weights", "--preset", "tiny", "--out", str(tmp_path / "tiny"), "--check"],
               cwd=tmp_path).stdout  # fmt: skip
    assert "[OK]" in out, out


# Each documented entry point, with --help: every module from the root (where the root is first
# on sys.path), and from another folder the console scripts (the same mains) and the rest.
MODULES = ["limo.engine.train", "limo.eval.run", "limo.engine.memory", "limo.engine.simulate", "limo.curate",
           "limo.kernels.compile_check", "limo.data.inspect", "limo.model.weights"]
SCRIPTS = ["limo-train", "limo-eval", "limo-memory", "limo-simulate", "limo-curate"]


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_every_entry_point_starts_from_the_root_and_from_elsewhere(where, tmp_path):
    cwd = ROOT if where == "root" else tmp_path
    if where == "root":
        commands = [[sys.executable, "-m", m, "--help"] for m in MODULES] + [[sys.executable, "limo/engine/train.py", "--help"]]
    else:
        commands = [[str(BIN / s), "--help"] for s in SCRIPTS] + [[sys.executable, "-m", m, "--help"] for m in MODULES[5:]]
        commands.append([sys.executable, str(ROOT / "limo/engine/train.py"), "--help"])
    with ThreadPoolExecutor(2) as pool:  # each one mostly imports torch
        outputs = list(pool.map(lambda cmd: _run(cmd, cwd=cwd).stdout, commands))
    for cmd, out in zip(commands, outputs):
        assert "usage:" in out, " ".join(cmd)


@pytest.mark.parametrize("form", [["-m", "limo.engine.train"], [str(ROOT / "limo/engine/train.py")]])
def test_torchrun_takes_the_module_and_the_path_from_another_folder(form, tmp_path):
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", *form, "--help"], cwd=tmp_path)
    assert "--train.output_dir" in proc.stdout


# ---------------------------------------------------------------------------------------------
# No leftover of the old top-level names: imports, commands, module paths in strings.

_PY = [p for d in ("limo", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py") if p != Path(__file__).resolve()]  # not our own samples
_TEXT = [ROOT / "README.md", ROOT / "Makefile", ROOT / ".ci" / "run", *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*.md"),
         *(ROOT / "benchmarks").glob("*.sh"), *(ROOT / "configs").glob("*.toml")]  # fmt: skip
_NAME = "|".join(OLD)
# `python -m engine.train`, `"-m", "eval.run"`, `engine/train.py`, `kernels/compile_check.py`: commands and paths.
_COMMAND = re.compile(rf"(?:-m\s+|[\"']-m[\"'],\s*[\"'])(?:{_NAME})\b|(?<![\w./-])(?:{_NAME})/[\w/]+\.py\b")
# A whole string that names one of our modules under its old name: "kernels.paged_attention".
_MODULE_STRING = re.compile(rf"^(?:{_NAME})(?:\.\w+)+$")


def _old_module(dotted: str) -> bool:
    parts = dotted.split(".")
    path = ROOT / "limo" / Path(*parts)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _leftovers_in_python(path: Path) -> list[str]:
    found = []  # (line, what)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            found += [(line, f"import {a.name}") for a in node.names if a.name.split(".")[0] in OLD]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in OLD:
            found.append((line, f"from {node.module} import ..."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _MODULE_STRING.match(node.value) and _old_module(node.value):
                found.append((line, repr(node.value)))
            found += [(line, f"{m.group(0)!r} in a string") for m in _COMMAND.finditer(node.value)]
            found += [(line, f"{code.strip()!r} in a string") for code in node.value.splitlines()
                      if re.match(rf"\s*(?:from|import) (?:{_NAME})\b", code)]  # code run by a subprocess
    return [f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in sorted(found)]


def test_no_import_or_command_uses_an_old_top_level_name():
    found = [hit for path in _PY for hit in _leftovers_in_python(path)]
    for path in _TEXT:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            found += [f"{path.relative_to(ROOT)}:{i}: {m.group(0)!r}" for m in _COMMAND.finditer(line)]
            if re.match(rf"\s*(?:from|import) (?:{_NAME})\b", line):
                found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()!r}")
    assert not found, "old top-level names (now limo.<name>):\n" + "\n".join(found)


def test_the_leftover_check_sees_each_kind():
    samples = ["python -m engine.train --config x", '"-m", "eval.run"', "torchrun engine/train.py", "kernels/compile_check.py"]
    assert all(_COMMAND.search(s) for s in samples)
    assert not any(_COMMAND.search(s) for s in ["python -m limo.eval.run", "limo/engine/train.py", "data.path='data/limo.jsonl'",
                                                "shared/data/eval/aime/test.jsonl"])  # fmt: skip
    assert _MODULE_STRING.match("kernels.paged_attention") and _old_module("kernels.paged_attention")
    assert not _old_module("model.path") and not _old_module("data.tokenizer")  # config keys are not modules

"""Security basics, checked on the source: weights are written as safetensors (torch.save only for
optimiser/scheduler state, read back with ``weights_only=True``), every ``torch.load`` has
``weights_only=True``, ``trust_remote_code`` is never on unless the user sets it, and nothing that
comes from a dataset or a config is unpickled or executed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import movekd

SOURCE = Path(movekd.__file__).parent
FILES = sorted(SOURCE.rglob("*.py"))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(value) -> bool:
    return isinstance(value, ast.Constant) and value.value is True


def problems(path: Path, relative: str) -> list[str]:
    """Every unsafe pattern in one source file, as ``file:line: what``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for call, owner, name in _calls(tree):
        line = f"{relative}:{call.lineno}"
        if owner == "torch" and name == "load" and not _is_true(_keyword(call, "weights_only")):
            found.append(f"{line}: torch.load without weights_only=True")
        if owner == "torch" and name == "save":
            saved = call.args[0] if call.args else None
            if not (isinstance(saved, ast.Call) and isinstance(saved.func, ast.Attribute)
                    and saved.func.attr == "state_dict") or relative != "train/checkpoint.py":
                found.append(f"{line}: torch.save (weights go to safetensors; optimiser state in checkpoints only)")
        if _is_true(_keyword(call, "trust_remote_code")):
            found.append(f"{line}: trust_remote_code=True")
        if owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
            found.append(f"{line}: yaml.{name} (use yaml.safe_load)")
        if owner in ("np", "numpy") and name == "load" and _is_true(_keyword(call, "allow_pickle")):
            found.append(f"{line}: np.load(allow_pickle=True)")
        if isinstance(call.func, ast.Name) and name in ("eval", "exec"):
            found.append(f"{line}: {name}()")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
            defaults += node.args.kw_defaults
            if any(a.arg == "trust_remote_code" and _is_true(d) for a, d in zip(args, defaults)):
                found.append(f"{relative}:{node.lineno}: trust_remote_code defaults to True")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if {m.split(".")[0] for m in modules} & {"pickle", "cPickle", "dill", "marshal", "shelve"}:
                found.append(f"{relative}:{node.lineno}: imports a pickle-like module")
    return found


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_source_file_is_safe(path):
    assert problems(path, str(path.relative_to(SOURCE))) == []


def test_the_checks_find_what_they_look_for(tmp_path):
    """The checks must be able to fail: a file with every pattern."""
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch\nimport yaml\nimport numpy as np\n"
                   "def f(trust_remote_code=True):\n    torch.load('x')\n    torch.save(model, 'w.pt')\n"
                   "    AutoModel.from_pretrained('x', trust_remote_code=True)\n    yaml.load(s)\n"
                   "    np.load('a.npy', allow_pickle=True)\n    eval('1')\n    model.eval()\n")
    found = "\n".join(problems(bad, "bad.py"))
    for what in ("pickle-like", "defaults to True", "torch.load without", "torch.save", "trust_remote_code=True",
                 "yaml.load", "allow_pickle", "eval()"):
        assert what in found, what
    assert found.count("eval()") == 1  # model.eval() is a method, not eval

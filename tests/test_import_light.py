"""``import movekd`` stays light (no transformers, no torch), yet the exact export's ``movekd_student``
type is known to transformers as soon as transformers is imported after movekd."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from test_export import _make_bundle


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_import_movekd_and_cli_parser_leave_transformers_and_torch_out():
    proc = _python("""
        import sys
        import movekd
        after_import = sorted(m for m in ("transformers", "torch") if m in sys.modules)
        from movekd.cli import build_parser
        build_parser()  # what `movekd --help` does: every subcommand's parser
        after_parser = sorted(m for m in ("transformers", "torch") if m in sys.modules)
        print(after_import, after_parser)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[]", "[]"]


@pytest.fixture(scope="module")
def exact_export(tmp_path_factory):
    from movekd.cli import main

    root = tmp_path_factory.mktemp("light")
    path, _ = _make_bundle(root)
    out = root / "exact"
    assert main(["export", str(path), str(out), "--merge", "none"]) == 0
    return out


LOAD_WITH_AUTOMODEL = """
    import sys
    {prelude}
    from transformers import AutoModel
    model, info = AutoModel.from_pretrained({folder!r}, output_loading_info=True)
    # AutoModel is the base LlavaModel: only the LM head is left over
    unexpected = [k for k in info["unexpected_keys"] if k.split(".")[-2] != "lm_head"]
    print(type(model.vision_tower).__name__, len(info["missing_keys"]), len(unexpected))
"""


def test_exact_export_loads_with_automodel_after_light_import(exact_export):
    proc = _python(LOAD_WITH_AUTOMODEL.format(
        prelude="import movekd; assert 'transformers' not in sys.modules", folder=str(exact_export)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-3:] == ["MoveKDStudentModel", "0", "0"]


def test_exact_export_needs_movekd_imported(exact_export):
    """The control: without ``import movekd`` transformers does not know the type (so the test above
    checks the registration, not some other path)."""
    proc = _python(LOAD_WITH_AUTOMODEL.format(prelude="", folder=str(exact_export)))
    assert proc.returncode != 0
    assert "movekd_student" in proc.stderr


def test_registration_when_transformers_was_imported_first(exact_export):
    proc = _python(LOAD_WITH_AUTOMODEL.format(prelude="import transformers; import movekd", folder=str(exact_export)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-3:] == ["MoveKDStudentModel", "0", "0"]

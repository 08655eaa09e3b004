"""Register the exact export's ``movekd_student`` HF type with transformers, without importing it.

``movekd export --merge none`` writes a LLaVA folder whose vision tower has ``model_type
"movekd_student"``; transformers resolves that name through ``AutoConfig`` / ``AutoModel``, so the
type must be registered before such a folder is loaded (no ``trust_remote_code``: the code is the
installed package). Registering means importing transformers' modelling code and torch (seconds),
which ``import movekd`` and ``movekd --help`` should not pay. So ``import movekd`` only arranges it:

- transformers already imported: register now (its cost is paid already);
- otherwise: a one-shot import hook registers the type right after ``transformers`` itself is first
  imported, i.e. before any ``from_pretrained`` can look the name up.

Code that loads an export itself (``movekd eval EXPORT``, the export writer) imports
:mod:`movekd.export.hf_student`, which registers on import.
"""

from __future__ import annotations

import importlib.abc
import sys

_TARGET = "transformers"


def _register() -> None:
    try:
        from movekd.export.hf_student import register
    except ImportError:  # transformers without torch: no model can load anyway; leave its import working
        return
    register()


class _RegisterAfterTransformersImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of ``transformers`` so that ``_register`` runs once
    the package has executed (the usual post-import-hook pattern), then removes itself."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        self._remove()
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                break
        else:
            return None  # transformers not installed: the import fails as it would without movekd
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:  # pragma: no cover - legacy loader; register on first movekd use instead
            return spec

        def exec_then_register(module):
            exec_module(module)
            _register()

        loader.exec_module = exec_then_register  # the loader instance belongs to this one module
        return spec

    def _remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def arrange_registration() -> None:
    """Register now if transformers is loaded, else when it is first imported (idempotent)."""
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterTransformersImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformersImport())

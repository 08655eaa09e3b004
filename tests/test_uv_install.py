"""tools/uv_install.py: pip's index settings handed to uv (the Makefile builds .venv with it)."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("uv_install", Path(__file__).parents[1] / "tools" / "uv_install.py")
uv_install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(uv_install)

LISTING = """:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.find-links='/opt/wheels'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/opt/old'
site.index-url='http://ignored'
"""


def test_pip_config_listing_parsed_with_the_environment_winning():
    settings = uv_install.parse_pip_config(LISTING)
    assert settings["extra-index-url"] == "file:///opt/pypi/simple file:///opt/pypi-more/simple"
    assert settings["find-links"] == "/opt/wheels"  # the environment wins over pip.conf, as in pip
    assert settings["constraint"] == "/etc/xdg/pip/constraints.txt"
    assert "index-url" not in settings  # only global / install / environment settings


def test_uv_gets_every_index_and_pips_best_match_strategy():
    args = uv_install.uv_index_args(uv_install.parse_pip_config(LISTING))
    assert args == ["--extra-index-url", "file:///opt/pypi/simple", "--extra-index-url", "file:///opt/pypi-more/simple",
                    "--find-links", "/opt/wheels", "--constraint", "/etc/xdg/pip/constraints.txt",
                    "--index-strategy", "unsafe-best-match"]


def test_plain_pypi_needs_no_options():
    assert uv_install.uv_index_args({}) == []
    assert uv_install.uv_index_args({"index-url": "https://mirror/simple"}) == ["--index-url", "https://mirror/simple"]


def test_environment_overrides_the_config(monkeypatch):
    monkeypatch.setenv("PIP_FIND_LINKS", "/env/wheels")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "file:///env/simple")
    settings = uv_install.pip_settings()
    assert settings["find-links"] == "/env/wheels"
    assert settings["extra-index-url"] == "file:///env/simple"

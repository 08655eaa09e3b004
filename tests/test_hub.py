"""``movekd export --push-to-hub REPO``, offline: huggingface_hub's HfApi is replaced by a recorder, so
the test checks what would be sent (the export folder, the private flag) and that hub problems give a
clear error, without any network."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
from huggingface_hub import constants

from movekd.cli import main
from test_export import _make_bundle


class RecordingHfApi:
    calls: list = []

    def __init__(self, token=None, **kwargs):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, self.token, kwargs))
        return f"https://hub.invalid/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], self.token, kwargs))


@pytest.fixture
def hub(monkeypatch):
    RecordingHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    return RecordingHfApi


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return _make_bundle(tmp_path_factory.mktemp("hub"))[0]


def test_push_uploads_the_export_folder_privately(hub, bundle, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(bundle), str(out), "--merge", "mean", "--push-to-hub", "me/tiny-movekd", "--private"]) == 0
    (create, repo, token, kwargs), (upload, repo2, token2, up) = hub.calls
    assert (create, repo, token) == ("create_repo", "me/tiny-movekd", "hf_test_token")
    assert kwargs["private"] is True and kwargs["exist_ok"] is True and kwargs["repo_type"] == "model"
    assert (upload, repo2, token2) == ("upload_folder", "me/tiny-movekd", "hf_test_token")
    assert up["folder_path"] == str(out) and up["repo_type"] == "model"
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"  # the folder uploaded is the export
    assert "pushed" in capsys.readouterr().out


def test_public_by_default(hub, bundle, tmp_path):
    assert main(["export", str(bundle), str(tmp_path / "e"), "--merge", "mean", "--push-to-hub", "tiny"]) == 0
    assert hub.calls[0][3]["private"] is False


@pytest.mark.parametrize("case, message", [
    ("no_token", "no Hugging Face token"),
    ("offline", "HF_HUB_OFFLINE=1"),
    ("bad_repo", "not a hub repo id"),
])
def test_hub_problems_stop_before_the_export(hub, bundle, tmp_path, monkeypatch, capsys, case, message):
    repo = "me/tiny"
    if case == "no_token":
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    elif case == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        repo = "me/bad repo//x"
    out = tmp_path / "export"
    assert main(["export", str(bundle), str(out), "--merge", "mean", "--push-to-hub", repo]) == 2
    err = capsys.readouterr().err
    assert err.startswith("movekd: error: --push-to-hub") and message in err
    assert not out.exists() and hub.calls == []  # checked before a (possibly long) export; nothing sent


def test_failed_upload_names_the_repo_and_keeps_the_folder(hub, bundle, tmp_path, monkeypatch, capsys):
    from huggingface_hub.errors import OfflineModeIsEnabled

    def refuse(self, repo_id, **kwargs):
        raise OfflineModeIsEnabled("cannot reach the hub")

    monkeypatch.setattr(RecordingHfApi, "create_repo", refuse)
    out = tmp_path / "export"
    assert main(["export", str(bundle), str(out), "--merge", "mean", "--push-to-hub", "me/tiny"]) == 2
    err = capsys.readouterr().err
    assert "me/tiny" in err and "cannot reach the hub" in err and f"kept in {out}" in err
    assert (out / "config.json").is_file()


def test_private_needs_push(bundle, tmp_path, capsys):
    assert main(["export", str(bundle), str(tmp_path / "e"), "--private"]) == 2
    assert "--private only applies with --push-to-hub" in capsys.readouterr().err

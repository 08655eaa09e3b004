"""``movekd export ... --push-to-hub REPO``: upload an export folder to the Hugging Face hub.

:func:`hub_token` is checked before the export runs (an export with ``--merge usage --eval-data``
takes minutes; a missing login should not be found after it); :func:`push_to_hub` uploads the
finished folder. Every hub problem (offline mode, no token, a bad repo id, a refused or failed
request) is a :class:`HubError` that names the repo and says the folder is kept, so the user can
upload it later (``hf upload REPO FOLDER``).
"""

from __future__ import annotations

from pathlib import Path

from movekd.errors import UserError


class HubError(UserError, RuntimeError):
    """The hub cannot be reached or refused the upload (offline, not logged in, no access)."""


def hub_token(repo_id: str, token: str | None = None) -> str:
    """The token to upload with (``token``, else the login / ``HF_TOKEN``), after checking the repo id
    and that the hub is not switched off (``HF_HUB_OFFLINE=1``)."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as error:  # HFValidationError
        raise HubError(f"--push-to-hub {repo_id!r}: not a hub repo id (expected NAME or OWNER/NAME): {error}") from None
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"--push-to-hub {repo_id}: the hub is switched off here (HF_HUB_OFFLINE=1); "
                       "unset it, or export without --push-to-hub and upload later with `hf upload`")
    token = token or huggingface_hub.get_token()
    if not token:
        raise HubError(f"--push-to-hub {repo_id}: no Hugging Face token; log in with `hf auth login` "
                       "or set HF_TOKEN (a token with write access)")
    return token


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str = "movekd export") -> str:
    """Create ``repo_id`` (a model repo; ``private`` if asked; kept if it exists) and upload ``folder``
    to it. Returns the repo's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError

    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"--push-to-hub {repo_id}: {folder} is not a folder")
    api = HfApi(token=hub_token(repo_id, token))
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=commit_message)
    except (HTTPError, OSError) as error:  # HfHubHTTPError (refused), connection errors, OfflineModeIsEnabled
        raise HubError(f"--push-to-hub {repo_id}: upload failed ({type(error).__name__}: {error}); "
                       f"the export is kept in {folder}: upload it later with `hf upload {repo_id} {folder}`") from error
    return str(url)

"""Hub failures as messages that say what to do: one home for the translation, used wherever cops_hf reads the Hub.

transformers and huggingface_hub report a missing repository, a gated one, a bad token or an offline cache as
their own exceptions (often re-raised as `OSError`); `friendly_hub_errors` turns them into one `CoPSHubError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub import constants, is_offline_mode
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id


class CoPSHubError(RuntimeError):
    """A Hub operation failed; the message says what to do about it and ``__cause__`` holds the Hub's error."""


def missing_model_source_message(name_or_path: str | os.PathLike) -> str | None:
    """What is wrong when `name_or_path` is neither an existing path nor a Hub id (None when it is one of them)."""
    if os.path.exists(name_or_path):
        return None
    try:
        validate_repo_id(str(name_or_path))
    except HFValidationError:
        return f"Model folder '{name_or_path}' does not exist (nor is it a Hub id, namespace/name): check the path."
    return None


def check_model_source(name_or_path: str | os.PathLike) -> None:
    """Raise `OSError` saying the folder does not exist when `name_or_path` is neither a local path nor a Hub id."""
    if message := missing_model_source_message(name_or_path):
        raise OSError(message)


def hub_error_message(error: BaseException, repo_id: str) -> str | None:
    """Explain a Hub failure about ``repo_id`` and what to do, or return ``None`` if it is not one.

    The Hub error may be ``error`` itself or any exception in its ``__cause__``/``__context__`` chain, since
    transformers re-raises Hub errors as ``OSError``.
    """
    for cause in _exception_chain(error):
        if isinstance(cause, HFValidationError) and (message := missing_model_source_message(repo_id)):
            return message
        if isinstance(cause, GatedRepoError):
            return (
                f"{repo_id} is a gated repository: request access on {constants.ENDPOINT}/{repo_id}, then log in "
                "with `hf auth login` (or set HF_TOKEN) as the account that was granted access."
            )
        if isinstance(cause, RepositoryNotFoundError):
            return (
                f"The Hub has no model repository {repo_id!r} that you can see. Check the id (namespace/name). "
                "If the repository is private, log in with `hf auth login` (or set HF_TOKEN) as an account that "
                "can read it."
            )
        if isinstance(cause, RevisionNotFoundError):
            return (
                f"{repo_id} has no such revision: check `revision=` (a branch, a tag or a full commit sha) "
                f"against the repository's history on {constants.ENDPOINT}/{repo_id}."
            )
        if isinstance(cause, RemoteEntryNotFoundError):
            return (
                f"A file is missing from {repo_id}: check that the repository holds a CoPS checkpoint saved with "
                "`save_pretrained` or `push_to_hub`, at the revision you asked for."
            )
        if isinstance(cause, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            if is_offline_mode():
                return (
                    f"{repo_id} is not in the local cache and Hub downloads are disabled (HF_HUB_OFFLINE=1). "
                    "Set HF_HUB_OFFLINE=0 and connect once to download it, or load from a local folder."
                )
            return (
                f"{repo_id} is not in the local cache and the Hub at {constants.ENDPOINT} could not be reached. "
                "Check your connection (and HF_ENDPOINT or proxy settings), or load from a local folder."
            )
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            if cause.response.status_code == 401:
                return (
                    f"The Hub rejected your access token while accessing {repo_id}: log in again with "
                    "`hf auth login` or set HF_TOKEN to a valid token."
                )
            if cause.response.status_code == 403:
                return (
                    f"Your access token is not allowed to do this on {repo_id}: use a token with write access "
                    "(`hf auth login`) and a namespace you own or may write to."
                )
    return None


@contextmanager
def friendly_hub_errors(repo_id: str) -> Iterator[None]:
    """Turn Hub failures about ``repo_id`` inside the block into `CoPSHubError` with a clear message.

    Other exceptions pass through unchanged.
    """
    try:
        yield
    except Exception as error:
        message = hub_error_message(error, repo_id)
        if message is None:
            raise
        raise CoPSHubError(message) from error


def _exception_chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then the exceptions it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


__all__ = [
    "CoPSHubError",
    "check_model_source",
    "friendly_hub_errors",
    "hub_error_message",
    "missing_model_source_message",
]

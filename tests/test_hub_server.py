"""The real huggingface_hub and transformers clients work end to end against the local hub."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel

from tests.conftest import CLIENT_TOKEN
from tests.hub_server import USER_NAME, LocalHub

REPO_ID = f"{USER_NAME}/tiny-repo"


def run_python(code: str, env: dict[str, str], cwd: Path, *args: str) -> str:
    """Run ``code`` in a fresh interpreter with ``env`` and return its stdout; fail the test on a non-zero exit."""
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def tiny_clip_model() -> CLIPModel:
    """A randomly initialised CLIP small enough to push and load in a fraction of a second."""
    torch.manual_seed(0)
    layer = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**layer, "vocab_size": 64, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1},
        vision_config={**layer, "image_size": 32, "patch_size": 16},
        projection_dim=8,
    )
    return CLIPModel(config).eval()


@pytest.fixture
def api(hub_server: LocalHub, hub_env: dict[str, str]) -> HfApi:
    """A client given the local endpoint explicitly, in an environment where everything else points there too."""
    return HfApi(endpoint=hub_server.url, token=CLIENT_TOKEN)


def test_upload_folder_then_download_every_file(api: HfApi, hub_server: LocalHub, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    (folder / "nested").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "nested" / "weights.bin").write_bytes(bytes(range(256)) * 40)

    repo_url = api.create_repo("tiny-repo")
    api.upload_folder(repo_id=repo_url.repo_id, folder_path=folder, commit_message="add files")

    assert repo_url.repo_id == REPO_ID
    assert api.list_repo_files(REPO_ID) == [".gitattributes", "config.json", "nested/weights.bin"]
    downloaded = hf_hub_download(
        REPO_ID, "nested/weights.bin", endpoint=hub_server.url, cache_dir=tmp_path / "cache", token=CLIENT_TOKEN
    )
    assert Path(downloaded).read_bytes() == (folder / "nested" / "weights.bin").read_bytes()
    assert hub_server.unhandled_requests == []


def test_unchanged_files_are_not_committed_again(api: HfApi, hub_server: LocalHub) -> None:
    api.create_repo(REPO_ID)
    first = api.upload_file(path_or_fileobj=b"same", path_in_repo="file.txt", repo_id=REPO_ID)
    second = api.upload_file(path_or_fileobj=b"same", path_in_repo="file.txt", repo_id=REPO_ID)

    assert second.oid == first.oid
    assert len(hub_server.repositories[REPO_ID].commits) == 2  # the initial commit and the first upload


def test_revisions_pin_commits_and_branches(api: HfApi, hub_server: LocalHub, tmp_path: Path) -> None:
    api.create_repo(REPO_ID)
    first = api.upload_file(path_or_fileobj=b"version 1", path_in_repo="file.txt", repo_id=REPO_ID)
    api.create_branch(REPO_ID, branch="v1", revision=first.oid)
    api.upload_file(path_or_fileobj=b"version 2", path_in_repo="file.txt", repo_id=REPO_ID)

    def download(revision: str) -> bytes:
        path = hf_hub_download(
            REPO_ID, "file.txt", revision=revision, endpoint=hub_server.url, cache_dir=tmp_path, token=CLIENT_TOKEN
        )
        return Path(path).read_bytes()

    assert download(first.oid) == b"version 1"
    assert download("v1") == b"version 1"
    assert download("main") == b"version 2"
    assert api.model_info(REPO_ID, revision="v1").sha == first.oid
    with pytest.raises(HfHubHTTPError) as moved:
        api.upload_file(path_or_fileobj=b"late", path_in_repo="file.txt", repo_id=REPO_ID, parent_commit=first.oid)
    assert moved.value.response.status_code == 412


def test_deletions(api: HfApi) -> None:
    api.create_repo(REPO_ID)
    for path in ("keep.txt", "drop.txt", "folder/a.txt", "folder/b.txt"):
        api.upload_file(path_or_fileobj=path.encode(), path_in_repo=path, repo_id=REPO_ID)

    api.delete_file("drop.txt", REPO_ID)
    api.delete_folder("folder", REPO_ID)

    assert api.list_repo_files(REPO_ID) == [".gitattributes", "keep.txt"]
    with pytest.raises(EntryNotFoundError):
        api.delete_file("drop.txt", REPO_ID)


def test_tree_listing_of_a_folder(api: HfApi) -> None:
    api.create_repo(REPO_ID)
    for path in ("folder/a.txt", "folder/deeper/b.txt"):
        api.upload_file(path_or_fileobj=path.encode(), path_in_repo=path, repo_id=REPO_ID)

    entries = list(api.list_repo_tree(REPO_ID, path_in_repo="folder"))

    assert [(type(entry).__name__, entry.path) for entry in entries] == [
        ("RepoFile", "folder/a.txt"),
        ("RepoFolder", "folder/deeper"),
    ]
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(REPO_ID, path_in_repo="nowhere"))


def test_readme_metadata_is_validated_and_shown_in_repo_info(api: HfApi) -> None:
    api.create_repo(REPO_ID)

    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(path_or_fileobj=b"---\ntags: [unclosed\n---\n", path_in_repo="README.md", repo_id=REPO_ID)
    api.upload_file(
        path_or_fileobj=b"---\ntags:\n- zero-shot\n---\n# Card\n", path_in_repo="README.md", repo_id=REPO_ID
    )

    assert api.model_info(REPO_ID).tags == ["zero-shot"]


def test_whoami(api: HfApi) -> None:
    assert api.whoami()["name"] == USER_NAME


def test_snapshot_download_in_a_subprocess_with_an_empty_cache(
    api: HfApi, hub_env: dict[str, str], hub_server: LocalHub, tmp_path: Path
) -> None:
    api.create_repo(REPO_ID)
    api.upload_file(path_or_fileobj=b"weights", path_in_repo="sub/model.bin", repo_id=REPO_ID)
    code = """
        import sys
        from pathlib import Path
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(sys.argv[1]))
        print(snapshot)
        print(sorted(str(path.relative_to(snapshot)) for path in snapshot.rglob("*") if path.is_file()))
    """

    snapshot, files = run_python(code, hub_env, tmp_path, REPO_ID).splitlines()

    assert Path(snapshot).is_relative_to(hub_env["HF_HUB_CACHE"])
    assert files == str([".gitattributes", "sub/model.bin"])
    assert (Path(snapshot) / "sub" / "model.bin").read_bytes() == b"weights"
    assert f"GET /api/models/{REPO_ID}/revision/main" in hub_server.requests
    assert hub_server.unhandled_requests == []


@pytest.mark.slow
def test_push_to_hub_then_from_pretrained_in_a_fresh_process(
    hub_env: dict[str, str], hub_server: LocalHub, tmp_path: Path
) -> None:
    model = tiny_clip_model()
    model.push_to_hub("tiny-clip")  # in this process, configured by hub_env
    code = """
        import sys
        from safetensors.torch import save_file
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(sys.argv[1])
        save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, sys.argv[2])
    """

    run_python(code, hub_env, tmp_path, f"{USER_NAME}/tiny-clip", str(tmp_path / "loaded.safetensors"))

    loaded = load_file(tmp_path / "loaded.safetensors")
    expected = model.state_dict()
    assert loaded.keys() == expected.keys()
    # Exact: weights are stored and read back, never computed.
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)
    assert hub_server.unhandled_requests == []


def test_missing_repository_revision_and_file(api: HfApi, hub_server: LocalHub, tmp_path: Path) -> None:
    api.create_repo(REPO_ID)

    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{USER_NAME}/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{USER_NAME}/missing", "config.json", endpoint=hub_server.url, cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO_ID, ".gitattributes", revision="nope", endpoint=hub_server.url, cache_dir=tmp_path)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO_ID, "config.json", endpoint=hub_server.url, cache_dir=tmp_path)


def test_private_repository_needs_its_token(api: HfApi, hub_server: LocalHub) -> None:
    api.create_repo(REPO_ID, private=True)

    assert api.model_info(REPO_ID).private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub_server.url, token="hf_someone_else").model_info(REPO_ID)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub_server.url, token=False).model_info(REPO_ID)


def test_gated_repository_shows_metadata_but_not_files(hub_server: LocalHub, tmp_path: Path) -> None:
    hub_server.create_repository(REPO_ID, gated_token="hf_accepted")

    assert HfApi(endpoint=hub_server.url, token=CLIENT_TOKEN).model_info(REPO_ID).gated == "manual"
    with pytest.raises(GatedRepoError):
        hf_hub_download(REPO_ID, ".gitattributes", endpoint=hub_server.url, cache_dir=tmp_path, token=CLIENT_TOKEN)
    path = hf_hub_download(REPO_ID, ".gitattributes", endpoint=hub_server.url, cache_dir=tmp_path, token="hf_accepted")
    assert Path(path).is_file()


def test_rejected_token_and_missing_write_access(hub_server: LocalHub) -> None:
    hub_server.create_repository(REPO_ID, write_token="hf_owner")
    hub_server.rejected_tokens.add("hf_revoked")

    with pytest.raises(HfHubHTTPError) as rejected:
        HfApi(endpoint=hub_server.url, token="hf_revoked").model_info(REPO_ID)
    with pytest.raises(HfHubHTTPError) as forbidden:
        HfApi(endpoint=hub_server.url, token=CLIENT_TOKEN).upload_file(
            path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO_ID
        )

    assert rejected.value.response.status_code == 401
    assert not isinstance(rejected.value, RepositoryNotFoundError)
    assert forbidden.value.response.status_code == 403


def test_create_repo_conflict_unless_exist_ok(api: HfApi) -> None:
    api.create_repo(REPO_ID)

    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(REPO_ID)
    assert conflict.value.response.status_code == 409
    assert api.create_repo(REPO_ID, exist_ok=True).repo_id == REPO_ID


def test_hub_env_refuses_to_reach_other_hosts(hub_env: dict[str, str]) -> None:
    with pytest.raises(Exception, match="Tests must not reach the network"):
        HfApi(endpoint="https://huggingface.co", token=False).model_info("openai/clip-vit-base-patch32")

"""Shared fixtures: a local Hugging Face Hub (:mod:`tests.hub_server`) and a client environment pointed at it.

How clients are pointed at the local hub:

* **Subprocesses** (the faithful path): run them with the environment ``hub_env`` returns. It sets
  ``HF_ENDPOINT``, ``HF_HOME``/``HF_HUB_CACHE`` (an empty cache under ``tmp_path``), ``HF_TOKEN`` and turns
  telemetry off, exactly as a user would configure the real client.
* **In this process**: ``huggingface_hub`` reads those variables once, at import, into
  ``huggingface_hub.constants``. ``hub_env`` therefore also sets the values those variables would have produced
  (``ENDPOINT`` and the URL template derived from it, the cache and token paths, ``HF_HUB_OFFLINE=False``) with
  ``monkeypatch``, and forgets the ``HfApi`` that transformers caches, so that code which does not take an
  ``endpoint=`` (``hf_hub_download`` without one, ``snapshot_download``, ``from_pretrained``, ``push_to_hub``)
  reaches the local hub. Tests that call ``huggingface_hub`` directly should still pass ``endpoint=`` (e.g.
  ``HfApi(endpoint=hub_server.url)``) where the API takes one. The module-level shortcuts
  (``huggingface_hub.create_repo`` ...) are bound to an ``HfApi`` built at import and keep the real endpoint:
  do not use them in tests.
* Safety net: while ``hub_env`` is active, resolving any host name other than the loopback one raises, so a
  client that escapes the configuration fails loudly instead of reaching the internet.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
from huggingface_hub import constants
from transformers.utils import hub as transformers_hub

from tests.hub_server import LocalHub

CLIENT_TOKEN = "hf_local_hub_client_token"
"""The token ``hub_env`` gives the client (the local hub accepts any token)."""

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@pytest.fixture
def hub_server() -> Iterator[LocalHub]:
    """A running :class:`LocalHub` on 127.0.0.1, stopped after the test."""
    with LocalHub() as hub:
        yield hub
        # Drop the client's pooled keep-alive connections to this server before it goes away.
        huggingface_hub.close_session()


@pytest.fixture
def hub_env(hub_server: LocalHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point huggingface_hub and transformers at ``hub_server``, with an empty cache; return a subprocess env."""
    hf_home = tmp_path / "hf_home"
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    settings = {
        "HF_ENDPOINT": hub_server.url,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_TOKEN": CLIENT_TOKEN,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)

    # The values huggingface_hub derived from the variables above when it was imported.
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub_server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    # transformers caches an HfApi built with the endpoint of that moment: rebuild it here, restore it afterwards.
    monkeypatch.setattr(transformers_hub, "_hf_api", None)

    resolve_address = socket.getaddrinfo

    def resolve_loopback_only(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in _LOOPBACK_HOSTS:
            raise OSError(f"Tests must not reach the network: refused to resolve {name!r} (only the local hub).")
        return resolve_address(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve_loopback_only)
    return dict(os.environ)


CUDA_SKIP_REASON = "needs a CUDA GPU (torch.cuda.is_available() is False); benchmarks/gpu_check.sh runs it on one"


# The fast unit half (`pytest -m unit`, under a minute on one core): modules whose tests exercise one module with tiny
# inputs. Every other test module is `integration` (end to end, subprocesses, the local Hub, training runs).
UNIT_TEST_MODULES = frozenset({
    "test_architecture", "test_configuration", "test_losses", "test_metrics", "test_metrics_report",
    "test_processing", "test_visualization", "test_mask_rules", "test_save_detector", "test_modeling",
})  # fmt: skip


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With `-m unit`, do not even import the other test modules (their imports dominate a fast run)."""
    if config.getoption("markexpr", "") == "unit" and collection_path.name.startswith("test_"):
        return collection_path.suffix == ".py" and collection_path.stem not in UNIT_TEST_MODULES
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test `unit` or `integration` (by module); skip the tests marked `gpu` without a CUDA device."""
    for item in items:
        unit = Path(str(item.path)).stem in UNIT_TEST_MODULES
        item.add_marker(pytest.mark.unit if unit else pytest.mark.integration)
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=CUDA_SKIP_REASON))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs, so that a disk can really fill up; skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); the disk-full test needs a small real disk")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)

"""Model card rendering and Hub error messages (cops_hf.hub, through huggingface_hub and transformers), checked
against the local hub."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
from transformers import CLIPModel

from cops_hf import CoPSForAnomalyDetection
from cops_hf.hub import CoPSHubError, friendly_hub_errors, hub_error_message, push_cops_to_hub, render_model_card
from cops_hf.testing_utils import random_clip_model
from tests.conftest import CLIENT_TOKEN
from tests.hub_server import USER_NAME, LocalHub

from .tiny_models import tiny_model

BASE_MODEL = "openai/clip-vit-large-patch14-336"
REPO_ID = f"{USER_NAME}/cops-test"
EVALUATION = {
    "VisA": {"I-AUROC": 0.912, "I-AP": 0.93, "P-AUROC": 0.955, "P-AP": 0.31},
    "BTAD": {"I-AUROC": 0.9},
}
CONFIG_FIELDS = {"num_state_tokens": 4, "feature_layers": [6, 12, 18, 24], "_name_or_path": "/home/me/ckpt"}


def test_card_with_evaluation_loads_back_with_its_metadata(tmp_path: Path) -> None:
    card = render_model_card(
        CONFIG_FIELDS, base_model=BASE_MODEL, training_dataset="mvtec-ad", evaluation=EVALUATION, repo_id=REPO_ID
    )
    card.save(tmp_path / "README.md")

    loaded = ModelCard.load(tmp_path / "README.md")

    assert loaded.data.pipeline_tag == "image-segmentation"
    assert {"anomaly-detection", "zero-shot", "cops", "clip"} <= set(loaded.data.tags)
    assert loaded.data.base_model == BASE_MODEL
    assert loaded.data.datasets == ["mvtec-ad"]
    assert loaded.data.library_name == "transformers"
    assert loaded.data.model_name == "cops-test"
    results = {(result.dataset_name, result.metric_name): result.metric_value for result in loaded.data.eval_results}
    assert results[("VisA", "P-AUROC")] == pytest.approx(0.955)
    assert results[("BTAD", "I-AUROC")] == pytest.approx(0.9)
    assert len(results) == 5
    assert "| VisA | 91.2 | 93.0 | 95.5 | 31.0 |" in loaded.text
    assert "| BTAD | 90.0 | – | – | – |" in loaded.text


def test_card_without_evaluation_or_training_data() -> None:
    card = render_model_card({}, base_model=BASE_MODEL, training_dataset=None, evaluation=None, repo_id=None)

    loaded = ModelCard(str(card))

    assert loaded.data.eval_results is None
    assert "model-index" not in loaded.content
    assert loaded.data.datasets is None
    assert loaded.data.pipeline_tag == "image-segmentation"
    assert "No evaluation results were recorded" in loaded.text
    assert "training dataset of this checkpoint was not recorded" in loaded.text


def test_card_names_the_models_own_clip_and_no_base_model_for_a_random_one() -> None:
    random_clip = random_clip_model("tiny")
    assert CoPSForAnomalyDetection.from_clip(random_clip, image_size=98).config.clip_model_id is None
    random_clip.name_or_path = "someone/tiny-clip"  # as CLIPModel.from_pretrained("someone/tiny-clip") sets it
    model = CoPSForAnomalyDetection.from_clip(random_clip, image_size=98)
    assert model.config.clip_model_id == "someone/tiny-clip"

    card = ModelCard(str(render_model_card({}, base_model=None, training_dataset=None, evaluation=None, repo_id=None)))
    assert card.data.base_model is None and "base_model" not in card.content.split("---")[1]
    assert "CLIP model that is not a published checkpoint" in card.text and "huggingface.co/None" not in card.text


def test_card_sections() -> None:
    text = render_model_card(
        CONFIG_FIELDS, base_model=BASE_MODEL, training_dataset="mvtec-ad", evaluation=None, repo_id=REPO_ID
    ).text

    for heading in ("Model description", "How to use", "Configuration", "Training data", "Evaluation"):
        assert f"## {heading}" in text
    assert "## Intended uses & limitations" in text and "not a medical device" in text
    assert "calibrated" in text
    assert "import cops_hf" in text
    assert f'pipeline("anomaly-detection", model="{REPO_ID}", trust_remote_code=True)' in text
    assert "| `feature_layers` | `[6, 12, 18, 24]` |" in text
    assert "_name_or_path" not in text and "/home/me" not in text
    assert "eprint        = {2508.03447}" in text


def test_card_publishes_only_benchmark_names_and_hub_dataset_ids(tmp_path: Path) -> None:
    """A local training folder (what `config.train_dataset` holds for data without a benchmark name) never reaches
    the card, neither in `datasets:` nor in its text or configuration table."""
    from cops_hf.hub import _card_config_fields, public_dataset_name

    local = tmp_path / "my-parts"
    local.mkdir()
    assert [public_dataset_name(name) for name in ("visa", "MVTec AD", "my-org/parts", str(local), "data/x/y")] == [
        "visa", "MVTec AD", "my-org/parts", None, None,
    ]  # fmt: skip
    model = tiny_model()
    model.config.train_dataset = str(local)
    card = render_model_card(
        _card_config_fields(model.config), base_model=None, training_dataset=str(local), evaluation=None,
        repo_id=REPO_ID,
    )  # fmt: skip
    assert card.data.datasets is None and str(tmp_path) not in str(card)
    assert "trained on a local dataset that is not published" in card.text
    hub_card = render_model_card({}, base_model=None, training_dataset="my-org/parts", evaluation=None, repo_id=None)
    assert hub_card.data.datasets == ["my-org/parts"]


def test_card_never_contains_an_access_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "my-configured-secret")
    render_kwargs = {"base_model": BASE_MODEL, "training_dataset": None, "evaluation": None, "repo_id": None}

    with pytest.raises(ValueError, match="access token"):
        render_model_card({"hub_token": "hf_" + "a1B2c3D4e5" * 3}, **render_kwargs)
    with pytest.raises(ValueError, match="access token"):
        render_model_card({"note": "my-configured-secret"}, **render_kwargs)


def test_evaluation_values_must_be_fractions() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        render_model_card(
            {}, base_model=BASE_MODEL, training_dataset=None, evaluation={"VisA": {"I-AUROC": 91.2}}, repo_id=None
        )


def test_uploaded_card_sets_the_repository_metadata(hub_server: LocalHub) -> None:
    api = HfApi(endpoint=hub_server.url, token=CLIENT_TOKEN)
    api.create_repo(REPO_ID)
    card = render_model_card(
        CONFIG_FIELDS, base_model=BASE_MODEL, training_dataset="mvtec-ad", evaluation=EVALUATION, repo_id=REPO_ID
    )

    api.upload_file(path_or_fileobj=str(card).encode(), path_in_repo="README.md", repo_id=REPO_ID)

    info = api.model_info(REPO_ID)
    assert info.pipeline_tag == "image-segmentation"
    assert "anomaly-detection" in info.tags
    assert info.card_data.base_model == BASE_MODEL


def _download(hub_server: LocalHub, tmp_path: Path, repo_id: str, **kwargs: object) -> str:
    return hf_hub_download(repo_id, "config.json", endpoint=hub_server.url, cache_dir=tmp_path, **kwargs)


def test_missing_repository_message(hub_server: LocalHub, tmp_path: Path) -> None:
    with pytest.raises(CoPSHubError, match="Check the id") as raised:
        with friendly_hub_errors(REPO_ID):
            _download(hub_server, tmp_path, REPO_ID, token=CLIENT_TOKEN)

    assert REPO_ID in str(raised.value)
    assert isinstance(raised.value.__cause__, RepositoryNotFoundError)


def test_missing_revision_message(hub_server: LocalHub, tmp_path: Path) -> None:
    hub_server.create_repository(REPO_ID)

    with pytest.raises(CoPSHubError, match="revision="):
        with friendly_hub_errors(REPO_ID):
            _download(hub_server, tmp_path, REPO_ID, revision="v9", token=CLIENT_TOKEN)


def test_missing_file_message(hub_server: LocalHub, tmp_path: Path) -> None:
    hub_server.create_repository(REPO_ID)

    with pytest.raises(CoPSHubError, match="A file is missing"):
        with friendly_hub_errors(REPO_ID):
            _download(hub_server, tmp_path, REPO_ID, token=CLIENT_TOKEN)


@pytest.mark.parametrize("client", ["huggingface_hub", "transformers"])
def test_private_repository_without_token_message(
    hub_env: dict[str, str], hub_server: LocalHub, tmp_path: Path, client: str
) -> None:
    hub_server.create_repository(REPO_ID, private_token="hf_owner")

    with pytest.raises(CoPSHubError, match="hf auth login"):
        with friendly_hub_errors(REPO_ID):
            if client == "huggingface_hub":
                _download(hub_server, tmp_path, REPO_ID, token=False)
            else:
                CoPSForAnomalyDetection.from_pretrained(REPO_ID, token=False)


def test_gated_repository_message(hub_server: LocalHub, tmp_path: Path) -> None:
    hub_server.create_repository(REPO_ID, gated_token="hf_accepted")

    with pytest.raises(CoPSHubError, match="gated repository: request access"):
        with friendly_hub_errors(REPO_ID):
            _download(hub_server, tmp_path, REPO_ID, token=CLIENT_TOKEN)


def test_rejected_token_and_forbidden_write_messages(hub_env: dict[str, str], hub_server: LocalHub) -> None:
    hub_server.create_repository(REPO_ID, write_token="hf_owner")
    hub_server.rejected_tokens.add("hf_revoked")

    with pytest.raises(CoPSHubError, match="rejected your access token"):
        with friendly_hub_errors(REPO_ID):
            HfApi(endpoint=hub_server.url, token="hf_revoked").model_info(REPO_ID)
    with pytest.raises(CoPSHubError, match="not allowed to do this"):
        with friendly_hub_errors(REPO_ID):
            HfApi(endpoint=hub_server.url, token=CLIENT_TOKEN).upload_file(
                path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO_ID
            )
    with pytest.raises(CoPSHubError, match="not allowed to do this"):  # push_cops_to_hub explains it too
        push_cops_to_hub(tiny_model(), REPO_ID)


@pytest.mark.parametrize("client", ["huggingface_hub", "transformers"])
def test_offline_with_an_empty_cache_message(
    hub_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, client: str
) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(CoPSHubError, match="HF_HUB_OFFLINE=0"):
        with friendly_hub_errors(REPO_ID):
            if client == "huggingface_hub":
                hf_hub_download(REPO_ID, "config.json")
            else:
                CoPSForAnomalyDetection.from_pretrained(REPO_ID)


def test_unreachable_hub_with_an_empty_cache_message(hub_env: dict[str, str]) -> None:
    # What hf_hub_download raises once its retries on a refused connection are spent (that takes ~25 s to reach).
    error = LocalEntryNotFoundError("cannot find the requested files in the local cache")

    message = hub_error_message(error, REPO_ID)

    assert message is not None and "could not be reached" in message and REPO_ID in message


def test_transformers_errors_are_explained_too(hub_env: dict[str, str]) -> None:
    with pytest.raises(CoPSHubError, match="Check the id") as raised:
        with friendly_hub_errors(REPO_ID):
            CLIPModel.from_pretrained(REPO_ID)

    assert isinstance(raised.value.__cause__, OSError)


def test_other_errors_pass_through() -> None:
    with pytest.raises(KeyError):
        with friendly_hub_errors(REPO_ID):
            raise KeyError("not a Hub error")


def test_saved_results_become_card_evaluation():
    from cops_hf.hub import evaluation_for_card

    benchmark = {"metrics": {"headct": {"image_auroc": 0.9, "pixel_auroc": None}}, "protocols": {}, "missing": {}}
    assert evaluation_for_card(benchmark) == {"headct": {"I-AUROC": 0.9}}
    evaluated = {"mean": {"image_ap": 0.5, "pixel_aupro": 0.25}, "protocol": {"test_preset": "visa"}}
    assert evaluation_for_card(evaluated) == {"visa": {"I-AP": 0.5, "AUPRO": 0.25}}
    assert evaluation_for_card({"MVTec": {"I-AUROC": 0.95}}) == {"MVTec": {"I-AUROC": 0.95}}
    named = {"mean": {"image_auroc": 0.5}, "protocol": {"test_preset": None, "dataset": "my-parts"}}
    assert evaluation_for_card(named) == {"my-parts": {"I-AUROC": 0.5}}
    with pytest.raises(ValueError, match="does not name the evaluated dataset"):
        evaluation_for_card({"mean": {"image_auroc": 0.5}, "protocol": {"test_preset": None}})

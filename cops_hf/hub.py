"""Sharing CoPS checkpoints on the Hugging Face Hub: pushing, the model card, and clear messages when the Hub says no.

A repository written by `push_cops_to_hub` loads in two ways:

* with cops_hf installed: ``CoPSForAnomalyDetection.from_pretrained(repo_id)`` or
  ``pipeline("anomaly-detection", model=repo_id)`` after ``import cops_hf``;
* without it, from the code files stored in the repository: ``AutoModel.from_pretrained(repo_id,
  trust_remote_code=True)`` or ``pipeline("anomaly-detection", model=repo_id, trust_remote_code=True)``.

Any ``save_pretrained`` folder carries the code files too (see the package docstring), so ``model.push_to_hub``
and ``processor.push_to_hub`` give repositories that load in both ways as well; `push_cops_to_hub` adds the
model card.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import (
    CommitInfo,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    get_token,
)
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import PretrainedConfig

from .configuration_cops import CoPSConfig
from .data.registry import benchmark_name
from .file_utils import atomic_write, named_write_failures, staged_folder
from .hub_errors import CoPSHubError, friendly_hub_errors, hub_error_message
from .modeling_cops import CoPSForAnomalyDetection
from .pipeline_anomaly_detection import TASK
from .processing_cops import CoPSProcessor

MODEL_CARD_TEMPLATE = Path(__file__).parent / "assets" / "MODEL_CARD.md"
"""Jinja template of the model card, filled by `render_model_card` through ``ModelCard.from_template``."""

ENDPOINT_HANDLER_TEMPLATE = Path(__file__).parent / "assets" / "endpoint_handler.py"
"""The Inference Endpoints custom handler every saved detector carries as ``handler.py``."""

ENDPOINT_HANDLER_NAME = "handler.py"
"""The file name Hugging Face Inference Endpoints looks for in a repository with a custom handler."""

PIPELINE_TAG = "image-segmentation"
"""Hub task of CoPS checkpoints: they output a per-pixel anomaly map (plus an image-level score)."""

CARD_TAGS = ("anomaly-detection", "zero-shot", "cops", "clip")
"""Tags every CoPS model card carries."""

_ACCESS_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


def public_dataset_name(name: str | None) -> str | None:
    """The training dataset's name as a card may publish it in `datasets:`, or `None`.

    Published are the paper's benchmarks (any spelling `cops_hf.data.benchmark_name` knows, kept as given) and Hub
    dataset ids (``namespace/name`` that is not a local folder); anything else, such as the path of a local
    training folder, gives `None`.

    Args:
        name: what the config records (`train_dataset`).

    Returns:
        `name`, or `None` when it must not be published.
    """
    if not name or not isinstance(name, str):
        return None
    try:
        benchmark_name(name)
        return name
    except ValueError:
        pass
    if os.path.isabs(name) or Path(name).exists() or name.count("/") != 1:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def render_model_card(
    config_fields: Mapping[str, Any],
    *,
    base_model: str | None,
    training_dataset: str | None,
    evaluation: Mapping[str, Mapping[str, float]] | None,
    repo_id: str | None,
    license: str = "mit",
) -> ModelCard:
    """Render the model card (README.md) of a CoPS checkpoint.

    Args:
        config_fields: the CoPS-specific configuration fields to list in the card, e.g. the attributes of the CoPS
            config that differ from the CLIP backbone's; keys starting with ``_`` (transformers bookkeeping such
            as ``_name_or_path``, which may hold a local path) are left out. ``reference_count`` and
            ``reference_sources`` also fill the card's few-shot references section.
        base_model: Hub id of the frozen CLIP backbone, e.g. ``"openai/clip-vit-large-patch14-336"``; ``None`` when
            the CLIP is not a published one (random, or of unknown origin): the card then names none.
        training_dataset: name or Hub id of the auxiliary dataset the prompt synthesis was trained on, if known.
            Only a benchmark name or a Hub dataset id is published (see `public_dataset_name`); a local path is
            described as "a local dataset" and never written into the card.
        evaluation: zero-shot test results as ``{dataset: {metric: value}}`` with values in ``[0, 1]``, e.g.
            ``{"VisA": {"I-AUROC": 0.92, "P-AUROC": 0.95}}``. They become the card's ``model-index`` and a table.
        repo_id: the repository the card is for; used in the usage snippets and for the model name.
        license: licence of the published weights (a Hub licence id).

    Returns:
        The card. Save it with ``card.save(folder / "README.md")`` or upload ``str(card)`` with
        ``HfApi.upload_file``.

    Raises:
        ValueError: if an evaluation value is outside ``[0, 1]``, or if the rendered card contains something that
            looks like a Hugging Face access token (or the token configured on this machine).
    """
    model_name = repo_id.split("/")[-1] if repo_id else "CoPS"
    published_dataset = public_dataset_name(training_dataset)
    metric_names = list(dict.fromkeys(metric for metrics in (evaluation or {}).values() for metric in metrics))
    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation="adapter" if base_model else None,
        datasets=[published_dataset] if published_dataset else None,
        eval_results=_eval_results(evaluation) if evaluation else None,
        library_name="transformers",
        license=license,
        model_name=model_name if evaluation else None,  # only the model-index uses it
        pipeline_tag=PIPELINE_TAG,
        tags=list(CARD_TAGS),
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=model_name,
        pipeline_task=TASK,
        repo_id=repo_id or "your-username/your-cops-model",
        training_dataset=published_dataset,
        local_training_dataset=bool(training_dataset) and not published_dataset,
        reference_count=config_fields.get("reference_count", 0),
        reference_sources=config_fields.get("reference_sources"),
        config_rows=[
            (name, _table_cell(value))
            for name, value in config_fields.items()
            if not name.startswith("_") and name != "reference_sources"  # listed in the references section
        ],
        metric_names=metric_names,
        evaluation_rows=[
            (dataset, [f"{100 * metrics[name]:.1f}" if name in metrics else "–" for name in metric_names])
            for dataset, metrics in (evaluation or {}).items()
        ],
    )
    _refuse_access_tokens(str(card))
    return card


def evaluation_for_card(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Turn saved results into the card's ``{dataset: {metric: value}}``.

    Accepts that form itself, a ``benchmark.json`` written by `cops-hf benchmark` (``{"metrics": ...}``) or a
    ``metrics.json`` written by `cops-hf evaluate` (``{"mean": ..., "protocol": ...}``). Metric keys of ours
    become the paper's names (I-AUROC, P-AP, ...); unavailable (None) metrics are dropped.
    """
    from .evaluation.report import METRIC_DISPLAY_NAMES

    expected = 'benchmark.json, metrics.json or {"dataset": {"metric": value}}'
    if not isinstance(results, Mapping):
        raise ValueError(f"Evaluation results must be a JSON object ({expected}), got a {type(results).__name__}.")
    if "metrics" in results:
        per_dataset = results["metrics"]
    elif "mean" in results:
        protocol = results.get("protocol") or {}
        dataset = protocol.get("dataset") or protocol.get("test_preset")
        if not isinstance(dataset, str) or not dataset:
            raise ValueError(
                "metrics.json does not name the evaluated dataset (protocol.dataset); rerun `cops-hf evaluate`, or "
                'give the results as {"DATASET": {"metric": value}}'
            )
        per_dataset = {dataset: results["mean"]}
    else:
        per_dataset = results
    for dataset, metrics in per_dataset.items() if isinstance(per_dataset, Mapping) else [(None, per_dataset)]:
        numbers = isinstance(metrics, Mapping) and all(
            value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
            for value in metrics.values()
        )
        if not numbers:
            raise ValueError(f"Evaluation results must be {expected}; {dataset!r} holds {metrics!r}.")
    return {
        dataset: {
            METRIC_DISPLAY_NAMES.get(name, name): float(value) for name, value in metrics.items() if value is not None
        }
        for dataset, metrics in per_dataset.items()
    }


def _eval_results(evaluation: Mapping[str, Mapping[str, float]]) -> list[EvalResult]:
    """One ``EvalResult`` per (test dataset, metric), as the Hub's ``model-index`` expects them."""
    results = []
    for dataset, metrics in evaluation.items():
        for metric, value in metrics.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Evaluation values must be fractions in [0, 1]; got {metric}={value} on {dataset}.")
            results.append(
                EvalResult(
                    task_type=PIPELINE_TAG,
                    task_name="Zero-shot anomaly detection",
                    dataset_type=_slug(dataset),
                    dataset_name=dataset,
                    dataset_split="test",
                    metric_type=_slug(metric),
                    metric_name=metric,
                    metric_value=float(value),
                )
            )
    return results


def _slug(name: str) -> str:
    """A lower-case identifier for a display name, e.g. ``"MVTec AD"`` -> ``"mvtec-ad"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _table_cell(value: Any) -> str:
    """A configuration value as the text of a markdown table cell."""
    text = value if isinstance(value, str) else json.dumps(value)
    return f"`{text}`".replace("|", "\\|")


def _refuse_access_tokens(text: str) -> None:
    """Raise if ``text`` contains a Hugging Face access token, so that a card can never publish one."""
    configured_token = get_token()
    if _ACCESS_TOKEN.search(text) or (configured_token and configured_token in text):
        raise ValueError("The model card would contain an access token; remove it from the configuration fields.")


def write_endpoint_handler(folder: str | os.PathLike) -> Path:
    """Write ``handler.py`` into a detector's ``folder``, so it deploys on Hugging Face Inference Endpoints.

    The handler (``EndpointHandler``, the Inference Endpoints custom-handler convention) loads the folder with
    ``trust_remote_code=True`` and answers the JSON ``cops-hf serve`` gives on ``POST /predict``
    (`cops_hf.pipeline_anomaly_detection.response_json`, shipped with the remote code). `save_detector` calls it.

    Args:
        folder: an existing folder (a saved detector, or the staging folder of one).

    Returns:
        The path of the handler written (atomically).
    """
    target = Path(folder) / ENDPOINT_HANDLER_NAME
    with atomic_write(target) as temporary:
        temporary.write_text(ENDPOINT_HANDLER_TEMPLATE.read_text())
    return target


def save_detector(
    model: CoPSForAnomalyDetection,
    processor: CoPSProcessor | None,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    card: ModelCard | None = None,
    into_existing: bool = False,
) -> Path:
    """Save a CoPS detector as one folder: the one way cops_hf writes a model folder.

    The folder holds what ``model.save_pretrained`` and ``processor.save_pretrained`` write: the weights (with the
    reference memory, when the model has one), the configuration with an ``auto_map`` and the ``custom_pipelines``
    entry of the "anomaly-detection" task, the processor files, and the code files that let transformers load all
    of them with ``trust_remote_code=True`` where cops_hf is not installed, ``handler.py`` for Inference Endpoints
    (`write_endpoint_handler`); plus ``README.md`` when a `card` is given. Everything is written in a staging
    folder beside `output_dir`, flushed to disk and renamed into place (`cops_hf.file_utils.staged_folder`): a
    failure (a full disk, say) leaves an existing folder as it was.

    Args:
        model: the CoPS model to save.
        processor: the processor to save; `None` for a ``CoPSProcessor`` at ``model.config.image_size``.
        output_dir: the folder to write.
        overwrite: replace a folder that already holds files; without it such a folder is refused.
        card: the model card to write as ``README.md``.
        into_existing: write into a folder that keeps its other files (a training run's output folder): each file
            of the detector replaces its namesake by one rename; implies `overwrite`.

    Returns:
        `output_dir`, as a `Path`.

    Raises:
        FileExistsError: `output_dir` holds files and neither `overwrite` nor `into_existing` is set.
        OSError: a file could not be written (the message names the folder and says what was kept).
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} is a file, not a folder: choose a folder for the model")
    holds_files = output_dir.is_dir() and any(output_dir.iterdir())
    if holds_files and not (overwrite or into_existing):
        raise FileExistsError(
            f"{output_dir} already holds files: choose a new folder, or replace it (overwrite=True, --overwrite)"
        )
    processor = processor or CoPSProcessor.for_image_size(model.config.image_size)
    kept = f"the model folder {output_dir} is left as it was" if holds_files else "nothing was saved"
    with named_write_failures(output_dir, kept):
        with staged_folder(output_dir, into_existing=into_existing) as staging:
            model.save_pretrained(staging)
            processor.save_pretrained(staging)
            write_endpoint_handler(staging)
            if card is not None:
                card.save(staging / "README.md")
    return output_dir


def push_cops_to_hub(
    model_or_dir: CoPSForAnomalyDetection | str | os.PathLike,
    repo_id: str,
    *,
    processor: CoPSProcessor | None = None,
    evaluation: Mapping[str, Mapping[str, float]] | None = None,
    training_dataset: str | None = None,
    base_model: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload CoPS anomaly detector",
    token: str | None = None,
) -> CommitInfo:
    """Upload a CoPS model, its processor, its remote code and its model card to the Hub in one commit.

    Args:
        model_or_dir: a model, or a folder written by ``save_pretrained`` (the processor is read from it too
            when it holds one).
        repo_id: the repository, ``"namespace/name"`` or ``"name"`` in your own namespace; created if needed.
        processor: the processor to upload; by default the folder's, or a ``CoPSProcessor`` at the model's
            ``image_size``.
        evaluation: zero-shot results ``{dataset: {metric: value in [0, 1]}}`` for the card's ``model-index``.
        training_dataset: name or Hub id of the auxiliary training dataset, for the card; by default the one the
            model records (`config.train_dataset`).
        base_model: Hub id of the CLIP backbone, for the card; by default the model's own (`config.clip_model_id`,
            none for a random or unpublished CLIP).
        private: create the repository private (an existing repository keeps its visibility).
        revision: the branch to commit to, created from ``main`` if needed; ``None`` commits to ``main``.
        commit_message: the commit's title.
        token: the access token; by default the one configured on this machine (``HF_TOKEN``, ``hf auth login``).

    Returns:
        The commit: ``commit_url``, and the commit sha as ``oid`` (pin it with ``from_pretrained(revision=...)``).

    Raises:
        CoPSHubError: the Hub refused the upload (no token, no write access, ...); the message says what to do.
        ValueError: ``evaluation`` holds values outside ``[0, 1]``, or the card would contain an access token.
    """
    if isinstance(model_or_dir, CoPSForAnomalyDetection):
        model = model_or_dir
    else:
        model = CoPSForAnomalyDetection.from_pretrained(model_or_dir)
        if processor is None and (Path(model_or_dir) / "processor_config.json").is_file():
            processor = CoPSProcessor.from_pretrained(model_or_dir)
    card = render_model_card(
        _card_config_fields(model.config),
        base_model=base_model or model.config.clip_model_id,
        training_dataset=training_dataset or model.config.train_dataset,
        evaluation=evaluation,
        repo_id=repo_id,
    )
    with tempfile.TemporaryDirectory(prefix="cops-push-") as temporary, friendly_hub_errors(repo_id):
        staging = save_detector(model, processor, Path(temporary) / "detector", card=card)
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id, folder_path=staging, revision=revision, commit_message=commit_message
        )


def _card_config_fields(config: PretrainedConfig) -> dict[str, Any]:
    """The CoPS fields of ``config`` that have a value (not the CLIP towers' configurations), for the card."""
    values = config.to_dict()
    values["train_dataset"] = public_dataset_name(values.get("train_dataset"))  # never a local path
    return {
        name: values[name]
        for name in CoPSConfig.__annotations__
        if name not in CoPSConfig.sub_configs_defaults and values.get(name) is not None
    }


__all__ = [
    "CARD_TAGS",
    "ENDPOINT_HANDLER_NAME",
    "ENDPOINT_HANDLER_TEMPLATE",
    "MODEL_CARD_TEMPLATE",
    "PIPELINE_TAG",
    "CoPSHubError",  # defined in cops_hf.hub_errors
    "evaluation_for_card",
    "friendly_hub_errors",
    "hub_error_message",
    "push_cops_to_hub",
    "render_model_card",
    "save_detector",
    "write_endpoint_handler",
]

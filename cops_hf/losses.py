"""The CoPS training objective (method spec, section 8): `cops_objective` and its terms.

`cops_objective` takes the tensors of the model's training forward and returns the loss with its named terms;
every other function is one term, taking probabilities or features as the model produces them and returning a
scalar tensor. The reference's quirks are kept on purpose: see the docstrings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SEGMENTATION_LOSS_WEIGHT = 4.0
# The named terms of the objective, in the order the training log reports them.
LOSS_TERMS = ("cls", "seg", "gather", "scatter", "kl", "recon")
FOCAL_GAMMA = 2.0
FOCAL_SMOOTH = 1e-5


def focal_loss(state_probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Focal loss (gamma 2) on given state probabilities, as the reference computes it.

    Args:
        state_probs: `[B, 2, H, W]` probabilities of (normal, anomalous) per pixel (already softmaxed).
        masks: `[B, H, W]` binary ground truth (1 = anomalous).

    The one-hot target is clamped to `[1e-5, 1 - 1e-5]` and `1e-5` is added to `pt` before the log.
    """
    num_states = state_probs.shape[1]
    # [B, 2, H, W] -> [B*H*W, 2]
    probs = state_probs.permute(0, 2, 3, 1).reshape(-1, num_states)
    one_hot = F.one_hot(masks.reshape(-1).long(), num_states).to(probs.dtype)
    one_hot = one_hot.clamp(FOCAL_SMOOTH / (num_states - 1), 1.0 - FOCAL_SMOOTH)
    pt = (one_hot * probs).sum(dim=1) + FOCAL_SMOOTH
    return (-((1.0 - pt) ** FOCAL_GAMMA) * pt.log()).mean()


def dice_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss `1 - mean_b (2 sum(p t) + 1) / (sum p + sum t + 1)` on `[B, H, W]` inputs."""
    probs_flat = probs.reshape(probs.shape[0], -1)
    targets_flat = targets.reshape(targets.shape[0], -1).to(probs.dtype)
    overlap = 2.0 * (probs_flat * targets_flat).sum(dim=1) + 1.0
    total = probs_flat.sum(dim=1) + targets_flat.sum(dim=1) + 1.0
    return 1.0 - (overlap / total).mean()


def segmentation_loss(state_maps: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    """Sum over feature layers of focal + Dice(anomalous, mask) + Dice(normal, 1 - mask).

    Args:
        state_maps: per feature layer, `[B, 2, H, W]` state probabilities at mask resolution.
        masks: `[B, H, W]` binary ground truth.
    """
    masks = masks.to(state_maps[0].dtype)
    total = state_maps[0].new_zeros(())
    for layer_maps in state_maps:
        total = total + focal_loss(layer_maps, masks)
        total = total + dice_loss(layer_maps[:, 1], masks)
        total = total + dice_loss(layer_maps[:, 0], 1.0 - masks)
    return total


def kl_divergence(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(q(z|g) || N(0, I)) summed over the latent dimension, averaged over the batch. Inputs `[B, D]`."""
    return (-0.5 * (1.0 + log_var - mean.pow(2) - log_var.exp()).sum(dim=1)).mean()


def reconstruction_loss(image_embeds: torch.Tensor, class_tokens: torch.Tensor) -> torch.Tensor:
    """The reference's VAE reconstruction term.

    Quirk kept for parity: every image's global feature is compared with every image's class token, and the
    result is averaged over (b, b', d), i.e. `mean_{b, b', d} (g[b', d] - c[b, d])^2`.

    Args:
        image_embeds: `[B, D]` global image features g.
        class_tokens: `[B, D]` decoded class tokens c.
    """
    # [1, B, D] - [B, 1, D] -> [B (token), B (image), D]
    return (image_embeds.unsqueeze(0) - class_tokens.unsqueeze(1)).pow(2).mean()


def prototype_gather_scatter(
    normal_distances: torch.Tensor, anomalous_distances: torch.Tensor, patch_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pull normal patches to the normal prototypes and anomalous patches to the anomalous ones.

    Args:
        normal_distances, anomalous_distances: `[B, N]` distances to the nearest normal / anomalous prototype.
        patch_labels: `[B, N]` patch labels (mask max-pooled over each patch; non-zero = anomalous).

    Returns:
        `(gather, scatter)`: mean normal distance over normal patches, and mean anomalous distance over
        anomalous patches; each is 0 when the batch has no such patch.
    """
    is_anomalous = patch_labels != 0
    return _mean_or_zero(normal_distances[~is_anomalous]), _mean_or_zero(anomalous_distances[is_anomalous])


def _mean_or_zero(values: torch.Tensor) -> torch.Tensor:
    return values.mean() if values.numel() > 0 else values.new_zeros(())


def image_classification_loss(image_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `[B, 2]` image-text logits against `[B]` labels (1 = anomalous)."""
    return F.cross_entropy(image_logits, labels.long())


def cops_objective(
    *,
    image_logits: torch.Tensor,
    labels: torch.Tensor,
    state_maps: torch.Tensor,
    masks: torch.Tensor | None,
    normal_distances: torch.Tensor,
    anomalous_distances: torch.Tensor,
    posterior_mean: torch.Tensor,
    posterior_log_var: torch.Tensor,
    image_embeds: torch.Tensor,
    class_tokens: torch.Tensor,
    patch_size: int,
    use_recon_loss: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss `cls + 4 seg + gather + scatter + kl + recon` and its terms (`LOSS_TERMS`).

    Args:
        image_logits: `[B, 2]` image-text logits (normal, anomalous).
        labels: `[B]` image labels (1 = anomalous).
        state_maps: `[B, F, 2, H, W]` state probabilities per feature layer, upsampled to the mask resolution.
        masks: `[B, H, W]` binary ground truth, or `None` for image-level data: then `seg`, `gather` and `scatter`
            are 0.
        normal_distances, anomalous_distances: `[B, N]` distances of the patches to the nearest prototype.
        posterior_mean, posterior_log_var: `[B, D]` VAE posterior of the class token.
        image_embeds: `[B, D]` global image features g.
        class_tokens: `[B, D]` class tokens decoded from the posterior sample.
        patch_size: pixels per patch side; patch labels are the masks max-pooled over each patch.
        use_recon_loss: add the reconstruction term (else it is 0).

    Returns:
        `(loss, terms)`: the scalar loss and the six scalar terms by name (not detached).
    """
    zero = image_logits.new_zeros(())
    terms = {
        "cls": image_classification_loss(image_logits, labels.to(image_logits.device)),
        "kl": kl_divergence(posterior_mean.float(), posterior_log_var.float()),
        "recon": reconstruction_loss(image_embeds.float(), class_tokens.float()) if use_recon_loss else zero,
        "seg": zero,
        "gather": zero,
        "scatter": zero,
    }
    if masks is not None:
        masks = masks.to(state_maps.dtype)
        terms["seg"] = segmentation_loss(list(state_maps.unbind(dim=1)), masks)
        patch_labels = F.max_pool2d(masks.unsqueeze(1), patch_size).flatten(1)  # [B, N]
        terms["gather"], terms["scatter"] = prototype_gather_scatter(
            normal_distances.float(), anomalous_distances.float(), patch_labels
        )
    loss = (
        terms["cls"]
        + SEGMENTATION_LOSS_WEIGHT * terms["seg"]
        + terms["gather"]
        + terms["scatter"]
        + terms["kl"]
        + terms["recon"]
    )
    return loss, {name: terms[name] for name in LOSS_TERMS}


__all__ = [
    "LOSS_TERMS",
    "SEGMENTATION_LOSS_WEIGHT",
    "cops_objective",
    "dice_loss",
    "focal_loss",
    "image_classification_loss",
    "kl_divergence",
    "prototype_gather_scatter",
    "reconstruction_loss",
    "segmentation_loss",
]

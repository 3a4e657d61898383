"""The HF Trainer, with the hooks InternVL training needs."""

from __future__ import annotations

import re

import torch
from transformers import Trainer

from vltrain.data.encode import Encoder
from vltrain.data.records import Record
from vltrain.infer.engine import answer_records, exact_match


class VLTrainer(Trainer):
    """Trainer that drops collator-only keys before the forward pass, runs the vision side on text-only batches
    while it trains, and scores held-out answers."""

    def __init__(self, *args, encoder: Encoder, answer_set: list[Record], max_new_tokens: int = 32, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder = encoder
        self.answer_set = answer_set
        self.max_new_tokens = max_new_tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The batch loss. A batch without images still runs the vision tower and projector on one dummy tile
        when either has trainable parameters, adding 0 x the sum of its features to the loss: under ZeRO-3 (and
        DDP) every rank must run the same modules each step, or a rank with image batches waits forever on one
        without (the official recipe's dummy image with `image_flags` 0). The loss value is unchanged and those
        parameters get zero gradients from such a batch."""
        inputs = {k: v for k, v in inputs.items() if k != "tiles_per_sample"}
        text_only_step = model.training and inputs.get("pixel_values") is None
        if not text_only_step or not _vision_side_trains(model):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        features = _dummy_image_features(self.accelerator.unwrap_model(model), inputs["input_ids"].device)
        loss = loss + 0.0 * features.sum()
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        """Loss on the held-out split, plus exact-match accuracy of greedy answers on its first rows."""
        metrics = super().evaluate(*args, **kwargs)
        if self.answer_set:
            answers = answer_records(self.model, self.encoder, self.answer_set, self.max_new_tokens)
            score = {"eval_exact_match": exact_match(answers, [r.response for r in self.answer_set])}
            self.log(score)
            metrics.update(score)
        return metrics


_VISION_SIDE = re.compile(r"(^|\.)(vision_tower|multi_modal_projector)\.")


def _vision_side_trains(model: torch.nn.Module) -> bool:
    """Whether any parameter of the vision tower or the projector (LoRA adapters included) requires grad."""
    return any(p.requires_grad and _VISION_SIDE.search(name) for name, p in model.named_parameters())


def _dummy_image_features(model, device: torch.device) -> torch.Tensor:
    """Projected features of one all-zero tile: (1, image_seq_length, text hidden size)."""
    vision = model.config.vision_config
    size = vision.image_size
    height, width = (size, size) if isinstance(size, int) else size
    tile = torch.zeros(1, vision.num_channels, height, width, device=device)
    return model.get_image_features(pixel_values=tile).pooler_output

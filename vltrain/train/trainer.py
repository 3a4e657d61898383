"""The HF Trainer, with the hooks InternVL training needs."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from transformers import Trainer
from transformers.integrations import is_deepspeed_zero3_enabled

from vltrain.data.encode import Encoder
from vltrain.data.records import Record
from vltrain.data.tiling import normalise_tensor
from vltrain.infer.engine import answer_records, exact_match, reference_answers
from vltrain.model.tuning import trainable_parts


class VLTrainer(Trainer):
    """Trainer that drops collator-only keys before the forward pass, runs the vision side on a dummy tile for
    text-only batches where other ranks need it to, and scores held-out answers."""

    def __init__(self, *args, encoder: Encoder, answer_set: list[Record], max_new_tokens: int = 32, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder = encoder
        self.answer_set = answer_set
        self.max_new_tokens = max_new_tokens

    def _get_train_sampler(self, train_dataset=None):
        """`trainer.train_sampling_strategy=group_by_length` groups by the token counts the data check measured
        (the dataset's `lengths`), instead of the Trainer encoding every sample to learn its length."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = getattr(dataset, "lengths", None)
        if self.args.train_sampling_strategy == "group_by_length" and lengths is not None:
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=lengths)
        return super()._get_train_sampler(train_dataset)

    def _prepare_inputs(self, inputs):
        """Batches whose tiles came as uint8 (the collator's `normalise_tiles=False`, on a GPU) are normalised
        on the device, after the 4x smaller copy."""
        inputs = super()._prepare_inputs(inputs)
        pixels = inputs.get("pixel_values")
        if pixels is not None and pixels.dtype == torch.uint8:
            inputs["pixel_values"] = normalise_tensor(pixels)
        return inputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The batch loss. A batch without images still runs the vision tower and projector, on one all-zero tile,
        where another rank may be running them on real images: under ZeRO-3 (or FSDP) always, since parameters
        are gathered collectively and every rank must run the same modules in the same order, frozen or not,
        in evaluation too; otherwise when they have trainable parameters (DDP needs a gradient for each, the
        official recipe's dummy image with `image_flags` 0). See `_dummy_image`: the loss and the gradients of
        everything else are unchanged, the vision side gets zero gradients."""
        inputs = {k: v for k, v in inputs.items() if k != "tiles_per_sample"}
        dummy = inputs.get("pixel_values") is None and self._vision_must_run(model)
        with _dummy_image(self.accelerator.unwrap_model(model)) if dummy else nullcontext():
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    def _vision_must_run(self, model) -> bool:
        if is_deepspeed_zero3_enabled() or self.is_fsdp_enabled:
            return True
        if not model.training:
            return False
        trains = trainable_parts(self.accelerator.unwrap_model(model))
        return "vision" in trains or "projector" in trains

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        """Loss on the held-out split, plus exact-match accuracy of greedy answers on its first rows (the rows
        split across ranks, the answers gathered)."""
        metrics = super().evaluate(*args, **kwargs)
        if self.answer_set:
            answers = self._answer_split()
            score = {"eval_exact_match": exact_match(answers, reference_answers(self.encoder, self.answer_set))}
            self.log(score)
            metrics.update(score)
        return metrics

    def _answer_split(self) -> list[str]:
        """Answers to `answer_set`, split across ranks and gathered. Under ZeRO-3 every rank must run the same
        forward passes (parameters are gathered collectively, in an order each rank traces): the rows are dealt
        kind by kind (with images, then text-only), each rank getting the same number of each (padded with a
        repeated row, whose answer is dropped), so that in every generate call either all ranks run the vision
        side or none does; generation is synchronised (`synced_gpus`) so that ranks finishing early keep step."""
        from vltrain.train.parallel import gather_to_all

        world, rank = self.args.world_size, self.args.process_index
        records = self.answer_set
        zero3 = is_deepspeed_zero3_enabled()
        kinds = [list(range(len(records)))]
        if zero3:
            with_media = [i for i, r in enumerate(records) if r.images or r.videos]
            kinds = [with_media, [i for i in range(len(records)) if i not in set(with_media)]]
        batch = 8  # rows per generate call, as answer_records batches by default
        mine: list[int] = []
        answers: list[str] = []
        for rows in kinds:
            if not rows:
                continue
            share = rows[rank::world]
            share += [share[-1] if share else rows[0]] * (-(-len(rows) // world) - len(share))  # padding
            for start in range(0, len(share), batch):
                chunk = share[start:start + batch]
                answers += answer_records(self.model, self.encoder, [records[i] for i in chunk], self.max_new_tokens,
                                          batch_size=len(chunk), **({"synced_gpus": True} if zero3 else {}))
            mine += share
        if world == 1:
            return answers
        by_index: dict[int, str] = {}
        for indices, texts in gather_to_all((mine, answers)):
            by_index.update(zip(indices, texts))
        return [by_index[i] for i in range(len(records))]


@contextmanager
def _dummy_image(model):
    """While active, the input embedding layer also runs the vision tower and projector on one all-zero tile and
    adds an empty slice of the features (exactly 0) to its output. The vision side thus runs where a real image
    batch runs it, between the embedding and the decoder layers (ZeRO-3 gathers parameters in call order), and
    its backward comes in the same place too. The value added is 0 whatever the features hold (no 0 x inf in
    fp16), so the loss and the gradients of the other parameters are those of the plain batch; vision and
    projector parameters get zero gradients, as `vit_embeds[image_flags == 1]` gives them in the official code."""

    def add_dummy(module, args, embeds):  # embeds: (batch, seq, text hidden size)
        features = _dummy_image_features(model, embeds.device)
        return embeds + features[:, :0].sum().to(embeds.device, embeds.dtype)  # device_map: another GPU

    handle = model.get_input_embeddings().register_forward_hook(add_dummy)
    try:
        yield
    finally:
        handle.remove()


def _dummy_image_features(model, device: torch.device) -> torch.Tensor:
    """Projected features of one all-zero tile: (1, image_seq_length, text hidden size)."""
    vision = model.config.vision_config
    size = vision.image_size
    height, width = (size, size) if isinstance(size, int) else size
    tile = torch.zeros(1, vision.num_channels, height, width, device=device)
    return model.get_image_features(pixel_values=tile).pooler_output

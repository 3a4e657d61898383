"""The HF Trainer, with the two hooks InternVL training needs."""

from __future__ import annotations

from transformers import Trainer

from vltrain.data.encode import Encoder
from vltrain.data.records import Record
from vltrain.infer.engine import answer_records, exact_match


class VLTrainer(Trainer):
    """Trainer that drops collator-only keys before the forward pass and scores held-out answers."""

    def __init__(self, *args, encoder: Encoder, answer_set: list[Record], max_new_tokens: int = 32, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder = encoder
        self.answer_set = answer_set
        self.max_new_tokens = max_new_tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "tiles_per_sample"}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        """Loss on the held-out split, plus exact-match accuracy of greedy answers on its first rows."""
        metrics = super().evaluate(*args, **kwargs)
        if self.answer_set:
            answers = answer_records(self.model, self.encoder, self.answer_set, self.max_new_tokens)
            score = {"eval_exact_match": exact_match(answers, [r.response for r in self.answer_set])}
            self.log(score)
            metrics.update(score)
        return metrics

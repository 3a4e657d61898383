"""Generation: answer records with a trained (or base) model, batched, greedy by default."""

from __future__ import annotations

import torch

from vltrain.data.collator import collate
from vltrain.data.encode import Encoder
from vltrain.data.records import Record
from vltrain.model.generation import stop_token_id


@torch.no_grad()
def answer_records(model, encoder: Encoder, records: list[Record], max_new_tokens: int = 32,
                   batch_size: int = 8, synced_gpus: bool = False) -> list[str]:
    """The model's answer to each record's final query (its history and images as context). `synced_gpus`:
    keep stepping until every process is done (DeepSpeed ZeRO-3, where each step gathers weights collectively)."""
    tokenizer = encoder.tokenizer
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Passed on every call: transformers' Trainer re-aligns generation_config.eos_token_id with the tokenizer's
    # EOS (`</s>` for InternLM2), which is not where InternVL's templates stop.
    stop_id = stop_token_id(tokenizer, encoder.template.name)
    answers = []
    try:
        for start in range(0, len(records), batch_size):
            samples = [encoder(r, for_generation=True) for r in records[start:start + batch_size]]
            batch = collate(samples, tokenizer.pad_token_id, padding_side="left")
            batch.pop("labels")
            batch.pop("tiles_per_sample")
            batch = {k: v.to(device) for k, v in batch.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_id,
                                 pad_token_id=tokenizer.pad_token_id, synced_gpus=synced_gpus)
            new_tokens = out[:, batch["input_ids"].shape[1]:]
            answers += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return answers


def exact_match(answers: list[str], references: list[str]) -> float:
    """Fraction of answers equal to the reference after stripping surrounding whitespace."""
    if not references:
        return 0.0
    return sum(a.strip() == r.strip() for a, r in zip(answers, references)) / len(references)

"""Multimodal packing (`data.packing`): the packs, the packed batch, and the loss and gradients of a packed batch
equal to those of the same records padded."""

from __future__ import annotations

import random

import pytest
import torch

from vltrain.config import compose_config
from vltrain.data.collator import Collator, collate, collate_packed, model_inputs
from vltrain.data.dataset import EncodedDataset, PackedDataset, pack_groups
from vltrain.data.demo import write_demo_dataset
from vltrain.data.encode import IGNORE_INDEX, Sample
from vltrain.data.specs import load_splits
from vltrain.model.load import load_model_tokenizer, make_encoder


def test_packs_hold_every_record_once_within_the_budget():
    rng = random.Random(0)
    lengths = [rng.choice([rng.randrange(20, 300), rng.randrange(300, 1800)]) for _ in range(500)]
    groups = pack_groups(lengths, 2048)
    assert sorted(i for g in groups for i in g) == list(range(500))
    assert all(sum(lengths[i] for i in g) <= 2048 for g in groups)
    assert all(g == sorted(g) for g in groups) and [g[0] for g in groups] == sorted(g[0] for g in groups)
    assert sum(lengths) / (len(groups) * 2048) > 0.95  # best fit, longest first: few tokens of padding
    assert groups == pack_groups(lengths, 2048)
    with pytest.raises(ValueError, match="does not fit"):
        pack_groups([10, 3000], 2048)


def test_packed_dataset_serves_packs_in_order():
    samples = [Sample(torch.arange(n), torch.arange(n), None, []) for n in (5, 9, 3, 7)]
    packed = PackedDataset(samples, [5, 9, 3, 7], max_length=12)
    assert packed.groups == [[0, 3], [1, 2]]  # 9 + 3 and 7 + 5: both full
    assert packed.lengths == [12, 12] and len(packed) == 2
    assert [len(s.input_ids) for s in packed[0]] == [5, 7]


def test_packed_row_keeps_positions_labels_and_tiles_per_record():
    pixels = [torch.full((t, 3, 2, 2), k, dtype=torch.uint8) for k, t in ((1, 2), (2, 1))]
    a = Sample(torch.tensor([1, 2, 3]), torch.tensor([-100, 2, 3]), pixels[0], [2])
    b = Sample(torch.tensor([4, 5]), torch.tensor([4, 5]), None, [])  # a trained first token: masked when packed
    c = Sample(torch.tensor([6, 7]), torch.tensor([-100, 7]), pixels[1], [1])
    batch = Collator(pad_id=0, packing=True)([[a, b], [c]])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 2, 3, IGNORE_INDEX, 5, -100, 7]]
    assert "attention_mask" not in batch  # the mask comes from the position ids
    assert batch["tiles_per_sample"] == [2, 0, 1]
    assert batch["sample_lengths"] == [3, 2, 2]
    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].shape == (3, 3, 2, 2)
    unpacked = collate([a, b, c], pad_id=0)
    assert torch.equal(batch["pixel_values"], unpacked["pixel_values"])  # same tiles, same order, normalised


@pytest.fixture(scope="module")
def model_and_samples(tmp_path_factory):
    """The tiny random model (fp32) and encoded demo records of several lengths, text-only and with images."""
    demo = write_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=24, n_val=2)
    cfg = compose_config(["dataset=custom", f"dataset.train=[{demo.train}]", "dataset.val_ratio=0"])
    model, tokenizer = load_model_tokenizer(cfg.model, dtype=torch.float32, seed=0)
    encoder = make_encoder(cfg, model, tokenizer)
    records, _ = load_splits(cfg.dataset)
    samples = [EncodedDataset(records, encoder)[i] for i in range(len(records))]
    with_image = [s for s in samples if s.pixel_values is not None]
    text_only = [s for s in samples if s.pixel_values is None]
    chosen = with_image[:3] + text_only[:1] + with_image[3:4]
    assert len({len(s.input_ids) for s in chosen}) > 1 and text_only  # lengths differ; both kinds present
    return model.train(), tokenizer, chosen


def loss_and_grads(model, batch):
    model.zero_grad()
    inputs = model_inputs(batch)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_batch_gives_the_loss_and_gradients_of_the_padded_batch(model_and_samples):
    model, tokenizer, samples = model_and_samples
    torch.manual_seed(0)
    padded_loss, padded_grads = loss_and_grads(model, collate(samples, tokenizer.pad_token_id))
    torch.manual_seed(0)
    packed_loss, packed_grads = loss_and_grads(model, collate_packed(samples))
    assert torch.isfinite(padded_loss) and padded_loss > 0
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    assert packed_grads.keys() == padded_grads.keys()
    assert any(n.startswith("model.vision_tower") for n in packed_grads)  # the images are trained too
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packing_is_needed_for_equality(model_and_samples):
    """Without the position ids the records attend to each other and the loss moves: the test above can fail."""
    model, tokenizer, samples = model_and_samples
    batch = collate_packed(samples)
    batch.pop("position_ids")
    with torch.no_grad():
        crossed = model(**model_inputs(batch)).loss
        padded = model(**model_inputs(collate(samples, tokenizer.pad_token_id))).loss
    assert not torch.allclose(crossed, padded, rtol=1e-4)

"""How training gets its data: encoded once per run into the shared cache and reused by the next run, packed,
grouped by length from the check's token counts, tiles normalised on the device, threads shared with the workers."""

from __future__ import annotations

import os

import pytest
import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

from vltrain import speed
from vltrain.config import compose_config
from vltrain.data import encode_cache
from vltrain.data.dataset import PackedDataset
from vltrain.data.demo import write_demo_dataset
from vltrain.data.tiling import normalise
from vltrain.speed import share_cores
from vltrain.train.recipe import build_trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=40, n_val=4)


def config(tmp_path, demo, *extra):
    return compose_config([
        "dataset=custom", f"dataset.train=[{demo.train}]", f"dataset.val=[{demo.val}]",
        f"data.encode_cache={tmp_path.parent / 'encoded'}", "eval.generate_samples=0", "global_batch_size=2",
        "trainer.per_device_train_batch_size=2", "trainer.max_steps=2", "trainer.dataloader_num_workers=0",
        "trainer.eval_strategy=no", "trainer.save_strategy=no", *extra,
    ], run_dir=str(tmp_path / "run"))


def test_a_second_run_on_the_same_data_encodes_nothing(tmp_path, demo, monkeypatch):
    first = build_trainer(config(tmp_path / "a", demo))
    with monkeypatch.context() as patch:
        patch.setattr(encode_cache, "encode_row", lambda *a: pytest.fail("encoded again"))
        second = build_trainer(config(tmp_path / "b", demo))  # another run folder, the same cache
    assert len(second.train_dataset) == len(first.train_dataset) == 40
    samples = second.train_dataset.dataset  # the training set, under its seeded (epoch, index) order
    a, b = first.train_dataset.dataset[3], samples[3]
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    assert a.pixel_values.dtype == torch.uint8  # uint8 from the dataset; the collator normalises
    assert second.train_dataset.lengths == [len(samples[i].input_ids) for i in range(40)]


@pytest.mark.parametrize("encode", ["datasets", "lazy"])
def test_packed_training_runs_on_packs_grouped_by_length(tmp_path, demo, encode):
    cfg = config(tmp_path, demo, "data.packing=true", "data.max_length=1024", f"data.encode={encode}",
                 "trainer.train_sampling_strategy=group_by_length")
    trainer = build_trainer(cfg)
    packs = trainer.train_dataset.dataset  # under the seeded (epoch, index) order
    assert isinstance(packs, PackedDataset)
    assert sorted(i for g in packs.groups for i in g) == list(range(40)) and len(packs) < 40
    assert all(n <= 1024 for n in packs.lengths)
    sampler = trainer._get_train_sampler()
    assert sampler.lengths == packs.lengths and sampler.group_size == 2
    order = [index for _, index in sampler]
    assert sorted(order) == list(range(len(packs)))
    grouped = get_length_grouped_indices(packs.lengths, 2, generator=torch.Generator().manual_seed(sampler.seed))
    assert order == grouped  # transformers' length-grouped order, drawn from the (seed, epoch) generator
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    assert (batch["position_ids"] == 0).sum() == len(batch["tiles_per_sample"]) > 2  # two packs, several records
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


def test_uint8_batches_are_normalised_by_the_trainer(tmp_path, demo):
    trainer = build_trainer(config(tmp_path, demo))
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    prepared = trainer._prepare_inputs({"input_ids": torch.ones(1, 3, dtype=torch.long), "pixel_values": pixels})
    assert torch.equal(prepared["pixel_values"], normalise(pixels.numpy()))


def test_torch_threads_leave_the_workers_their_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
        assert share_cores(1) == 3 and torch.get_num_threads() == 3
        assert share_cores(8) == 1
        assert share_cores(1, local_processes=2) == 1 and share_cores(0, local_processes=2) == 2  # two ranks
        # on the machine: two cores each
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert share_cores(1) == 2  # an explicit setting is kept
    finally:
        torch.set_num_threads(before)


def test_allocator_keeps_freed_memory_once_per_process():
    assert speed.keep_freed_memory() is True  # glibc on Linux
    assert os.getpid() in speed._ALLOCATOR_TUNED and speed.keep_freed_memory() is True


class _StrategyProbe(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        speed.ready_data_process()
        return torch.multiprocessing.get_sharing_strategy()


def test_workers_hand_tensors_over_by_name_and_the_main_process_is_left_alone():
    before = torch.multiprocessing.get_sharing_strategy()
    loader = torch.utils.data.DataLoader(_StrategyProbe(), batch_size=None, num_workers=1)
    assert list(loader) == ["file_system", "file_system"]
    speed.ready_data_process()  # in the main process: nothing changes
    assert torch.multiprocessing.get_sharing_strategy() == before

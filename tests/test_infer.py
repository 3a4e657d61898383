"""Inference: batched answers equal one-by-one answers, streaming ends on the non-streamed reply, replies keep
`<ref>`/`<box>`, references have their placeholders filled, the held-out split of a checkpoint, scores, the LoRA
merge (logits equal to the adapter model's) and the `python -m vltrain.infer` evaluation command."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from vltrain.cli.infer import main as infer_main
from vltrain.config import compose_config, run_config_yaml
from vltrain.data.demo import write_demo_dataset
from vltrain.data.records import Record, read_records
from vltrain.infer.engine import Conversation, Engine, reference_answers
from vltrain.infer.evaluate import CJKTokenizer, grounding_iou, held_out_records, parse_boxes, score
from vltrain.manifest import RUN_CONFIG
from vltrain.model.export import merge_lora
from vltrain.model.load import load_checkpoint, load_model_tokenizer, make_encoder
from vltrain.model.tuning import apply_sft


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=16, n_val=6)


def make_lora_checkpoint(root: Path, demo, val: bool = True, extra: tuple[str, ...] = ()) -> Path:
    """A LoRA checkpoint as training writes one (adapters with non-zero B, tokenizer, vltrain.yaml, the random
    base in the run folder), without the training steps. `extra`: more config overrides."""
    overrides = ["dataset=custom", f"dataset.train=[{demo.train}]", "dataset.val_ratio=0.25", *extra]
    if val:
        overrides.append(f"dataset.val=[{demo.val}]")
    cfg = compose_config(overrides, run_dir=str(root))
    model, tokenizer = load_model_tokenizer(cfg.model)
    base = root / "base_model"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init="pretrained", path=str(base)))
    model = apply_sft(model, cfg.sft_type)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    ckpt = root / "checkpoint-1"
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    (ckpt / RUN_CONFIG).write_text(run_config_yaml(cfg), encoding="utf-8")
    return ckpt


@pytest.fixture(scope="module")
def tiny():
    cfg = compose_config(["dataset=custom", "dataset.train=[unused.jsonl]"])
    model, tokenizer = load_model_tokenizer(cfg.model)
    return Engine(model, make_encoder(cfg, model, tokenizer))


def test_batched_answers_equal_one_by_one_answers_and_streaming_ends_on_them(tiny, demo):
    image = str(demo.train.parent / "images" / sorted(p.name for p in (demo.train.parent / "images").iterdir())[0])
    conversations = [Conversation("<image>\nWhat colour is it?", images=[image]),
                     Conversation("Hello, a longer question without any image at all?"),
                     Conversation("And now?", history=[("<image>\nShape?", "circle")], images=[image], system="")]
    batched = tiny.generate(conversations, batch_size=3, max_new_tokens=10)
    single = [tiny.generate([c], max_new_tokens=10)[0] for c in conversations]
    assert batched == single and all(batched)
    steps = list(tiny.stream(conversations[0], max_new_tokens=10))
    assert steps[-1] == single[0] and len(steps) > 1
    assert all(single[0].startswith(s) for s in steps)


def test_replies_keep_ref_and_box_tokens_and_stop_at_the_separator(tiny):
    tokenizer = tiny.tokenizer
    ids = tokenizer.encode("<ref>the cat</ref><box>[[1, 2, 30, 40]]</box>", add_special_tokens=False)
    assert tiny.decode(ids + [tiny.stop_id] + ids) == "<ref>the cat</ref><box>[[1, 2, 30, 40]]</box>"
    assert tiny.decode(ids, stop_words=["</ref>"]) == "<ref>the cat"


def new_token_counts(tiny, monkeypatch) -> list[int]:
    """The number of new tokens of each `generate` call of the tiny engine's model, appended as they happen."""
    lengths = []
    real_generate = tiny.model.generate

    def generate(**kwargs):
        out = real_generate(**kwargs)
        lengths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(tiny.model, "generate", generate)
    return lengths


def test_generation_config_is_honoured(tiny, monkeypatch):
    conversation = Conversation("Tell me something.")
    lengths = new_token_counts(tiny, monkeypatch)
    gen = tiny.model.generation_config
    gen.max_new_tokens = 3
    try:
        assert tiny.generate([conversation]) == tiny.generate([conversation]) and lengths == [3, 3]
        gen.do_sample, gen.temperature = True, 5.0
        torch.manual_seed(0)
        assert len({tiny.generate([conversation])[0] for _ in range(4)}) > 1  # sampling at a high temperature
    finally:
        gen.max_new_tokens, gen.do_sample, gen.temperature = None, False, None


def test_references_fill_placeholders(tiny, tmp_path):
    from PIL import Image

    Image.new("RGB", (200, 100)).save(tmp_path / "a.png")
    row = {"query": "Find <ref-object>", "response": "<bbox>", "images": ["a.png"],
           "objects": [{"caption": "the box", "bbox": [20, 10, 100, 50]}]}
    (tmp_path / "g.jsonl").write_text(json.dumps(row) + "\n")
    (record,) = read_records(tmp_path / "g.jsonl")
    assert reference_answers(tiny.encoder, [record]) == ["<box>[[100, 100, 500, 500]]</box>"]
    assert reference_answers(tiny.encoder, [Record(query="q", response=" red ")]) == ["red"]


def test_scores():
    assert CJKTokenizer().tokenize("红色的 Square, 2 个") == ["红", "色", "的", "square", "2", "个"]
    metrics = score(["红色", "a red square", "<box>[[0, 0, 10, 10]]</box>"],
                    ["红色", "a blue square", "<ref>x</ref><box>[[0, 0, 10, 20]]</box>"])
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    # LCS: 2 of 3 words; <box> 0 0 10 [10] </box> against <ref> x </ref> <box> 0 0 10 [20] </box>: 5 of 6 and 9
    assert metrics["rouge_l"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert metrics["grounding_rows"] == 1 and metrics["grounding_iou"] == pytest.approx(0.5)
    assert parse_boxes("<box> [[1, 2, 3, 4],[5, 6, 7, 8]] </box>") == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert grounding_iou("no box", "<box>[[0, 0, 1, 1]]</box>") == 0.0 and grounding_iou("x", "y") is None


def test_held_out_split_is_training_s_and_a_changed_file_is_named(tmp_path, demo, caplog):
    ckpt = make_lora_checkpoint(tmp_path / "run", demo, val=False)
    _, _, cfg = load_checkpoint(ckpt)
    from vltrain.data.specs import load_splits

    train, val = load_splits(cfg.dataset)
    held = held_out_records(cfg, ckpt)
    assert [r.key for r in held] == [r.key for r in val] and not {r.key for r in held} & {r.key for r in train}
    assert "changed since training" not in caplog.text
    stat = demo.train.stat()
    os.utime(demo.train, (stat.st_atime, stat.st_mtime + 3600))  # edited after the checkpoint, no manifest
    try:
        held_out_records(cfg, ckpt)
    finally:
        os.utime(demo.train, (stat.st_atime, stat.st_mtime))
    assert f"{demo.train}: modified after the checkpoint was written" in caplog.text
    caplog.clear()
    keys = [list(k) for k in [r.key for r in val][:2]]
    manifest = {"files": [{"path": str(demo.train), "size": demo.train.stat().st_size + 1, "sha256": "0"}],
                "val_keys": keys}
    (ckpt / "data_manifest.json").write_text(json.dumps(manifest))
    held = held_out_records(cfg, ckpt)
    assert [list(r.key) for r in held] == keys
    assert "changed since training" in caplog.text and str(demo.train) in caplog.text


def test_the_manifest_of_a_run_on_relative_paths_names_the_held_out_rows(tmp_path, demo, monkeypatch, caplog):
    """A run started on `dataset.train=[train.jsonl]` (relative) records absolute paths in its manifest, so
    evaluation from another folder (the saved config names the files absolutely) finds every held-out row."""
    import dataclasses

    from vltrain.data.specs import load_splits
    from vltrain.manifest import data_manifest

    ckpt = make_lora_checkpoint(tmp_path / "run", demo, val=False)
    _, _, cfg = load_checkpoint(ckpt)
    monkeypatch.chdir(demo.train.parent)
    relative = dataclasses.replace(cfg.dataset, train=[demo.train.name])
    _, val = load_splits(relative)  # the records as training names them
    (ckpt / "data_manifest.json").write_text(json.dumps(data_manifest([demo.train.name], [r.key for r in val])))
    monkeypatch.chdir(tmp_path)
    held = held_out_records(cfg, ckpt)
    assert len(held) == len(val) > 0 and "were not found" not in caplog.text


@pytest.mark.slow
def test_merge_equals_adapters_and_evaluation_writes_results(tmp_path, demo, capsys):
    ckpt = make_lora_checkpoint(tmp_path / "run", demo)
    adapted, tokenizer, cfg = load_checkpoint(ckpt)
    merged_dir = merge_lora(ckpt)
    assert merged_dir == ckpt.with_name("checkpoint-1-merged")
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["text_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert (merged_dir / "generation_config.json").is_file() and "chat_template" in json.dumps(
        json.loads((merged_dir / "tokenizer_config.json").read_text())) or (merged_dir / "chat_template.jinja").is_file()
    merged, _, merged_cfg = load_checkpoint(merged_dir)
    assert merged_cfg.sft_type.name == "full"
    encoder = make_encoder(cfg, adapted, tokenizer)
    record = read_records(demo.val)[0]
    sample = encoder(record)
    inputs = {"input_ids": sample.input_ids[None], "pixel_values": sample.pixel_values}
    with torch.no_grad():
        diff = (adapted(**inputs).logits - merged(**inputs).logits).abs().max().item()
    assert diff <= 1e-5
    # plain transformers loads the merged folder
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    plain = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(merged_dir).convert_tokens_to_ids("<IMG_CONTEXT>") == plain.config.image_token_id
    with torch.no_grad():
        assert (plain(**inputs).logits - merged(**inputs).logits).abs().max().item() == 0.0
    # a second merge reuses the folder; a folder made otherwise is refused
    stamp = (merged_dir / "config.json").stat().st_mtime_ns
    assert merge_lora(ckpt) == merged_dir and (merged_dir / "config.json").stat().st_mtime_ns == stamp
    other = tmp_path / "run" / "other"
    other.mkdir()
    (other / "x").write_text("x")
    with pytest.raises(Exception, match="overwrite=true"):
        merge_lora(ckpt, other)

    # evaluation through the command, batched (3) and one by one: same answers
    results = tmp_path / "results"
    for batch, folder in ((3, results / "b3"), (1, results / "b1")):
        assert infer_main([f"ckpt_dir={ckpt}", "load_dataset_config=true", f"batch_size={batch}",
                           f"result_dir={folder}", "max_new_tokens=6"]) == 0
    out = capsys.readouterr().out
    assert '"exact_match"' in out and '"rouge_l"' in out
    rows = {b: [json.loads(line) for f in (results / b).glob("*.jsonl") for line in f.read_text().splitlines()]
            for b in ("b3", "b1")}
    assert len(rows["b3"]) == 6 and [r["response"] for r in rows["b3"]] == [r["response"] for r in rows["b1"]]
    assert rows["b3"][0]["label"] == read_records(demo.val)[0].response and rows["b3"][0]["images"]
    summary = json.loads(next((results / "b3").glob("*_summary.json")).read_text())
    assert summary["rows"] == 6 and 0.0 <= summary["exact_match"] <= 1.0
    # infer merge_lora=true reuses the merge
    assert infer_main([f"ckpt_dir={ckpt}", "merge_lora=true", f"'dataset.val=[{demo.val}]'".strip("'"),
                       f"result_dir={results / 'm'}", "max_new_tokens=6", "limit=2"]) == 0
    assert (merged_dir / "config.json").stat().st_mtime_ns == stamp


def test_infer_command_errors_are_one_line(capsys, tmp_path):
    assert infer_main(["load_dataset_config=true"]) == 2
    assert infer_main([f"ckpt_dir={tmp_path}"]) == 2
    assert infer_main(["batch_sise=3"]) == 2
    err = capsys.readouterr().err
    assert "needs ckpt_dir" in err and "not a vltrain checkpoint" in err and "batch_size" in err


def test_merge_refuses_8bit_models_and_full_checkpoints(tmp_path, demo):
    import yaml

    ckpt = make_lora_checkpoint(tmp_path / "run", demo)
    run_config = yaml.safe_load((ckpt / RUN_CONFIG).read_text())
    run_config["model"] |= {"name": "internvl-chat-v1_5-int8", "load_in_8bit": True}
    (ckpt / RUN_CONFIG).write_text(yaml.safe_dump(run_config))
    with pytest.raises(Exception, match="8-bit weights"):
        merge_lora(ckpt)
    with pytest.raises(Exception, match="not a LoRA checkpoint"):
        merge_lora(tmp_path / "run" / "base_model")
    assert not ckpt.with_name("checkpoint-1-merged").exists()


def test_ctrl_c_during_a_reply_stops_the_generation(tiny, monkeypatch, capsys):
    """A KeyboardInterrupt while the reply streams (where Ctrl-C lands in the chat loop) drops the turn and stops
    the generating thread long before max_new_tokens."""
    from vltrain.infer.chat import _stream_reply

    lengths = new_token_counts(tiny, monkeypatch)
    writes = []

    class Terminal:
        def write(self, text):
            writes.append(text)
            if len(writes) == 3:
                raise KeyboardInterrupt

        def flush(self):
            pass

    monkeypatch.setattr("sys.stdout", Terminal())
    gen = tiny.model.generation_config
    gen.max_new_tokens, gen.stop_strings = 400, None
    try:
        assert _stream_reply(tiny, Conversation("Tell me a long story."), {}) is None
    finally:
        gen.max_new_tokens = None
    assert len(lengths) == 1 and lengths[0] < 400


def test_stop_words_end_the_reply_where_they_occur(tiny):
    conversation = Conversation("Say something long.")
    full = tiny.generate([conversation], max_new_tokens=12)[0]
    word = full[len(full) // 2:len(full) // 2 + 3]
    assert len(full) > 6 and word.strip()
    cut = full[:full.index(word)].strip()
    assert tiny.generate([conversation], max_new_tokens=12, stop_words=[word]) == [cut]
    assert list(tiny.stream(conversation, max_new_tokens=12, stop_words=[word]))[-1] == cut

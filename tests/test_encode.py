"""Encoding: media tag placement, multi-image rounds, tile budget, the V1.5 merged block, video frames, and errors
that name file, line and field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from vltrain.config import DataConfig, DatasetConfig, ModelConfig, TrainConfig
from vltrain.data.encode import IGNORE_INDEX, Encoder, place_media_tags
from vltrain.data.records import Record, RecordError, read_records
from vltrain.data.templates import get_template
from vltrain.data.tiling import num_tiles

CTX = "<IMG_CONTEXT>"


def write_video(path: Path, frames: int = 16, size=(64, 48)) -> str:
    """An MPEG-4 clip whose frame i is uniformly grey at level 15 * i (so frame order is visible in the tiles)."""
    av = pytest.importorskip("av")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_image(Image.new("RGB", size, (15 * i,) * 3))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("media")
    files = {}
    for name, size, colour in (("square", (448, 448), "red"), ("wide", (1344, 448), "blue"),
                               ("big", (1792, 896), "green")):
        Image.new("RGB", size, colour).save(root / f"{name}.png")
        files[name] = str(root / f"{name}.png")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    files.update(broken=str(root / "broken.png"), missing=str(root / "missing.png"),
                 clip=write_video(root / "clip.mp4"), broken_clip=str(root / "broken.mp4"))
    return files


def rec(query: str, response: str = "ok", history=(), images=(), videos=(), system=None) -> Record:
    return Record(query=query, response=response, history=list(history), system=system, images=list(images),
                  videos=list(videos), objects=[], source="d.jsonl", line=3)


def shown(tokenizer, ids) -> str:
    """Decoded ids with each run of image context tokens written as `<IMG_CONTEXT>*n`."""
    text = tokenizer.decode(ids)
    return re.sub(f"(?:{CTX})+", lambda m: f"{CTX}*{len(m.group()) // len(CTX)}", text)


def trained_text(tokenizer, sample) -> list[str]:
    runs, current = [], []
    for token, label in zip(sample.input_ids.tolist(), sample.labels.tolist()):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return [tokenizer.decode(r) for r in runs + ([current] if current else [])]


def mean_rgb(tile: torch.Tensor) -> list[float]:
    return tile.mean(dim=(1, 2)).tolist()


# ---------------------------------------------------------------- tag placement


def test_untagged_media_go_to_the_start_of_the_first_round(media):
    record = rec("Q2", history=[("Q1", "A1")], images=[media["square"], media["wide"]], videos=[media["clip"]])
    assert place_media_tags(record) == [("<image>\n<image>\n<video>\nQ1", "A1"), ("Q2", "ok")]
    tagged = rec("Compare <image> and <image>", images=[media["square"]] * 2)
    assert place_media_tags(tagged) == [("Compare <image> and <image>", "ok")]
    partly = rec("and <image>", history=[("Q1", "A1")], images=[media["square"]] * 2)
    assert place_media_tags(partly) == [("<image>\nQ1", "A1"), ("and <image>", "ok")]


def test_images_stay_in_their_rounds_in_text_order(tokenizer, media):
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=8, max_length=4096, image_tokens_per_tile=2)
    record = rec("Now this one: <image>\nWhat changed?", "B", history=[("<image>\nWhat is it?", "A")],
                 images=[media["square"], media["wide"]])
    sample = encoder(record)
    assert shown(tokenizer, sample.input_ids) == (
        f"<|im_start|>user\n<img>{CTX}*2</img>\nWhat is it?<|im_end|><|im_start|>assistant\nA<|im_end|>"
        f"<|im_start|>user\nNow this one: <img>{CTX}*8</img>\nWhat changed?<|im_end|><|im_start|>assistant\n"
        "B<|im_end|>")
    # budget 8 // 2 = 4: the square is one tile, the 3:1 image 3 tiles + thumbnail
    assert sample.tiles_per_image == [1, 4]
    assert sample.pixel_values.shape == (5, 3, 448, 448)
    red, blue = mean_rgb(sample.pixel_values[0]), mean_rgb(sample.pixel_values[1])
    assert red[0] > red[2] and blue[2] > blue[0]
    assert trained_text(tokenizer, sample) == ["A<|im_end|>", "B<|im_end|>"]


def test_replacement_adds_no_newline(tokenizer, media):
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=1, max_length=4096, image_tokens_per_tile=1)
    inline = shown(tokenizer, encoder(rec("Look at <image> please", images=[media["square"]])).input_ids)
    assert f"user\nLook at <img>{CTX}*1</img> please<|im_end|>" in inline
    untagged = shown(tokenizer, encoder(rec("Q", images=[media["square"]])).input_ids)
    assert f"user\n<img>{CTX}*1</img>\nQ<|im_end|>" in untagged


COMBOS = [("internlm2", "internlm2-chat"), ("qwen2", "Hermes-2"), ("phi3", "phi3-chat")]


def official_ids(tokenizer, template_name: str, text: str) -> list[int]:
    """Ids of the whole expected text, as the official training tokenizes a conversation."""
    template = get_template(template_name)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if template.bos else []) + ids


@pytest.mark.parametrize("folder,template_name", COMBOS)
def test_multi_image_rounds_match_the_official_text(real_tokenizer, media, folder, template_name):
    tok = real_tokenizer(folder, template_name)
    t = get_template(template_name)
    encoder = Encoder(tok, template_name, system="Be brief.", max_tiles=12, max_length=8192, image_tokens_per_tile=4)
    record = rec("Image-2: <image>\nAnd now?", "Blue.", history=[("Image-1: <image>\nColour?", "Red.")],
                 images=[media["square"], media["big"]])
    sample = encoder(record)
    block = [f"<img>{CTX * 4 * n}</img>" for n in (1, num_tiles(1792, 896, 6))]  # budget 12 // 2 = 6
    text = (f"{t.system_prefix}Be brief.{t.stop_token}"
            f"{t.user_prefix}Image-1: {block[0]}\nColour?{t.stop_token}{t.assistant_prefix}Red.{t.stop_token}"
            f"{t.user_prefix}Image-2: {block[1]}\nAnd now?{t.stop_token}{t.assistant_prefix}Blue.{t.stop_token}")
    assert sample.input_ids.tolist() == official_ids(tok, template_name, text)
    assert sample.tiles_per_image == [1, 3]
    assert [s.strip() for s in trained_text(tok, sample)] == [f"Red.{t.stop_token}", f"Blue.{t.stop_token}"]


# ---------------------------------------------------------------- tile budget


@pytest.mark.parametrize("split,with_video,budget", [(True, False, 4), (False, False, 8), (True, True, 1),
                                                     (False, True, 1)])
def test_tile_budget(tokenizer, media, split, with_video, budget):
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=8, max_length=8192, image_tokens_per_tile=1,
                      split_tile_budget=split, video_frames=2)
    record = rec("Q", images=[media["big"], media["big"]], videos=[media["clip"]] if with_video else [])
    sample = encoder(record)
    per_image = num_tiles(1792, 896, budget)  # 2:1 image: 2x1 + thumbnail with 4 tiles, 4x2 + thumbnail with 8
    assert per_image == {4: 3, 8: 9, 1: 1}[budget]
    assert sample.tiles_per_image == [per_image] * 2 + ([1, 1] if with_video else [])
    assert sample.pixel_values.shape[0] == sum(sample.tiles_per_image)
    assert sample.input_ids.tolist().count(tokenizer.convert_tokens_to_ids(CTX)) == sum(sample.tiles_per_image)


def test_split_budget_never_drops_below_one_tile(tokenizer, media):
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=2, max_length=8192, image_tokens_per_tile=1)
    assert encoder(rec("Q", images=[media["wide"]] * 3)).tiles_per_image == [1, 1, 1]  # max(1, 2 // 3)


# ---------------------------------------------------------------- V1.5: one merged block


def test_merged_block_holds_every_tile_at_the_first_tag(tokenizer, media):
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=8, max_length=4096, image_tokens_per_tile=2,
                      merge_image_blocks=True)
    images = [media["square"], media["wide"]]
    untagged = encoder(rec("Compare them.", images=images))
    assert shown(tokenizer, untagged.input_ids).startswith(f"<|im_start|>user\n<img>{CTX}*10</img>\nCompare them.")
    assert untagged.tiles_per_image == [1, 4] and untagged.pixel_values.shape[0] == 5
    for query in ("<image>\n<image>\nCompare them.", "<image> <image>\nCompare them.", "<image>\nCompare them."):
        assert torch.equal(encoder(rec(query, images=images)).input_ids, untagged.input_ids), query
    later = shown(tokenizer, encoder(rec("Then: <image><image> ok?", history=[("hi", "yo")], images=images)).input_ids)
    assert f"user\nhi<|im_end|><|im_start|>assistant\nyo<|im_end|><|im_start|>user\nThen: <img>{CTX}*10</img> ok?" \
        in later


@pytest.mark.parametrize("folder,template_name", [("internlm2", "internlm2-chat"), ("phi3", "phi3-chat")])
def test_merged_block_matches_the_v1_5_model_card_text(real_tokenizer, media, folder, template_name):
    tok = real_tokenizer(folder, template_name)
    t = get_template(template_name)
    encoder = Encoder(tok, template_name, system="", max_tiles=12, max_length=8192, image_tokens_per_tile=4,
                      merge_image_blocks=True)
    sample = encoder(rec("<image>\n<image>\nDescribe the two images.", "Two.", images=[media["wide"], media["big"]]))
    tiles = num_tiles(1344, 448, 6) + num_tiles(1792, 896, 6)
    text = (f"{t.user_prefix}<img>{CTX * 4 * tiles}</img>\nDescribe the two images.{t.stop_token}"
            f"{t.assistant_prefix}Two.{t.stop_token}")
    assert sample.input_ids.tolist() == official_ids(tok, template_name, text)


@pytest.mark.parametrize("record_args,where", [
    ({"query": "<image>\nand\n<image>\nQ"}, r"query: text between <image> tags: "),
    ({"query": "Q <image>"}, r"query: text between <image> tags \(1 untagged image\(s\) placed at the start of "),
    ({"query": "<image>\nQ2", "history": [("<image>\nQ1", "A1")]},
     r"query: <image> tags in more than one round \(history\[0\]\[0\], query\)"),
    ({"query": "then <image>", "history": [("Q1", "A1")]}, r"query: <image> tags in more than one round"),
    ({"query": "Q", "videos": ["clip"]}, r"videos: V1.5 model types \(model.merge_image_blocks=true\) take no video"),
])
def test_merged_block_errors(tokenizer, media, record_args, where):
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=8, max_length=4096, merge_image_blocks=True)
    args = dict(record_args)
    videos = [media[v] for v in args.pop("videos", [])]
    with pytest.raises(RecordError, match=rf"^d\.jsonl:3: {where}"):
        encoder(rec(**args, images=[media["square"]] * 2, videos=videos))


# ---------------------------------------------------------------- videos


def frame_lines(n: int, tokens: int = 1) -> str:
    return "\n".join(f"Frame{i}: <img>{CTX}*{tokens}</img>" for i in range(1, n + 1))


def test_video_becomes_frame_lines(tokenizer, media):
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=12, max_length=4096, image_tokens_per_tile=1,
                      video_frames=4)
    sample = encoder(rec("What happens?", videos=[media["clip"]]))
    assert shown(tokenizer, sample.input_ids) == (
        f"<|im_start|>user\n{frame_lines(4)}\nWhat happens?<|im_end|><|im_start|>assistant\nok<|im_end|>")
    assert sample.tiles_per_image == [1, 1, 1, 1]
    assert sample.pixel_values.shape == (4, 3, 448, 448)
    brightness = [sum(mean_rgb(tile)) for tile in sample.pixel_values]
    assert brightness == sorted(brightness) and brightness[0] < brightness[-1]  # frames in time order

    inline = shown(tokenizer, encoder(rec("Watch <video> now", videos=[media["clip"]])).input_ids)
    assert f"user\nWatch {frame_lines(4)} now<|im_end|>" in inline  # no newline after the last frame


def test_images_and_videos_follow_the_text_order(tokenizer, media):
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=12, max_length=4096, image_tokens_per_tile=1,
                      video_frames=2)
    untagged = encoder(rec("Q", images=[media["square"]], videos=[media["clip"]]))
    assert shown(tokenizer, untagged.input_ids).startswith(f"<|im_start|>user\n<img>{CTX}*1</img>\n{frame_lines(2)}\nQ")
    assert untagged.tiles_per_image == [1, 1, 1]  # one tile per image in a sample with a video
    assert mean_rgb(untagged.pixel_values[0])[0] > 2  # the red image first
    video_first = encoder(rec("<video>\nand <image>\nQ", images=[media["square"]], videos=[media["clip"]]))
    assert shown(tokenizer, video_first.input_ids).startswith(
        f"<|im_start|>user\n{frame_lines(2)}\nand <img>{CTX}*1</img>\nQ")
    assert mean_rgb(video_first.pixel_values[2])[0] > 2 and mean_rgb(video_first.pixel_values[0])[0] < 0


def test_video_matches_the_model_card_text(real_tokenizer, media):
    tok = real_tokenizer("qwen2", "Hermes-2")  # InternVL2-1B
    encoder = Encoder(tok, "Hermes-2", system="", max_tiles=12, max_length=8192, image_tokens_per_tile=4,
                      video_frames=8)
    sample = encoder(rec("What is the red panda doing?", "Eating.", videos=[media["clip"]]))
    prefix = "".join(f"Frame{i + 1}: <img>{CTX * 4}</img>\n" for i in range(8))  # the model card's video prompt
    text = f"<|im_start|>user\n{prefix}What is the red panda doing?<|im_end|><|im_start|>assistant\nEating.<|im_end|>"
    assert sample.input_ids.tolist() == official_ids(tok, "Hermes-2", text)
    assert sample.tiles_per_image == [1] * 8


# ---------------------------------------------------------------- system, generation, config


def test_record_system_overrides_and_empty_system_removes(tokenizer):
    encoder = Encoder(tokenizer, "Hermes-2", system=None, max_tiles=1, max_length=512)
    default = tokenizer.decode(encoder(rec("hi", "yo")).input_ids)
    assert default.startswith("<|im_start|>system\n你是由上海人工智能实验室")  # the template's official default
    own = tokenizer.decode(encoder(rec("hi", "yo", system="Be brief.")).input_ids)
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nhi")
    none = tokenizer.decode(encoder(rec("hi", "yo", system="")).input_ids)
    assert none.startswith("<|im_start|>user\nhi")


def test_thinking_makes_the_thinking_prompt_the_default_system(real_tokenizer):
    from vltrain.data.templates import THINKING_SYSTEM

    tokenizer = real_tokenizer("qwen3", "internvl2_5")
    thinking = Encoder(tokenizer, "internvl2_5", system=None, max_tiles=1, max_length=4096, thinking=True)
    plain = Encoder(tokenizer, "internvl2_5", system=None, max_tiles=1, max_length=4096)
    record = rec("12*12?", "<think>\n12*12 = 144.\n</think>\n\n144.")
    text = tokenizer.decode(thinking(record).input_ids)
    assert text.startswith(f"<|im_start|>system\n{THINKING_SYSTEM}<|im_end|>\n<|im_start|>user\n12*12?")
    assert tokenizer.decode(plain(record).input_ids).startswith("<|im_start|>system\n你是书生·万象")
    assert trained_text(tokenizer, thinking(record)) == ["<think>\n12*12 = 144.\n</think>\n\n144.<|im_end|>"]
    # a record's own system still wins
    own = tokenizer.decode(thinking(rec("q", "a", system="Be brief.")).input_ids)
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    with pytest.raises(ValueError, match="template 'Hermes-2' has no thinking mode"):
        Encoder(tokenizer, "Hermes-2", system=None, max_tiles=1, max_length=512, thinking=True)


def test_generation_prompt_ends_with_assistant_header(tokenizer, media):
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=1, max_length=512)
    sample = encoder(rec("hi", "yo", images=[media["square"]]), for_generation=True)
    assert tokenizer.decode(sample.input_ids).endswith("hi<|im_end|><|im_start|>assistant\n")
    assert all(label == IGNORE_INDEX for label in sample.labels.tolist())
    assert sample.tiles_per_image == [1]


def test_from_config_carries_every_option(tokenizer, tmp_path):
    thinking = Encoder.from_config(TrainConfig(model=ModelConfig(init="random", template="internvl2_5", thinking=True),
                                               dataset=DatasetConfig(train=["x.jsonl"])), tokenizer, 448, 256)
    assert thinking.default_system == get_template("internvl2_5").thinking_system
    cfg = TrainConfig(
        model=ModelConfig(init="random", template="internlm2-chat", system="S", max_tiles=6, merge_image_blocks=True),
        dataset=DatasetConfig(train=["x.jsonl"]),
        data=DataConfig(max_length=999, split_tile_budget=False, video_frames=3, box_style="swift",
                        media_cache=str(tmp_path), url_timeout=3.5, url_retries=0, url_max_bytes=1234),
    )
    encoder = Encoder.from_config(cfg, tokenizer, tile_size=224, image_tokens_per_tile=64)
    assert (encoder.template.name, encoder.system, encoder.max_tiles, encoder.max_length) == (
        "internlm2-chat", "S", 6, 999)
    assert (encoder.tile_size, encoder.image_tokens_per_tile, encoder.merge_image_blocks, encoder.split_tile_budget,
            encoder.video_frames, encoder.box_style) == (224, 64, True, False, 3, "swift")
    assert (Path(encoder.media.cache_dir), encoder.media.timeout, encoder.media.retries, encoder.media.max_bytes) == (
        tmp_path, 3.5, 0, 1234)


# ---------------------------------------------------------------- errors: file:line: field: message


@pytest.mark.parametrize("make,where", [
    (lambda m: rec("<image> and <image>", images=[m["square"]]), r"images: 2 <image> tags in the queries but 1 image$"),
    (lambda m: rec("<video>\nQ"), r"videos: 1 <video> tag in the queries but 0 videos$"),
    (lambda m: rec("q", "<image>"), r"response: <image> in responses: media tags belong in queries"),
    (lambda m: rec("q", history=[("q0", "see <video>")]), r"history\[0\]\[1\]: <video> in responses"),
    (lambda m: rec(f"q {CTX}"), r"query: <IMG_CONTEXT> is reserved"),
    (lambda m: rec("q", history=[(f"{CTX}", "a")]), r"history\[0\]\[0\]: <IMG_CONTEXT> is reserved"),
    (lambda m: rec("q", images=[m["square"], m["missing"]]), r"images\[1\]: .*missing\.png: file not found"),
    (lambda m: rec("q", images=[m["broken"]]), r"images\[0\]: .*broken\.png: not an image PIL can read"),
    (lambda m: rec("q", videos=[m["broken_clip"]]), r"videos\[0\]: .*broken\.mp4: cannot read the video"),
    (lambda m: rec("q", videos=[m["clip"], m["missing"]]), r"videos\[1\]: .*missing\.png: file not found"),
])
def test_errors_name_file_line_and_field(tokenizer, media, make, where):
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=1, max_length=4096, video_frames=2)
    with pytest.raises(RecordError, match=rf"^d\.jsonl:3: {where}"):
        encoder(make(media))


def test_video_shorter_than_the_frame_count(tokenizer, media):
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=1, max_length=4096, video_frames=32)
    with pytest.raises(RecordError, match=r"^d\.jsonl:3: videos\[0\]: .*clip\.mp4: the video has 16 frames, fewer"):
        encoder(rec("q", videos=[media["clip"]]))


def test_too_long_after_image_expansion(tokenizer, media):
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=12, max_length=64, image_tokens_per_tile=256)
    with pytest.raises(RecordError, match=r"^d\.jsonl:3: length: \d+ tokens after image expansion exceed "
                                          r"data\.max_length=64"):
        encoder(rec("<image>\nlong", images=[media["wide"]]))
    # generation prompts are not limited (the engine decides how much context to keep)
    encoder(rec("<image>\nlong", images=[media["wide"]]), for_generation=True)


# ---------------------------------------------------------------- from a data file


def test_rows_of_every_kind_encode_from_a_file(tokenizer, media, tmp_path):
    Image.new("RGB", (640, 480), "white").save(tmp_path / "scene.png")
    rows = [
        {"query": "Find <ref-object>", "response": "<bbox>", "images": ["scene.png"],
         "objects": [{"caption": "the cup", "bbox": [160, 120, 480, 360], "bbox_type": "real"}]},
        {"query": f"<img>{media['square']}</img>\nWhat colour?", "response": "Red."},
        {"id": 7, "video": media["clip"], "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                                            {"from": "gpt", "value": "It brightens."}]},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    grounding, inline, video = read_records(tmp_path / "d.jsonl")
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=4, max_length=4096, image_tokens_per_tile=1,
                      video_frames=2)
    assert shown(tokenizer, encoder(grounding).input_ids) == (
        f"<|im_start|>user\n<img>{CTX}*1</img>\nFind <ref>the cup</ref><|im_end|><|im_start|>assistant\n"
        "<box>[[250, 250, 750, 750]]</box><|im_end|>")
    assert f"user\n<img>{CTX}*1</img>\nWhat colour?<|im_end|>" in shown(tokenizer, encoder(inline).input_ids)
    sample = encoder(video)
    assert f"user\n{frame_lines(2)}\nWhat happens?<|im_end|>" in shown(tokenizer, sample.input_ids)
    assert sample.tiles_per_image == [1, 1]


def test_errors_name_the_fields_as_the_row_writes_them(tokenizer, media, tmp_path):
    """Problems found at encoding name `messages[k].content`, `conversations[k].value`, `image`, ... not the
    ms-swift fields the encoder works with; rows of a compact .json array add their index in the array."""
    rows = [
        {"messages": [{"role": "user", "content": "Find <ref-object> and <ref-object>"},
                      {"role": "assistant", "content": "<bbox>"}],
         "images": [media["square"]], "objects": [{"caption": "c", "bbox": [0, 0, 10, 10]}]},
        {"image": media["broken"], "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                     {"from": "gpt", "value": "Red."}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "yo"}, {"role": "user", "content": f"<img>{media['broken']}</img>"},
                      {"role": "assistant", "content": "ok"}]},
        {"conversations": [{"from": "human", "value": f"q {CTX}"}, {"from": "gpt", "value": "a"}]},
    ]
    expected = ["messages[0].content: <ref-object> #2 has no object", "image: ", "messages[3].content: ",
                "conversations[0].value: <IMG_CONTEXT> is reserved"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=1, max_length=4096)
    for line, (record, where) in enumerate(zip(read_records(tmp_path / "d.jsonl"), expected), start=1):
        with pytest.raises(RecordError) as e:
            encoder(record)
        assert str(e.value).startswith(f"{tmp_path / 'd.jsonl'}:{line}: {where}"), str(e.value)
        assert e.value.row == line

    # V1.5: the rounds named in the message are the row's own turns.
    merged = Encoder(tokenizer, "Hermes-2", system="", max_tiles=1, max_length=4096, merge_image_blocks=True)
    two_rounds = {"messages": [{"role": "user", "content": "<image>\nA?"}, {"role": "assistant", "content": "a"},
                               {"role": "user", "content": "<image>\nB?"}, {"role": "assistant", "content": "b"}],
                  "images": [media["square"]] * 2}
    (tmp_path / "m.jsonl").write_text(json.dumps(two_rounds) + "\n", encoding="utf-8")
    with pytest.raises(RecordError, match=re.escape("m.jsonl:1: messages[2].content: <image> tags in more than one "
                                                    "round (messages[0].content, messages[2].content)")):
        merged(read_records(tmp_path / "m.jsonl")[0])

    # A compact .json array: every row on line 1, told apart by its index.
    (tmp_path / "d.json").write_text(json.dumps([{"query": "q", "response": "a"}, rows[1], rows[0]]),
                                     encoding="utf-8")
    _, official, messages = read_records(tmp_path / "d.json")
    with pytest.raises(RecordError, match=re.escape("d.json:1: [1].image: ")):
        encoder(official)
    with pytest.raises(RecordError, match=re.escape("d.json:1: [2].messages[0].content: <ref-object> #2")):
        encoder(messages)
    assert (official.row, messages.row) == (2, 3)

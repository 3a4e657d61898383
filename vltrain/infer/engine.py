"""The inference engine: conversations and their media -> replies, batched with left padding, or streamed.

A `Conversation` is what a user holds (query, history, system, images, videos, grounding objects); the engine
turns it into a record with the training encoder, so a generation prompt is exactly the training rendering ended
by the assistant header. Replies are decoded with the special tokens kept (`<ref>`, `<box>` are special tokens
of every InternVL tokenizer), cut at the template's stop token, without the template's response prefix (harmony's
`<|channel|>final<|message|>`, which the generation prompt leaves to the model, as the official `chat()` does).
Decoding follows `model.generation_config` (greedy by default; sampling, `max_new_tokens`, `stop_words`); on a GPU
a model held in fp32 generates under autocast in the compute dtype. The trainer's held-out scoring
(`answer_records`), the Python API, the chat loop, evaluation and the server (`vltrain.serve`: `encode`,
`generate_ids`, `decode`) all call this module.
"""

from __future__ import annotations

import base64
import copy
import io
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from vltrain.data.collator import collate
from vltrain.data.encode import Encoder, Sample, place_media_tags
from vltrain.data.grounding import fill_placeholders
from vltrain.data.records import Record, parse_row, round_field
from vltrain.data.templates import reply_text
from vltrain.model.generation import stop_token_id
from vltrain.model.placement import resolve_dtype

DEFAULT_MAX_NEW_TOKENS = 2048  # ms-swift's infer default when the generation config sets none


@dataclass
class Conversation:
    """One conversation to answer: `query` after `history` rounds, with the media of the whole conversation.

    `images`: paths (relative to `base_dir`, default the working directory), URLs, base64 / data URIs or PIL
    images; `<image>` tags in the queries place them (untagged ones go to the start of the first round), inline
    `<img>path</img>` works as in records. `objects`: grounding objects as records give them, used by the
    `<ref-object>` / `<bbox>` placeholders of the queries.
    """

    query: str
    history: list[tuple[str, str]] = field(default_factory=list)
    system: str | None = None
    images: list = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    objects: list | str | None = None

    def to_record(self, base_dir: Path | None = None) -> Record:
        """The record the encoder reads (its response is a stand-in: generation drops it); checked as a data
        file row is, so a bad input is one RecordError naming the field."""
        row = {"query": self.query, "response": "-", "history": [list(p) for p in self.history],
               "system": self.system, "images": [_image_ref(im) for im in self.images], "videos": list(self.videos)}
        if self.objects:
            row["objects"] = self.objects
        if not row["images"] and "<img>" in "".join([self.query, *(q for q, _ in self.history)]):
            row.pop("images")  # inline <img> may not be combined with an `images` field, even an empty one
        if not row["videos"]:
            row.pop("videos")
        return parse_row(row, "<conversation>", 0, Path(base_dir or Path.cwd()))

    @classmethod
    def from_record(cls, record: Record) -> Conversation:
        """The conversation of a record's final query (its reference response left out)."""
        return _RecordConversation(record)


class _RecordConversation(Conversation):
    """A record as a conversation: encoded as it is (its placeholders filled from its own objects)."""

    def __init__(self, record: Record):
        super().__init__(query=record.query, history=list(record.history), system=record.system,
                         images=list(record.images), videos=list(record.videos), objects=record.objects)
        self.record = record

    def to_record(self, base_dir: Path | None = None) -> Record:
        return self.record


def _image_ref(image) -> str:
    """A PIL image becomes a PNG data URI (what the media loader reads); references pass through."""
    if isinstance(image, (str, Path)):
        return str(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def reference_text(record: Record, encoder: Encoder) -> str:
    """A record's response as the model was trained to write it: grounding placeholders filled (`<ref>...</ref>`,
    `<box>[[...]]</box>` scaled to the images), the template's whitespace rule applied."""
    response = record.response
    if record.objects:
        rounds = place_media_tags(record)
        fields = [(round_field(i, len(rounds), part), text) for i, pair in enumerate(rounds)
                  for part, text in enumerate(pair)]
        sizes = [encoder._load_image(record, i).size for i in range(len(record.images))]  # errors name the image
        response = fill_placeholders(record, fields, sizes, encoder.box_style)[-1]
    return response.strip()


# ---- generation ---------------------------------------------------------------------------------------------


class Engine:
    """Replies of one model with one encoder (template, system, tile budget and geometry).

    `generation_config` None: the model's own (`model.generation_config`), read at every call so that changing
    it (max_new_tokens, do_sample, temperature, top_p, stop_strings) takes effect.
    """

    def __init__(self, model, encoder: Encoder, base_dir: Path | None = None):
        self.model = model
        self.encoder = encoder
        self.tokenizer = encoder.tokenizer
        self.base_dir = base_dir
        self.stop_id = stop_token_id(self.tokenizer, encoder.template.name)

    def generation_kwargs(self, generation_config=None, stop_words: list[str] | None = None,
                          **overrides) -> dict:
        """Keyword arguments of `model.generate`: the config (copied), stopping at the template's stop token."""
        gen = copy.deepcopy(generation_config or self.model.generation_config)
        # Set on every call: transformers' Trainer re-aligns generation_config.eos_token_id with the tokenizer's
        # EOS (`</s>` for InternLM2), which is not where InternVL's templates stop.
        gen.eos_token_id = self.stop_id
        gen.pad_token_id = self.tokenizer.pad_token_id
        if gen.max_new_tokens is None:
            gen.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        for key, value in overrides.items():
            setattr(gen, key, value)
        if gen.do_sample is False:  # greedy: sampling knobs would only raise warnings
            gen.temperature, gen.top_p, gen.top_k = None, None, None
        words = list(stop_words or []) + list(gen.stop_strings or [])
        gen.stop_strings = words or None
        kwargs = {"generation_config": gen}
        if words:
            kwargs["tokenizer"] = self.tokenizer
        return kwargs

    def encode(self, conversation: Conversation) -> Sample:
        """The generation prompt of a conversation (the training rendering ended by the assistant header); a bad
        input is a RecordError naming the field."""
        return self.encoder(conversation.to_record(self.base_dir), for_generation=True)

    def _batch(self, conversations: list[Conversation]) -> dict[str, torch.Tensor]:
        return self.collate([self.encode(c) for c in conversations])

    def collate(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """Encoded prompts -> one left-padded batch on the model's input device."""
        batch = collate(samples, self.tokenizer.pad_token_id, padding_side="left")
        batch.pop("labels")
        batch.pop("tiles_per_sample")
        device = _input_device(self.model)
        batch = {k: v.to(device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(_float_dtype(self.model))
        return batch

    def decode(self, new_tokens: list[int], stop_words: list[str] | None = None) -> str:
        """The reply of generated ids: cut at the stop token (and at a stop word), special tokens kept."""
        if self.stop_id in new_tokens:
            new_tokens = new_tokens[:new_tokens.index(self.stop_id)]
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=False)
        for word in stop_words or []:
            if word and word in text:
                text = text[:text.index(word)]
        return reply_text(self.encoder.template, text).rstrip()

    @torch.no_grad()
    def generate(self, conversations: list[Conversation], batch_size: int = 8, generation_config=None,
                 stop_words: list[str] | None = None, show_progress: bool = False, synced_gpus: bool = False,
                 **overrides) -> list[str]:
        """One reply per conversation, `batch_size` at a time, left padded (equal to one-by-one replies).
        `overrides`: generation config fields (`max_new_tokens`, `do_sample`, ...)."""
        kwargs = self.generation_kwargs(generation_config, stop_words, **overrides)
        words = kwargs["generation_config"].stop_strings
        starts = range(0, len(conversations), batch_size)
        if show_progress:
            from vltrain.progress import progress

            starts = progress(starts, desc="generating", unit="batch")
        replies = []
        for start in starts:
            samples = [self.encode(c) for c in conversations[start:start + batch_size]]
            new = self.generate_ids(samples, kwargs, synced_gpus=synced_gpus)
            replies += [self.decode(ids, words) for ids in new]
        return replies

    @torch.no_grad()
    def generate_ids(self, samples: list[Sample], generation_kwargs: dict, **extra) -> list[list[int]]:
        """The new token ids of each encoded prompt, generated in one left-padded batch. `generation_kwargs`:
        what `generation_kwargs` returns; `extra`: more `model.generate` arguments (`stopping_criteria`, ...).
        Rows that end early are padded after their end (`decode` cuts at the stop token)."""
        with _InferenceMode(self.model):
            batch = self.collate(samples)
            out = self.model.generate(**batch, **generation_kwargs, **extra)
        return out[:, batch["input_ids"].shape[1]:].tolist()

    def stream(self, conversation: Conversation, generation_config=None, stop_words: list[str] | None = None,
               **overrides) -> Iterator[str]:
        """The reply so far, after every token that completes text; the last one equals `generate`'s reply.
        Closing the iterator (or an exception in the consumer, such as Ctrl-C) stops the generation."""
        kwargs = self.generation_kwargs(generation_config, stop_words, **overrides)
        words = kwargs["generation_config"].stop_strings
        batch = self._batch([conversation])
        tokens: queue.Queue = queue.Queue()
        stop = threading.Event()
        failure: list[BaseException] = []

        def run():
            try:
                with torch.no_grad(), _InferenceMode(self.model):
                    self.model.generate(**batch, **kwargs, streamer=_QueueStreamer(tokens),
                                        stopping_criteria=StoppingCriteriaList([_Interrupted(stop)]))
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer's thread
                failure.append(e)
            finally:
                tokens.put(None)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        ids: list[int] = []
        shown = ""
        try:
            while (chunk := tokens.get()) is not None:
                ids += chunk
                if self.stop_id in ids:
                    continue
                text = self.tokenizer.decode(ids, skip_special_tokens=False)
                if text.endswith("\ufffd"):  # a character split across tokens: wait for its other bytes
                    continue
                text = self.decode(ids, words) if words else reply_text(self.encoder.template, text.lstrip())
                if text != shown:
                    shown = text
                    yield text
            if failure:
                raise failure[0]
            final = self.decode(ids, words)
            if final != shown:
                yield final
        finally:
            stop.set()
            worker.join()


class _QueueStreamer(BaseStreamer):
    """Hands each generated token's ids to a queue (the prompt, which `generate` puts first, is skipped)."""

    def __init__(self, tokens: queue.Queue):
        self.tokens = tokens
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.tokens.put(value.reshape(-1).tolist())

    def end(self):
        pass


class _Interrupted(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _input_device(model) -> torch.device:
    embeddings = model.get_input_embeddings()
    return embeddings.weight.device


def _float_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


class _InferenceMode:
    """Eval mode for the call (training mode restored after); on a GPU, a model held in fp32 (full fine-tuning's
    master weights) generates under autocast in the compute dtype `model.dtype=auto` picks on that GPU (bf16 where it
    is native, else fp16)."""

    def __init__(self, model):
        self.model = model
        self.autocast = None

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        device = _input_device(self.model)
        if device.type == "cuda" and _float_dtype(self.model) == torch.float32:
            self.autocast = torch.autocast("cuda", dtype=resolve_dtype("auto"))
            self.autocast.__enter__()
        return self

    def __exit__(self, *exc):
        if self.autocast is not None:
            self.autocast.__exit__(*exc)
        self.model.train(self.was_training)
        return False


# ---- the trainer's held-out scoring --------------------------------------------------------------------------


@torch.no_grad()
def answer_records(model, encoder: Encoder, records: list[Record], max_new_tokens: int = 32,
                   batch_size: int = 8, synced_gpus: bool = False) -> list[str]:
    """The model's greedy answer to each record's final query (its history and images as context). `synced_gpus`:
    keep stepping until every process is done (DeepSpeed ZeRO-3, where each step gathers weights collectively)."""
    engine = Engine(model, encoder)
    return engine.generate([Conversation.from_record(r) for r in records], batch_size=batch_size,
                           max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=synced_gpus)


def reference_answers(encoder: Encoder, records: list[Record]) -> list[str]:
    """What exact match compares answers with: each record's response with its placeholders filled."""
    return [reference_text(r, encoder) for r in records]


def exact_match(answers: list[str], references: list[str]) -> float:
    """Fraction of answers equal to the reference after stripping surrounding whitespace."""
    if not references:
        return 0.0
    return sum(a.strip() == r.strip() for a, r in zip(answers, references)) / len(references)

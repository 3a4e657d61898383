"""Tokenizer loading without remote code, and the nine tokens InternVL adds to every LLM tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as sp_model_pb2
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.models.auto.tokenization_auto import tokenizer_class_from_name
from transformers.tokenization_utils_sentencepiece import (
    SentencePieceBackend,
    SentencePieceExtractor,
)

from vltrain.data.templates import get_template

# Official order (InternVL's finetune script appends them in this order, so the ids follow it).
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
INTERNVL_TOKENS = ("<img>", "</img>", IMAGE_CONTEXT_TOKEN, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")

SPIECE_UNDERLINE = "▁"


class SlowLlamaTokenizer(SentencePieceBackend):
    """transformers 4.x's sentencepiece `LlamaTokenizer` with `legacy=False`, on v5's sentencepiece backend.

    The official InternVL training loads Phi-3 with `use_fast=False`, i.e. this tokenizer. Its ids differ from
    the checkpoint's tokenizer.json around special tokens: one `▁` is put before the whole text (so a text that
    starts with `<|system|>` begins with the piece `▁`, id 29871 for Phi-3), and none after special tokens.
    Text between special tokens is encoded by sentencepiece without a dummy prefix (the backend's `legacy=False`).
    """

    def tokenize(self, text: str, **kwargs) -> list[str]:
        if not text:
            return []
        tokens = super().tokenize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "), **kwargs)
        # 4.x drops the leading "▁" only before the named/registered special tokens (bos, eos, unk, pad and
        # tokens added with special_tokens=True), not before Phi-3's own role tokens.
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
            tokens = tokens[1:]
        return tokens

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # sentencepiece turns "▁" and byte pieces (<0x0A>) back into text; added tokens stay as they are. The "▁"
        # that `tokenize` put before the text (after BOS, if any) is dropped again.
        tokens = list(tokens)
        first = 1 if tokens[:1] == [self.bos_token] else 0
        if first < len(tokens) and tokens[first].startswith(SPIECE_UNDERLINE):
            tokens[first] = tokens[first][1:]
        text, run = [], []
        for token in tokens:
            if token in self._added_tokens_encoder:
                text += [self.sp_model.decode(run), token]
                run = []
            else:
                run.append(token)
        return "".join(text + [self.sp_model.decode(run)])


def load_tokenizer(path: str | Path, template: str | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a checkpoint folder; never runs remote code.

    - `template="phi3-chat"`: `SlowLlamaTokenizer` from tokenizer.model, reproducing the ids the official training
      saw (the whole conversation tokenized at once by the slow sentencepiece tokenizer).
    - a folder with tokenizer.json: that file as a fast tokenizer. Its tokenizer_config may name a remote-code class
      (InternLM2's `InternLM2Tokenizer`); the file gives the same ids without it. `add_bos_token` from the config is
      honoured, as transformers 4.x did.
    - tokenizer.model with a config naming a class transformers lacks (InternLM2 checkpoints as published):
      `sentencepiece_fast_tokenizer` builds the equivalent fast tokenizer in code.
    - otherwise the class named in tokenizer_config.json (e.g. `Qwen2Tokenizer` from vocab.json + merges.txt).

    The InternVL tokens are not added here: see `add_internvl_tokens`.
    """
    path = Path(path)
    if template is not None:
        get_template(template)  # an unknown name fails here, with the close match
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: tokenizer folder not found")
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}

    if template == "phi3-chat":
        if not (path / "tokenizer.model").is_file():
            raise ValueError(
                f"{path}: phi3-chat needs tokenizer.model: the official encoding is the slow sentencepiece "
                "tokenizer's, which tokenizer.json does not reproduce"
            )
        return SlowLlamaTokenizer.from_pretrained(
            path,
            legacy=False,
            special_tokens_pattern="bos" if config.get("add_bos_token", True) else "none",
        )

    if (path / "tokenizer.json").is_file():
        kwargs = {key: config[key] for key in ("add_bos_token", "add_eos_token") if key in config}
        return PreTrainedTokenizerFast.from_pretrained(path, **kwargs)
    cls = _transformers_class(config)
    if cls is None and config.get("tokenizer_class"):
        if (path / "tokenizer.model").is_file():
            return sentencepiece_fast_tokenizer(path, config)
        raise ValueError(
            f"{config_file}: tokenizer_class '{config['tokenizer_class']}' is remote code, which vltrain does not "
            "run, and the folder has neither tokenizer.json nor tokenizer.model to build it from"
        )
    if not any(_is_tokenizer_source(p.name) for p in path.iterdir() if p.is_file()):
        raise FileNotFoundError(f"{path}: no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...)")
    if cls is not None:
        return cls.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def _is_tokenizer_source(name: str) -> bool:
    """A file a tokenizer can be built from (tokenizer_config.json only names the class)."""
    return (name.startswith(("tokenizer", "vocab")) and name != "tokenizer_config.json") or name.endswith(
        (".model", ".tiktoken", "merges.txt"))


def _transformers_class(config: dict) -> type | None:
    """The tokenizer class the config names, when transformers has one of that name (an `auto_map` to remote
    code is never followed)."""
    name = config.get("tokenizer_class")
    if not name:
        return None
    return tokenizer_class_from_name(name) or tokenizer_class_from_name(name.removesuffix("Fast"))


def sentencepiece_fast_tokenizer(path: Path, config: dict) -> PreTrainedTokenizerFast:
    """A fast tokenizer equal to InternLM2's remote-code `InternLM2Tokenizer`, built from tokenizer.model.

    The slow tokenizer splits the text on its added tokens and encodes every piece in between with sentencepiece
    (BPE, byte fallback, no dummy prefix, no normalisation), after a BOS. Here the same is expressed with
    `tokenizers`: the vocab and merges extracted from the sentencepiece model, spaces turned into "▁" without a
    prefix, sentencepiece's user-defined pieces as (non-special) added tokens, and every `added_tokens_decoder`
    entry of the config as a special token at its stated id. InternLM2-chat relabels six `[UNUSED_TOKEN_*]`
    pieces as its chat tokens (`<|im_start|>` = 92543), so those vocab entries are renamed; the nine InternVL
    tokens come after the vocab (92544..92552). A piece sentencepiece treats as unused (InternLM2's "\\0") is
    made unreachable, so that character falls back to its byte piece as in sentencepiece.
    """
    model_file = path / "tokenizer.model"
    proto = sp_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    normalizer = proto.normalizer_spec
    if proto.trainer_spec.model_type != sp_model_pb2.TrainerSpec.BPE or normalizer.name not in ("identity", ""):
        raise ValueError(f"{model_file}: only sentencepiece BPE models without normalisation can be converted "
                         f"(this one: model type {proto.trainer_spec.model_type}, normaliser '{normalizer.name}')")
    vocab, _, merges = SentencePieceExtractor(str(model_file)).extract()
    pieces = {i: piece for piece, i in vocab.items()}
    piece_type = sp_model_pb2.ModelProto.SentencePiece

    added = {int(i): spec for i, spec in config.get("added_tokens_decoder", {}).items()}
    renamed = {pieces[i]: spec["content"] for i, spec in added.items() if i in pieces and pieces[i] != spec["content"]}
    byte_fallback = proto.trainer_spec.byte_fallback
    for i, piece in enumerate(proto.pieces):
        # sentencepiece itself ignores a "\0" piece when it has byte fallback
        if piece.type == piece_type.UNUSED or (byte_fallback and piece.piece == "\0"):
            renamed[piece.piece] = f"<unused:{i}>"
    vocab = {renamed.get(piece, piece): i for piece, i in vocab.items()}
    merges = [(a, b) for a, b in merges if not {a, b, a + b} & renamed.keys()]

    backend = Tokenizer(BPE(vocab, merges, unk_token=pieces[proto.trainer_spec.unk_id], fuse_unk=True,
                            byte_fallback=byte_fallback))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPIECE_UNDERLINE, prepend_scheme="always" if normalizer.add_dummy_prefix else "never",
        split=False)
    backend.decoder = decoders.Sequence([decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    backend.add_tokens([AddedToken(p.piece, special=False, normalized=False) for p in proto.pieces
                        if p.type == piece_type.USER_DEFINED and p.piece not in renamed])
    for i in sorted(added):
        spec = added[i]
        token = AddedToken(spec["content"], special=spec.get("special", True), normalized=False,
                           lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                           single_word=spec.get("single_word", False))
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(spec["content"]) != i:
            raise ValueError(f"{path / 'tokenizer_config.json'}: added token {spec['content']!r} is stated at id {i} "
                             f"but would get id {backend.token_to_id(spec['content'])} (ids must follow the vocab)")

    kwargs = {key: config[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template",
                                           "model_max_length", "clean_up_tokenization_spaces") if key in config}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        name_or_path=str(path),
        add_bos_token=config.get("add_bos_token", True),  # InternLM2Tokenizer's defaults
        add_eos_token=config.get("add_eos_token", False),
        extra_special_tokens=config.get("additional_special_tokens") or config.get("extra_special_tokens") or [],
        **kwargs,
    )


def add_internvl_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add the missing `INTERNVL_TOKENS` as special tokens, in the official order; return how many were added.

    InternLM2-based checkpoints ship them (ids 92544..92552, `<IMG_CONTEXT>` = 92546): nothing is added there.
    """
    return tokenizer.add_tokens(list(INTERNVL_TOKENS), special_tokens=True)


def single_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """The id of `token` as one vocabulary entry, None when the tokenizer would split it (or map it to unk)."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return token_id

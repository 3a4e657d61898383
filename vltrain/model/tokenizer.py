"""Tokenizer loading without remote code, and the nine tokens InternVL adds to every LLM tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

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
    - otherwise the class named in tokenizer_config.json (e.g. `Qwen2Tokenizer` from vocab.json + merges.txt).

    The InternVL tokens are not added here: see `add_internvl_tokens`.
    """
    path = Path(path)
    if template is not None:
        get_template(template)  # an unknown name fails here, with the close match
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
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def add_internvl_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add the missing `INTERNVL_TOKENS` as special tokens, in the official order; return how many were added.

    InternLM2-based checkpoints ship them (ids 92544..92552, `<IMG_CONTEXT>` = 92546): nothing is added there.
    """
    return tokenizer.add_tokens(list(INTERNVL_TOKENS), special_tokens=True)

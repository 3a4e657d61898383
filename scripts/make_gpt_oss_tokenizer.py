"""Build a GPT-OSS tokenizer folder (as InternVL3.5-GPT-OSS ships it) for tests, without downloading the model.

The regular vocabulary is OpenAI's o200k_base (199998 byte-level BPE ranks), read from the copy that the PyPI
package `bpe-openai` ships (its sha256 matches the one tiktoken publishes). On top of it come the special tokens
at the ids of openai/gpt-oss-20b's tokenizer (its tokenizer_config.json lists ids 199998-200018; the model's
embedding has 201088 rows, the ids above 200018 are not in the tokenizer):

    199998 <|startoftext|>   199999 <|endoftext|>   200002 <|return|>    200003 <|constrain|>
    200005 <|channel|>       200006 <|start|>       200007 <|end|>       200008 <|message|>
    200012 <|call|>          200018 <|endofprompt|> the other ids in 200000-200017: <|reserved_N|>

bos is <|startoftext|>, eos <|return|>, pad <|endoftext|>; no BOS is added when encoding.

The InternVL tokens follow as the official fine-tuning script adds them (`tokenizer.add_tokens(token_list,
special_tokens=True)`, internvl_chat_gpt_oss/internvl/train/internvl_chat_finetune.py): appended after the
tokenizer's last id, in the order of `INTERNVL_TOKENS`, so `<img>` 200019, `</img>` 200020, `<IMG_CONTEXT>` 200021,
... `</box>` 200027, all inside the 201088-row embedding (no resize).

The vocabulary is never stored in the repository: tests build the folder into a temporary directory
(tests/conftest.py `gpt_oss_tokenizer`). Usage: python scripts/make_gpt_oss_tokenizer.py OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vltrain.model.tokenizer import INTERNVL_TOKENS  # noqa: E402

FIRST_SPECIAL_ID = 199998
NAMED_SPECIAL_TOKENS = {
    199998: "<|startoftext|>",
    199999: "<|endoftext|>",
    200002: "<|return|>",
    200003: "<|constrain|>",
    200005: "<|channel|>",
    200006: "<|start|>",
    200007: "<|end|>",
    200008: "<|message|>",
    200012: "<|call|>",
    200018: "<|endofprompt|>",
}
LAST_SPECIAL_ID = 200018
MODEL_VOCAB_SIZE = 201088  # rows of GPT-OSS's embedding; the tokenizer's ids stop below it


def gpt_oss_special_tokens() -> dict[int, str]:
    """id -> content of every special token in GPT-OSS's tokenizer (199998-200018)."""
    return {
        i: NAMED_SPECIAL_TOKENS.get(i, f"<|reserved_{i}|>") for i in range(FIRST_SPECIAL_ID, LAST_SPECIAL_ID + 1)
    }


def _o200k_base() -> dict:
    try:
        from bpe_openai import registry
    except ImportError as e:
        raise ImportError("the GPT-OSS test tokenizer needs the o200k vocabulary of `pip install bpe-openai`") from e
    return registry.o200k_base()


def write_gpt_oss_tokenizer(dst: Path) -> Path:
    """Write tokenizer.json + tokenizer_config.json of the GPT-OSS tokenizer (with the InternVL tokens) to `dst`
    and return `dst`. AutoTokenizer loads it as a fast tokenizer, without remote code."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    spec = _o200k_base()
    ranks: dict[bytes, int] = spec["mergeable_ranks"]
    if len(ranks) != FIRST_SPECIAL_ID or max(ranks.values()) != FIRST_SPECIAL_ID - 1:
        raise ValueError(f"o200k_base should hold ranks 0-{FIRST_SPECIAL_ID - 1}; got {len(ranks)} ranks")

    class _O200k(TikTokenConverter):
        # the converter reads a .tiktoken file through tiktoken; the ranks are already in memory here
        @staticmethod
        def load_tiktoken_bpe(_url):
            return ranks

    backend = _O200k(vocab_file="o200k_base", pattern=spec["pat_str"]).converted()
    specials = gpt_oss_special_tokens()
    backend.add_special_tokens([AddedToken(specials[i], normalized=False, special=True) for i in sorted(specials)])
    for i, content in specials.items():
        if backend.token_to_id(content) != i:
            raise AssertionError(f"{content} got id {backend.token_to_id(content)}, GPT-OSS has {i}")

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|return|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    # the official fine-tuning script's rule: appended after the tokenizer's last id, in this order
    tok.add_tokens(list(INTERNVL_TOKENS), special_tokens=True)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(dst)
    config_path = dst / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write tokenizer.json and tokenizer_config.json into")
    args = parser.parse_args(argv)
    print(write_gpt_oss_tokenizer(args.out))


if __name__ == "__main__":
    main()

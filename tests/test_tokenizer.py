"""Tokenizer loading: the real tokenizers give their known ids without remote code; InternVL tokens get their ids."""

import functools
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece

from vltrain.model.tokenizer import (
    INTERNVL_TOKENS,
    SlowLlamaTokenizer,
    add_internvl_tokens,
    load_tokenizer,
)


@functools.cache
def loaded(root: str, folder: str, template: str | None = None):
    return load_tokenizer(Path(root) / folder, template)


# The examples of ../shared/tokenizers/PROVENANCE.md (Phi-3: the tokenizer.json behaviour, BOS from the config).
PROVENANCE = [
    ("internlm2", "Hello world", [1, 9843, 2028]),
    ("internlm2", "<|im_start|>user\n你好<|im_end|>", [1, 92543, 1008, 364, 77230, 92542]),
    ("internlm2", "<img><IMG_CONTEXT></img>", [1, 92544, 92546, 92545]),
    ("qwen2", "Hello world", [9707, 1879]),
    ("qwen2", "<|im_start|>user\n你好<|im_end|>", [151644, 872, 198, 108386, 151645]),
    ("qwen2", "<img><IMG_CONTEXT></img>", [20092, 1784, 30346, 29577, 1472, 1892, 29]),
    ("phi3", "Hello world", [1, 15043, 3186]),
    ("phi3", "<|user|>\nHello<|end|>\n<|assistant|>\n",
     [1, 32010, 29871, 13, 10994, 32007, 29871, 13, 32001, 29871, 13]),
    ("phi3", "<img><IMG_CONTEXT></img>", [1, 529, 2492, 5299, 7833, 29954, 29918, 6007, 16975, 2565, 2492, 29958]),
    ("llama3", "Hello world", [128000, 9906, 1917]),
    ("llama3", "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
     [128000, 128006, 882, 128007, 271, 13347, 128009]),
    ("llama3", "<|im_start|>user\n你好<|im_end|>",
     [128000, 27, 91, 318, 5011, 91, 29, 882, 198, 57668, 53901, 27, 91, 318, 6345, 91, 29]),
]


@pytest.mark.parametrize("folder,text,expected", PROVENANCE)
def test_provenance_examples(folder, text, expected, shared_tokenizers):
    assert loaded(str(shared_tokenizers), folder)(text)["input_ids"] == expected


def test_internlm2_loads_without_remote_code(shared_tokenizers):
    # its tokenizer_config names the remote-code InternLM2Tokenizer; the tokenizer.json gives the same ids
    tokenizer = loaded(str(shared_tokenizers), "internlm2")
    assert type(tokenizer).__module__.startswith("transformers.")
    assert len(tokenizer) == 92553
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
    assert ids == [1, 92543, 1008, 364, 6176, 92542, 364, 92543, 525, 11353, 364]


PUBLISHED_INTERNLM2 = "internlm2 without tokenizer.json"  # the `internlm2_published` folder

# (folder, template, first InternVL id, how many add_internvl_tokens adds, len afterwards)
INTERNVL_IDS = [
    ("internlm2", "internlm2-chat", 92544, 0, 92553),
    (PUBLISHED_INTERNLM2, "internlm2-chat", 92544, 0, 92553),
    ("qwen2", "Hermes-2", 151646, 9, 151655),
    ("phi3", "phi3-chat", 32011, 9, 32020),
    ("phi3", None, 32011, 9, 32020),
    ("llama3", "internlm2-chat", 128256, 9, 128265),
]


@pytest.mark.parametrize("folder,template,first,added,length", INTERNVL_IDS)
def test_internvl_token_ids(folder, template, first, added, length, shared_tokenizers, internlm2_published):
    path = internlm2_published if folder == PUBLISHED_INTERNLM2 else shared_tokenizers / folder
    tokenizer = load_tokenizer(path, template)
    assert add_internvl_tokens(tokenizer) == added
    assert add_internvl_tokens(tokenizer) == 0
    assert len(tokenizer) == length
    assert tokenizer.convert_tokens_to_ids(list(INTERNVL_TOKENS)) == list(range(first, first + 9))
    assert tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == first + 2
    block = tokenizer("<img><IMG_CONTEXT></img>", add_special_tokens=False)["input_ids"]
    assert block == [first, first + 2, first + 1]


# Ids of transformers 4.x's slow LlamaTokenizer (use_fast=False, legacy=False) on the Phi-3 folder, InternVL tokens
# added, as the official training tokenized (computed with transformers 4.37.2 and 4.45.2: identical).
PHI3_SLOW = [
    ("Hello world", [1, 15043, 3186]),
    ("<|user|>\nHello<|end|>\n<|assistant|>\n", [1, 29871, 32010, 13, 10994, 32007, 13, 32001, 13]),
    ("<|system|>\nHi<|end|><|user|>\n  two<|end|>", [1, 29871, 32006, 13, 18567, 32007, 32010, 13, 29871, 1023, 32007]),
    (" x", [1, 29871, 921]),
    ("a <|end|> b", [1, 263, 29871, 32007, 289]),
    ("<img><IMG_CONTEXT></img>", [1, 32011, 32013, 32012]),
    ("<|user|>\n<img><IMG_CONTEXT></img>\nWhat is this?<|end|><|assistant|>\n",
     [1, 29871, 32010, 13, 32011, 32013, 32012, 13, 5618, 338, 445, 29973, 32007, 32001, 13]),
    ("你好，世界", [1, 29871, 30919, 31076, 30214, 30793, 30967]),
    ("<|endoftext|>Hi", [1, 32000, 18567]),
    ("a▁b", [1, 263, 289]),
    ("", [1]),
]


@pytest.mark.parametrize("text,expected", PHI3_SLOW)
def test_phi3_chat_reproduces_the_slow_sentencepiece_tokenizer(text, expected, real_tokenizer):
    tokenizer = real_tokenizer("phi3", "phi3-chat")
    assert isinstance(tokenizer, SlowLlamaTokenizer)
    assert tokenizer(text)["input_ids"] == expected


@pytest.mark.parametrize("text", ["<|user|>\n<img><IMG_CONTEXT></img>\nWhat is this 🙂?<|end|><|assistant|>\nA cat.<|end|>",
                                  " leading space,  two spaces", "你好，世界\n\tbye"])
def test_phi3_chat_decodes_back_to_the_text(text, real_tokenizer):
    tokenizer = real_tokenizer("phi3", "phi3-chat")
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == "<s>" + text  # byte pieces (<0x0A>, emoji) become text again
    # as in transformers 4.x, the role tokens are not "special" for skip_special_tokens; BOS and InternVL's are
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.replace("<img><IMG_CONTEXT></img>", "")


def test_phi3_chat_needs_the_sentencepiece_model(shared_tokenizers, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shared_tokenizers / "phi3" / name, tmp_path / name)
    with pytest.raises(ValueError, match="tokenizer.model"):
        load_tokenizer(tmp_path, "phi3-chat")


def test_phi3_chat_tokenizer_survives_save_and_load(real_tokenizer, tmp_path):
    tokenizer = real_tokenizer("phi3", "phi3-chat")
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path, "phi3-chat")
    assert len(reloaded) == len(tokenizer) == 32020
    assert add_internvl_tokens(reloaded) == 0
    text = "<|user|>\n<img><IMG_CONTEXT></img>\n你好<|end|><|assistant|>\n"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]


# ---- InternLM2 as published: tokenizer.model + a tokenizer_config naming the remote-code InternLM2Tokenizer ----


@pytest.fixture(scope="module")
def internlm2_published(shared_tokenizers, tmp_path_factory) -> Path:
    """A folder holding only what InternLM2-based checkpoints ship: no tokenizer.json."""
    folder = tmp_path_factory.mktemp("internlm2_published")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(shared_tokenizers / "internlm2" / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def internlm2_built(internlm2_published):
    return load_tokenizer(internlm2_published, "internlm2-chat")


EN = ["Hello world", "The quick brown fox jumps over the lazy dog.", "It's 3:45pm, isn't it?", "e-mail: a.b@c.org",
      "https://example.com/a?b=1&c=2", "1234567890", "3.14159e-10", "CamelCaseIdentifier", "ALL CAPS", "x"]
ZH = ["你好，世界！", "书生·万象是一个多模态大模型。", "今天天气很好", "（全角括号）与「引号」", "——破折号……省略号",
      "ＡＢＣ　ｘｙｚ", "日本語のテキスト", "한국어 문장"]
CODE = ["def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
        "SELECT * FROM t WHERE id=1;", "{\"key\": [1, 2, {\"n\": null}]}", "if a and not b:  # comment\n\tpass",
        "<div class=\"x\">&amp;</div>", "x = y  >>  2 | ~z"]
EMOJI = ["🙂", "👨‍👩‍👧", "🇨🇳", "❤️", "🤖🤖", "∑∫√∞", "é à ü ß ø"]
SPACE = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t  ", "      ", "\u3000", "\x00"]
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|im_start|>user\n", "<|im_start|>assistant\n", "<img>", "</img>",
           "<IMG_CONTEXT>", "<IMG_CONTEXT><IMG_CONTEXT>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>",
           "<|action_start|>", "<|action_end|>", "<|plugin|>", "<|interpreter|>", "<s>", "</s>", "<unk>"]


def mixed_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """English, Chinese, code, emoji and whitespace runs, with special tokens inside and between them."""
    rng = random.Random(seed)
    pools = [EN, ZH, CODE, EMOJI, SPACE, SPECIAL]
    corpus = [*EN, *ZH, *CODE, *EMOJI, *SPACE, *SPECIAL, "", "  leading", "trailing  ", "a\n\n\nb", "<img>x</img>"]
    while len(corpus) < n:
        parts = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(2, 8))]
        corpus.append("".join(p + rng.choice(["", "", " ", "  ", "\n"]) for p in parts))
    return corpus


def slow_internlm2_encoder(folder: Path):
    """What InternLM2Tokenizer gives: BOS, then sentencepiece on each stretch between its added tokens."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    added = {spec["content"]: int(i) for i, spec in
             json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"].items()}
    pattern = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))

    def encode(text: str) -> list[int]:
        ids, pos = [1], 0
        for match in pattern.finditer(text):
            ids += sp.encode(text[pos:match.start()]) + [added[match.group()]]
            pos = match.end()
        return ids + sp.encode(text[pos:])

    return encode


def test_internlm2_builds_without_tokenizer_json(internlm2_published, internlm2_built):
    assert sorted(p.name for p in internlm2_published.iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    assert type(internlm2_built).__module__.startswith("transformers.")
    assert len(internlm2_built) == 92553
    assert internlm2_built.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>", "<IMG_CONTEXT>"]) == [92542, 92543, 92546]
    assert (internlm2_built.bos_token_id, internlm2_built.eos_token_id, internlm2_built.pad_token_id) == (1, 2, 2)
    ids = internlm2_built.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                              return_dict=True)["input_ids"]
    assert ids == [1, 92543, 1008, 364, 6176, 92542, 364, 92543, 525, 11353, 364]


def test_internlm2_built_matches_sentencepiece_on_a_mixed_corpus(internlm2_published, internlm2_built):
    corpus = mixed_corpus()
    assert len(corpus) == 400
    reference = slow_internlm2_encoder(internlm2_published)
    mismatches = [(text, ids, reference(text)) for text in corpus
                  if (ids := internlm2_built(text)["input_ids"]) != reference(text)]
    assert not mismatches, mismatches[:3]
    # the corpus exercises what it claims: specials inside text, byte fallback (emoji), user-defined pieces
    all_ids = {i for text in corpus for i in internlm2_built(text)["input_ids"]}
    assert {92543, 92546, 3} <= all_ids and any(92352 <= i < 92397 for i in all_ids)


def test_internlm2_built_decodes_back_to_the_text(internlm2_built):
    specials = re.compile("|".join(re.escape(t) for t in internlm2_built.all_special_tokens))
    for text in mixed_corpus():
        ids = internlm2_built(text)["input_ids"]
        assert internlm2_built.decode(ids) == "<s>" + text
        assert internlm2_built.decode(ids, skip_special_tokens=True) == specials.sub("", text)


def test_internlm2_built_tokenizer_survives_save_and_load(internlm2_built, tmp_path):
    internlm2_built.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path, "internlm2-chat")
    assert add_internvl_tokens(reloaded) == 0
    for text in mixed_corpus(60, seed=1):
        assert reloaded(text)["input_ids"] == internlm2_built(text)["input_ids"]


def test_original_layout_folder_loads_without_remote_code(shared_tokenizers, tmp_path):
    # an original InternVL2-1B folder: Qwen2 tokenizer files next to a remote-code config.json
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(shared_tokenizers / "qwen2" / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "internvl_chat", "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"}}))
    tokenizer = load_tokenizer(tmp_path, "Hermes-2")
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert tokenizer("<|im_start|>user\n你好<|im_end|>")["input_ids"] == [151644, 872, 198, 108386, 151645]


def test_remote_code_class_without_files_to_build_from(shared_tokenizers, tmp_path):
    shutil.copy(shared_tokenizers / "internlm2" / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    with pytest.raises(ValueError, match="InternLM2Tokenizer' is remote code"):
        load_tokenizer(tmp_path, "internlm2-chat")


def test_unknown_template(shared_tokenizers):
    with pytest.raises(ValueError, match="did you mean 'phi3-chat'"):
        load_tokenizer(shared_tokenizers / "phi3", "phi3_chat")


# GPT-OSS (InternVL3.5-GPT-OSS): ids of openai/gpt-oss-20b's tokenizer_config.json, and of o200k_harmony (tiktoken)
GPT_OSS_SPECIAL_IDS = {
    "<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|reserved_200000|>": 200000, "<|return|>": 200002,
    "<|constrain|>": 200003, "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008,
    "<|call|>": 200012, "<|reserved_200017|>": 200017, "<|endofprompt|>": 200018,
}
# o200k_base encodings (the same with tiktoken's o200k_base / o200k_harmony)
O200K_KNOWN = [
    ("Hello world", [13225, 2375]),
    ("hello world", [24912, 2375]),
    ("Hello, world!", [13225, 11, 2375, 0]),
]
O200K_TEXTS = [
    "The quick brown fox's tail\n", "你好，世界 123456 \n\n  x", "def f(x):\n    return x**2  # ok\r\n",
    "Tabs\tand  double  spaces, ÜBER-große Wörter; émoji 🙂 and <b>html</b>", "   leading and trailing   ",
]


def test_gpt_oss_tokenizer_special_ids(gpt_oss_tokenizer):
    tok = load_tokenizer(gpt_oss_tokenizer)
    assert type(tok).__name__ != "PreTrainedTokenizer"  # fast: tokenizer.json, no remote code
    for token, token_id in GPT_OSS_SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == token_id, token
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|startoftext|>", "<|return|>", "<|endoftext|>")
    # InternVL tokens after the tokenizer's last id, as the official `add_tokens` places them: nothing to add
    assert [tok.convert_tokens_to_ids(t) for t in INTERNVL_TOKENS] == list(range(200019, 200028))
    assert add_internvl_tokens(tok) == 0
    assert len(tok) == 200028
    assert tok.encode("<|start|>user<|message|>Hi<|end|><IMG_CONTEXT>") == [200006, 1428, 200008, 12194, 200007, 200021]


def test_gpt_oss_tokenizer_matches_o200k(gpt_oss_tokenizer):
    tok = load_tokenizer(gpt_oss_tokenizer)
    for text, ids in O200K_KNOWN:
        assert tok.encode(text) == ids, text
    import bpe_openai

    reference = bpe_openai.get_encoding("o200k_base")  # bpe-openai's own encoder (a Rust BPE, not tokenizers)
    for text in O200K_TEXTS + [t for t, _ in O200K_KNOWN]:
        assert tok.encode(text) == reference.encode_ordinary(text), text
        assert tok.decode(tok.encode(text)) == text
    try:
        import tiktoken
    except ImportError:
        return
    try:
        harmony = tiktoken.get_encoding("o200k_harmony")
    except Exception:  # its vocabulary is downloaded on first use; offline it is absent
        return
    for token, token_id in GPT_OSS_SPECIAL_IDS.items():
        if not token.startswith("<|reserved") and token != "<|endofprompt|>":
            assert harmony.encode_single_token(token) == token_id, token
    for text in O200K_TEXTS:
        assert tok.encode(text) == harmony.encode_ordinary(text), text

"""Templates: golden encodings of the official InternVL training code, plus rules checked on a byte tokenizer."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vltrain.data.templates import IGNORE_INDEX, TEMPLATES, expand_image_context, get_template, render
from vltrain.model.tokenizer import add_internvl_tokens

GOLDEN = json.loads((Path(__file__).parent / "data" / "templates_golden.json").read_text(encoding="utf-8"))
CASES = {case["id"]: case for case in GOLDEN["cases"]}
IMG = "<img><IMG_CONTEXT></img>"
# (tokenizer folder, template, tokens registered as special before the InternVL ones) as in the golden file
COMBOS = sorted({(c["tokenizer"], c["template"], tuple(c.get("extra_special_tokens", ()))) for c in CASES.values()})


def expand_text(text: str, tokens_per_image: list[int]) -> str:
    pieces = text.split("<IMG_CONTEXT>")
    assert len(pieces) == len(tokens_per_image) + 1
    return pieces[0] + "".join("<IMG_CONTEXT>" * n + piece for n, piece in zip(tokens_per_image, pieces[1:]))


def byte_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """One token per byte; the role strings and stop tokens of all templates are special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>" if bos else None, eos_token="</s>")
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
                         special_tokens=True)
    add_internvl_tokens(tokenizer)
    return tokenizer


BYTES = byte_tokenizer()


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def trained_runs(labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


# ---------------------------------------------------------------- golden: the official encoding


def test_golden_file_covers_every_template_and_tokenizer():
    assert {(c["template"], c["tokenizer"]) for c in CASES.values()} == {
        ("internlm2-chat", "internlm2"), ("internlm2-chat", "llama3"), ("Hermes-2", "qwen2"), ("phi3-chat", "phi3")}
    assert len(CASES) == 52


@pytest.mark.parametrize("case_id", list(CASES))
def test_matches_official_encoding(case_id, real_tokenizer):
    case = CASES[case_id]
    # extra special tokens: Hermes-2-Theta's ChatML tokens, which its checkpoint tokenizer defines
    tokenizer = real_tokenizer(case["tokenizer"], case["template"], tuple(case.get("extra_special_tokens", ())))
    rendered = render(get_template(case["template"]), tokenizer, [tuple(t) for t in case["turns"]], case["system"])
    # the ids are those of the whole string at once, BOS as the tokenizer itself adds it
    assert rendered.input_ids == tokenizer(rendered.text)["input_ids"]
    ids, labels = expand_image_context(rendered.input_ids, rendered.labels,
                                       tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), case["tokens_per_image"])
    assert expand_text(rendered.text, case["tokens_per_image"]) == case["prompt"]
    assert ids == case["input_ids"]
    if case["turns"][-1][1] is None:  # generation prompt (official chat()): the history is labelled as in training
        history = render(get_template(case["template"]), tokenizer, [tuple(t) for t in case["turns"][:-1]],
                         case["system"])
        n = len(history.labels)
        if rendered.input_ids[:n] == history.input_ids:  # not with base Llama-3: "<|im_end|><|im_start|>" merges
            assert labels[:n] == history.labels
        assert set(labels[n:]) == {IGNORE_INDEX}
    elif case["labels"] is not None:
        assert labels == case["labels"]
    else:
        # The official code trains nothing here (it reports a tokenization mismatch: the base Llama-3 tokenizer
        # splits <|im_end|> into pieces that merge with the text around them). vltrain still trains the responses.
        trained = tokenizer.decode([label for label in labels if label != IGNORE_INDEX])
        assert all(response.strip() in trained for _, response in case["turns"])


@pytest.mark.parametrize("case_id", [i for i, c in CASES.items() if c["tokenizer"] != "phi3"])
def test_labels_without_offsets_equal_labels_from_offsets(case_id, real_tokenizer):
    """Tokenizers without offsets (the Phi-3 sentencepiece one) label by tokenizing prefixes: same result."""

    class WithoutOffsets:
        is_fast = False

        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

        def __call__(self, text, **kwargs):
            return self.tokenizer(text, **kwargs)

    case = CASES[case_id]
    tokenizer = real_tokenizer(case["tokenizer"], case["template"], tuple(case.get("extra_special_tokens", ())))
    template, turns = get_template(case["template"]), [tuple(t) for t in case["turns"]]
    assert render(template, WithoutOffsets(tokenizer), turns, case["system"]) == render(
        template, tokenizer, turns, case["system"])


@pytest.mark.parametrize("folder,template,extra", COMBOS)
def test_expanding_context_equals_rendering_expanded_text(folder, template, extra, real_tokenizer):
    tokenizer = real_tokenizer(folder, template, extra)
    context_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    tokens_per_image = [3, 5, 2]
    turns = [(f"Image-1: {IMG}\nImage-2: {IMG}\nCompare them.", "The left one is larger."),
             (f"{IMG}\nAnd this one?", "It is small.")]
    rendered = render(get_template(template), tokenizer, turns, "System.")
    ids, labels = expand_image_context(rendered.input_ids, rendered.labels, context_id, tokens_per_image)

    expanded_turns = [(expand_text(q, tokens_per_image[:2]) if i == 0 else expand_text(q, tokens_per_image[2:]), r)
                      for i, (q, r) in enumerate(turns)]
    direct = render(get_template(template), tokenizer, expanded_turns, "System.")
    assert (ids, labels) == (direct.input_ids, direct.labels)
    assert ids == tokenizer(expand_text(rendered.text, tokens_per_image))["input_ids"]
    assert ids.count(context_id) == sum(tokens_per_image)
    assert all(label == IGNORE_INDEX for token, label in zip(ids, labels) if token == context_id)


@pytest.mark.parametrize("folder,template,extra", COMBOS)
def test_render_is_repeatable(folder, template, extra, real_tokenizer):
    """Rendering keeps no state between records (its speed is measured by scripts/bench/data.py, not here)."""
    tokenizer = real_tokenizer(folder, template, extra)
    tmpl = get_template(template)
    turns = [(f"{IMG}\nWhat is in the image?", "A cat sitting on a sofa.")]
    first = render(tmpl, tokenizer, turns, tmpl.default_system)
    for _ in range(20):
        again = render(tmpl, tokenizer, turns, tmpl.default_system)
        assert (again.text, again.input_ids, again.labels) == (first.text, first.input_ids, first.labels)


# ---------------------------------------------------------------- rules, on a byte tokenizer (no files needed)


def test_hermes2_hand_counted():
    rendered = render(TEMPLATES["Hermes-2"], BYTES, [("Q", "A")], "S")
    assert rendered.text == ("<|im_start|>system\nS<|im_end|><|im_start|>user\nQ<|im_end|>"
                             "<|im_start|>assistant\nA<|im_end|>")
    start, end = BYTES.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    b = lambda text: ids_of(BYTES, text)  # noqa: E731
    expected = ([start] + b("system\nS") + [end] + [start] + b("user\nQ") + [end] + [start] + b("assistant\n")
                + b("A") + [end])
    assert rendered.input_ids == expected  # no BOS for Hermes-2
    assert rendered.labels == [IGNORE_INDEX] * (len(expected) - 2) + b("A") + [end]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_every_response_and_its_stop_token_are_trained(name):
    template = TEMPLATES[name]
    turns = [(f"{IMG}\nFirst?", "One."), ("Second?", "Two, 二."), ("Third?", "Three.")]
    rendered = render(template, BYTES, turns, "Be brief.")
    ids, labels = rendered.input_ids, rendered.labels
    assert len(ids) == len(labels)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    assert trained_runs(labels) == [ids_of(BYTES, r + template.stop_token) for _, r in turns]
    if template.bos:
        assert ids[0] == BYTES.bos_token_id and labels[0] == IGNORE_INDEX
    else:
        assert BYTES.bos_token_id not in ids


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_generation_prompt_ends_with_the_assistant_prefix(name):
    template = TEMPLATES[name]
    prompt = render(template, BYTES, [("Hi", "Hello."), ("How are you?", None)], "S")
    assert prompt.text.endswith(template.user_prefix + "How are you?" + template.stop_token + template.assistant_prefix)
    assert trained_runs(prompt.labels) == [ids_of(BYTES, "Hello." + template.stop_token)]  # history still trained
    full = render(template, BYTES, [("Hi", "Hello."), ("How are you?", "Fine.")], "S")
    assert full.input_ids[:len(prompt.input_ids)] == prompt.input_ids
    with pytest.raises(ValueError, match="only the last response"):
        render(template, BYTES, [("Hi", None), ("How are you?", "Fine.")], "S")


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("system", [None, ""])
def test_no_system_block_without_system(name, system):
    template = TEMPLATES[name]
    rendered = render(template, BYTES, [("Q", "A")], system)
    assert rendered.text == template.user_prefix + "Q" + template.stop_token + template.assistant_prefix + "A" + \
        template.stop_token
    with_system = render(template, BYTES, [("Q", "A")], "S")
    assert with_system.text.startswith(template.system_prefix + "S" + template.stop_token + template.user_prefix)


def test_only_internlm2_chat_strips_whitespace():
    turns = [("  Q \n", "\tA  ")]
    assert render(TEMPLATES["internlm2-chat"], BYTES, turns, None).text == \
        "<|im_start|>user\nQ<|im_end|><|im_start|>assistant\nA<|im_end|>"
    assert render(TEMPLATES["Hermes-2"], BYTES, turns, None).text == \
        "<|im_start|>user\n  Q \n<|im_end|><|im_start|>assistant\n\tA  <|im_end|>"
    assert render(TEMPLATES["phi3-chat"], BYTES, turns, None).text == \
        "<|user|>\n  Q \n<|end|><|assistant|>\n\tA  <|end|>"


def test_empty_response_is_an_error():
    with pytest.raises(ValueError, match="empty response"):
        render(TEMPLATES["Hermes-2"], BYTES, [("Q", "")], None)
    with pytest.raises(ValueError, match="empty response"):
        render(TEMPLATES["internlm2-chat"], BYTES, [("Q", "  \n")], None)


def test_bos_template_needs_a_bos_token():
    render(TEMPLATES["Hermes-2"], byte_tokenizer(bos=False), [("Q", "A")], None)
    with pytest.raises(ValueError, match="bos_token"):
        render(TEMPLATES["internlm2-chat"], byte_tokenizer(bos=False), [("Q", "A")], None)


def test_image_blocks_are_single_special_tokens():
    rendered = render(TEMPLATES["Hermes-2"], BYTES, [(f"{IMG}\nWhat?", "A cat.")], None)
    block = BYTES.convert_tokens_to_ids(["<img>", "<IMG_CONTEXT>", "</img>"])
    ids = rendered.input_ids
    at = ids.index(block[0])
    assert ids[at:at + 3] == block
    assert rendered.labels[at:at + 3] == [IGNORE_INDEX] * 3


def test_expand_image_context_hand_counted():
    ids, labels = expand_image_context([5, 9, 6, 9, 7], [-100, -100, -100, -100, 7], 9, [2, 3])
    assert ids == [5, 9, 9, 6, 9, 9, 9, 7]
    assert labels == [-100] * 7 + [7]
    assert expand_image_context([5, 6], [5, 6], 9, []) == ([5, 6], [5, 6])


def test_expand_image_context_count_mismatch():
    with pytest.raises(ValueError, match="2 image context tokens .* but 1 images"):
        expand_image_context([9, 9], [-100, -100], 9, [4])
    with pytest.raises(ValueError, match="at least one token"):
        expand_image_context([9], [-100], 9, [0])


def test_get_template():
    assert get_template("Hermes-2") is TEMPLATES["Hermes-2"]
    assert set(TEMPLATES) == {"internlm2-chat", "Hermes-2", "phi3-chat"}
    for wrong, right in [("hermes-2", "Hermes-2"), ("internlm2_chat", "internlm2-chat"), ("phi3", "phi3-chat")]:
        with pytest.raises(ValueError, match=f"did you mean '{right}'"):
            get_template(wrong)

"""Templates: golden encodings of the official InternVL training code (1.5 / 2.0 templates; internvl2_5 and the
GPT-OSS harmony format), plus rules checked on a byte tokenizer."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vltrain.data.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    chat_template_jinja,
    expand_image_context,
    get_template,
    render,
    reply_text,
    starts_with_bos,
    system_default,
)
from vltrain.model.tokenizer import add_internvl_tokens, load_tokenizer

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
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                          "<|start|>", "<|message|>", "<|channel|>", "<|return|>"], special_tokens=True)
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
    stops = [template.stop_token] * (len(turns) - 1) + [template.reply_stop_token]
    assert trained_runs(labels) == [ids_of(BYTES, template.response_prefix + r + stop)
                                    for (_, r), stop in zip(turns, stops)]
    if template.turn_suffix:  # masked after every stop token, the last one included
        assert rendered.text.endswith(template.reply_stop_token + template.turn_suffix)
        n = len(ids_of(BYTES, template.turn_suffix))
        assert labels[-n:] == [IGNORE_INDEX] * n
    if template.bos:
        assert ids[0] == BYTES.bos_token_id and labels[0] == IGNORE_INDEX
    else:  # bos None: this tokenizer adds no BOS of its own
        assert BYTES.bos_token_id not in ids


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_generation_prompt_ends_with_the_assistant_prefix(name):
    template = TEMPLATES[name]
    prompt = render(template, BYTES, [("Hi", "Hello."), ("How are you?", None)], "S")
    assert prompt.text.endswith(template.user_prefix + "How are you?" + template.stop_token + template.turn_suffix
                                + template.assistant_prefix)
    # history still trained, closed by the non-final stop token
    assert trained_runs(prompt.labels) == [ids_of(BYTES, template.response_prefix + "Hello." + template.stop_token)]
    full = render(template, BYTES, [("Hi", "Hello."), ("How are you?", "Fine.")], "S")
    assert full.input_ids[:len(prompt.input_ids)] == prompt.input_ids
    assert full.text.endswith(template.response_prefix + "Fine." + template.reply_stop_token + template.turn_suffix)
    with pytest.raises(ValueError, match="only the last response"):
        render(template, BYTES, [("Hi", None), ("How are you?", "Fine.")], "S")


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("system", [None, ""])
def test_no_system_block_without_system(name, system):
    template = TEMPLATES[name]
    t = template
    rendered = render(template, BYTES, [("Q", "A")], system)
    assert rendered.text == (t.user_prefix + "Q" + t.stop_token + t.turn_suffix + t.assistant_prefix + t.response_prefix
                             + "A" + t.reply_stop_token + t.turn_suffix)
    with_system = render(template, BYTES, [("Q", "A")], "S")
    assert with_system.text.startswith(t.system_prefix + "S" + t.stop_token + t.turn_suffix + t.user_prefix)


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
    assert set(TEMPLATES) == {"internlm2-chat", "Hermes-2", "phi3-chat", "internvl2_5", "internvl3_5_gpt_oss"}
    for wrong, right in [("hermes-2", "Hermes-2"), ("internlm2_chat", "internlm2-chat"), ("phi3", "phi3-chat")]:
        with pytest.raises(ValueError, match=f"did you mean '{right}'"):
            get_template(wrong)


# ---------------------------------------------------------------- golden: InternVL2.5 / 3 / 3.5 and GPT-OSS

LATER = json.loads((Path(__file__).parent / "data" / "templates_later_golden.json").read_text(encoding="utf-8"))
LATER_CASES = {case["id"]: case for case in LATER["cases"]}


@pytest.fixture(scope="module")
def later_tokenizer(real_tokenizer, request):
    """`later_tokenizer(folder, template)`: ../shared/tokenizers/<folder>, or the GPT-OSS tokenizer built from
    bpe-openai (its fixture is only requested, and so only built or skipped, for the GPT-OSS cases)."""

    def load(folder: str, template: str):
        if folder == "gpt_oss":
            return load_tokenizer(request.getfixturevalue("gpt_oss_tokenizer"), template)
        return real_tokenizer(folder, template)

    return load


def test_later_golden_file_covers_every_backbone():
    combos = {(c["template"], c["tokenizer"], c["thinking"]) for c in LATER_CASES.values()}
    assert combos == {("internvl2_5", "qwen2_5", False), ("internvl2_5", "internlm2", False),
                      ("internvl2_5", "qwen3", False), ("internvl2_5", "qwen3", True),
                      ("internvl3_5_gpt_oss", "gpt_oss", False)}
    kinds = {case_id.rsplit("/", 1)[1] for case_id in LATER_CASES}
    assert {"image", "two_images_one_turn", "video", "grounding", "multi3", "generation"} <= kinds
    assert len(LATER_CASES) == 55


@pytest.mark.parametrize("case_id", list(LATER_CASES))
def test_matches_official_internvl2_5_and_gpt_oss_encoding(case_id, later_tokenizer):
    case = LATER_CASES[case_id]
    tokenizer = later_tokenizer(case["tokenizer"], case["template"])
    template = get_template(case["template"])
    # every id from the tokenizer: <IMG_CONTEXT> as the official run found it (151667 / 151671 / 92546 / 200021)
    context_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert context_id == LATER["made_with"]["tokenizers"][case["tokenizer"]]["IMG_CONTEXT"]
    assert case["system"] == system_default(template, case["thinking"]) or case_id.endswith(
        ("custom_system", "chinese"))
    turns = [tuple(t) for t in case["turns"]]
    rendered = render(template, tokenizer, turns, case["system"])
    ids, labels = expand_image_context(rendered.input_ids, rendered.labels, context_id, case["tokens_per_image"])
    assert expand_text(rendered.text, case["tokens_per_image"]) == case["prompt"]
    assert ids == case["input_ids"]
    if case["labels"] is not None:
        assert labels == case["labels"]
    else:  # generation prompt (official chat()): the history trained as in training, closed by `stop_token`
        assert rendered.text.endswith(template.assistant_prefix)
        assert trained_runs(labels) == [ids_of(tokenizer, template.response_prefix + r + template.stop_token)
                                        for _, r in turns[:-1]]


def test_internvl2_5_bos_only_where_the_tokenizer_adds_one(later_tokenizer):
    template = get_template("internvl2_5")
    assert starts_with_bos(template, later_tokenizer("internlm2", "internvl2_5"))  # InternLM2.5 backbones
    assert not starts_with_bos(template, later_tokenizer("qwen2_5", "internvl2_5"))
    assert LATER_CASES["internvl2_5/internlm2/single"]["input_ids"][0] == 1
    assert LATER_CASES["internvl2_5/internlm2/single"]["labels"][0] == IGNORE_INDEX


def test_internvl2_5_trailing_newline_is_masked():
    case = LATER_CASES["internvl2_5/qwen2_5/multi3"]
    newline, im_end = 198, 151645  # Qwen's "\n" and <|im_end|>
    ends = [i for i, token in enumerate(case["input_ids"]) if token == im_end]
    assert all(case["input_ids"][i + 1] == newline and case["labels"][i + 1] == IGNORE_INDEX for i in ends)
    # system, then query / answer three times: only the answers' <|im_end|> trained
    assert [case["labels"][i] for i in ends] == [IGNORE_INDEX] + [IGNORE_INDEX, im_end] * 3


def test_thinking_keeps_think_blocks_as_trained_text(later_tokenizer):
    tokenizer = later_tokenizer("qwen3", "internvl2_5")
    think, end_think = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    assert (think, end_think) == (151667, 151668)  # Qwen3's own tokens, below InternVL's
    case = LATER_CASES["internvl2_5/qwen3/thinking/think_multi"]
    assert case["system"] == system_default(get_template("internvl2_5"), thinking=True)
    assert case["labels"].count(think) == case["labels"].count(end_think) == 2
    with pytest.raises(ValueError, match="has no thinking mode"):
        system_default(get_template("internvl3_5_gpt_oss"), thinking=True)


def test_gpt_oss_end_tokens_follow_the_format_not_the_official_index():
    """The official preprocess picks the end token with the image loop's index: a NameError for text-only samples
    and the wrong token elsewhere. vltrain closes earlier answers with <|end|> and the last with <|return|>; where
    the official output differs, it differs only in those end tokens."""
    end, ret = 200007, 200002
    compared = errors = 0
    for case in LATER_CASES.values():
        if case["template"] != "internvl3_5_gpt_oss" or case["labels"] is None:
            continue
        trained_ends = [t for t in case["labels"] if t in (end, ret)]
        assert trained_ends == [end] * (len(trained_ends) - 1) + [ret]
        as_is = case["official_as_is"]
        if "error" in as_is:
            assert not case["tokens_per_image"] and as_is["error"].startswith("UnboundLocalError")
            errors += 1
            continue
        compared += 1
        diff = [k for k, (a, b) in enumerate(zip(as_is["input_ids"], case["input_ids"])) if a != b]
        assert len(as_is["input_ids"]) == len(case["input_ids"])
        assert all({as_is["input_ids"][k], case["input_ids"][k]} == {end, ret} for k in diff)
        assert [k for k, (a, b) in enumerate(zip(as_is["labels"], case["labels"])) if a != b] == diff
    assert compared >= 5 and errors >= 3


def test_gpt_oss_reply_text_drops_the_channel_header():
    template = get_template("internvl3_5_gpt_oss")
    assert reply_text(template, "<|channel|>final<|message|>A cat.") == "A cat."
    assert reply_text(template, "<|channel|>fin") == ""  # streamed, header still incomplete
    assert reply_text(get_template("internvl2_5"), "  <think>\nx\n</think>\n\nA cat.") == "<think>\nx\n</think>\n\nA cat."


JINJA_CONVERSATIONS = [
    # (messages, add_generation_prompt, enable_thinking, turns for render, system for render or None: the default)
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}], True, False,
     [("<IMG_CONTEXT>\nWhat is it?", None)], None),
    ([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Q1"},
      {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
     False, False, [("Q1", "A1"), ("Q2", "A2")], "Answer briefly."),
    ([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
     True, True, [("Q1", "A1"), ("Q2", None)], "thinking"),
]


@pytest.mark.parametrize("name,folder", [("internvl2_5", "internlm2"), ("internvl2_5", "qwen3"),
                                         ("internvl3_5_gpt_oss", "gpt_oss")])
def test_chat_template_jinja_renders_what_render_renders(name, folder, later_tokenizer):
    template, tokenizer = get_template(name), later_tokenizer(folder, name)
    jinja = chat_template_jinja(name, tokenizer)
    bos = tokenizer.bos_token if starts_with_bos(template, tokenizer) else ""
    for messages, generation_prompt, thinking, turns, system in JINJA_CONVERSATIONS:
        if thinking and template.thinking_system is None:
            continue
        text = tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                             add_generation_prompt=generation_prompt, enable_thinking=thinking)
        system = system_default(template, thinking) if system in (None, "thinking") else system
        assert text == bos + render(template, tokenizer, turns, system).text

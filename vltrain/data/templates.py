"""The InternVL chat templates, rendered to ids and labels exactly as the official training encodes them.

One two-round conversation, each line labelled with the field that produced it (T = trained, . = masked with
-100). The blocks follow each other with nothing in between; the line breaks are for reading:

    <s>                                           .  BOS (`bos`)
    <|im_start|>system\\n{system}<|im_end|>        .  system_prefix + system + stop_token (no block: system None/"")
    \\n                                            .  turn_suffix (internvl2_5 only; after every stop token)
    <|im_start|>user\\n{query 1}<|im_end|>\\n       .  user_prefix + query + stop_token + turn_suffix (image blocks)
    <|im_start|>assistant\\n                       .  assistant_prefix
    {response 1}<|im_end|>                        T  response_prefix + response + stop_token
    \\n                                            .  turn_suffix
    <|im_start|>user\\n{query 2}<|im_end|>\\n       .  user_prefix + query + stop_token + turn_suffix
    <|im_start|>assistant\\n                       .  assistant_prefix (a generation prompt stops after this line)
    {response 2}<|im_end|>                        T  response_prefix + response + (last_stop_token or stop_token)
    \\n                                            .  turn_suffix

- `internlm2-chat`, `Hermes-2`, `phi3-chat` (InternVL 1.5 / 2.0): no `turn_suffix`; BOS for internlm2-chat and
  phi3-chat, never for Hermes-2; phi3-chat uses `<|system|>\\n`, `<|user|>\\n`, `<|assistant|>\\n`, `<|end|>`;
  internlm2-chat strips whitespace around every query and response (`strip`).
- `internvl2_5` (InternVL2.5, 3, 3.5 with Qwen3): ChatML with `\\n` after every `<|im_end|>` (masked), BOS where the
  tokenizer adds one (InternLM2.5 backbones), its own default system; `thinking_system` is the system prompt the 3.5
  models think under (`<think>...</think>` before the answer, trained as ordinary response text).
- `internvl3_5_gpt_oss` (GPT-OSS's harmony format): `<|start|>system<|message|>{system}<|end|>`,
  `<|start|>user<|message|>{query}<|end|>`, then `<|start|>assistant` (masked) and
  `<|channel|>final<|message|>{response}` (trained) closed by `<|end|>`, the last response by `<|return|>`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

IGNORE_INDEX = -100

INTERNVL2_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
INTERNVL2_5_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
# InternVL3.5's thinking mode: the model card's R1_SYSTEM_PROMPT
THINKING_SYSTEM = (
    "You are an AI assistant that rigorously follows this response protocol:\n\n"
    "1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, and "
    "reason through the problem step-by-step. Enclose this entire thinking process within <think> and </think> "
    "tags.\n\n"
    "2. After the thinking section, provide a clear, concise, and direct answer to the user's question. Separate "
    "the answer from the think section with a newline.\n\n"
    "Ensure that the thinking process is thorough but remains focused on the query. The final answer should be "
    "standalone and not reference the thinking section."
)
GPT_OSS_SYSTEM = (
    "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
    "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for every "
    "message."
)


@dataclass(frozen=True)
class Template:
    """One chat format: strings and a few rules, no code."""

    name: str
    system_prefix: str
    user_prefix: str
    assistant_prefix: str
    """Opens every response; masked, and the end of a generation prompt."""
    stop_token: str
    """Closes the system block, every query and every response; generation stops at it (see `reply_stop_token`)."""
    default_system: str
    """The official conversation template's system message (model types of the V1.5 era use their own)."""
    bos: bool | None
    """The sequence starts with the tokenizer's BOS token (what the official preprocess function assumes).
    None: where the tokenizer itself adds one (the official `tokenizer.add_bos_token` test)."""
    strip: bool
    """Strip whitespace around every query and response before rendering."""
    turn_suffix: str = ""
    """Follows every stop token; never trained (internvl2_5's newline after `<|im_end|>`)."""
    response_prefix: str = ""
    """Precedes every response and is trained with it (harmony's `<|channel|>final<|message|>`); a reply is decoded
    without it."""
    last_stop_token: str | None = None
    """Closes the final response instead of `stop_token` (harmony's `<|return|>`); None: `stop_token`."""
    thinking_system: str | None = None
    """The system message under which the model reasons in `<think>...</think>` first (`model.thinking`); None:
    the template has no thinking mode."""

    @property
    def reply_stop_token(self) -> str:
        """Where generation stops: the final response's stop token."""
        return self.last_stop_token or self.stop_token


_CHATML = dict(system_prefix="<|im_start|>system\n", user_prefix="<|im_start|>user\n",
               assistant_prefix="<|im_start|>assistant\n", stop_token="<|im_end|>")

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(name="internlm2-chat", bos=True, strip=True, default_system=INTERNVL2_SYSTEM, **_CHATML),
        Template(name="Hermes-2", bos=False, strip=False, default_system=INTERNVL2_SYSTEM, **_CHATML),
        Template(name="phi3-chat", system_prefix="<|system|>\n", user_prefix="<|user|>\n",
                 assistant_prefix="<|assistant|>\n", stop_token="<|end|>", default_system=INTERNVL2_SYSTEM,
                 bos=True, strip=False),
        Template(name="internvl2_5", bos=None, strip=False, turn_suffix="\n", default_system=INTERNVL2_5_SYSTEM,
                 thinking_system=THINKING_SYSTEM, **_CHATML),
        Template(name="internvl3_5_gpt_oss", system_prefix="<|start|>system<|message|>",
                 user_prefix="<|start|>user<|message|>", assistant_prefix="<|start|>assistant",
                 response_prefix="<|channel|>final<|message|>", stop_token="<|end|>", last_stop_token="<|return|>",
                 default_system=GPT_OSS_SYSTEM, bos=None, strip=False),
    )
}


def get_template(name: str) -> Template:
    """The template called `name`; an unknown name raises ValueError naming the closest known one."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    close = difflib.get_close_matches(name, list(TEMPLATES), n=1, cutoff=0.0)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown template {name!r}{hint} (known: {', '.join(TEMPLATES)})")


@dataclass
class Rendered:
    """A rendered conversation: its text, the ids of that text (BOS included) and labels (-100 = not trained)."""

    text: str
    input_ids: list[int]
    labels: list[int]


def render(template: Template, tokenizer, turns: list[tuple[str, str | None]], system: str | None) -> Rendered:
    """Render `turns` = [(query, response), ...] and label every response and its stop token as trained.

    The last response may be None: the text then ends with the assistant prefix (a generation prompt). Queries may
    hold `<img><IMG_CONTEXT></img>` blocks, one `<IMG_CONTEXT>` per image (see `expand_image_context`).
    `system` None or "" renders no system block.
    """
    if not turns:
        raise ValueError("render needs at least one turn")
    t = template
    parts: list[tuple[str, bool]] = []  # (text, trained)
    if system:
        parts.append((t.system_prefix + system + t.stop_token + t.turn_suffix, False))
    for i, (query, response) in enumerate(turns):
        if t.strip:
            query = query.strip()
        parts.append((t.user_prefix + query + t.stop_token + t.turn_suffix + t.assistant_prefix, False))
        if response is None:
            if i != len(turns) - 1:
                raise ValueError(f"turn {i}: only the last response may be None (a generation prompt)")
            continue
        if t.strip:
            response = response.strip()
        if not response:
            raise ValueError(f"turn {i}: empty response (nothing to train); use None for a generation prompt")
        stop = t.reply_stop_token if i == len(turns) - 1 else t.stop_token
        parts.append((t.response_prefix + response + stop, True))
        if t.turn_suffix:
            parts.append((t.turn_suffix, False))

    text = "".join(part for part, _ in parts)
    cuts, trained, end = [], [], 0
    for part, is_trained in parts:
        cuts.append(end)
        trained.append(is_trained)
        end += len(part)
    # Labels follow the ids of the whole string, so they can never disagree with what the model sees. A token
    # belongs to the part its first character is in (a token that merges across a boundary goes left).
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
    ids = encoding["input_ids"]
    if tokenizer.is_fast:
        starts = _counts_from_offsets(encoding["offset_mapping"], cuts)
    else:
        starts = _counts_from_prefixes(tokenizer, text, ids, cuts)
    labels = [IGNORE_INDEX] * len(ids)
    for k, is_trained in enumerate(trained):
        if is_trained:
            stop = starts[k + 1] if k + 1 < len(starts) else len(ids)
            labels[starts[k]:stop] = ids[starts[k]:stop]

    # The template, not the tokenizer's post-processor, decides BOS: each official preprocess function assumes
    # a fixed one (its masking counts it), whatever the tokenizer would add; internvl2_5's asks the tokenizer.
    if starts_with_bos(t, tokenizer):
        ids = [tokenizer.bos_token_id] + ids
        labels = [IGNORE_INDEX] + labels
    return Rendered(text=text, input_ids=ids, labels=labels)


def starts_with_bos(template: Template, tokenizer) -> bool:
    """Whether `template` puts the tokenizer's BOS first. `bos` None: when the tokenizer adds BOS itself (the
    official internvl2_5 preprocessing tests `tokenizer.add_bos_token`: the InternLM2.5 backbones)."""
    if template.bos is None:
        bos_id = tokenizer.bos_token_id
        return bos_id is not None and tokenizer("a")["input_ids"][:1] == [bos_id] != \
            tokenizer("a", add_special_tokens=False)["input_ids"][:1]
    if template.bos and tokenizer.bos_token_id is None:
        raise ValueError(f"template {template.name!r} starts with BOS, but the tokenizer has no bos_token")
    return template.bos


def system_default(template: Template, thinking: bool = False) -> str:
    """The system message used when neither the record nor `model.system` gives one: the template's default, or
    with `thinking` its thinking prompt (an error for a template without a thinking mode)."""
    if not thinking:
        return template.default_system
    if template.thinking_system is None:
        with_thinking = ", ".join(n for n, t in TEMPLATES.items() if t.thinking_system is not None)
        raise ValueError(f"template {template.name!r} has no thinking mode (templates with one: {with_thinking})")
    return template.thinking_system


def reply_text(template: Template, text: str) -> str:
    """Decoded reply text (or the part of it generated so far) without leading whitespace and without the
    template's `response_prefix` (harmony's channel header; "" while only part of it has been generated)."""
    text = text.lstrip()
    prefix = template.response_prefix
    if prefix:
        if text.startswith(prefix):
            return text[len(prefix):].lstrip()
        if prefix.startswith(text):
            return ""
    return text


def _counts_from_offsets(offsets: list[tuple[int, int]], cuts: list[int]) -> list[int]:
    """For each character index in `cuts`: how many tokens start before it."""
    counts, k = [], 0
    for cut in cuts:  # cuts ascend and token starts never decrease, so one pass suffices
        while k < len(offsets) and offsets[k][0] < cut:
            k += 1
        counts.append(k)
    return counts


def _counts_from_prefixes(tokenizer, text: str, ids: list[int], cuts: list[int]) -> list[int]:
    """`_counts_from_offsets` for a tokenizer without offsets; `ids` are the ids of `text`."""
    # Slow tokenizers have no offsets: tokenize each prefix. Where a token merges across the cut, the prefix's
    # tokens part from the whole string's at that token, which therefore starts before the cut.
    tokens = tokenizer.convert_ids_to_tokens(ids)
    counts = []
    for cut in cuts:
        prefix = tokenizer.tokenize(text[:cut]) if cut else []
        common = 0
        for a, b in zip(prefix, tokens):
            if a != b:
                break
            common += 1
        counts.append(common if common == len(prefix) else common + 1)
    return counts


def expand_image_context(
    rendered_ids: list[int], labels: list[int], context_id: int, tokens_per_image: list[int]
) -> tuple[list[int], list[int]]:
    """Replace the k-th `context_id` with `tokens_per_image[k]` copies of it (labels -100)."""
    positions = [i for i, token in enumerate(rendered_ids) if token == context_id]
    if len(positions) != len(tokens_per_image):
        raise ValueError(
            f"{len(positions)} image context tokens (id {context_id}) in the text, "
            f"but {len(tokens_per_image)} images to expand"
        )
    if any(n < 1 for n in tokens_per_image):
        raise ValueError(f"every image needs at least one token: {tokens_per_image}")
    ids: list[int] = []
    out_labels: list[int] = []
    start = 0
    for position, n in zip(positions, tokens_per_image):
        ids += rendered_ids[start:position]
        out_labels += labels[start:position]
        ids += [context_id] * n
        out_labels += [IGNORE_INDEX] * n
        start = position + 1
    ids += rendered_ids[start:]
    out_labels += labels[start:]
    return ids, out_labels


def chat_template_jinja(template_name: str, tokenizer=None) -> str:
    """The template as a Jinja chat template (for `tokenizer.chat_template`), rendering exactly what `render`
    renders: `apply_chat_template(messages)` == BOS text (when `starts_with_bos`) + `render(...).text`.

    A leading `system` message sets the system text ("" = no system block); without one the template's
    `default_system` is used, as the official `chat()` does, or its thinking prompt when called with
    `enable_thinking=True` (templates with a thinking mode). `add_generation_prompt` ends with the assistant prefix.
    Content may be a string or a list of parts: `text`, `image` (-> `<IMG_CONTEXT>\\n`, the placeholder
    transformers' InternVL processor expands into `<img>...</img>`) and `video` (-> `<video>\\n`). `tokenizer`
    decides BOS for a template whose `bos` is None (no BOS without one).
    """
    import json

    t = get_template(template_name)
    bos = starts_with_bos(t, tokenizer) if tokenizer is not None else bool(t.bos)

    def q(text: str) -> str:  # a Jinja string literal
        return json.dumps(text, ensure_ascii=False)

    default = f"{{%- set system = {q(t.default_system)} -%}}"
    if t.thinking_system is not None:
        default = (f"{{%- if enable_thinking is defined and enable_thinking -%}}{{%- set system = "
                   f"{q(t.thinking_system)} -%}}{{%- else -%}}{default}{{%- endif -%}}")
    stop = f"(({q(t.reply_stop_token)}) if loop.last else ({q(t.stop_token)}))"
    # Every line starts and ends with a whitespace-trimming tag, so the line breaks are not rendered.
    lines = [
        "{%- macro text_of(content) -%}",
        "  {%- if content is string -%}{{- content -}}",
        "  {%- else -%}{%- for part in content -%}",
        "    {%- if part['type'] == 'text' -%}{{- part['text'] -}}",
        "    {%- elif part['type'] == 'image' -%}{{- '<IMG_CONTEXT>\\n' -}}",
        "    {%- elif part['type'] == 'video' -%}{{- '<video>\\n' -}}",
        "    {%- endif -%}",
        "  {%- endfor -%}{%- endif -%}",
        "{%- endmacro -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "  {%- set system = text_of(messages[0]['content']) -%}{%- set turns = messages[1:] -%}",
        "{%- else -%}",
        f"  {default}{{%- set turns = messages -%}}",
        "{%- endif -%}",
        "{{- bos_token -}}" if bos else "",
        f"{{%- if system -%}}{{{{- {q(t.system_prefix)} + system + {q(t.stop_token + t.turn_suffix)} -}}}}"
        "{%- endif -%}",
        "{%- for message in turns -%}",
        "  {%- set content = text_of(message['content']) -%}",
        "  {%- set content = content | trim -%}" if t.strip else "",
        "  {%- if message['role'] == 'user' -%}",
        f"    {{{{- {q(t.user_prefix)} + content + {q(t.stop_token + t.turn_suffix)} -}}}}",
        "  {%- elif message['role'] == 'assistant' -%}",
        f"    {{{{- {q(t.assistant_prefix + t.response_prefix)} + content + {stop} + {q(t.turn_suffix)} -}}}}",
        "  {%- else -%}",
        "    {{- raise_exception('unsupported role ' + message['role'] + ' (a system message must come first)') -}}",
        "  {%- endif -%}",
        "{%- endfor -%}",
        f"{{%- if add_generation_prompt -%}}{{{{- {q(t.assistant_prefix)} -}}}}{{%- endif -%}}",
    ]
    return "\n".join(line for line in lines if line)

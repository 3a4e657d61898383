"""The InternVL 1.5 / 2.0 chat templates, rendered to ids and labels exactly as the official training encodes them.

One two-round conversation in `internlm2-chat`, each line labelled with the field that produced it
(T = trained, . = masked with -100). The blocks follow each other with NO newline; the line breaks are for reading:

    <s>                                        .  BOS (`bos`: internlm2-chat, phi3-chat; not Hermes-2)
    <|im_start|>system\\n{system}<|im_end|>     .  system_prefix + system + stop_token (none if system is None or "")
    <|im_start|>user\\n{query 1}<|im_end|>      .  user_prefix + query + stop_token (image blocks included)
    <|im_start|>assistant\\n                    .  assistant_prefix
    {response 1}<|im_end|>                     T  response + stop_token
    <|im_start|>user\\n{query 2}<|im_end|>      .  user_prefix + query + stop_token
    <|im_start|>assistant\\n                    .  assistant_prefix
    {response 2}<|im_end|>                     T  response + stop_token (a generation prompt stops before this line)

`Hermes-2` is the same text without BOS; `phi3-chat` uses `<|system|>\\n`, `<|user|>\\n`, `<|assistant|>\\n` and
`<|end|>`. `internlm2-chat` strips whitespace around every query and response (`strip`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

IGNORE_INDEX = -100

INTERNVL2_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)


@dataclass(frozen=True)
class Template:
    """One chat format: strings and two rules, no code."""

    name: str
    system_prefix: str
    user_prefix: str
    assistant_prefix: str
    stop_token: str
    """Closes the system block, every query and every response; generation stops at it."""
    default_system: str
    """The official conversation template's system message (model types of the V1.5 era use their own)."""
    bos: bool
    """The sequence starts with the tokenizer's BOS token (what the official preprocess function assumes)."""
    strip: bool
    """Strip whitespace around every query and response before rendering."""


_CHATML = dict(system_prefix="<|im_start|>system\n", user_prefix="<|im_start|>user\n",
               assistant_prefix="<|im_start|>assistant\n", stop_token="<|im_end|>", default_system=INTERNVL2_SYSTEM)

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(name="internlm2-chat", bos=True, strip=True, **_CHATML),
        Template(name="Hermes-2", bos=False, strip=False, **_CHATML),
        Template(name="phi3-chat", system_prefix="<|system|>\n", user_prefix="<|user|>\n",
                 assistant_prefix="<|assistant|>\n", stop_token="<|end|>", default_system=INTERNVL2_SYSTEM,
                 bos=True, strip=False),
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
    parts: list[tuple[str, bool]] = []  # (text, trained)
    if system:
        parts.append((template.system_prefix + system + template.stop_token, False))
    for i, (query, response) in enumerate(turns):
        if template.strip:
            query = query.strip()
        parts.append((template.user_prefix + query + template.stop_token + template.assistant_prefix, False))
        if response is None:
            if i != len(turns) - 1:
                raise ValueError(f"turn {i}: only the last response may be None (a generation prompt)")
            continue
        if template.strip:
            response = response.strip()
        if not response:
            raise ValueError(f"turn {i}: empty response (nothing to train); use None for a generation prompt")
        parts.append((response + template.stop_token, True))

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
    # a fixed one (its masking counts it), whatever the tokenizer would add.
    if template.bos:
        if tokenizer.bos_token_id is None:
            raise ValueError(f"template {template.name!r} starts with BOS, but the tokenizer has no bos_token")
        ids = [tokenizer.bos_token_id] + ids
        labels = [IGNORE_INDEX] + labels
    return Rendered(text=text, input_ids=ids, labels=labels)


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


def chat_template_jinja(template_name: str) -> str:
    """The template as a Jinja chat template (for `tokenizer.chat_template`), rendering exactly what `render`
    renders: `apply_chat_template(messages)` == BOS text (when `bos`) + `render(...).text`.

    A leading `system` message sets the system text ("" = no system block); without one the template's
    `default_system` is used, as the official `chat()` does. `add_generation_prompt` ends with the assistant
    prefix. Content may be a string or a list of parts: `text`, `image` (-> `<IMG_CONTEXT>\\n`, the placeholder
    transformers' InternVL processor expands into `<img>...</img>`) and `video` (-> `<video>\\n`).
    """
    import json

    t = get_template(template_name)

    def q(text: str) -> str:  # a Jinja string literal
        return json.dumps(text, ensure_ascii=False)

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
        f"  {{%- set system = {q(t.default_system)} -%}}{{%- set turns = messages -%}}",
        "{%- endif -%}",
        "{{- bos_token -}}" if t.bos else "",
        f"{{%- if system -%}}{{{{- {q(t.system_prefix)} + system + {q(t.stop_token)} -}}}}{{%- endif -%}}",
        "{%- for message in turns -%}",
        "  {%- set content = text_of(message['content']) -%}",
        "  {%- set content = content | trim -%}" if t.strip else "",
        "  {%- if message['role'] == 'user' -%}",
        f"    {{{{- {q(t.user_prefix)} + content + {q(t.stop_token)} -}}}}",
        "  {%- elif message['role'] == 'assistant' -%}",
        f"    {{{{- {q(t.assistant_prefix)} + content + {q(t.stop_token)} -}}}}",
        "  {%- else -%}",
        "    {{- raise_exception('unsupported role ' + message['role'] + ' (a system message must come first)') -}}",
        "  {%- endif -%}",
        "{%- endfor -%}",
        f"{{%- if add_generation_prompt -%}}{{{{- {q(t.assistant_prefix)} -}}}}{{%- endif -%}}",
    ]
    return "\n".join(line for line in lines if line)

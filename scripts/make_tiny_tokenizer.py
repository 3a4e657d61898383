"""Train the small byte-level BPE tokenizer in vltrain/assets/tiny_tokenizer.

The corpus is the demo dataset's question and answer texts, ChatML role
strings, the two default InternVL system messages and a little generic
English. Special tokens follow the regular vocabulary with fixed ids:
<|endoftext|>, <|im_start|>, <|im_end|>, then the InternVL image and grounding
tokens. As in Qwen2, no BOS token is added, eos is <|im_end|> and pad is
<|endoftext|>. The output is byte-for-byte reproducible.
"""

from __future__ import annotations

import os

# The BPE trainer counts words in parallel; one thread keeps merge ties and
# therefore the output files identical from run to run.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from vltrain.data.demo import demo_texts  # noqa: E402
from vltrain.model.tokenizer import INTERNVL_TOKENS  # noqa: E402

DEFAULT_OUT = REPO / "vltrain" / "assets" / "tiny_tokenizer"
# Upper bound on the regular tokens; this corpus runs out of merges first
# (about 1350). The special tokens come after them.
VOCAB_SIZE = 2000

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

SYSTEM_MESSAGES = [
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。",
    "You are an AI assistant whose name is InternLM (书生·浦语).",
]
ROLES = ["system", "user", "assistant"]

GENERIC_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Please describe the image in detail. What can you see in this picture? There is a
small red car parked next to a tall building, and a man is walking his dog along
the street. The weather is sunny and the sky is clear. Two children are playing
with a ball in the park while their parents sit on a wooden bench under a tree.
Answer the question using a single word or phrase. Read the text in the image.
Where is the cat? The cat is sleeping on the sofa in the living room. How many
people are in the photo? I think there are three people standing near the door.
This chart shows the number of visitors per month. The values increase from
January to June and then decrease towards the end of the year. Which of the
following options is correct? Choose the best answer from A, B, C or D.
Thank you for your help. I am sorry, but I cannot answer that question because
the image is not clear enough. Could you provide a larger version of the photo?
The document contains a table with four columns: name, date, amount and total.
Please provide the bounding box coordinates of the region this sentence describes.
The model was trained on a mixture of image, text and video data. It can answer
questions, write stories, translate sentences, solve simple math problems and
explain what is happening in a scene. Numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
10, 12, 25, 50, 100 and 2024 appear often. Yes. No. Maybe. OK.
Fine-tuning adapts a pretrained model to a new task with a modest amount of data.
Each training example is a conversation between a user and an assistant; only the
assistant's replies contribute to the loss. The learning rate warms up over the
first few steps and then follows a cosine schedule. Evaluation runs every hundred
steps on a held-out split, and the best checkpoint is saved to the output folder.
If the loss becomes unstable, try a smaller learning rate or a larger batch size.
Images are resized to square tiles, normalised with the mean and standard
deviation of the vision encoder, and turned into a sequence of visual tokens that
the language model reads together with the words of the prompt.
My favourite colours are orange, purple, pink, brown, black, white and grey. The
kitchen has a round table, four chairs, a window and a small green plant. She
bought apples, bananas, bread, milk, cheese and eggs at the market on Sunday
morning. The train leaves the station at half past seven and arrives at noon.
Mountains, rivers, forests, lakes, beaches and deserts cover the surface of the
earth. Birds fly south in autumn, and flowers bloom again every spring. Water
boils at one hundred degrees and freezes at zero. The library opens on Monday,
Tuesday, Wednesday, Thursday and Friday, but it is closed on Saturday.
Summary: the results are good, although several questions remain open. First,
second, third, last. Before, after, above, below, inside, outside, between.
Hello! How are you today? I'm fine, thanks. Let's get started. Here's an example:
"print('hello world')" returns nothing but writes a line. x = 3; y = x * 2 + 1.
"""


def corpus() -> list[str]:
    """Training texts in a fixed order."""
    texts = demo_texts()
    lines: list[str] = []
    lines += SYSTEM_MESSAGES
    lines += ROLES + [f"{role}\n" for role in ROLES]
    # Conversations rendered the way the chat template lays them out, minus
    # the special tokens, so that role names and newlines merge naturally.
    for system in SYSTEM_MESSAGES:
        for text in texts:
            lines.append(f"system\n{system}\nuser\n{text}\nassistant\n{text}\n")
    lines += texts
    lines += GENERIC_ENGLISH.splitlines()
    return lines


def build() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    # Added after training so they take the ids right after the regular vocabulary.
    tokenizer.add_special_tokens(SPECIAL_TOKENS + list(INTERNVL_TOKENS))
    return tokenizer


def save(tokenizer: Tokenizer, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
        extra_special_tokens=SPECIAL_TOKENS[1:] + list(INTERNVL_TOKENS),
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    tokenizer = build()
    save(tokenizer, args.out)
    print(f"wrote {args.out} (vocab {tokenizer.get_vocab_size()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

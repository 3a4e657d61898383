"""Golden logits and greedy tokens of the OFFICIAL InternVL code on the tiny original-layout checkpoints of
scripts/make_tiny_original.py (the InternVL2.5 / 3 / 3.5 families): tests/data/convert_later_golden.json.

Runs OUTSIDE the project environment, next to a copy of the official code (scripts/golden/convert.md, "Later
generations", says which versions and how). Two steps:

    python official_convert_later.py run --ckpt CKPT --families qwen2_5 internlm2_5 --code internvl_chat \
        --official OFFICIAL --out part.json           # transformers 4.45.2 for internvl_chat, 4.57 for _gpt_oss
    python official_convert_later.py merge OUT part1.json part2.json ...   # in the project venv (digests)
"""
import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers

if len(sys.argv) > 1 and sys.argv[1] == "merge":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import make_tiny_original

    out_file, parts = Path(sys.argv[2]), [json.loads(Path(f).read_text()) for f in sys.argv[3:]]
    families = {}
    for part in parts:
        for name, entry in part["families"].items():
            entry["weights_digest"] = make_tiny_original.state_dict_digest(Path(part["ckpt"]) / name)
            entry["made_with"] = part["made_with"]
            families[name] = entry
    out_file.write_text(json.dumps({"format": 1, "families": {
        k: families[k] for k in make_tiny_original.FAMILIES if k in families}}, separators=(",", ":")))
    sys.exit(0)

p = argparse.ArgumentParser()
p.add_argument("step", choices=["run"])
p.add_argument("--ckpt", type=Path, required=True)
p.add_argument("--families", nargs="+", required=True)
p.add_argument("--code", choices=["internvl_chat", "internvl_chat_gpt_oss"], required=True)
p.add_argument("--official", type=Path, required=True)
p.add_argument("--out", type=Path, required=True)
args = p.parse_args()

root = args.official / args.code
sys.path.insert(0, str(root))
if args.code == "internvl_chat":
    from internvl.conversation import get_conv_template
    from internvl.model.internvl_chat import InternVLChatConfig, InternVLChatModel
else:
    from internvl.model.internvl_chat.configuration_internvl_chat import InternVLChatConfig
    from internvl.model.internvl_chat.conversation import get_conv_template
    from internvl.model.internvl_chat.modeling_internvl_chat import InternVLChatModel
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

torch.set_grad_enabled(False)
INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
TILES = {"qwen2_5": 3, "internlm2_5": 2, "qwen3": 3, "qwen3_moe": 2, "gpt_oss": 2}


def r7(x):
    return float(f"{x:.7g}")


def rl(t):
    return [r7(v) for v in t.tolist()]


def state(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for f in dict.fromkeys(index["weight_map"].values()):
        out.update(load_file(str(folder / f)))
    return out, list(index["weight_map"])


def build(folder):
    config = InternVLChatConfig.from_pretrained(folder)
    config.llm_config._attn_implementation = "eager"
    config.vision_config.use_flash_attn = False
    model = InternVLChatModel(config, use_flash_attn=False).float().eval()
    sd, order = state(folder)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    lm = model.language_model
    if tied:
        assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight, "not tied"
        assert list(missing) == ["language_model.lm_head.weight"], missing
    else:
        assert not missing, missing
    assert not unexpected, unexpected
    official_order = [k for k in model.state_dict() if not (tied and k == "language_model.lm_head.weight")]
    return model, order == official_order, tied


def tokenizer_for(folder, family):
    if family.startswith("internlm2"):
        tmp = Path(tempfile.mkdtemp())
        shutil.copytree(folder, tmp / "tok")
        shutil.copy(args.official / "internvl_chat/internvl/model/internlm2/tokenization_internlm2.py", tmp / "tok")
        cfg = json.loads((tmp / "tok/tokenizer_config.json").read_text())
        cfg["auto_map"] = {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}
        (tmp / "tok/tokenizer_config.json").write_text(json.dumps(cfg))
        return AutoTokenizer.from_pretrained(tmp / "tok", trust_remote_code=True, use_fast=False)
    use_fast = not (folder / "vocab.json").is_file()  # GPT-OSS ships tokenizer.json only
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=True, use_fast=use_fast)


results = {}
for family in args.families:
    folder = args.ckpt / family
    raw = json.loads((folder / "config.json").read_text())
    template_name = raw["template"]
    tok = tokenizer_for(folder, family)
    ids = {t: tok.convert_tokens_to_ids(t) for t in INTERNVL_TOKENS}
    model, order_ok, tied = build(folder)
    vocab = raw["llm_config"]["vocab_size"]
    img_id = ids["<IMG_CONTEXT>"]
    num_image_token = model.num_image_token
    conv = get_conv_template(template_name)
    sep = conv.sep.strip() if conv.sep2 is None else conv.sep2.strip()
    sep_id = tok.convert_tokens_to_ids(sep)
    g = torch.Generator().manual_seed(4321)
    columns = sorted(set(torch.randint(0, vocab, (40,), generator=g).tolist()) | set(ids.values()) | {sep_id})
    entry = {"seed": 0, "weights_digest": None, "state_dict_order_matches_official": order_ok, "vocab_size": vocab,
             "image_token_id": img_id, "num_image_token": num_image_token, "ps_version": raw["ps_version"],
             "template": template_name, "eos_token_id": sep_id, "tied_lm_head": tied, "code": args.code,
             "len_tokenizer": len(tok), "columns": columns, "prompts": {}}
    for pname in ("image", "text"):
        tiles = TILES[family] if pname == "image" else 0
        conv = get_conv_template(template_name)
        conv.system_message = "Answer briefly."
        question = "<image>\nWhat is in the image?" if pname == "image" else "Tell me a short story."
        conv.append_message(conv.roles[0], question)
        conv.append_message(conv.roles[1], None)
        prompt = conv.get_prompt()
        query = prompt.replace("<image>", "<img>" + "<IMG_CONTEXT>" * num_image_token * tiles + "</img>", 1)
        input_ids = tok(query, return_tensors="pt").input_ids
        if tiles:
            spec = {"seed": 1234, "shape": [tiles, 3, 112, 112]}
            pv = torch.randn(spec["shape"], generator=torch.Generator().manual_seed(1234), dtype=torch.float32)
            spec["sum"] = float(pv.double().sum())
            flags = torch.ones(tiles, 1, dtype=torch.long)
            spec["image_flags"] = [1] * tiles
        else:
            spec = None
            pv = torch.zeros(1, 3, 112, 112)
            flags = torch.zeros(1, 1, dtype=torch.long)
        # forward (fresh model)
        model, _, _ = build(folder)
        model.img_context_token_id = img_id
        logits = model(pixel_values=pv, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                       image_flags=flags).logits[0].float()
        if not tiles:  # the zero tile changes nothing: equal to the bare LLM
            bare = model.language_model(input_ids=input_ids).logits[0].float()
            assert (bare - logits).abs().max() < 1e-5
        lg = {"at_columns": [rl(row) for row in logits[:, columns]], "logsumexp": rl(torch.logsumexp(logits, -1)),
              "argmax": logits.argmax(-1).tolist(), "max": rl(logits.max(-1).values),
              "last_top20_ids": logits[-1].topk(20).indices.tolist(),
              "last_top20_values": rl(logits[-1].topk(20).values)}
        # generate (fresh model), chat()'s call
        model, _, _ = build(folder)
        model.img_context_token_id = img_id
        out = model.generate(pixel_values=pv if tiles else None, input_ids=input_ids,
                             attention_mask=torch.ones_like(input_ids), max_new_tokens=10, do_sample=False,
                             eos_token_id=sep_id, pad_token_id=sep_id, output_scores=True,
                             return_dict_in_generate=True)
        new = out.sequences[0].tolist()
        scores = [s[0].float() for s in out.scores]
        assert (scores[0] - logits[-1]).abs().max() < 1e-4, (scores[0] - logits[-1]).abs().max()
        margins = [r7(float(s.topk(2).values[0] - s.topk(2).values[1])) for s in scores]
        # cross-check: argmax loop without cache (fresh model)
        model, _, _ = build(folder)
        model.img_context_token_id = img_id
        seq = input_ids
        loop = []
        for _ in range(len(new)):
            out_loop = model(pixel_values=pv, input_ids=seq, attention_mask=torch.ones_like(seq), image_flags=flags)
            nxt = int(out_loop.logits[0, -1].argmax())
            loop.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
            if nxt == sep_id:
                break
        entry["prompts"][pname] = {
            "prompt": prompt, "tiles": tiles, "input_ids": input_ids[0].tolist(), "pixel_values": spec,
            "logits": lg,
            "generation": {"new_tokens": new, "margins": margins, "stopped_at_eos": new[-1] == sep_id,
                           "no_cache_argmax_loop": loop, "no_cache_loop_agrees": loop == new}}
        print(family, pname, len(input_ids[0]), new, min(margins), loop == new, flush=True)
    results[family] = entry

made = {"code": args.code, "commit": "2410d1dbf208f0e799459aff9376e5747dbf41a2",
        "transformers": transformers.__version__, "torch": torch.__version__, "dtype": "float32",
        "attention": "eager"}
args.out.write_text(json.dumps({"made_with": made, "ckpt": str(args.ckpt), "families": results},
                               separators=(",", ":")))

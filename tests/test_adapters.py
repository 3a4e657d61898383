"""ms-swift and official InternVL LoRA checkpoints: converted exactly onto the native model (logits against the
official model with the original adapter, tests/data/adapters_golden.json), loaded by infer / export / convert,
merged, exported back to the original layout, continued by training; what cannot be represented is refused."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_convert import GOLDEN as CONVERT_GOLDEN
from tests.test_convert import _load_maker, model_inputs, vltrain_tokenizer
from vltrain.cli.convert import main as convert_main
from vltrain.cli.export import main as export_main
from vltrain.model import adapters
from vltrain.model.adapters import AdapterError, adapter_on, load_foreign, read_foreign
from vltrain.model.convert import load_original

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = json.loads((ROOT / "tests" / "data" / "adapters_golden.json").read_text(encoding="utf-8"))
CASES = list(GOLDEN["cases"])
ATOL = 1e-5
DTYPE = torch.float64  # the golden values' dtype (scripts/golden/adapters.md)


@pytest.fixture(autouse=True, scope="module")
def _converted_cache_in_tmp(tmp_path_factory):
    """Official checkpoints' extracted bases go to a temporary folder, never the user's cache."""
    import os

    old = os.environ.get("VLTRAIN_CONVERTED_CACHE")
    os.environ["VLTRAIN_CONVERTED_CACHE"] = str(tmp_path_factory.mktemp("converted"))
    yield
    if old is None:
        os.environ.pop("VLTRAIN_CONVERTED_CACHE", None)
    else:
        os.environ["VLTRAIN_CONVERTED_CACHE"] = old


@pytest.fixture(scope="module")
def makers():
    maker = _load_maker()
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("make_tiny_adapters", ROOT / "scripts" / "make_tiny_adapters.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return maker, module


@pytest.fixture(scope="module")
def bases(tmp_path_factory, shared_tokenizers, makers) -> dict[str, Path]:
    maker, _ = makers
    root = tmp_path_factory.mktemp("bases")
    families = sorted({c["family"] for c in GOLDEN["cases"].values()})
    return {f: maker.make_checkpoint(f, root / f, shared_tokenizers, seed=CONVERT_GOLDEN["families"][f]["seed"])
            for f in families}


@pytest.fixture(scope="module")
def native_bases(bases) -> dict:
    """The converted base of each family in float64, loaded once (each test adapts a copy)."""
    return {f: load_original(path, vltrain_tokenizer(path, f), DTYPE) for f, path in bases.items()}


def digest_folder(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix == ".safetensors"):
        for k, t in sorted(load_file(str(f)).items()):
            h.update(f"{f.relative_to(folder)}|{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def make(makers, bases, name: str, out: Path, **kwargs) -> Path:
    case = GOLDEN["cases"][name]
    folder = makers[1].make_adapter(bases[case["family"]], case["family"], case["format"], out, seed=case["seed"],
                                    **case["options"], **kwargs)
    return folder


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, makers, bases) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make(makers, bases, name, root / name.replace("/", "__")) for name in CASES}


def logits_of(model, family: str) -> torch.Tensor:
    inputs = model_inputs(CONVERT_GOLDEN["families"][family]["prompts"]["image"])
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.no_grad():
        return model(**inputs).logits[0].double()


def assert_golden(logits: torch.Tensor, name: str, atol: float = ATOL) -> None:
    case = GOLDEN["cases"][name]
    diff = (logits[:, case["columns"]] - torch.tensor(case["logits_at_columns"], dtype=torch.float64)).abs().max()
    assert diff <= atol, f"{name}: logits differ from the official model with the adapter by {diff:.2e}"
    lse = (torch.logsumexp(logits, -1) - torch.tensor(case["logsumexp"], dtype=torch.float64)).abs().max()
    assert lse <= atol, f"{name}: logsumexp differs by {lse:.2e}"
    assert logits.argmax(-1).tolist() == case["argmax"]


# ---- the mapping, every format and family --------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_generator_rebuilds_the_golden_adapters(adapter_dirs, name):
    assert digest_folder(adapter_dirs[name]) == GOLDEN["cases"][name]["adapter_digest"], (
        f"{name}: scripts/make_tiny_adapters.py no longer writes the adapter the golden values were made from")


@pytest.mark.parametrize("name", CASES)
def test_converted_adapter_gives_the_official_logits(adapter_dirs, native_bases, bases, name):
    case = GOLDEN["cases"][name]
    foreign = read_foreign(adapter_dirs[name])
    if case["format"] == "official":  # against its own base weights here; against a separate base below
        foreign.lora.trained.clear()
        base = load_original(adapters._extracted_base(foreign), vltrain_tokenizer(bases[case["family"]],
                                                                                  case["family"]), DTYPE)
    else:
        base = copy.deepcopy(native_bases[case["family"]])
    model, native = adapter_on(base, foreign)
    assert_golden(logits_of(model, case["family"]), name)
    if case["family"].startswith("internlm2") and case["format"] != "official":
        # the fused wqkv became q/k/v adapters sharing lora_A, rank and alpha unchanged
        q = next(m for m in native.modules if m.endswith("layers.0.self_attn.q_proj"))
        k = q.replace("q_proj", "k_proj")
        assert torch.equal(native.modules[q]["lora_A"], native.modules[k]["lora_A"])
        assert native.r == foreign.lora.r and native.alpha == foreign.lora.alpha


def test_ms_swift_regex_targets_become_explicit_native_modules(adapter_dirs):
    foreign = read_foreign(adapter_dirs["internlm2/swift2-regex"])
    assert foreign.format == "ms-swift peft" and foreign.model_type == "internvl2-2b"
    assert "mlp1.1" in foreign.lora.modules and "language_model.output" not in foreign.lora.modules
    model, tokenizer, cfg = load_foreign(adapter_dirs["internlm2/swift2-regex"])
    targets = model.peft_config["default"].target_modules
    assert "model.multi_modal_projector.linear_1" in targets
    assert "model.language_model.layers.1.self_attn.v_proj" in targets
    assert cfg.model.name == "internvl2-2b" and cfg.model.template == "internlm2-chat"
    assert sorted(targets) == cfg.sft_type.lora_targets


# ---- infer / convert / merge / export / train ---------------------------------------------------------------


def test_infer_command_answers_with_an_ms_swift_checkpoint(tmp_path, adapter_dirs):
    from vltrain.cli.infer import main as infer_main
    from vltrain.data.demo import write_demo_dataset

    demo = write_demo_dataset(tmp_path / "demo", n_train=2, n_val=2)
    results = tmp_path / "results"
    assert infer_main([f"ckpt_dir={adapter_dirs['qwen2/swift3+rslora']}", f"dataset.val=[{demo.val}]",
                       "max_new_tokens=3", f"result_dir={results}"]) == 0
    rows = [json.loads(line) for f in results.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["response"], str) for r in rows)


def test_python_api_puts_an_ms_swift_adapter_on_a_loaded_model(adapter_dirs, bases):
    from vltrain import Swift, get_model_tokenizer, get_template, inference

    model, tokenizer = get_model_tokenizer("internvl2-4b", torch.float32, model_id_or_path=str(bases["phi3"]))
    model = Swift.from_pretrained(model, str(adapter_dirs["phi3/swift2-list"]))
    assert_golden(logits_of(model.to(DTYPE), "phi3"), "phi3/swift2-list")  # bf16 base, fp32 adapter: exact in fp64
    model.generation_config.max_new_tokens = 3
    response, history = inference(model, get_template("internvl2-phi3", tokenizer), "Hello")
    assert isinstance(response, str) and history[-1][0] == "Hello"


def test_records_point_nowhere_then_model_path_is_the_base(tmp_path, makers, bases, adapter_dirs):
    folder = make(makers, bases, "qwen2/swift2-list", tmp_path / "moved", base_record="/nowhere/InternVL2-1B")
    with pytest.raises(AdapterError, match=r"not here .*sft_args.json model_id_or_path: /nowhere/InternVL2-1B.*"
                                           r"model.path="):
        load_foreign(folder)
    from vltrain.model.load import load_checkpoint

    model, _, cfg = load_checkpoint(folder, model_path=str(bases["qwen2"]))
    assert cfg.model.path == str(bases["qwen2"])
    assert_golden(logits_of(model.to(DTYPE), "qwen2"), "qwen2/swift2-list")


def test_official_checkpoint_checks_its_base_and_carries_the_trained_projector(adapter_dirs, native_bases, bases,
                                                                              makers, shared_tokenizers, tmp_path):
    name = "phi3/official"
    foreign = read_foreign(adapter_dirs[name])
    model, native = adapter_on(copy.deepcopy(native_bases["phi3"]), foreign)
    assert sorted(native.trained) == ["model.multi_modal_projector.linear_1.weight",
                                      "model.multi_modal_projector.linear_2.weight"]
    assert_golden(logits_of(model, "phi3"), name)
    # the base named by config.json's _name_or_path: the same, through load_foreign
    folder = tmp_path / "named"
    shutil.copytree(adapter_dirs[name], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": str(bases["phi3"])}))
    model, _, cfg = load_foreign(folder, dtype=DTYPE)
    assert cfg.model.path == str(bases["phi3"].resolve())
    assert "model.multi_modal_projector.linear_1" in model.peft_config["default"].modules_to_save
    assert_golden(logits_of(model, "phi3"), name)
    # a base_layer that is not the base's weight: another base
    other = makers[0].make_checkpoint("phi3", tmp_path / "other", shared_tokenizers, seed=1)
    wrong = load_original(other, vltrain_tokenizer(other, "phi3"), DTYPE)
    with pytest.raises(AdapterError, match=r"base_layer of a LoRA layer\) differs .*model.path="):
        adapter_on(wrong, read_foreign(adapter_dirs[name]))


def test_convert_command_writes_a_checkpoint_plain_peft_loads(tmp_path, adapter_dirs, bases):
    from peft import PeftModel
    from transformers import InternVLForConditionalGeneration

    name = "internlm2/swift-backend"
    dst = tmp_path / "lora"
    assert convert_main([f"src={adapter_dirs[name]}", f"dst={dst}"]) == 0
    config = json.loads((dst / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(bases["internlm2"].resolve())
    assert (dst / "vltrain.yaml").is_file() and (dst / "converted_from.json").is_file()
    base_hf = tmp_path / "base-hf"
    assert convert_main([f"src={bases['internlm2']}", f"dst={base_hf}", "dtype=fp32"]) == 0
    base = InternVLForConditionalGeneration.from_pretrained(base_hf, dtype=DTYPE)
    model = PeftModel.from_pretrained(base, dst).eval()
    assert_golden(logits_of(model, "internlm2"), name)

    # the converted checkpoint, moved onto the HF-native base, exports back: the base in the original layout too
    import yaml

    saved = yaml.safe_load((dst / "vltrain.yaml").read_text())
    saved["model"]["path"] = str(base_hf)
    (dst / "vltrain.yaml").write_text(yaml.safe_dump(saved))
    back = tmp_path / "back"
    assert export_main([f"ckpt_dir={dst}", "to=original", f"dst={back}"]) == 0
    assert (tmp_path / "back-base" / "config.json").is_file()
    assert json.loads((back / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (tmp_path / "back-base").resolve())
    model, _, _ = load_foreign(back, dtype=DTYPE)
    assert_golden(logits_of(model, "internlm2"), name)


def test_converted_official_checkpoint_reloads_with_its_trained_projector(tmp_path, adapter_dirs, bases):
    from vltrain.model.load import load_checkpoint

    name = "llama/official"
    dst = tmp_path / "lora"
    assert convert_main([f"src={adapter_dirs[name]}", f"dst={dst}", f"model.path={bases['llama']}"]) == 0
    assert json.loads((dst / "adapter_config.json").read_text())["modules_to_save"] == [
        "model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"]
    model, _, cfg = load_checkpoint(dst)
    assert cfg.model.path == str(bases["llama"])
    assert_golden(logits_of(model.to(DTYPE), "llama"), name)


def test_merge_and_export_back_to_the_original_layout(tmp_path, adapter_dirs, bases, capsys):
    from vltrain.model.load import load_checkpoint

    name = "internlm2/swift2-list"  # wqkv only: the language model alone
    merged = tmp_path / "merged"
    assert export_main([f"ckpt_dir={adapter_dirs[name]}", "merge_lora=true", f"dst={merged}"]) == 0
    model, _, _ = load_checkpoint(merged)
    assert_golden(logits_of(model.to(DTYPE), "internlm2"), name, atol=1e-4)  # merged in fp32

    back = tmp_path / "original-lora"
    assert export_main([f"ckpt_dir={adapter_dirs[name]}", "to=original", f"dst={back}"]) == 0
    assert "original-layout LoRA adapter" in capsys.readouterr().out
    foreign = read_foreign(back)
    assert set(foreign.lora.modules) == set(read_foreign(adapter_dirs[name]).lora.modules)
    assert foreign.lora.r == 8  # the q/k/v A's are still equal: rank r
    model, _, _ = load_foreign(back, dtype=DTYPE)
    assert_golden(logits_of(model, "internlm2"), name)


def test_vision_or_projector_lora_exports_merged_and_says_why(tmp_path, adapter_dirs, capsys):
    dst = tmp_path / "out"
    assert export_main([f"ckpt_dir={adapter_dirs['qwen2/swift2-regex']}", "to=original", f"dst={dst}"]) == 0
    out = capsys.readouterr().out
    assert "merging the adapter into the weights: the adapter also adapts the projector" in out
    assert (dst / "config.json").is_file() and not (dst / "adapter_config.json").exists()


@pytest.mark.parametrize("name, alpha", [("internlm2-vit6b-ps1/swift2-regex", 96.0),
                                         ("internlm2/swift2-regex+dora", 96.0),
                                         ("internlm2-vit6b-ps1/swift2-all+rslora", 32.0 * 3 ** 0.5)])
def test_stacked_export_after_training_is_exact(adapter_dirs, native_bases, tmp_path, name, alpha):
    """Once trained, the q/k/v A's differ: the original adapter gets rank 3r (A stacked, B block-diagonal, alpha
    tripled, or times sqrt(3) with rsLoRA; DoRA magnitudes fused as the rows) and gives the same logits. The
    vision tower's `attn.qkv` (ALL targets) is stacked the same way."""
    family = GOLDEN["cases"][name]["family"]
    model, native = adapter_on(copy.deepcopy(native_bases[family]), read_foreign(adapter_dirs[name]))
    generator = torch.Generator().manual_seed(3)
    for module, parts in native.modules.items():  # stand-in for training: the three A's move apart
        layer = model.get_submodule(f"base_model.model.{module}")
        with torch.no_grad():
            layer.lora_A["default"].weight.add_(0.05 * torch.randn(parts["lora_A"].shape, generator=generator,
                                                                   dtype=DTYPE))
    expected = logits_of(model, family)
    original = adapters.to_original(adapters.native_lora(model), model.get_base_model(), "InternLM2ForCausalLM")
    assert original.r == 24 and original.alpha == pytest.approx(alpha)
    adapters.save_original_adapter(original, tmp_path / "stacked", "unused")
    foreign = read_foreign(tmp_path / "stacked")
    assert set(foreign.lora.modules) == set(read_foreign(adapter_dirs[name]).lora.modules)
    again, _ = adapter_on(copy.deepcopy(native_bases[family]), foreign)
    assert (logits_of(again, family) - expected).abs().max() <= ATOL


@pytest.mark.slow
def test_training_continues_from_an_ms_swift_adapter(tmp_path, adapter_dirs, bases):
    from vltrain.config import compose_config
    from vltrain.data.demo import write_demo_dataset
    from vltrain.train.recipe import build_trainer

    name = "qwen2/swift2-list"
    demo = write_demo_dataset(tmp_path / "demo", n_train=8, n_val=0)
    cfg = compose_config([
        "model=internvl2-1b", f"model.path={bases['qwen2']}", "model.max_tiles=1", "sft_type=lora",
        f"sft_type.init_adapter={adapter_dirs[name]}", "dataset=custom", f"dataset.train=[{demo.train}]",
        "dataset.val_ratio=0", "global_batch_size=2", "trainer.max_steps=1", "trainer.per_device_train_batch_size=2",
        "trainer.save_steps=1", "trainer.dataloader_num_workers=0", "trainer.learning_rate=1e-2",
        "trainer.lr_scheduler_type=constant", "trainer.warmup_steps=0", "data.max_length=1024",
    ], run_dir=str(tmp_path / "run"))
    trainer = build_trainer(cfg)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    expected = adapters.to_native(read_foreign(adapter_dirs[name]).lora, trainer.model.get_base_model())
    a = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert torch.equal(start[a], expected.modules["model.language_model.layers.0.self_attn.q_proj"]["lora_A"])
    assert trainer.optimizer is None  # nothing of ms-swift's optimizer is read: built afresh by train()
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, start[n])]
    assert moved and set(moved) <= set(start)
    assert (Path(cfg.run_dir) / "checkpoint-1" / "adapter_model.safetensors").is_file()


def test_per_module_alpha_and_rank_patterns_carry_over(tmp_path, adapter_dirs, native_bases):
    """peft's rank_pattern / alpha_pattern (matched on the original names) reach the native modules they map to:
    here v_proj at rank 4 and q_proj at alpha 16 give what the same weights scaled by hand give."""
    folder = tmp_path / "a"
    shutil.copytree(adapter_dirs["qwen2/swift2-list"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"v_proj": 4},
                                                            "alpha_pattern": {"q_proj": 16}}))

    def cut(state):  # v_proj's adapter of rank 4: its first 4 components
        return {k: (v[:4] if "v_proj.lora_A" in k else v[:, :4] if "v_proj.lora_B" in k else v)
                for k, v in state.items()}

    _rewrite(folder, cut)
    patterned, native = adapter_on(copy.deepcopy(native_bases["qwen2"]), read_foreign(folder))
    assert native.ranks == {m: 4 for m in native.modules if m.endswith("v_proj")}
    by_hand = read_foreign(folder)
    by_hand.lora.ranks, by_hand.lora.alphas = {}, {}
    for module, parts in by_hand.lora.modules.items():
        if module.endswith("v_proj"):  # rank 4 at alpha 32: scale 8 instead of 4
            parts["lora_B"] = parts["lora_B"] * 2
        if module.endswith("q_proj"):  # alpha 16: scale 2 instead of 4
            parts["lora_B"] = parts["lora_B"] / 2
        if module.endswith("v_proj"):
            parts["lora_A"] = torch.cat([parts["lora_A"], torch.zeros_like(parts["lora_A"])])
            parts["lora_B"] = torch.cat([parts["lora_B"], torch.zeros_like(parts["lora_B"])], dim=1)
    reference, _ = adapter_on(copy.deepcopy(native_bases["qwen2"]), by_hand)
    diff = (logits_of(patterned, "qwen2") - logits_of(reference, "qwen2")).abs().max()
    assert diff <= 1e-9, diff


# ---- refusals -------------------------------------------------------------------------------------------------


def _rewrite(folder: Path, edit) -> None:
    file = folder / "adapter_model.safetensors"
    state = load_file(str(file))
    save_file({k: v.contiguous() for k, v in edit(state).items()}, str(file), metadata={"format": "pt"})


def test_lora_on_a_module_the_native_class_lacks_is_refused_by_name(tmp_path, adapter_dirs, native_bases):
    folder = tmp_path / "a"
    shutil.copytree(adapter_dirs["qwen2/swift2-list"], folder)

    def rename(state):
        return {k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.rotary_emb"): v for k, v in state.items()}

    _rewrite(folder, rename)
    with pytest.raises(AdapterError, match=r"language_model\.model\.layers\.0\.self_attn\.rotary_emb"):
        adapter_on(copy.deepcopy(native_bases["qwen2"]), read_foreign(folder))


@pytest.mark.parametrize("edit, message", [
    ({"peft_type": "ADALORA"}, "peft_type 'ADALORA': only LoRA"),
    ({"use_qa_lora": True}, "use_qa_lora=True: QA-LoRA"),
    ({"bias": "all"}, "bias='all'"),
    ({"modules_to_save": ["mlp1"]}, "modules_to_save"),
])
def test_settings_peft_cannot_express_are_refused(tmp_path, adapter_dirs, edit, message):
    folder = tmp_path / "a"
    shutil.copytree(adapter_dirs["qwen2/swift2-list"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(AdapterError, match=message):
        read_foreign(folder)


def test_an_adapter_for_another_base_is_refused(adapter_dirs, native_bases):
    with pytest.raises(AdapterError, match=r"language_model\.model\.layers\.0\.attention\.wqkv"):
        adapter_on(copy.deepcopy(native_bases["internlm2-vit6b-ps1"]), read_foreign(adapter_dirs[
            "internlm2/swift2-list"]))


def test_unsupported_families_and_moe_experts_are_refused_by_name(makers, shared_tokenizers, tmp_path):
    from types import SimpleNamespace

    from vltrain.model.adapters import Lora, to_native

    other = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(model_type="mistral")))
    with pytest.raises(AdapterError, match="'mistral' language model: not a family vltrain converts adapters of"):
        adapters.layout_config(other, ["language_model.model.layers.0.self_attn.q_proj"])
    base = makers[0].make_checkpoint("qwen3_moe", tmp_path / "moe", shared_tokenizers, seed=0)
    from tests.test_convert_later import tokenizer_of

    model = load_original(base, tokenizer_of(base), torch.float32)
    text = model.config.text_config
    q_out = model.get_submodule("model.language_model.layers.0.self_attn.q_proj").out_features
    attention = {"language_model.model.layers.0.self_attn.q_proj": {"lora_A": torch.ones(2, text.hidden_size),
                                                                    "lora_B": torch.ones(q_out, 2)}}
    native = to_native(Lora(attention, 2, 4.0), model)  # attention of a Qwen3-MoE base converts
    assert list(native.modules) == ["model.language_model.layers.0.self_attn.q_proj"]
    expert = {"language_model.model.layers.1.mlp.experts.3.gate_proj": {
        "lora_A": torch.ones(2, text.hidden_size), "lora_B": torch.ones(text.moe_intermediate_size, 2)}}
    with pytest.raises(AdapterError, match=r"experts.3.gate_proj: LoRA on qwen3_moe's MoE experts cannot be"):
        to_native(Lora({**attention, **expert}, 2, 4.0), model)

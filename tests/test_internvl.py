"""Training hooks of vltrain.model.internvl (pixel shuffle v1, drop path) and VLTrainer's dummy image."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    Qwen2Config,
    TrainingArguments,
)

from vltrain.model.internvl import (
    InternVLPsV1ForConditionalGeneration,
    drop_path_rates,
    model_class,
    set_drop_path,
)
from vltrain.train import trainer as trainer_module
from vltrain.train.trainer import VLTrainer

IMAGE = 112  # 8 x 8 patches of 14 px -> a 4 x 4 token grid per tile after the pixel shuffle
GRID = 4


def tiny_config(ps_version: str = "v2", layers: int = 3) -> InternVLConfig:
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                  num_attention_heads=4, image_size=IMAGE, patch_size=14, attention_bias=True)
    text = Qwen2Config(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=5, image_seq_length=GRID * GRID,
                          tie_word_embeddings=False, ps_version=ps_version)


def build(ps_version: str = "v2", seed: int = 0, layers: int = 3) -> InternVLForConditionalGeneration:
    config = tiny_config(ps_version, layers)
    torch.manual_seed(seed)
    model = model_class(config)(config)
    # layer scales of 1 instead of 0.1, so the residual branches matter in the drop path tests
    for name, p in model.named_parameters():
        if "lambda_" in name:
            p.data.fill_(1.0)
    return model.eval()


def tiles(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


# ---- pixel shuffle v1 -----------------------------------------------------------------------------------------


def test_model_class_follows_ps_version():
    assert model_class(tiny_config("v2")) is InternVLForConditionalGeneration
    assert model_class(tiny_config("v1")) is InternVLPsV1ForConditionalGeneration
    assert model_class(Qwen2Config()) is InternVLForConditionalGeneration  # no ps_version: transformers' v2
    with pytest.raises(ValueError, match="ps_version"):
        model_class(tiny_config("v3"))


def test_ps_v1_is_v2_with_the_token_grid_transposed():
    v2 = build("v2")
    v1 = build("v1")
    v1.load_state_dict(v2.state_dict())
    assert isinstance(v1, InternVLPsV1ForConditionalGeneration)
    with torch.no_grad():
        f2 = v2.get_image_features(pixel_values=tiles()).pooler_output  # (n, 16, D)
        f1 = v1.get_image_features(pixel_values=tiles()).pooler_output
    n, tokens, dim = f2.shape
    assert tokens == GRID * GRID and f1.shape == f2.shape
    assert not torch.allclose(f1, f2, atol=1e-3)  # the token order does differ
    transposed = f2.reshape(n, GRID, GRID, dim).transpose(1, 2).reshape(n, tokens, dim)
    torch.testing.assert_close(f1, transposed, rtol=0, atol=1e-6)


def test_ps_v1_survives_save_and_reload(tmp_path):
    v1 = build("v1")
    v1.save_pretrained(tmp_path)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tmp_path)
    assert config.ps_version == "v1"
    reloaded = model_class(config).from_pretrained(tmp_path)
    assert isinstance(reloaded, InternVLPsV1ForConditionalGeneration)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.get_image_features(pixel_values=tiles()).pooler_output,
                                   v1.get_image_features(pixel_values=tiles()).pooler_output)


# ---- drop path --------------------------------------------------------------------------------------------------


def vision_out(model, train: bool, seed: int = 0) -> torch.Tensor:
    model.train(train)
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.model.vision_tower(pixel_values=tiles(8)).last_hidden_state


def test_drop_path_rates_rise_linearly_over_depth():
    model = build(layers=5)
    set_drop_path(model, 0.4)
    assert drop_path_rates(model) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    set_drop_path(model, 0.2)  # replaces, does not stack
    assert drop_path_rates(model) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    layer = model.model.vision_tower.encoder.layer[1]
    assert len(layer.attention._forward_hooks) == 1 and len(layer.mlp._forward_hooks) == 1


def test_drop_path_is_identity_in_eval():
    plain = vision_out(build(), train=False)
    model = build()
    set_drop_path(model, 0.5)
    torch.testing.assert_close(vision_out(model, train=False), plain, rtol=0, atol=0)


def test_drop_path_is_stochastic_in_train():
    model = build()
    plain = vision_out(model, train=True)  # no dropout anywhere else: training mode alone changes nothing
    torch.testing.assert_close(vision_out(model, train=True, seed=1), plain, rtol=0, atol=0)
    set_drop_path(model, 0.5)
    a, b = vision_out(model, train=True, seed=0), vision_out(model, train=True, seed=1)
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, plain)


def test_drop_path_drops_whole_samples_and_scales_the_kept_ones():
    model = build(layers=2)
    set_drop_path(model, 0.5)  # layer 1 drops with p = 0.5
    layer = model.model.vision_tower.encoder.layer[1]
    x = torch.randn(64, 5, 32)
    with torch.no_grad():
        layer.eval()
        clean = layer.attention(x)[0]
        layer.train()
        torch.manual_seed(0)
        dropped = layer.attention(x)[0]
    kept = [(dropped[i] != 0).any().item() for i in range(64)]
    for i, is_kept in enumerate(kept):
        expected = clean[i] / 0.5 if is_kept else torch.zeros_like(clean[i])
        torch.testing.assert_close(dropped[i], expected)
    assert 16 < sum(kept) < 48  # about half of 64 samples kept


def test_drop_path_rate_zero_leaves_the_model_untouched():
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = vision_out(model, train=True)
    set_drop_path(model, 0.3)
    set_drop_path(model, 0.0)
    assert drop_path_rates(model) == [0.0, 0.0, 0.0]
    for layer in model.model.vision_tower.encoder.layer:
        assert not layer.attention._forward_hooks and not layer.mlp._forward_hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(vision_out(model, train=True, seed=3), plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="drop path rate"):
        set_drop_path(model, 1.0)


# ---- dummy image on text-only batches ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_zero3(monkeypatch):
    """ZeRO-3 off unless a test turns it on (the flag is process-global in transformers)."""
    monkeypatch.setattr(trainer_module, "is_deepspeed_zero3_enabled", lambda: False)


def make_trainer(model, tmp_path) -> VLTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=2)
    return VLTrainer(model=model, args=args, encoder=None, answer_set=[])


def text_batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[1, 7, 9, 11, 13, 2], [1, 8, 10, 12, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "tiles_per_sample": [0, 0]}


def image_batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[1, 7] + [5] * GRID * GRID + [9, 2]])
    return {"input_ids": ids, "labels": ids.masked_fill(ids == 5, -100), "pixel_values": tiles(1)}


def count_vision_calls(model) -> list[int]:
    calls = [0]
    model.model.vision_tower.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


def plain_loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**{k: v for k, v in batch.items() if k != "tiles_per_sample"}).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def test_text_only_batch_runs_the_trainable_vision_side_with_zero_gradient(tmp_path):
    model = build().train()
    trainer = make_trainer(model, tmp_path)
    batch = text_batch()
    expected_loss, expected_grads = plain_loss_and_grads(model, batch)
    assert expected_grads and not any("vision_tower" in n or "multi_modal_projector" in n for n in expected_grads)
    calls = count_vision_calls(model)
    loss = trainer.compute_loss(model, batch)
    assert calls[0] == 1
    assert torch.equal(loss, expected_loss)
    loss.backward()
    for name, p in model.named_parameters():
        if "vision_tower" in name or "multi_modal_projector" in name:
            assert p.grad is not None, name
            assert torch.count_nonzero(p.grad) == 0, name
        else:  # the language side learns exactly what it learns without the dummy
            assert torch.equal(p.grad, expected_grads[name]), name


def test_dummy_cannot_change_the_loss_even_when_the_features_overflow(tmp_path):
    """0 x inf would be NaN: fp16 features of a broken or saturated projector must not reach the loss."""
    model = build().train()
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.bias.fill_(float("inf"))
    trainer = make_trainer(model, tmp_path)
    expected_loss, expected_grads = plain_loss_and_grads(model, text_batch())
    loss = trainer.compute_loss(model, text_batch())
    assert torch.isfinite(loss) and torch.equal(loss, expected_loss)
    loss.backward()
    assert torch.equal(model.lm_head.weight.grad, expected_grads["lm_head.weight"])


def call_order(model, run) -> list[str]:
    """The order in which the parts of the model run forward, then get their parameter gradients, in `run()`
    (ZeRO-3 gathers parameters in forward order and reduces gradients as they are accumulated)."""
    parts = {"embed": model.get_input_embeddings(), "vision": model.model.vision_tower.embeddings.patch_embeddings,
             "projector": model.model.multi_modal_projector.linear_1, "decoder": model.model.language_model.layers[0],
             "lm_head": model.lm_head}
    order, handles = [], []
    for name, module in parts.items():
        handles.append(module.register_forward_pre_hook(lambda *a, name=name: order.append(f"forward {name}")))
        handles.append(next(module.parameters()).register_post_accumulate_grad_hook(
            lambda *a, name=name: order.append(f"gradient {name}")))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return order


def test_dummy_runs_the_vision_side_where_an_image_batch_runs_it(tmp_path):
    """A text-only rank calls the same modules in the same order as a rank with images, forward and backward."""
    model = build().train()
    trainer = make_trainer(model, tmp_path)
    with_images = call_order(model, lambda: model(**image_batch()).loss.backward())
    text_only = call_order(model, lambda: trainer.compute_loss(model, text_batch()).backward())
    assert with_images[:5] == ["forward embed", "forward vision", "forward projector", "forward decoder",
                               "forward lm_head"]
    assert len(with_images) == 10
    assert text_only == with_images


def train_llm_only(model) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_("language_model" in name or "lm_head" in name)


def test_no_dummy_when_the_vision_side_is_frozen_or_in_eval(tmp_path):
    model = build().train()
    train_llm_only(model)
    trainer = make_trainer(model, tmp_path)
    calls = count_vision_calls(model)
    trainer.compute_loss(model, text_batch()).backward()
    assert calls[0] == 0
    assert model.model.vision_tower.embeddings.cls_token.grad is None

    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    with torch.no_grad():
        trainer.compute_loss(model, text_batch())
    assert calls[0] == 0
    trainer.compute_loss(model, image_batch())
    assert calls[0] == 1  # the real image, no dummy on top


def test_zero3_runs_the_dummy_frozen_or_not_in_training_and_in_eval(tmp_path, monkeypatch):
    """Frozen parameters are partitioned too: a rank that skips the vision tower leaves the others waiting."""
    monkeypatch.setattr(trainer_module, "is_deepspeed_zero3_enabled", lambda: True)
    model = build().train()
    train_llm_only(model)
    trainer = make_trainer(model, tmp_path)
    calls = count_vision_calls(model)
    trainer.compute_loss(model, text_batch()).backward()
    assert calls[0] == 1
    model.eval()
    with torch.no_grad():
        trainer.compute_loss(model, text_batch())
    assert calls[0] == 2


def test_dummy_runs_under_lora_when_the_projector_has_adapters(tmp_path):
    from vltrain.config import SftConfig
    from vltrain.model.tuning import apply_sft

    model = apply_sft(build(), SftConfig(name="lora")).train()  # default targets include the projector
    trainer = make_trainer(model, tmp_path)
    calls = count_vision_calls(model.base_model.model)
    trainer.compute_loss(model, text_batch()).backward()
    assert calls[0] == 1
    adapters = [p for n, p in model.named_parameters() if "multi_modal_projector" in n and "lora_" in n]
    assert adapters and all(p.grad is not None and not p.grad.any() for p in adapters)

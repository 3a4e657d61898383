"""InternViT (300M and 6B, and their V2_5 releases) and the `mlp1` projector: original key -> native key, as
data. The fused `attn.qkv` is split evenly into q/k/v (rows [Q|K|V]) by the converter and concatenated back by the
exporter; the 6B towers' `attn.q_norm` / `attn.k_norm` keep their weights under the native names."""

from __future__ import annotations

# inside `vision_model.encoder.layers.<i>.` -> inside `model.vision_tower.encoder.layer.<i>.` (a trailing dot: prefix)
LAYER = {"attn.proj.": "attention.projection_layer.", "attn.q_norm.": "attention.q_norm.",
         "attn.k_norm.": "attention.k_norm.", "norm1.": "layernorm_before.", "norm2.": "layernorm_after.",
         "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.", "ls1": "lambda_1", "ls2": "lambda_2"}
# inside `vision_model.embeddings.` -> inside `model.vision_tower.embeddings.`
EMBEDDINGS = {"class_embedding": "cls_token", "position_embedding": "position_embeddings",
              "patch_embedding.weight": "patch_embeddings.projection.weight",
              "patch_embedding.bias": "patch_embeddings.projection.bias"}
# `mlp1.<i>` -> `model.multi_modal_projector.<name>` (mlp1.2 is the GELU: no weights)
PROJECTOR = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}

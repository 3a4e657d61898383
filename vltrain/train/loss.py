"""The training objective beyond transformers' token mean: per-sample loss weights (`loss_reduction`) and the MoE
router's load-balancing loss, both as the official InternVL3.5 training code computes them.

Sample weights (`loss_reduction`, the official `len2weight`): every trained token of a sample with n trained tokens
weighs 1 (`token`), 1/n (`sample`) or 1/sqrt(n) (`square`); untrained tokens weigh 0. A sample is one row of a padded
batch, or one record of a packed row (`sample_lengths`, from the collator). For one micro-batch on each of R
data-parallel ranks the official loss is

    loss_rank = sum(w * CE) on this rank / mean over the R ranks of sum(w)

and averaging the gradients over the ranks makes it sum(w * CE) / sum(w) over all of them. Each micro-batch of a
gradient-accumulation step is normalised on its own, and the step takes their mean. (The official recipe, run on
transformers 4.55, gets the sum over micro-batches, times R, instead: the Trainer thinks the model normalises by
`num_items_in_batch`, because its forward takes **kwargs, so it neither divides by the accumulation steps nor leaves
out its factor R. That only scales the gradient, by R x accumulation steps, which gradient clipping at 1.0 then
mostly undoes; vltrain takes the mean.)

Router loss: the Switch-Transformer load-balancing loss over every MoE layer's router output of the micro-batch
(padding left out), times the coefficient, added to the loss of each micro-batch on each rank. transformers'
`InternVLForConditionalGeneration` does not return router logits, so they are read from the router modules with
forward hooks while the training forward runs. As in the official code (transformers 4.55), Qwen3-MoE's loss takes
the router's logits and GPT-OSS's takes its top-k scores (the softmax of the k largest logits, zeros elsewhere),
which is what 4.55's GPT-OSS router returned as its "router logits".
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from vltrain.data.encode import IGNORE_INDEX

LOSS_REDUCTIONS = ("token", "sample", "square")


def len2weight(n: torch.Tensor, reduction: str) -> torch.Tensor:
    """The weight of each trained token of a sample with `n` trained tokens (0 for a sample with none)."""
    n = n.float()
    if reduction == "token":
        weight = torch.ones_like(n)
    elif reduction == "sample":
        weight = 1.0 / n
    elif reduction == "square":
        weight = n.rsqrt()
    else:
        raise ValueError(f"loss_reduction must be one of {', '.join(LOSS_REDUCTIONS)}, got {reduction!r}")
    return torch.where(n > 0, weight, torch.zeros_like(n))


def token_weights(labels: torch.Tensor, reduction: str, sample_lengths: list[int] | None = None) -> torch.Tensor:
    """Per-token loss weights, (B, L) float32 like `labels`: `len2weight(n)` on the trained tokens (label != -100)
    of each sample, 0 elsewhere. Without `sample_lengths` each row is one sample; with them (a packed batch, B = 1),
    the row holds the samples back to back, `sum(sample_lengths) == L`. n counts the sample's labels that are not
    -100, as the official collator counts them (the first token of a sample is never trained)."""
    trained = labels != IGNORE_INDEX
    if sample_lengths is None:
        n = trained.sum(dim=1, keepdim=True)  # (B, 1)
        return torch.where(trained, len2weight(n, reduction), 0.0)
    if labels.shape[0] != 1 or sum(sample_lengths) != labels.shape[1]:
        raise ValueError(f"sample_lengths {sample_lengths} do not tile a packed row of shape {tuple(labels.shape)}")
    lengths = torch.tensor(sample_lengths, device=labels.device)
    segment = torch.repeat_interleave(torch.arange(len(sample_lengths), device=labels.device), lengths)  # (L,)
    n = torch.zeros(len(sample_lengths), dtype=torch.long, device=labels.device).index_add_(0, segment,
                                                                                            trained[0].long())
    return torch.where(trained, len2weight(n, reduction)[segment][None], 0.0)


def weighted_loss_sums(logits: torch.Tensor, labels: torch.Tensor,
                       weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of w * CE, sum of w) over the next-token predictions of a batch: logits (B, L, V), labels and weights
    (B, L); token t's label and weight go with the prediction made at t - 1. Cross-entropy in float32."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    shift_weights = weights[:, 1:].to(logits.device)
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none")
    return (ce * shift_weights.reshape(-1)).sum(), shift_weights.sum()


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """`value` averaged over the data-parallel processes (itself in a single process); every rank must call it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    world = torch.distributed.get_world_size()
    if world == 1:
        return value
    total = value.detach().clone()
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return total / world


def weighted_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str,
                     sample_lengths: list[int] | None = None) -> torch.Tensor:
    """One micro-batch's loss on this rank, as the official code computes it: sum(w * CE) / (sum(w) averaged over
    the data-parallel ranks)."""
    numerator, denominator = weighted_loss_sums(logits, labels, token_weights(labels, reduction, sample_lengths))
    return numerator / mean_over_ranks(denominator).clamp(min=torch.finfo(torch.float32).tiny)


# ---- MoE router load balancing ----------------------------------------------------------------------------


def router_kind(text_config) -> tuple[str, int, int] | None:
    """(LLM model type, number of experts, experts per token) of an MoE LLM config, None for a dense one."""
    model_type = getattr(text_config, "model_type", None)
    if model_type == "qwen3_moe":
        return model_type, text_config.num_experts, text_config.num_experts_per_tok
    if model_type == "gpt_oss":
        return model_type, text_config.num_local_experts, text_config.num_experts_per_tok
    return None


def router_aux_coef(llm: dict, override: float | None) -> float:
    """The coefficient of the router loss for an LLM config (as a dict: `model.arch.llm`, `text_config` or the
    original `llm_config`): `override` when set; else, as the official recipe, the config's `router_aux_loss_coef`
    for GPT-OSS (its training script forces `output_router_logits` on) and for a config whose
    `output_router_logits` is true; 0 otherwise (dense LLMs always 0)."""
    model_type = llm.get("model_type")
    if model_type not in ("qwen3_moe", "gpt_oss"):
        return 0.0
    if override is not None:
        return float(override)
    if model_type == "gpt_oss" or llm.get("output_router_logits"):
        return float(llm.get("router_aux_loss_coef", OFFICIAL_AUX_COEF[model_type]))
    return 0.0


OFFICIAL_AUX_COEF = {"qwen3_moe": 0.001, "gpt_oss": 0.9}
"""`router_aux_loss_coef` of a config that does not give it: the config classes' defaults in transformers 4.55, which
the official code runs on (transformers 5 lowered GPT-OSS's to 0.001)."""


def _router_classes():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    return {"qwen3_moe": Qwen3MoeTopKRouter, "gpt_oss": GptOssTopKRouter}


def top_k_scores(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """GPT-OSS's router output in transformers 4.55: softmax over each token's k largest logits, scattered into
    zeros, (tokens, experts)."""
    values, indices = torch.topk(logits, top_k, dim=-1)
    return torch.zeros_like(logits).scatter_(1, indices, torch.softmax(values, dim=1, dtype=values.dtype))


@contextmanager
def recorded_router_logits(model: torch.nn.Module, text_config):
    """While active, collects the logits of each MoE router of `model`: a list, one (tokens, experts) tensor per MoE
    layer in call order, yielded. Only the forward passes inside the block are recorded (activation checkpointing
    runs the layers again during backward, after the block). The hook only keeps the tensor: an operation there
    would run in the checkpointed forward and not in its recomputation, which torch refuses."""
    kind = router_kind(text_config)
    recorded: list[torch.Tensor] = []
    if kind is None:
        yield recorded
        return
    router_class = _router_classes()[kind[0]]

    def record(module, args, output):
        recorded.append(output[0])  # (tokens, experts)

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, router_class)]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def router_aux_loss(router_logits: list[torch.Tensor], text_config,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The load-balancing loss of one forward pass (transformers' `load_balancing_loss_func`) from its routers'
    logits (`recorded_router_logits`): over all layers' tokens (padding left out by `attention_mask`, (B, L)),
    num_experts x sum over experts of (share of top-k assignments) x (mean routing probability), the routing
    probabilities being the softmax of the logits (Qwen3-MoE) or of the top-k scores (GPT-OSS)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    model_type, num_experts, top_k = router_kind(text_config)
    if model_type == "gpt_oss":
        router_logits = [top_k_scores(logits, top_k) for logits in router_logits]
    return load_balancing_loss_func(tuple(router_logits), num_experts, top_k, attention_mask)

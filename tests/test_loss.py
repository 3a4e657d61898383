"""The training objective of `vltrain.train.loss`: per-sample weights (`loss_reduction`) by hand and against the
official InternVL formula, padded and packed, across data-parallel ranks; the MoE router loss against the formula
of the official code's transformers (4.55), recorded through activation checkpointing; and when it is on."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from vltrain.data.collator import collate, collate_packed, model_inputs
from vltrain.data.encode import IGNORE_INDEX, Sample
from vltrain.model.load import internvl_config
from vltrain.train.loss import (
    recorded_router_logits,
    router_aux_coef,
    router_aux_loss,
    token_weights,
    top_k_scores,
    weighted_lm_loss,
)

X = IGNORE_INDEX


# ---- the official formula, re-implemented from its published arithmetic (internvl_chat_gpt_oss, 2410d1d) ----


def official_len2weight(n: int, reduction: str) -> float:
    """`internvl_chat_finetune.len2weight`."""
    if n == 0:
        return 0
    return {"token": 1, "sample": 1 / n, "square": 1 / n**0.5}[reduction]


def official_packed_loss(logits, labels, lengths, reduction):
    """`PackedDataset.get_cu_seqlens_and_indexes` + `packed_collate_fn` (weights per sub-sample, zero where the
    label is ignored) + `InternVLChatModel.forward` (shifted, CE x weight summed / weights summed), one rank."""
    weights, start = [], 0
    for n in lengths:
        trained = int((labels[0, start:start + n] != X).sum())
        weights += [official_len2weight(trained, reduction)] * n
        start += n
    weights = torch.where(labels == X, 0, torch.tensor(weights, dtype=torch.float32)[None])
    ce = torch.nn.CrossEntropyLoss(reduction="none")(logits[..., :-1, :].reshape(-1, logits.shape[-1]),
                                                     labels[..., 1:].reshape(-1))
    shift_weights = weights[..., 1:].reshape(-1)
    return (ce * shift_weights).sum() / shift_weights.sum()


def official_unpacked_square_loss(logits, labels):
    """The forward's path without packing (always 1/sqrt of each row's trained tokens)."""
    ce = torch.nn.CrossEntropyLoss(reduction="none")(logits[..., :-1, :].reshape(-1, logits.shape[-1]),
                                                     labels[..., 1:].reshape(-1))
    weight = 1 / (labels != X).sum(dim=-1).float().sqrt()
    weight = torch.where(labels != X, weight.unsqueeze(1), 0.0)[..., 1:].reshape(-1)
    return (ce * weight).sum() / weight.sum()


def official_load_balancing(gate_logits, num_experts, top_k, attention_mask=None):
    """transformers 4.55 `load_balancing_loss_func` (the one the official model imports): all layers concatenated."""
    logits = torch.cat(list(gate_logits), dim=0)
    probs = torch.softmax(logits, dim=-1)
    _, selected = torch.topk(probs, top_k, dim=-1)
    mask = F.one_hot(selected, num_experts).float()  # (layers x tokens, top_k, experts)
    if attention_mask is None:
        return (mask.mean(0) * probs.mean(0).unsqueeze(0)).sum() * num_experts
    keep = attention_mask.reshape(-1).float().repeat(len(gate_logits))  # (layers x tokens,)
    tokens = (mask * keep[:, None, None]).sum(0) / keep.sum()
    prob = (probs * keep[:, None]).sum(0) / keep.sum()
    return (tokens * prob.unsqueeze(0)).sum() * num_experts


def official_gpt_oss_router_output(logits, top_k):
    """transformers 4.55 GptOssTopKRouter: what its load-balancing loss receives as "router logits"."""
    values, indices = torch.topk(logits, top_k, dim=-1)
    return torch.zeros_like(logits).scatter_(1, indices, torch.softmax(values, dim=1))


# ---- sample weights ----


def test_weights_by_hand_padded_and_packed():
    labels = torch.tensor([[X, 5, 6, 7, 8, X],    # 4 trained tokens: 1/2 each (square), 1/4 (sample)
                           [X, X, 9, X, X, X]])   # 1 trained token: 1
    assert token_weights(labels, "square").tolist() == [[0, .5, .5, .5, .5, 0], [0, 0, 1, 0, 0, 0]]
    assert token_weights(labels, "sample").tolist() == [[0, .25, .25, .25, .25, 0], [0, 0, 1, 0, 0, 0]]
    assert token_weights(labels, "token").tolist() == (labels != X).float().tolist()
    packed = torch.tensor([[X, 5, 6, 7, 8, X, X, X, 9, X, X]])  # records of 6, 2 and 3 tokens
    weights = token_weights(packed, "square", [6, 2, 3])
    assert weights.tolist() == [[0, .5, .5, .5, .5, 0, 0, 0, 1, 0, 0]]  # the middle record trains nothing: 0
    with pytest.raises(ValueError, match="do not tile"):
        token_weights(packed, "square", [6, 2])
    with pytest.raises(ValueError, match="loss_reduction"):
        token_weights(labels, "mean")


def test_square_loss_by_hand():
    """sum over samples of (its summed CE / sqrt(n)) over sum of sqrt(n): each sample's mean CE weighs sqrt(n)."""
    torch.manual_seed(0)
    logits = torch.randn(1, 11, 7)
    labels = torch.tensor([[X, 5, 6, 1, 2, X, X, 3, 4, X, 0]])
    lengths = [6, 3, 2]
    ce = -torch.log_softmax(logits[0, :-1], dim=-1)[torch.arange(10), labels[0, 1:].clamp(min=0)]
    trained = labels[0, 1:] != X
    sums, counts, start = [], [], 0
    for n in lengths:  # the label of token t is predicted at t - 1
        span = slice(max(start - 1, 0), start + n - 1)
        sums.append(float(ce[span][trained[span]].sum()))
        counts.append(int(trained[span].sum()))
        start += n
    assert counts == [4, 2, 1]
    hand = sum(s / math.sqrt(n) for s, n in zip(sums, counts)) / sum(math.sqrt(n) for n in counts)
    assert weighted_lm_loss(logits, labels, "square", lengths).item() == pytest.approx(hand, rel=1e-6)
    token_mean = sum(sums) / sum(counts)
    assert weighted_lm_loss(logits, labels, "token", lengths).item() == pytest.approx(token_mean, rel=1e-6)
    assert hand != pytest.approx(token_mean, rel=1e-3)  # the weighting matters on this batch


@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
def test_matches_the_official_formula(reduction):
    torch.manual_seed(1)
    lengths = [9, 4, 12, 5]
    labels = torch.randint(0, 50, (1, sum(lengths)))
    labels[torch.rand(labels.shape) < 0.4] = X
    labels[0, torch.tensor([0, 9, 13, 25])] = X  # the first token of each record, as the collator masks it
    labels[0, 9:13] = X  # a record with nothing trained
    logits = torch.randn(1, sum(lengths), 50)
    ours = weighted_lm_loss(logits, labels, reduction, lengths)
    torch.testing.assert_close(ours, official_packed_loss(logits, labels, lengths, reduction))
    if reduction == "square":
        rows = torch.full((2, 12), X)
        rows[0, :9], rows[1, :12] = labels[0, :9], labels[0, 13:25]
        row_logits = torch.randn(2, 12, 50)
        torch.testing.assert_close(weighted_lm_loss(row_logits, rows, "square"),
                                   official_unpacked_square_loss(row_logits, rows))


def test_packed_square_loss_equals_the_padded_one():
    """The same records, packed in one row (positions restarting) or padded in rows, give one square loss."""
    from vltrain.config import compose_config
    from vltrain.model.load import load_model_tokenizer

    cfg = compose_config(["model.arch.llm.model_type=qwen3", "+model.arch.llm.head_dim=24"])
    model, tokenizer = load_model_tokenizer(cfg.model, dtype=torch.float32, seed=0)
    torch.manual_seed(0)
    samples = []
    for n, trained in ((30, 3), (12, 8), (21, 1)):
        ids = torch.randint(10, 1000, (n,))
        labels = torch.full((n,), X)
        labels[-trained:] = ids[-trained:]
        samples.append(Sample(ids, labels, None, []))
    packed, padded = collate_packed(samples), collate(samples, tokenizer.pad_token_id)
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in model_inputs(packed).items() if k != "labels"}).logits
        padded_logits = model(**{k: v for k, v in model_inputs(padded).items() if k != "labels"}).logits
    packed_loss = weighted_lm_loss(packed_logits, packed["labels"], "square", packed["sample_lengths"])
    padded_loss = weighted_lm_loss(padded_logits, padded["labels"], "square")
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    hand = sum(math.sqrt(t) for t in (3, 8, 1))  # the weights sum to sum(sqrt(n)) (each first token untrained)
    assert token_weights(packed["labels"], "square", packed["sample_lengths"]).sum() == pytest.approx(hand)


def _rank_grads(rank: int, world: int, port: int, batches, queue):
    """One data-parallel rank: its own micro-batch's weighted loss, gradients averaged over the ranks (DDP)."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    hidden, labels, lengths, weight = batches[rank]
    weight = weight.clone().requires_grad_(True)
    loss = weighted_lm_loss(hidden @ weight, labels, "square", lengths)
    loss.backward()
    torch.distributed.all_reduce(weight.grad)
    queue.put((rank, (weight.grad / world).tolist()))
    torch.distributed.destroy_process_group()


@pytest.mark.multiprocess
def test_ranks_average_to_the_global_weighted_mean():
    """Two gloo processes, each with another micro-batch: the sum of weights averaged over the ranks as the
    denominator (the official all_reduce AVG) makes the DDP-averaged gradient that of sum(w CE) / sum(w) over
    both ranks' tokens."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    weight = torch.randn(8, 20)
    batches = []
    for lengths, trained in (([7, 5], [4, 1]), ([10], [6])):
        labels = torch.full((1, sum(lengths)), X)
        start = 0
        for n, t in zip(lengths, trained):
            labels[0, start + n - t:start + n] = torch.randint(0, 20, (t,))
            start += n
        batches.append((torch.randn(1, sum(lengths), 8), labels, lengths, weight))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    processes = [context.Process(target=_rank_grads, args=(r, 2, port, batches, queue)) for r in range(2)]
    for p in processes:
        p.start()
    grads = dict(queue.get(timeout=120) for _ in processes)
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    # one process, both micro-batches: numerators and weights summed over all tokens
    w = weight.clone().requires_grad_(True)
    numerator = denominator = 0
    for hidden, labels, lengths, _ in batches:
        weights = token_weights(labels, "square", lengths)
        ce = F.cross_entropy((hidden @ w)[0, :-1], labels[0, 1:], ignore_index=X, reduction="none")
        numerator = numerator + (ce * weights[0, 1:]).sum()
        denominator = denominator + weights.sum()
    (numerator / denominator).backward()
    torch.testing.assert_close(torch.tensor(grads[0]), w.grad)
    torch.testing.assert_close(torch.tensor(grads[1]), w.grad)


# ---- MoE router loss ----


def tiny_moe(model_type: str):
    from transformers import InternVLForConditionalGeneration

    llm = {"model_type": model_type, "hidden_size": 48, "intermediate_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 24, "num_experts_per_tok": 2}
    llm |= {"num_experts": 4, "moe_intermediate_size": 32} if model_type == "qwen3_moe" else {"num_local_experts": 4}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 448, "patch_size": 56}
    torch.manual_seed(0)
    return InternVLForConditionalGeneration(internvl_config({"vision": vision, "llm": llm}, vocab_size=64,
                                                            image_token_id=63))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_router_loss_matches_the_official_formula_through_checkpointing(model_type):
    model = tiny_moe(model_type).train()
    text = model.config.text_config
    ids = torch.randint(0, 60, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding

    def aux_and_grads(checkpointing: bool):
        model.zero_grad()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
        with recorded_router_logits(model, text) as logits:
            model(input_ids=ids, attention_mask=mask)
        assert len(logits) == 2 and logits[0].shape == (18, 4)  # one per layer, (tokens, experts)
        aux = router_aux_loss(logits, text, mask)
        aux.backward()  # under checkpointing the layers run again here, unrecorded
        return aux, logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    aux, logits, grads = aux_and_grads(checkpointing=False)
    gate = [official_gpt_oss_router_output(x, 2) for x in logits] if model_type == "gpt_oss" else logits
    torch.testing.assert_close(aux, official_load_balancing(gate, 4, 2, mask))
    unmasked = router_aux_loss(logits, text)
    torch.testing.assert_close(unmasked, official_load_balancing(gate, 4, 2))
    assert any("router" in n or ".gate." in n for n in grads)  # the loss trains the routers
    aux_ckpt, _, grads_ckpt = aux_and_grads(checkpointing=True)
    torch.testing.assert_close(aux_ckpt, aux)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)
    with recorded_router_logits(model, text) as after:
        pass
    model(input_ids=ids)
    assert after == []  # hooks removed with the block


def test_gpt_oss_scores_are_the_4_55_router_output():
    logits = torch.randn(5, 6)
    torch.testing.assert_close(top_k_scores(logits, 2), official_gpt_oss_router_output(logits, 2))


def test_router_loss_coefficient_follows_the_official_rule():
    assert router_aux_coef({"model_type": "qwen3"}, 0.5) == 0.0  # dense: never
    assert router_aux_coef({"model_type": "qwen3_moe", "router_aux_loss_coef": 0.01}, None) == 0.0  # flag off
    assert router_aux_coef({"model_type": "qwen3_moe", "output_router_logits": True,
                            "router_aux_loss_coef": 0.01}, None) == 0.01
    assert router_aux_coef({"model_type": "qwen3_moe", "output_router_logits": True}, None) == 0.001
    assert router_aux_coef({"model_type": "gpt_oss"}, None) == 0.9  # forced on by the recipe; config default
    assert router_aux_coef({"model_type": "gpt_oss", "router_aux_loss_coef": 0.2}, None) == 0.2
    assert router_aux_coef({"model_type": "gpt_oss"}, 0.0) == 0.0
    assert router_aux_coef({"model_type": "qwen3_moe"}, 0.05) == 0.05

"""The HF Trainer, with the hooks InternVL training needs: the vision side on text-only batches, a data order that
follows from (seed, epoch, step), checkpoints published only when complete (`vltrain.train.checkpoint`), NaN or
inf losses and gradients caught before they reach the weights, and the training objective of `vltrain.train.loss`
(per-sample weights, the MoE router loss)."""

from __future__ import annotations

import logging
import math
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from transformers import Trainer
from transformers.integrations import is_deepspeed_zero3_enabled

from vltrain.data.collator import model_inputs
from vltrain.data.encode import Encoder
from vltrain.data.records import Record
from vltrain.infer.engine import answer_records, exact_match, reference_answers
from vltrain.model.load import load_saved_weights
from vltrain.model.tuning import trainable_parts
from vltrain.speed import FastSteps
from vltrain.train.checkpoint import CheckpointError, checkpoint_error, publish, rotate, staging_dir
from vltrain.train.loss import mean_over_ranks, recorded_router_logits, router_aux_loss, weighted_lm_loss
from vltrain.train.order import EpochSampler, SeededSamples

log = logging.getLogger(__name__)


class NumericalFault(RuntimeError):
    """A NaN or inf loss or gradient with `on_nonfinite=stop`; nothing was applied to the weights or saved."""


class VLTrainer(FastSteps, Trainer):
    """Trainer that drops collator-only keys before the forward pass, runs the vision side on a dummy tile for
    text-only batches where other ranks need it to, and scores held-out answers; its per-step speed tricks come
    from `vltrain.speed.FastSteps`.

    `checkpoint_files` (name -> text) go into every checkpoint before it is published; `resume_only_model` loads
    only the weights of the checkpoint `train` resumes; `on_nonfinite` is `stop` or `skip`; `loss_reduction`
    and `router_aux_coef` shape the training loss (`vltrain.train.loss`; evaluation keeps the plain token mean)."""

    def __init__(self, *args, encoder: Encoder, answer_set: list[Record], max_new_tokens: int = 32,
                 checkpoint_files: dict[str, str] | None = None, resume_only_model: bool = False,
                 on_nonfinite: str = "stop", parallel: str = "single", loss_reduction: str = "token",
                 router_aux_coef: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_reduction = loss_reduction
        self.router_aux_coef = router_aux_coef
        if loss_reduction != "token":
            self.loss_is_scaled_for_ga = False  # a per-micro-batch loss: the Trainer divides by the steps
        self._router_aux: list[torch.Tensor] = []  # router losses of the micro-batches since the last log
        self.encoder = encoder
        self.answer_set = answer_set
        self.max_new_tokens = max_new_tokens
        self.checkpoint_files = checkpoint_files or {}
        self.resume_only_model = resume_only_model
        self.on_nonfinite = on_nonfinite
        self.parallel = parallel
        self._staging: Path | None = None
        self._step_records: list[int] = []  # train records of the micro-batches of the current optimizer step
        self._bad_loss: list[str] = []

    # ---- data order: (seed, epoch) -> permutation; the Trainer skips what a checkpoint consumed ----

    def _get_train_sampler(self, train_dataset=None):
        """The (seed, epoch) order; with `trainer.train_sampling_strategy=group_by_length`, grouped by the token
        counts the data check measured (the dataset's `lengths`), not by encoding every sample again."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(dataset, SeededSamples):
            group = None
            if self.args.train_sampling_strategy == "group_by_length":
                group = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return EpochSampler(len(dataset), self.args.seed, lengths=dataset.lengths, group_size=group)
        return super()._get_train_sampler(train_dataset)

    def _run_epoch(self, *args, epoch, **kwargs):
        if self.state.global_step >= self.state.max_steps > 0:
            # resumed from the last checkpoint mid-epoch: the Trainer would run one step before it checks
            self.control.should_training_stop = True
            return None
        # accelerate forwards set_epoch to a sampler two wrappers deep, not three (DDP shard + resume skip)
        if isinstance(self._train_sampler(), EpochSampler):
            self._train_sampler().set_epoch(epoch)
        return super()._run_epoch(*args, epoch=epoch, **kwargs)

    def _train_sampler(self):
        loader = self.callback_handler.train_dataloader
        batch_sampler = getattr(loader, "batch_sampler", None)
        for _ in range(4):
            sampler = getattr(batch_sampler, "sampler", None)
            if isinstance(sampler, EpochSampler):
                return sampler
            batch_sampler = getattr(batch_sampler, "batch_sampler", None)
        return None

    # ---- numerical faults ----

    def training_step(self, model, inputs, num_items_in_batch=None):
        if "record_index" in inputs:
            self._step_records.extend(inputs["record_index"])
        loss = super().training_step(model, inputs, num_items_in_batch)  # speed.FastSteps: no model walk
        if not torch.isfinite(loss).all():
            where = self._where(inputs.get("record_index"))
            message = (f"loss is {loss.item()} at step {self.state.global_step + 1} (records {where}); "
                       "nothing from this step was applied or saved")
            if self.on_nonfinite == "stop":
                raise NumericalFault(message + "; on_nonfinite=skip skips such steps instead")
            self._bad_loss.append(where)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        records, self._step_records = self._step_records, []
        value = float(norm) if norm is not None else 0.0
        if math.isfinite(value) and not self._bad_loss:
            return norm
        self._bad_loss = []
        message = (f"gradient norm {value} at step {self.state.global_step + 1} (records "
                   f"{self._where(records)})")
        if self.on_nonfinite == "stop":
            raise NumericalFault(message + "; nothing from this step was applied or saved; on_nonfinite=skip "
                                 "skips such steps instead")
        log.warning("%s: step skipped (on_nonfinite=skip), no parameter was updated", message)
        for p in model.parameters():
            p.grad = None  # the optimizer leaves parameters without a gradient untouched
        return norm

    def _where(self, indices) -> str:
        where = getattr(self.train_dataset, "where", None)
        if indices is None or where is None:
            return "unknown"
        return ", ".join(dict.fromkeys(where[i] for i in indices))

    # ---- checkpoints: staged, then published complete ----

    def _get_output_dir(self, trial):
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self.args.output_dir)
        staged = staging_dir(run_dir) / f"checkpoint-{self.state.global_step}"
        self._staging = staged.parent
        failure = None
        try:
            super()._save_checkpoint(model, trial)
        except Exception as e:  # noqa: BLE001 - reported below, on every rank
            failure = e
        finally:
            self._staging = None
        self._stop_if_any_failed(failure, staged, run_dir)  # also: every rank's files (RNG, ZeRO shards) are in
        if self.args.should_save:
            try:
                best = self.state.best_model_checkpoint
                if best and Path(best).parent == staged.parent:
                    self.state.best_model_checkpoint = str(run_dir / Path(best).name)
                    self.state.save_to_json(str(staged / "trainer_state.json"))
                target = publish(staged, run_dir, self.checkpoint_files, self.state.global_step,
                                 self.args.world_size, self.parallel)
                rotate(run_dir, self.args.save_total_limit, keep=[self.state.best_model_checkpoint, target])
            except Exception as e:  # noqa: BLE001
                failure = e
        self._stop_if_any_failed(failure, staged, run_dir)

    def _stop_if_any_failed(self, failure: Exception | None, staged: Path, run_dir: Path) -> None:
        """A save that failed on one process stops all of them (the others would wait for it forever in the
        next collective); the partial checkpoint is removed once no process writes to it any more."""
        failed = failure is not None
        if self.args.world_size > 1:
            flag = torch.tensor([int(failed)], device=self.args.device)
            failed = bool(self.accelerator.reduce(flag, reduction="sum").item())
        if not failed:
            return
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)
        if isinstance(failure, CheckpointError):
            raise failure
        error = failure if failure is not None else RuntimeError("another process failed to save its part")
        raise checkpoint_error(error, run_dir / staged.name) from failure

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Full weights read into the model in place (`load_saved_weights`): InternVL saves its keys in the published
        layout (`language_model.model.*`), which the Trainer's plain `load_state_dict(strict=False)` silently misses,
        and `from_pretrained` would build a second full model in every process."""
        from peft import PeftModel

        model = model if model is not None else self.model
        unwrapped = self.accelerator.unwrap_model(model)
        folder = Path(resume_from_checkpoint)
        full = any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))
        if isinstance(unwrapped, PeftModel) or not full or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_saved_weights(unwrapped, folder)  # in place, tensor by tensor: no second model in memory

    def _load_optimizer_and_scheduler(self, checkpoint):
        if not self.resume_only_model:
            super()._load_optimizer_and_scheduler(checkpoint)

    def _load_scaler(self, checkpoint):
        if not self.resume_only_model:
            super()._load_scaler(checkpoint)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The batch loss. A batch without images still runs the vision tower and projector, on one all-zero tile,
        where another rank may be running them on real images: under ZeRO-3 (or FSDP) always, since parameters
        are gathered collectively and every rank must run the same modules in the same order, frozen or not,
        in evaluation too; otherwise when they have trainable parameters (DDP needs a gradient for each, the
        official recipe's dummy image with `image_flags` 0). See `_dummy_image`: the loss and the gradients of
        everything else are unchanged, the vision side gets zero gradients."""
        sample_lengths = inputs.get("sample_lengths")
        records = inputs.get("record_index")
        inputs = model_inputs(inputs)
        dummy = inputs.get("pixel_values") is None and self._vision_must_run(model)
        with _dummy_image(self.accelerator.unwrap_model(model)) if dummy else nullcontext():
            if not model.training or (self.loss_reduction == "token" and not self.router_aux_coef):
                out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                           num_items_in_batch=num_items_in_batch)
            else:
                loss = self._training_objective(model, inputs, sample_lengths, num_items_in_batch)
                out = (loss, None) if return_outputs else loss
        if model.training:
            self._stop_before_deepspeed_backward(out[0] if return_outputs else out, records)
        return out

    def _stop_before_deepspeed_backward(self, loss: torch.Tensor, records) -> None:
        """DeepSpeed's backward also applies the update: with `on_nonfinite=stop` a non-finite loss stops here,
        before it. (A non-finite gradient is DeepSpeed's overflow: it zeroes the gradients and skips the update,
        which `_get_grad_norm` then reports.)"""
        if self.is_deepspeed_enabled and self.on_nonfinite == "stop" and not torch.isfinite(loss).all():
            raise NumericalFault(f"loss is {loss.item()} at step {self.state.global_step + 1} (records "
                                 f"{self._where(records)}); nothing from this step was applied or saved; "
                                 "on_nonfinite=skip skips such steps instead")

    def _training_objective(self, model, inputs, sample_lengths, num_items_in_batch) -> torch.Tensor:
        """The loss of one training micro-batch with sample weights and / or the router loss. `token` keeps the
        Trainer's own normalisation (by the trained tokens of the whole accumulated step, over all ranks); the
        weighted reductions normalise each micro-batch (`weighted_lm_loss`) and let the Trainer divide by the
        accumulation steps. The router loss is scaled the way the language-model loss is, so that the step
        averages it over micro-batches and ranks."""
        text_config = self._base_model().config.text_config
        recording = recorded_router_logits(self._base_model(), text_config) if self.router_aux_coef else nullcontext()
        with recording as routed:
            if self.loss_reduction == "token":
                loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            else:
                labels = inputs.pop("labels")
                logits = model(**inputs).logits
                loss = weighted_lm_loss(logits, labels, self.loss_reduction, sample_lengths)
        if not self.router_aux_coef:
            return loss
        aux = router_aux_loss(routed, text_config, inputs.get("attention_mask"))
        self._router_aux.append(aux.detach().float())
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:  # the Trainer's own rule (Trainer.training_step)
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        steps = self.current_gradient_accumulation_steps if scaled else 1
        return loss + self.router_aux_coef * aux.to(loss.device) / steps

    def _base_model(self):
        """The InternVL model under the DDP / DeepSpeed and peft wrappers."""
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds `router_aux_loss` to the training logs: the unweighted router loss, averaged over the micro-batches
        since the last log and over the ranks (every rank logs the same steps)."""
        if "loss" in logs and self._router_aux:
            aux = mean_over_ranks(torch.stack(self._router_aux).mean().to(self.args.device))
            logs["router_aux_loss"] = round(aux.item(), 6)
            self._router_aux = []
        super().log(logs, start_time)

    def _vision_must_run(self, model) -> bool:
        if is_deepspeed_zero3_enabled() or self.is_fsdp_enabled:
            return True
        if not model.training:
            return False
        trains = trainable_parts(self.accelerator.unwrap_model(model))
        return "vision" in trains or "projector" in trains

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        """Loss on the held-out split, plus exact-match accuracy of greedy answers on its first rows (the rows
        split across ranks, the answers gathered)."""
        metrics = super().evaluate(*args, **kwargs)
        if self.answer_set:
            answers = self._answer_split()
            score = {"eval_exact_match": exact_match(answers, reference_answers(self.encoder, self.answer_set))}
            self.log(score)
            metrics.update(score)
        return metrics

    def _answer_split(self) -> list[str]:
        """Answers to `answer_set`, split across ranks and gathered. Under ZeRO-3 every rank must run the same
        forward passes (parameters are gathered collectively, in an order each rank traces): the rows are dealt
        kind by kind (with images, then text-only), each rank getting the same number of each (padded with a
        repeated row, whose answer is dropped), so that in every generate call either all ranks run the vision
        side or none does; generation is synchronised (`synced_gpus`) so that ranks finishing early keep step."""
        from vltrain.train.parallel import gather_to_all

        world, rank = self.args.world_size, self.args.process_index
        records = self.answer_set
        zero3 = is_deepspeed_zero3_enabled()
        kinds = [list(range(len(records)))]
        if zero3:
            with_media = [i for i, r in enumerate(records) if r.images or r.videos]
            kinds = [with_media, [i for i in range(len(records)) if i not in set(with_media)]]
        batch = 8  # rows per generate call, as answer_records batches by default
        mine: list[int] = []
        answers: list[str] = []
        for rows in kinds:
            if not rows:
                continue
            share = rows[rank::world]
            share += [share[-1] if share else rows[0]] * (-(-len(rows) // world) - len(share))  # padding
            for start in range(0, len(share), batch):
                chunk = share[start:start + batch]
                answers += answer_records(self.model, self.encoder, [records[i] for i in chunk], self.max_new_tokens,
                                          batch_size=len(chunk), **({"synced_gpus": True} if zero3 else {}))
            mine += share
        if world == 1:
            return answers
        by_index: dict[int, str] = {}
        for indices, texts in gather_to_all((mine, answers)):
            by_index.update(zip(indices, texts))
        return [by_index[i] for i in range(len(records))]


@contextmanager
def _dummy_image(model):
    """While active, the input embedding layer also runs the vision tower and projector on one all-zero tile and
    adds an empty slice of the features (exactly 0) to its output. The vision side thus runs where a real image
    batch runs it, between the embedding and the decoder layers (ZeRO-3 gathers parameters in call order), and
    its backward comes in the same place too. The value added is 0 whatever the features hold (no 0 x inf in
    fp16), so the loss and the gradients of the other parameters are those of the plain batch; vision and
    projector parameters get zero gradients, as `vit_embeds[image_flags == 1]` gives them in the official code."""

    def add_dummy(module, args, embeds):  # embeds: (batch, seq, text hidden size)
        features = _dummy_image_features(model, embeds.device)
        return embeds + features[:, :0].sum().to(embeds.device, embeds.dtype)  # device_map: another GPU

    handle = model.get_input_embeddings().register_forward_hook(add_dummy)
    try:
        yield
    finally:
        handle.remove()


def _dummy_image_features(model, device: torch.device) -> torch.Tensor:
    """Projected features of one all-zero tile: (1, image_seq_length, text hidden size)."""
    vision = model.config.vision_config
    size = vision.image_size
    height, width = (size, size) if isinstance(size, int) else size
    tile = torch.zeros(1, vision.num_channels, height, width, device=device)
    return model.get_image_features(pixel_values=tile).pooler_output

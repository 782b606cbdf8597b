"""``HOSLTrainer``: Hybrid-Order Split Learning inside a ``transformers.Trainer``.

The Trainer's training step is replaced, as MeZO's trainer does: each step is one
:class:`~hosl.HybridOrderOptimizer` step on the split model. The **client** half (embeddings and the
first ``cut`` blocks) is trained by the ZO estimate (``zo_config``, a :class:`~hosl.optim.config.ZOConfig`,
or its three most used options ``zo_lr``, ``zo_eps``, ``num_queries``); the
**server** half gets its gradient from the clean pass, and everything after that is the Trainer's
own: its optimizer (``args.optim``: SGD, AdamW, ...) built over the server's parameters only,
gradient clipping, its LR scheduler (``args.lr_scheduler_type``, warmup), logging and
``report_to`` (TensorBoard, W&B, ...). The client's ZO learning rate follows the same schedule
(a second scheduler of the same type over the ZO optimizer), so both halves warm up and decay
together.

Rules that follow from the ZO estimate: dropout is off in both halves while training (the
``+`` and ``-`` passes of a direction must see the same function; MeZO does the same), and
``gradient_accumulation_steps`` must be 1 (the client updates at every step).

``save_model`` writes ``hosl.merge(client, server)``: a plain Hugging Face model folder. Each of
the Trainer's checkpoints also holds ``hosl_state.pt``: the split model's own state dict (the
halves as they train, the server's untied head copy included) and the client's ZO optimizer
(its seed stream, momentum/Adam state, skipped updates) and ZO scheduler, so
``trainer.train(resume_from_checkpoint=...)`` continues where the checkpoint left off: resuming
reaches the same weights as a run that was never interrupted (``tests/test_trainer.py``).

The Trainer's logs gain ``zo_learning_rate`` (the client's rate) and ``zo_skipped_updates``
(client updates the optimizer's finite guard skipped so far) beside its own ``learning_rate``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer
from transformers.optimization import get_scheduler

from hosl.models import TASK_CAUSAL_LM, split
from hosl.optim import HybridOrderOptimizer
from hosl.optim.config import ZOConfig

HOSL_STATE = "hosl_state.pt"  # beside the Trainer's files in each checkpoint-N folder


def default_split_loss(logits: torch.Tensor, inputs: dict) -> torch.Tensor:
    """Hugging Face's losses on the server's logits: next-token cross-entropy for causal LMs
    (``labels`` -100 ignored), cross-entropy over classes for sequence classifiers."""
    labels = inputs["labels"].to(logits.device)
    if logits.dim() == 3:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    return F.cross_entropy(logits.float(), labels)


class SplitModel(nn.Module):
    """The two halves as the Trainer's model: ``forward(input_ids, attention_mask, labels)`` runs
    server∘client and returns ``{"loss", "logits"}``; the halves are submodules, so the Trainer moves,
    clips and evaluates both (the server's untied head copy included)."""

    def __init__(self, client: nn.Module, server: nn.Module, loss_fn=default_split_loss):
        super().__init__()
        self.client, self.server, self.loss_fn = client, server, loss_fn

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.server(self.client(input_ids, attention_mask), attention_mask)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = self.loss_fn(logits, {"labels": labels, "attention_mask": attention_mask})
        return out


class HOSLTrainer(Trainer):
    """``Trainer(model, args, ...)`` plus ``cut`` (blocks on the client) and the client's ZO settings.

    ``zo_config``: every ZO option (default ``ZOConfig()``, HybridOrderOptimizer's defaults);
    ``zo_lr``, ``zo_eps``, ``num_queries``, when given, replace its ``lr``, ``eps``, ``num_queries``.
    The ZO seed is ``args.seed``.

    ``loss_fn(logits, inputs) -> scalar``: the loss on the server's logits (default
    :func:`default_split_loss`). ``model`` may be a ``peft`` LoRA model (only its trainable
    parameters train). Every other keyword goes to ``transformers.Trainer``.
    """

    def __init__(
        self,
        model: nn.Module,
        args=None,
        *,
        cut: int,
        zo_config: ZOConfig | None = None,
        zo_lr: float | None = None,
        zo_eps: float | None = None,
        num_queries: int | None = None,
        loss_fn=default_split_loss,
        **kwargs,
    ):
        if args is not None and args.gradient_accumulation_steps != 1:
            raise ValueError("HOSLTrainer: gradient_accumulation_steps must be 1 (the ZO client updates every step)")
        if zo_config is not None and not isinstance(zo_config, ZOConfig):
            raise TypeError(f"HOSLTrainer: zo_config must be a hosl.ZOConfig, got {type(zo_config).__name__}")
        given: dict[str, Any] = {
            k: v for k, v in dict(lr=zo_lr, eps=zo_eps, num_queries=num_queries).items() if v is not None
        }
        # replace() validates: a bad value is refused here, before the model is split
        self.zo_config = dataclasses.replace(zo_config if zo_config is not None else ZOConfig(), **given)
        client, server = split(model, cut)
        self.split_model = SplitModel(client, server, loss_fn)
        self.zo_optimizer: HybridOrderOptimizer | None = None
        self.zo_scheduler = None
        super().__init__(model=self.split_model, args=args, **kwargs)

    @property
    def client(self) -> nn.Module:
        return self.split_model.client

    @property
    def server(self) -> nn.Module:
        return self.split_model.server

    def create_optimizer(self, model=None):
        """The Trainer's optimizer (``args.optim``) over the server half only; the ZO optimizer for the client."""
        optimizer = super().create_optimizer(model=self.server)
        if self.zo_optimizer is None:
            self.zo_optimizer = HybridOrderOptimizer(self.client, None, config=self.zo_config, seed=self.args.seed)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.zo_scheduler is None:
            if self.zo_optimizer is None:
                self.create_optimizer()
            self.zo_scheduler = get_scheduler(
                self.args.lr_scheduler_type,
                optimizer=self.zo_optimizer,  # type: ignore[arg-type]  # create_optimizer() just set it
                num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
                num_training_steps=num_training_steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,  # type: ignore[arg-type]  # the Trainer's own
            )
        return scheduler

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One HOSL step: server gradient from the clean pass (the Trainer's optimizer steps on it next),
        the client's ZO estimate and update."""
        inputs = self._prepare_inputs(inputs)
        self.split_model.eval()  # dropout off: see the module docstring
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        loss_fn = self.split_model.loss_fn
        opt = self.zo_optimizer
        assert opt is not None, "the Trainer calls create_optimizer() before the first step"
        loss = opt.step(lambda: self.client(ids, mask), lambda h: loss_fn(self.server(h, mask), inputs))
        if self.zo_scheduler is not None:
            self.zo_scheduler.step()
        return torch.as_tensor(float(loss), device=self.args.device)

    def log(self, logs: dict, *args, **kwargs) -> None:
        """The Trainer's log record plus the client's ZO learning rate and skipped updates."""
        if self.zo_optimizer is not None and "loss" in logs:
            logs = {
                **logs,
                "zo_learning_rate": self.zo_optimizer.param_groups[0]["lr"],
                "zo_skipped_updates": self.zo_optimizer.skipped_updates,
            }
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, then ``hosl_state.pt`` beside it (see the module docstring)."""
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(folder):
            state = {
                "split_model": self.split_model.state_dict(),
                "zo_optimizer": self.zo_optimizer.state_dict() if self.zo_optimizer is not None else None,
                "zo_scheduler": self.zo_scheduler.state_dict() if self.zo_scheduler is not None else None,
            }
            torch.save(state, os.path.join(folder, HOSL_STATE))

    def _hosl_state(self, checkpoint: str) -> dict:
        path = os.path.join(checkpoint, HOSL_STATE)
        if not os.path.isfile(path):
            raise ValueError(
                f"HOSLTrainer: {checkpoint} has no {HOSL_STATE} (the split model and the client's ZO "
                "state); it was not written by HOSLTrainer, so it cannot be resumed"
            )
        try:  # the restricted unpickler: tensors, numbers, strings and containers, never code
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(
                f"HOSLTrainer: {path} holds objects other than tensors, numbers and strings; refused "
                "(a checkpoint HOSLTrainer wrote never does)"
            ) from None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The split model's weights from the checkpoint's ``hosl_state.pt`` (its model folder holds
        the merged model, whose parameter names are not the split model's)."""
        state = self._hosl_state(resume_from_checkpoint)
        self.split_model.load_state_dict(state["split_model"])

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        """The Trainer's optimizer and scheduler, then the client's ZO optimizer and scheduler."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        state = self._hosl_state(checkpoint)
        if state["zo_optimizer"] is not None and self.zo_optimizer is not None:
            self.zo_optimizer.load_state_dict(state["zo_optimizer"])
        if state["zo_scheduler"] is not None and self.zo_scheduler is not None:
            self.zo_scheduler.load_state_dict(state["zo_scheduler"])

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """A Hugging Face model folder of the merged halves (and the tokenizer, if the Trainer has one)."""
        from hosl.export import merge

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        merge(self.client, self.server).save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)  # type: ignore[arg-type]  # output_dir: TrainingArguments always has one
        torch.save(self.args, f"{output_dir}/training_args.bin")

    @property
    def is_causal_lm(self) -> bool:
        return self.server.task == TASK_CAUSAL_LM

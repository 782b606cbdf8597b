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

``save_model`` writes ``hosl.merge(client, server)``: a plain Hugging Face model folder. Resuming
from the Trainer's own checkpoints (``resume_from_checkpoint``) is not supported.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer
from transformers.optimization import get_scheduler

from hosl.models import TASK_CAUSAL_LM, split
from hosl.optim import HybridOrderOptimizer
from hosl.optim.config import ZOConfig


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

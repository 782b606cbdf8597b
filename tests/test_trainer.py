"""HOSLTrainer: the transformers.Trainer drives HOSL steps; the server trains with the Trainer's
optimizer and scheduler, the client with the ZO estimate, on the schedule's learning rates."""

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from hosl.integrations import HOSLTrainer, default_split_loss
from hosl.models import load_model

pytestmark = [pytest.mark.filterwarnings("ignore:hosl. no compiled kernels"), pytest.mark.filterwarnings("ignore")]


def _dataset(n=8, seq=10):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 250, (n, seq), generator=g)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, learning_rate=0.1,
                optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
                report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


@pytest.mark.slow
def test_one_step_is_the_server_sgd_step_and_the_client_stays_exact_at_zo_lr_0(tmp_path):
    model, _ = load_model("tiny-llama", "causal_lm")
    data = _dataset(4)
    trainer = HOSLTrainer(model, _args(tmp_path, max_steps=1), cut=1, zo_lr=0.0, zo_eps=1e-2, num_queries=2,
                          train_dataset=data)
    client_before = {n: p.detach().clone() for n, p in trainer.client.named_parameters()}
    server_before = {n: p.detach().clone() for n, p in trainer.server.named_parameters()}
    # the expected server update, computed here: w - lr * dL/dw at the starting weights on the one batch
    batch = {k: torch.stack([ex[k] for ex in data]) for k in data[0]}
    trainer.server.zero_grad()
    loss = default_split_loss(trainer.server(trainer.client(batch["input_ids"], batch["attention_mask"]),
                                             batch["attention_mask"]), batch)
    loss.backward()
    expected = {n: server_before[n] - 0.1 * p.grad for n, p in trainer.server.named_parameters()}
    trainer.server.zero_grad(set_to_none=True)
    trainer.train()
    assert all(torch.equal(client_before[n], p) for n, p in trainer.client.named_parameters())
    for n, p in trainer.server.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=0, atol=1e-7)


@pytest.mark.slow
def test_both_halves_follow_the_trainers_schedule_and_the_loss_falls(tmp_path):
    model, _ = load_model("tiny-llama", "causal_lm")
    data = _dataset(4)  # one batch, seen at every step
    trainer = HOSLTrainer(model, _args(tmp_path, max_steps=8, optim="adamw_torch", learning_rate=1e-2,
                                       lr_scheduler_type="linear", warmup_steps=2),
                          cut=1, zo_lr=1e-3, zo_eps=1e-2, num_queries=2, train_dataset=data)
    client_before = {n: p.detach().clone() for n, p in trainer.client.named_parameters()}
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      torch.optim.AdamW)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0]
    # linear decay to 0 after 8 steps: both the server's and the client's learning rates
    assert trainer.zo_optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    lrs = [r["learning_rate"] for r in trainer.state.log_history if "learning_rate" in r]
    assert lrs[0] < lrs[1]  # warmup
    assert any(not torch.equal(client_before[n], p) for n, p in trainer.client.named_parameters())
    server_params = {id(p) for p in trainer.server.parameters()}
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert {id(p) for g in opt.param_groups for p in g["params"]} <= server_params


@pytest.mark.slow
def test_save_model_writes_a_from_pretrained_folder_with_the_split_logits(tmp_path):
    model, _ = load_model("tiny-qwen2", "causal_lm")
    trainer = HOSLTrainer(model, _args(tmp_path, max_steps=2), cut=2, zo_lr=1e-3, zo_eps=1e-2, num_queries=2,
                          train_dataset=_dataset(8))
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = _dataset(2)[0]["input_ids"][None]
    mask = torch.ones_like(ids)
    trainer.split_model.eval()
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, trainer.server(trainer.client(ids, mask), mask))
    assert loaded.config.tie_word_embeddings is False  # the server's head copy trained, the embedding too


def test_gradient_accumulation_is_refused(tmp_path):
    model, _ = load_model("tiny-opt", "causal_lm")
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be 1"):
        HOSLTrainer(model, _args(tmp_path, gradient_accumulation_steps=2), cut=1)


def test_the_zo_options_are_a_zoconfig_whose_defaults_are_the_optimizers(tmp_path):
    import dataclasses

    from hosl import ZOConfig

    model, _ = load_model("tiny-opt", "causal_lm")
    trainer = HOSLTrainer(model, _args(tmp_path), cut=1)
    assert trainer.zo_config == ZOConfig()  # no second set of defaults in the Trainer
    given = ZOConfig(direction="rademacher", num_queries=3, lr=1e-4)
    trainer = HOSLTrainer(model, _args(tmp_path, seed=7), cut=1, zo_config=given, zo_eps=1e-2)
    trainer.create_optimizer()
    config = trainer.zo_optimizer.config
    assert config == dataclasses.replace(given, eps=1e-2, seed=7)  # zo_eps replaces the config's; seed: args'
    with pytest.raises(TypeError, match="zo_config must be a hosl.ZOConfig, got dict"):
        HOSLTrainer(model, _args(tmp_path), cut=1, zo_config={"lr": 1e-3})
    with pytest.raises(ValueError, match="eps"):
        HOSLTrainer(model, _args(tmp_path), cut=1, zo_eps=-1.0)


@pytest.mark.slow
def test_resuming_from_a_checkpoint_reaches_the_weights_of_an_uninterrupted_run(tmp_path):
    from hosl import ZOConfig

    def trainer_for(out, **kw):
        model, _ = load_model("tiny-llama", "causal_lm", seed=0)
        zo = ZOConfig(lr=1e-3, eps=1e-2, num_queries=2, variant="momentum", momentum=0.9, seed=3)
        return HOSLTrainer(model, _args(tmp_path / out, max_steps=4, save_strategy="steps", save_steps=2,
                                        lr_scheduler_type="linear", **kw),
                           cut=1, zo_config=zo, train_dataset=_dataset(16))

    whole = trainer_for("whole")
    whole.train()
    logged = [r for r in whole.state.log_history if "loss" in r]
    assert all("zo_learning_rate" in r and r["zo_skipped_updates"] == 0 for r in logged)
    assert logged[0]["zo_learning_rate"] > logged[-1]["zo_learning_rate"]  # the client follows the linear decay
    resumed = trainer_for("resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "out" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for (name, a), b in zip(whole.split_model.state_dict().items(), resumed.split_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(whole.zo_optimizer.generator.get_state(), resumed.zo_optimizer.generator.get_state())
    # without the client's state a checkpoint is not resumable: said before any step
    fresh = trainer_for("fresh")
    (tmp_path / "whole" / "out" / "checkpoint-4" / "hosl_state.pt").unlink()
    with pytest.raises(ValueError, match="has no hosl_state.pt"):
        fresh.train(resume_from_checkpoint=str(tmp_path / "whole" / "out" / "checkpoint-4"))
    assert fresh.state.global_step == 0


class _Payload:
    """Unpickling this calls ``open(path, "w")``: the file appears if the unpickler runs code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_pickle_payload_in_hosl_state_is_refused_naming_the_file_and_never_runs(tmp_path):
    model, _ = load_model("tiny-opt", "causal_lm")
    trainer = HOSLTrainer(model, _args(tmp_path), cut=1)
    checkpoint, marker = tmp_path / "checkpoint-2", tmp_path / "payload-ran"
    checkpoint.mkdir()
    torch.save({"split_model": _Payload(marker)}, checkpoint / "hosl_state.pt")
    with pytest.raises(ValueError, match=r"hosl_state\.pt holds objects other than tensors"):
        trainer._load_from_checkpoint(str(checkpoint))
    assert not marker.exists()

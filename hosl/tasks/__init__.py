"""Task layer: data, MeZO's sampling and prompts, batches, losses and evaluation.

Typical use::

    data = sample_task("rte", data_dir="../shared/data", train_size=1000, seed=0)
    collate = make_collate_fn(data.template, tokenizer, "causal_lm", max_length=512)
    batches = ShuffledBatches(data.train, batch_size=64, seed=0, collate_fn=collate)
    batch = next(batches)
    loss = lm_answer_loss(model(batch["input_ids"], batch["attention_mask"]).logits, batch)
    metrics = evaluate(forward_fn, data.eval, tokenizer, 16, data.template)
"""

from .batches import ShuffledBatches
from .causal_lm import (
    collate_causal_lm,
    encode_prompt_and_option,
    lm_answer_loss,
    option_classification_loss,
    option_scores,
    scores_by_example,
)
from .classifier import classification_loss, collate_classifier, encode_classifier_text
from .custom import FileTaskOptions, configured_num_labels, sample_configured_task, sample_file_task
from .data import load_task, local_path
from .evaluation import evaluate, make_collate_fn, predict
from .registry import TaskSpec, get_task_spec, known_tasks
from .sampling import TaskData, sample_task
from .templates import PromptTemplate, get_template
from .tokenization import special_affixes, special_prefix_ids

__all__ = [
    "FileTaskOptions",
    "ShuffledBatches",
    "configured_num_labels",
    "sample_configured_task",
    "sample_file_task",
    "PromptTemplate",
    "TaskData",
    "TaskSpec",
    "classification_loss",
    "collate_causal_lm",
    "collate_classifier",
    "encode_classifier_text",
    "encode_prompt_and_option",
    "evaluate",
    "get_task_spec",
    "get_template",
    "known_tasks",
    "lm_answer_loss",
    "load_task",
    "local_path",
    "make_collate_fn",
    "option_classification_loss",
    "option_scores",
    "predict",
    "sample_task",
    "scores_by_example",
    "special_affixes",
    "special_prefix_ids",
]

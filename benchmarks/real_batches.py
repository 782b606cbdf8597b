"""Real training batches through a split model, for the benchmarks that measure estimates on them
(``linear_agreement.py``, ``wire_codecs.py``): the same flags, model, loss and batch stream as
``hosl train`` builds (tokenizer, template, collation), in evaluation mode."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_args(p, batch_size: int = 16) -> None:
    """--model, --task, --cut, --data-dir, --batches, --batch-size, --max-length, --queries."""
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--task", default="sst2")
    p.add_argument("--cut", type=int, default=2)
    p.add_argument("--data-dir", default=os.environ.get("HOSL_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--queries", type=int, default=10)


@dataclass
class RealBatches:
    model_kind: str
    client: object
    server: object
    loss_of: object
    batches: object  # ShuffledBatches: next(batches) is a collated batch


def load(a) -> RealBatches:
    """The split model (eval mode) and a seeded stream of ``a.batches`` training batches."""
    sys.path.insert(0, str(ROOT))
    from hosl.tasks import ShuffledBatches, make_collate_fn, sample_task
    from hosl.training.config import TrainConfig
    from hosl.training.run import load_split_model, loss_fn

    cfg = TrainConfig(model=a.model, task=a.task, cut=a.cut, data_dir=a.data_dir, batch_size=a.batch_size,
                      max_length=a.max_length, train_size=a.batches * a.batch_size, eval_size=8, progress=False)
    cfg.validate()
    data = sample_task(cfg.task, cfg.data_dir, cfg.train_size, cfg.eval_size, seed=0)
    model_kind, tokenizer, client, server = load_split_model(cfg, data)
    client.eval()
    server.eval()
    batches = ShuffledBatches(data.train, a.batch_size, seed=0,
                              collate_fn=make_collate_fn(data.template, tokenizer, model_kind, a.max_length))
    return RealBatches(model_kind, client, server, loss_fn(model_kind), batches)

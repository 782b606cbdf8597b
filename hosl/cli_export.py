"""``hosl export RUN --out DIR``: a run's latest checkpoint as a Hugging Face model folder (and a
PEFT adapter folder for LoRA runs); see ``hosl/run_export.py``."""

from __future__ import annotations

import json

from hosl import cli_options


def _cmd_export(args) -> int:
    """write a run's latest checkpoint as a Hugging Face model folder (LoRA: + PEFT adapter)

    Rebuild the run's model from its config.json, load its latest checkpoint (both halves; for a
    two-process run pass the --out holding client/ and server/, the server's checkpoints sharded
    (--server-parallel fsdp) or not) and write a folder that transformers loads with
    from_pretrained. Full runs: DIR is the model (+ tokenizer). LoRA runs: DIR/base (the
    weights under the adapters), DIR/adapter (PeftModel.from_pretrained(base, DIR/adapter)) and, with
    --merge-lora, DIR/merged. A tied embedding/head that trained apart is saved untied
    (tie_word_embeddings=false). A classifier gets the run's label names (id2label);
    hosl_export.json records the labels, template and verbaliser."""
    from hosl.run_export import export_run

    record = export_run(args.run, args.out, merge_lora=args.merge_lora, tie_head=args.tie_head)
    print(json.dumps(record, indent=2))
    return 0


def register(sub) -> None:
    p = cli_options.add_command(sub, "export", _cmd_export)
    p.add_argument("run", help="run folder (the --out of hosl train)")
    p.add_argument("--out", required=True, help="new or empty folder to write")
    p.add_argument("--merge-lora", action="store_true", help="LoRA runs: also write DIR/merged, the adapters folded in")
    p.add_argument(
        "--tie-head",
        action="store_true",
        help="insist on one matrix for a tied input embedding and output head: refused, saying why, when "
        "the client's embedding and the server's head copy trained apart (equal copies are tied "
        "anyway)",
    )

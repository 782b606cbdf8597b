"""``hosl train`` options for bringing your own data (``--task custom`` / ``--task lm``); the
fields are TrainConfig's of the same names, the rules in ``hosl/tasks/custom.py``."""

from __future__ import annotations

import argparse


def add_data_args(p: argparse.ArgumentParser, d) -> None:
    g = p.add_argument_group("your own data (--task custom: classification; --task lm: plain text, perplexity)")
    g.add_argument("--train-file", default=d.train_file, metavar="F",
                   help="training rows: .csv, .tsv, .json or .jsonl (read with the datasets library)")
    g.add_argument("--eval-file", default=d.eval_file, metavar="F",
                   help="evaluation rows (default: held out of --train-file, at most half of it)")
    g.add_argument("--text-field", default=d.text_field, metavar="COLUMN", help="the text column (default %(default)s)")
    g.add_argument("--text-pair-field", default=d.text_pair_field, metavar="COLUMN",
                   help="custom: a second text column (premise/hypothesis style; default none)")
    g.add_argument("--label-field", default=d.label_field, metavar="COLUMN",
                   help="custom: the label column; the classes are its distinct values (default %(default)s)")
    g.add_argument("--template", default=d.template,
                   help="custom: prompt as a format string over the columns, e.g. 'Review: {text}\\nSentiment:' "
                        "(default '{text}\\nAnswer:'; an encoder reads the bare text unless given)")
    g.add_argument("--verbalizer", default=d.verbalizer, metavar="L=W,...",
                   help="custom: the answer word of each label, e.g. 'neg=terrible,pos=great' or a JSON object "
                        "(default: each label's own text)")

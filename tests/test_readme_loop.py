"""The README's own-loop snippet runs as written (with its loss helper) and trains both halves."""

import re
from pathlib import Path

import pytest
import torch

from hosl.models import load_model

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_own_loop_snippet_trains_with_the_loss_helper_it_names():
    section = README.read_text().split("## Use it in your own loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "default_split_loss" in code
    model, _ = load_model("tiny-llama", "causal_lm", seed=0)
    ids = torch.randint(4, 200, (2, 8), generator=torch.Generator().manual_seed(0))
    code = code.replace("cut=5", "cut=1").replace("lr=1e-6", "lr=1e-2").replace("num_queries=10", "num_queries=2")
    before = {id(p): p.detach().clone() for p in model.parameters()}
    scope = {"model": model, "loader": [(ids, torch.ones_like(ids), ids.clone())]}
    exec(compile(code, "README.md", "exec"), scope)
    assert torch.isfinite(torch.as_tensor(float(scope["loss"])))
    for half in ("client", "server"):  # the ZO update moved the client, the SGD step the server
        params = [p for p in scope[half].parameters() if id(p) in before]
        assert params and any(not torch.equal(before[id(p)], p) for p in params), half

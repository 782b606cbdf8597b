"""hosl.forward (the perturbed forwards) apart from the optimizers, and the optimizers' public
point methods (``perturbed``, ``at_point``, ``scratch_nbytes``) that everything else uses.

* ``opt.perturbed(seed, sign)`` / ``opt.at_point(seed, scale)`` give the activation of the
  perturber ``hosl.forward.make_perturber`` builds, bit for bit, and leave the weights' bits alone;
* ``hosl.forward`` imports from neither ``hosl.optim`` nor ``hosl.training`` (its source, and an
  import with those packages blocked);
* no code outside ``hosl/optim`` (the training modes, the split protocol's server half,
  benchmarks, scripts) reaches into an optimizer's perturbers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import hosl
from hosl.forward import ParameterLayout, make_perturber

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")

ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-2


class _Tiny(nn.Module):
    """Embedding -> Linear -> LayerNorm -> Linear: every kind of owner the perturbers handle."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 24)
        self.norm = nn.LayerNorm(24)
        self.out = nn.Linear(24, 8)

    def forward(self, ids):
        return self.out(self.norm(torch.relu(self.fc(self.emb(ids)))))


def _ids():
    return torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(1))


def _bits(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().view(torch.int32).clone() for n, p in module.named_parameters()}


def _same_bits(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p.detach().view(torch.int32), before[n]) for n, p in module.named_parameters())


@pytest.mark.parametrize("direction", ["gaussian", "sphere"])
@pytest.mark.parametrize("perturbed_forward", ["scratch", "auto"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_point_methods_equal_the_perturber_and_keep_the_weights(perturbed_forward, direction, sign):
    model, ids = _Tiny(), _ids()
    opt = hosl.ZerothOrderOptimizer(model, eps=EPS, perturbed_forward=perturbed_forward, direction=direction)
    perturber, _ = make_perturber(model, ParameterLayout(model), None, perturbed_forward, direction)
    before = _bits(model)
    with torch.no_grad():
        clean = model(ids)
    with perturber.perturbed(17, sign * EPS):
        want = model(ids)
    with opt.perturbed(17, sign):
        by_sign = model(ids)
    assert _same_bits(model, before)
    with opt.at_point(17, sign * EPS):
        by_scale = model(ids)
    assert _same_bits(model, before)
    assert torch.equal(by_sign, want) and torch.equal(by_scale, want)
    assert (by_sign - clean).abs().max() > 1e-4  # it is a perturbed point, not the clean one
    with opt.at_point(18, sign * EPS):
        other = model(ids)
    assert not torch.equal(other, want)  # and the seed picks the point


def test_at_point_numbers_every_module_after_the_previous_and_restores_after_a_raise():
    first, second, ids = _Tiny(0), _Tiny(1), _ids()
    opt = hosl.ZerothOrderOptimizer([first, second], eps=EPS, perturbed_forward="scratch")
    lay_first = ParameterLayout(first)
    p_first, _ = make_perturber(first, lay_first, None, "scratch")
    p_second, _ = make_perturber(second, ParameterLayout(second, offset=lay_first.end), None, "scratch")
    with p_first.perturbed(5, 0.5), p_second.perturbed(5, 0.5):
        want = (first(ids), second(ids))
    with opt.at_point(5, 0.5):
        got = (first(ids), second(ids))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    before = {**_bits(first), **{"second." + n: t for n, t in _bits(second).items()}}

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with opt.at_point(5, 0.5):
            first(ids)
            raise Boom
    assert _same_bits(first, before)
    assert all(torch.equal(p.detach().view(torch.int32), before["second." + n]) for n, p in second.named_parameters())


def test_scratch_nbytes_is_the_perturbers_scratch():
    model = _Tiny()
    opt = hosl.ZerothOrderOptimizer(model, perturbed_forward="scratch")
    perturber, _ = make_perturber(model, ParameterLayout(model), None, "scratch")
    assert opt.scratch_nbytes() == perturber.scratch_nbytes() == model.emb.weight.numel() * 4  # the largest owner


def test_the_optimizer_reports_its_modules_in_coordinate_order():
    first, second = _Tiny(0), _Tiny(1)
    assert hosl.ZerothOrderOptimizer([first, second]).zo_modules() == [first, second]


# -- package boundaries ---------------------------------------------------------------------------
ALLOWED_IN_FORWARD = ("hosl.ops", "hosl.directions", "hosl.forward")


def _hosl_imports(path: Path) -> list[str]:
    """Every ``hosl...`` module ``path`` imports (``from hosl import ops`` counts as ``hosl.ops``)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            mod = node.module or ""
            names += [f"{mod}.{a.name}" for a in node.names] if mod == "hosl" else [mod]
    return [n for n in names if n == "hosl" or n.startswith("hosl.")]


def test_the_forward_package_imports_only_ops_directions_and_itself():
    files = sorted((ROOT / "hosl" / "forward").glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "scratch.py", "fused.py", "batched.py", "layout.py"}
    bad = {f"{f.name}: {n}" for f in files for n in _hosl_imports(f)
           if not any(n == ok or n.startswith(ok + ".") for ok in ALLOWED_IN_FORWARD)}
    assert not bad, f"hosl/forward imports outside {ALLOWED_IN_FORWARD}: {sorted(bad)}"


def test_the_forward_package_imports_with_optim_and_training_blocked():
    """Import ``hosl.forward`` without running ``hosl/__init__.py`` (which loads the optimizers),
    with ``hosl.optim`` and ``hosl.training`` unimportable."""
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('hosl'); pkg.__path__ = [{str(ROOT / 'hosl')!r}]; sys.modules['hosl'] = pkg\n"
        "sys.modules['hosl.optim'] = None; sys.modules['hosl.training'] = None\n"
        "import hosl.forward\n"
        "assert hosl.forward.make_perturber and hosl.forward.BatchedPerturber\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def _python_files_outside_optim() -> list[Path]:
    files = [p for p in (ROOT / "hosl").rglob("*.py")
             if not p.is_relative_to(ROOT / "hosl" / "optim") and not p.is_relative_to(ROOT / "hosl" / "forward")]
    return files + sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))


def test_nothing_outside_the_optimizers_reaches_into_their_perturbers():
    reaches = []
    for path in _python_files_outside_optim():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in ("perturbers", "batch_perturbers"):
                reaches.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not reaches, f"use the optimizer's public point methods instead: {reaches}"


def test_the_split_server_half_uses_the_public_point_and_update_methods():
    """ZO-SL's server half evaluates its client's ``(seed, scale)`` with ``at_point`` and applies the
    client's update with ``apply_update``."""
    tree = ast.parse((ROOT / "hosl" / "training" / "server_handler.py").read_text())
    called = {node.func.attr for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert {"at_point", "apply_update"} <= called

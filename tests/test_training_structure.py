"""The shape of the training package (issue 19 item 4): no import circle among hosl's modules, one
class per name, each run-level check once per ``hosl train``, and a server handler that tells clean
from perturbed requests by their phase, not by the grad mode it is called under."""

import ast
import math
import random
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import hosl.tasks.registry
from hosl.cli import main
from hosl.training.config import TrainConfig
from hosl.training.modes import Hyper
from hosl.training.protocol import KEEP_ACTIVATION_GRAD, Phase
from hosl.training.server_handler import ServerHandler
from hosl.transport import Kind, Message

ROOT = Path(__file__).resolve().parents[1]


# -- the package's shape: imports and class names -------------------------------------------------------

def _hosl_modules() -> dict[str, tuple[Path, bool]]:
    """hosl's modules by dotted name -> (file, is a package's __init__)."""
    modules = {}
    for path in sorted((ROOT / "hosl").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _imports(modules) -> dict[str, set[str]]:
    """module -> the hosl modules it imports, anywhere in the file (a function's lazy import too:
    it closes a circle at run time all the same). ``from a.b import c`` is an import of ``a.b.c``
    when that is a module, else of ``a.b``."""
    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module
                for alias in node.names:
                    if f"{source}.{alias.name}" in modules:
                        found.add(f"{source}.{alias.name}")
                    elif source in modules:
                        found.add(source)
        found.discard(name)
        graph[name] = found
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (iterative Tarjan)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_hosl_modules():
    graph = _imports(_hosl_modules())
    assert "hosl.cli_options" in graph["hosl.cli_remote"]  # the walk sees the imports at all
    assert _cycles(graph) == []


def test_no_two_classes_share_a_name_across_hosl():
    where: dict[str, list[str]] = {}
    for path, _ in _hosl_modules().values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                where.setdefault(node.name, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert "ServerHandler" in where and "ServerHalf" in where
    assert {name: places for name, places in where.items() if len(places) > 1} == {}


# -- the server handler: clean vs perturbed by the message -----------------------------------------------

class _ToyServer(nn.Module):
    """server(h, mask) -> class logits, as the server halves of hosl/models/halves.py answer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(8, 2)

    def forward(self, h, mask):
        return self.head((h * mask[..., None]).sum(1))


def _loss_of(logits, batch, copies):
    return nn.functional.cross_entropy(logits, batch["labels"])


def _handler() -> ServerHandler:
    handler = ServerHandler(_ToyServer(), "hosl", Hyper(), _loss_of, "classifier", train_dropout=False)
    mask = torch.ones(3, 4, dtype=torch.long)
    handler.handle(Message(Kind.REQUEST, Phase.BEGIN_STEP, 1, tensors=[mask, torch.tensor([0, 1, 1])]))
    return handler


def _h() -> torch.Tensor:
    return torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1))


def _grads(handler):
    return [p.grad for p in handler.server.parameters()]


@pytest.mark.parametrize("grad_mode", [torch.enable_grad, torch.no_grad])
def test_a_losses_request_never_back_propagates_whatever_the_grad_mode(grad_mode):
    reference = _handler().handle(Message(Kind.REQUEST, Phase.LOSSES, 1, tensors=[_h()])).floats
    handler = _handler()
    with grad_mode():
        reply = handler.handle(Message(Kind.REQUEST, Phase.LOSSES, 1, tensors=[_h()]))
    assert reply.floats == reference and math.isfinite(reply.floats[0])
    assert all(g is None for g in _grads(handler))


@pytest.mark.parametrize("grad_mode", [torch.enable_grad, torch.no_grad])
def test_a_clean_loss_request_back_propagates_whatever_the_grad_mode(grad_mode):
    """Called under no_grad (a caller's choice the server must not read), the clean point is still
    the server's first-order pass: same loss, same gradient, dL/dh kept when asked."""
    reference = _handler()
    expected = reference.handle(Message(Kind.REQUEST, Phase.CLEAN_LOSS, 1, tensors=[_h()])).floats
    handler = _handler()
    with grad_mode():
        reply = handler.handle(Message(Kind.REQUEST, Phase.CLEAN_LOSS, 1, ints=[KEEP_ACTIVATION_GRAD],
                                       tensors=[_h()]))
    assert reply.floats == expected
    for got, want in zip(_grads(handler), _grads(reference)):
        assert got is not None and torch.equal(got, want)
    assert handler.activation_grad is not None and handler.activation_grad.shape == _h().shape


def test_a_backprop_request_returns_the_activation_gradient_under_no_grad():
    handler = _handler()
    with torch.no_grad():
        reply = handler.handle(Message(Kind.REQUEST, Phase.BACKPROP, 1, tensors=[_h()]))
    assert reply.tensors[0].shape == _h().shape and all(g is not None for g in _grads(handler))


# -- each run-level check once per run -------------------------------------------------------------------

WORDS = "good bad fine awful great dull lovely boring superb weak".split()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small synthetic SST-2 folder (as tests/test_reliability.py writes it)."""
    folder = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    (folder / "sst2").mkdir()
    for name in ("train.tsv", "dev.tsv"):
        lines = ["text\tlabel"] + [f"{' '.join(rng.choices(WORDS, k=5))}\t{i % 2}" for i in range(24)]
        (folder / "sst2" / name).write_text("\n".join(lines) + "\n")
    return folder


def _train_args(out, data, *extra):
    return ["train", "--model", "tiny-opt", "--task", "sst2", "--data-dir", str(data), "--mode", "hosl", "--cut", "1",
            "--steps", "1", "--batch-size", "4", "--train-size", "8", "--eval-size", "4", "--num-queries", "1",
            "--max-length", "16", "--out", str(out), "--no-progress", *extra]


@pytest.fixture
def calls(monkeypatch) -> dict:
    """Counts of TrainConfig.validate and get_task_spec calls (the latter in every hosl module that
    bound the name)."""
    counts = {"validate": 0, "get_task_spec": 0}
    validate, get_task_spec = TrainConfig.validate, hosl.tasks.registry.get_task_spec

    def counted_validate(self):
        counts["validate"] += 1
        return validate(self)

    def counted_get_task_spec(name):
        counts["get_task_spec"] += 1
        return get_task_spec(name)

    monkeypatch.setattr(TrainConfig, "validate", counted_validate)
    for name, module in list(sys.modules.items()):
        if name.startswith("hosl") and getattr(module, "get_task_spec", None) is get_task_spec:
            monkeypatch.setattr(module, "get_task_spec", counted_get_task_spec)
    return counts


@pytest.mark.filterwarnings("ignore:hosl. no compiled kernels", "ignore::FutureWarning")
def test_a_local_run_validates_its_config_and_looks_up_its_task_once(data, tmp_path, calls):
    assert main(_train_args(tmp_path / "run", data)) == 0
    assert calls == {"validate": 1, "get_task_spec": 1}


@pytest.mark.filterwarnings("ignore:hosl. no compiled kernels", "ignore::FutureWarning")
def test_the_client_of_a_two_process_run_validates_once(data, tmp_path, calls, monkeypatch, capsys):
    """``hosl train --role client`` up to the connection (the data sampled, the model loaded): the
    config checked once, the task looked up once."""
    from hosl.training.remote import Connection

    def no_server(self, stop_requested):
        raise ConnectionRefusedError("no server in this test")

    monkeypatch.setattr(Connection, "connect", no_server)
    monkeypatch.setenv("HOSL_SECRET", "a-shared-secret-for-the-tests")
    args = _train_args(tmp_path / "run", data, "--role", "client", "--rank", "0", "--master-addr", "127.0.0.1",
                       "--master-port", "1")
    assert main(args) == 2
    assert "no server in this test" in capsys.readouterr().err
    assert calls == {"validate": 1, "get_task_spec": 1}

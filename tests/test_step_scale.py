"""``step_scale="loss-std"``: FZOO's normalised step, g_q divided by the spread of the perturbed losses."""

import math
import statistics

import pytest
import torch
from torch import nn

import hosl
from hosl.optim.config import ZOConfig
from hosl.optim.functional import loss_spread_scaled

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")


def test_loss_spread_scaled_divides_by_the_sample_std():
    losses = [1.0, 1.5, 0.25, 2.0]
    sigma = statistics.stdev(losses)  # n - 1, as FZOO defines it
    assert loss_spread_scaled([2.0, -4.0], losses) == pytest.approx([2.0 / sigma, -4.0 / sigma], rel=1e-15)


@pytest.mark.parametrize("losses", [[0.5, 0.5, 0.5], [1.0, math.nan]])
def test_no_spread_gives_nan_so_the_update_is_skipped(losses):
    assert all(math.isnan(g) for g in loss_spread_scaled([1.0, 2.0, 3.0], losses))


def test_one_loss_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        loss_spread_scaled([1.0], [1.0])


def test_config_refuses_what_has_no_spread():
    with pytest.raises(ValueError, match="num_queries >= 2"):
        ZOConfig(step_scale="loss-std", difference="forward", num_queries=1)
    with pytest.raises(ValueError, match="server_estimate=linear"):
        ZOConfig(step_scale="loss-std", server_estimate="linear")
    with pytest.raises(ValueError, match="step_scale"):
        ZOConfig(step_scale="adam")
    assert ZOConfig(step_scale="loss-std", difference="forward", num_queries=2).step_scale == "loss-std"


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))


@pytest.mark.parametrize("difference", ["central", "forward"])
def test_the_step_is_the_plain_step_divided_by_the_spread(difference):
    """Same seeds and weights: the normalised optimizer's g_q are the plain one's over the sample std
    of the perturbed losses it saw, and (SGD, no decay) its move is the plain move over that std."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)
    plain_model, scaled_model = _model(), _model()
    start = [p.detach().clone() for p in plain_model.parameters()]
    kw = dict(lr=1e-2, eps=1e-2, num_queries=3, seed=5, difference=difference)
    plain = hosl.ZerothOrderOptimizer(plain_model, **kw)
    scaled = hosl.ZerothOrderOptimizer(scaled_model, step_scale="loss-std", **kw)
    seen = []

    def loss_of(model, record):
        def closure():
            loss = nn.functional.mse_loss(model(x), y)
            if record:
                seen.append(float(loss))
            return loss
        return closure

    plain.step(loss_of(plain_model, False))
    scaled.step(loss_of(scaled_model, True))
    assert scaled.last_seeds == plain.last_seeds
    perturbed = seen[:6] if difference == "central" else seen[1:]  # forward: the clean loss comes first
    assert len(perturbed) == (6 if difference == "central" else 3)
    sigma = statistics.stdev(perturbed)
    assert sigma > 0
    assert scaled.last_projected_grads == pytest.approx([v / sigma for v in plain.last_projected_grads], rel=1e-9)
    for p0, pp, ps in zip(start, plain_model.parameters(), scaled_model.parameters()):
        torch.testing.assert_close(ps - p0, (pp - p0) / sigma, rtol=1e-4, atol=1e-7)
    assert any(not torch.equal(ps, p0) for p0, ps in zip(start, scaled_model.parameters()))


def test_the_cli_takes_it_and_the_run_records_it():
    from hosl.cli import build_parser
    from hosl.training.config import TrainConfig

    args = build_parser().parse_args(["train", "--step-scale", "loss-std"])
    assert args.step_scale == "loss-std"
    assert TrainConfig(step_scale="loss-std").to_dict()["step_scale"] == "loss-std"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--step-scale", "sigma"])

"""Optimizers and LR schedules: LAMB against the published formula, AdamWNoBiasCorrection
against a hand-computed step and torch's AdamW (the difference is exactly the bias
correction), the reference's parameter groups, foreach vs per-tensor agreement, the half
first moment, exact state round trips, schedule values."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch

from bertforge.train.optim import LAMB, AdamW, build_optimizer, parameter_groups
from bertforge.train.schedule import build_scheduler


def section(optimizer: str, **kw) -> SimpleNamespace:
    values = dict(optimizer=optimizer, learning_rate=0.1, weight_decay=0.01, beta1=0.9,
                  beta2=0.999, eps=1e-6, enable_half_first_order_momentum=False)
    values.update(kw)
    return SimpleNamespace(**values)


def adam_moments(size, grads, *, b1, b2, bias_correction):
    """Adam's first and second moments after each gradient, bias-corrected or not, on plain
    Python floats: (m_hat, v_hat) per step."""
    m, v = [0.0] * size, [0.0] * size
    for t, g in enumerate(grads, start=1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        yield ([mi / (1 - b1 ** t) for mi in m] if bias_correction else m,
               [vi / (1 - b2 ** t) for vi in v] if bias_correction else v)


def lamb_by_hand(x, grads, *, lr, b1, b2, eps, wd, bias_correction, trust_ratio=True):
    """Algorithm 2 of You et al. 2019 (phi = identity) on plain Python floats."""
    x = list(x)
    for mh, vh in adam_moments(len(x), grads, b1=b1, b2=b2, bias_correction=bias_correction):
        u = [a / (math.sqrt(b) + eps) + wd * xi for a, b, xi in zip(mh, vh, x)]
        x_norm = math.sqrt(sum(xi * xi for xi in x))
        u_norm = math.sqrt(sum(ui * ui for ui in u))
        r = x_norm / u_norm if (trust_ratio and x_norm > 0 and u_norm > 0) else 1.0
        x = [xi - lr * r * ui for xi, ui in zip(x, u)]
    return x


X0 = [3.0, -4.0, 0.5, 1.5]
GRADS = [[0.1, -0.2, 0.05, 0.0], [-0.3, 0.1, 0.2, 0.4]]


def run_lamb(bias_correction: bool, foreach: bool, *, trust_ratio=True, wd=0.01, x0=X0, grads=GRADS):
    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    opt = LAMB([{"params": [x], "trust_ratio": trust_ratio}], lr=0.1, betas=(0.9, 0.999), eps=1e-6,
               weight_decay=wd, bias_correction=bias_correction, foreach=foreach)
    for g in grads:
        x.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return x.detach().tolist()


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_lamb_two_steps_match_published_formula(bias_correction, foreach):
    got = run_lamb(bias_correction, foreach)
    expected = lamb_by_hand(X0, GRADS, lr=0.1, b1=0.9, b2=0.999, eps=1e-6, wd=0.01,
                            bias_correction=bias_correction)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # The two variants really differ (else this test could not tell them apart).
    other = lamb_by_hand(X0, GRADS, lr=0.1, b1=0.9, b2=0.999, eps=1e-6, wd=0.01,
                         bias_correction=not bias_correction)
    assert max(abs(a - b) for a, b in zip(got, other)) > 1e-4


def test_lamb_first_step_by_hand():
    # x = [3, 4] (norm 5), g = [0.1, -0.2], wd 0.01: m_hat = g, v_hat = g^2, so
    # u = g / (|g| + 1e-6) + 0.01 x and the step has length lr * ||x|| = 0.5 exactly.
    got = run_lamb(True, True, x0=[3.0, 4.0], grads=[[0.1, -0.2]])
    u = [0.1 / (0.1 + 1e-6) + 0.03, -0.2 / (0.2 + 1e-6) + 0.04]
    r = 5.0 / math.hypot(*u)
    assert got == pytest.approx([3.0 - 0.1 * r * u[0], 4.0 - 0.1 * r * u[1]], rel=1e-12)
    assert math.hypot(got[0] - 3.0, got[1] - 4.0) == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("foreach", [True, False])
def test_lamb_without_trust_ratio_and_zero_norm_cases(foreach):
    got = run_lamb(True, foreach, trust_ratio=False, wd=0.0, x0=[1.0, 1.0], grads=[[0.5, -0.5]])
    assert got == pytest.approx([1.0 - 0.1 * 0.5 / (0.5 + 1e-6), 1.0 + 0.1 * 0.5 / (0.5 + 1e-6)], rel=1e-12)
    # ||x|| = 0 (a fresh zero bias in a trust-ratio group): ratio falls back to 1, no NaN.
    zero = run_lamb(True, foreach, wd=0.0, x0=[0.0, 0.0], grads=[[0.5, -0.5]])
    assert zero == pytest.approx([-0.1 * 0.5 / (0.5 + 1e-6), 0.1 * 0.5 / (0.5 + 1e-6)], rel=1e-12)


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 6)
        self.dense = torch.nn.Linear(6, 6)
        self.LayerNorm = torch.nn.LayerNorm(6)
        self.out = torch.nn.Linear(6, 3)

    def forward(self, ids):
        return self.out(self.LayerNorm(torch.relu(self.dense(self.embed(ids))))).square().mean()


def test_parameter_groups_follow_the_reference():
    net = TinyNet()
    groups = parameter_groups(net, 0.01)
    names = {id(p): n for n, p in net.named_parameters()}
    by = [({names[id(p)] for p in g["params"]}, g["weight_decay"], g["trust_ratio"]) for g in groups]
    assert by == [({"embed.weight", "dense.weight", "out.weight"}, 0.01, True),
                  ({"LayerNorm.weight"}, 0.0, True),
                  ({"dense.bias", "LayerNorm.bias", "out.bias"}, 0.0, False)]


def test_lamb_bias_group_has_no_trust_ratio_and_no_weight_decay():
    torch.manual_seed(0)
    net = TinyNet()
    with torch.no_grad():
        net.LayerNorm.weight.mul_(1.5)
        net.dense.bias.fill_(0.3)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = build_optimizer(net, section("LAMB", weight_decay=0.5))
    net(torch.arange(8)).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt.step()
    for name, p in net.named_parameters():
        wd = 0.5 if p.ndim > 1 else 0.0          # LayerNorm weight and biases: no decay
        trust = not name.endswith("bias")         # biases: no trust ratio
        expected = lamb_by_hand(before[name].flatten().tolist(), [grads[name].flatten().tolist()],
                                lr=0.1, b1=0.9, b2=0.999, eps=1e-6, wd=wd, bias_correction=True,
                                trust_ratio=trust)
        assert p.detach().flatten().tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7), name
    # A bias step is lr * g/(|g|+eps): at most lr per element whatever the bias's own norm.
    assert (net.dense.bias - before["dense.bias"]).abs().max() <= 0.1 + 1e-6



def train_side_by_side(nets, opts, steps: int = 5) -> None:
    """The same `steps` random batches through each (net, optimizer) pair."""
    for step in range(steps):
        ids = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(step))
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            net(ids).backward()
            opt.step()

@pytest.mark.parametrize("name", ["LAMB", "LAMBNoBiasCorrection", "AdamWNoBiasCorrection"])
def test_foreach_and_reference_paths_agree(name):
    # float64, so that the two paths' different rounding (lerp vs mul+add, ~1 ulp per step
    # in fp32) stays far below the tolerance while any real formula difference does not.
    torch.manual_seed(0)
    nets = [TinyNet().double(), TinyNet().double()]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [build_optimizer(n, section(name)) for n in nets]
    for group in opts[1].param_groups:
        group["foreach"] = False
    train_side_by_side(nets, opts)
    for (n, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=n)


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("name", ["LAMB", "LAMBNoBiasCorrection", "AdamW", "AdamWNoBiasCorrection"])
def test_optimizer_state_round_trips_exactly(name, half):
    # half: torch's load_state_dict casts the bf16 first moment to fp32; the next step casts
    # it back, losslessly, so the resumed run must still be bit-identical.
    def train(net, opt, steps):
        for step in steps:
            ids = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            net(ids).backward()
            opt.step()

    torch.manual_seed(0)
    straight = TinyNet()
    start = {k: v.clone() for k, v in straight.state_dict().items()}
    opt = build_optimizer(straight, section(name, enable_half_first_order_momentum=half))
    train(straight, opt, range(4))

    resumed = TinyNet()
    resumed.load_state_dict(start)
    opt1 = build_optimizer(resumed, section(name, enable_half_first_order_momentum=half))
    train(resumed, opt1, range(2))
    buf = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optimizer": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = TinyNet()
    fresh.load_state_dict(saved["model"])
    opt2 = build_optimizer(fresh, section(name, enable_half_first_order_momentum=half))
    opt2.load_state_dict(saved["optimizer"])
    train(fresh, opt2, range(2, 4))
    for (n, a), b in zip(straight.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), n


def test_adamw_uses_reference_eps_groups_and_fused_kernel_on_cpu():
    net = TinyNet()
    opt = build_optimizer(net, section("AdamW", learning_rate=1e-3))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0, 0.0]
    assert all(g["eps"] == 1e-6 and g["betas"] == (0.9, 0.999) for g in opt.param_groups)
    assert all(g["fused"] for g in opt.param_groups)
    assert all("trust_ratio" not in g for g in opt.param_groups)


def adamw_by_hand(x, grads, *, lr, b1, b2, eps, wd, bias_correction):
    """AdamW (Loshchilov & Hutter 2019) on plain Python floats; bias_correction=False is
    poptorch.optim.AdamW(..., bias_correction=False), the reference's optimizer."""
    x = list(x)
    for mh, vh in adam_moments(len(x), grads, b1=b1, b2=b2, bias_correction=bias_correction):
        x = [xi - lr * (a / (math.sqrt(b) + eps) + wd * xi) for xi, a, b in zip(x, mh, vh)]
    return x


def run_adamw(name: str, *, x0=X0, grads=GRADS, foreach=True):
    """Two steps of build_optimizer(name) on one float64 matrix (the weight-decay group)."""
    x = torch.nn.Parameter(torch.tensor([x0], dtype=torch.float64))
    opt = build_optimizer(module_with(x), section(name))
    for group in opt.param_groups:
        if "foreach" in group and not isinstance(opt, torch.optim.AdamW):
            group["foreach"] = foreach
    for g in grads:
        x.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
    return x.detach()[0].tolist(), opt


def module_with(param):
    """A module whose only parameter is the matrix `param` (the weight-decay group)."""
    module = torch.nn.Module()
    module.weight = param
    return module


@pytest.mark.parametrize("foreach", [True, False])
def test_adamw_no_bias_correction_first_step_by_hand(foreach):
    # x = [3, 4], g = [0.1, -0.2], lr 0.1, wd 0.01. Without bias correction m = 0.1 g and
    # v = 0.001 g^2, so the direction is 0.1 g / (sqrt(0.001) |g| + 1e-6) ~ 3.16 sign(g): 3.16x
    # torch's first step (whose m_hat / sqrt(v_hat) is sign(g)).
    got, opt = run_adamw("AdamWNoBiasCorrection", x0=[3.0, 4.0], grads=[[0.1, -0.2]],
                         foreach=foreach)
    assert isinstance(opt, AdamW) and not isinstance(opt, torch.optim.AdamW)
    d = [0.1 * 0.1 / (math.sqrt(0.001) * 0.1 + 1e-6), 0.1 * -0.2 / (math.sqrt(0.001) * 0.2 + 1e-6)]
    expected = [3.0 - 0.1 * (d[0] + 0.01 * 3.0), 4.0 - 0.1 * (d[1] + 0.01 * 4.0)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert d[0] == pytest.approx(math.sqrt(10), rel=1e-3)  # torch's first direction: ~1.0


def test_adamw_differs_from_torch_exactly_by_the_bias_correction():
    # torch's AdamW is the by-hand formula with bias correction; AdamWNoBiasCorrection is the
    # same formula without it; and our AdamW implementation with bias correction on (used for
    # `AdamW` with a half first moment) lands on torch's result to float64 rounding.
    hand = {bc: adamw_by_hand(X0, GRADS, lr=0.1, b1=0.9, b2=0.999, eps=1e-6, wd=0.01,
                              bias_correction=bc) for bc in (True, False)}
    torch_result, opt = run_adamw("AdamW")
    assert isinstance(opt, torch.optim.AdamW)
    assert torch_result == pytest.approx(hand[True], rel=1e-12, abs=1e-12)
    no_bc, _ = run_adamw("AdamWNoBiasCorrection")
    assert no_bc == pytest.approx(hand[False], rel=1e-12, abs=1e-12)
    assert max(abs(a - b) for a, b in zip(no_bc, torch_result)) > 1e-2  # really different
    for foreach in (True, False):
        x = torch.nn.Parameter(torch.tensor([X0], dtype=torch.float64))
        ours = AdamW(parameter_groups(module_with(x), 0.01), lr=0.1, eps=1e-6,
                     weight_decay=0.01, bias_correction=True, foreach=foreach)
        for g in GRADS:
            x.grad = torch.tensor([g], dtype=torch.float64)
            ours.step()
        assert x.detach()[0].tolist() == pytest.approx(torch_result, rel=1e-13, abs=1e-14)


@pytest.mark.parametrize("name", ["AdamW", "AdamWNoBiasCorrection", "LAMB", "LAMBNoBiasCorrection"])
def test_half_first_moment_is_bf16_and_close_to_fp32(name):
    torch.manual_seed(0)
    nets = [TinyNet(), TinyNet()]
    nets[1].load_state_dict(nets[0].state_dict())
    start = {n: p.detach().clone() for n, p in nets[0].named_parameters()}
    opts = [build_optimizer(net, section(name, learning_rate=1e-2,
                                         enable_half_first_order_momentum=half))
            for net, half in zip(nets, (False, True))]
    assert isinstance(opts[1], (AdamW, LAMB))  # `AdamW` too: torch's keeps exp_avg in fp32
    train_side_by_side(nets, opts)
    for p in nets[1].parameters():
        assert opts[1].state[p]["exp_avg"].dtype == torch.bfloat16
        assert opts[1].state[p]["exp_avg_sq"].dtype == torch.float32
    for p in nets[0].parameters():
        assert opts[0].state[p]["exp_avg"].dtype == torch.float32
    # One bf16 rounding of m per step (relative 2^-9): after 5 steps the two runs differ,
    # by well under 2% of how far the weights moved (measured: 0.1-0.8%).
    for (n, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        moved, diff = (a - start[n]).abs().max().item(), (a - b).abs().max().item()
        assert 0 < diff < 0.02 * moved, (n, diff, moved)


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError,
                       match="AdamW, AdamWNoBiasCorrection, LAMB, LAMBNoBiasCorrection"):
        build_optimizer(TinyNet(), section("SGD"))


def lrs(schedule: str, warmup: float, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = build_scheduler(opt, schedule, warmup, steps)
    out = []
    for _ in range(steps + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_linear_schedule_warms_up_then_decays_to_zero():
    got = lrs("linear", 0.3, 10)  # warmup int(0.3 * 10) = 3 steps, then 7 of decay
    expected = [0.0, 2 / 3, 4 / 3, 2.0] + [2.0 * (10 - s) / 7 for s in range(4, 11)]
    assert got == pytest.approx(expected)
    assert got[10] == 0.0


def test_constant_schedule_with_and_without_warmup():
    assert lrs("constant", 0.0, 5) == pytest.approx([2.0] * 6)
    assert lrs("constant", 0.4, 5) == pytest.approx([0.0, 1.0, 2.0, 2.0, 2.0, 2.0])


def test_schedule_state_round_trips_and_rejects_bad_input():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = build_scheduler(opt, "linear", 0.28, 100)
    for _ in range(40):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched2 = build_scheduler(opt2, "linear", 0.28, 100)
    sched2.load_state_dict(sched.state_dict())
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx((100 - 41) / 72)
    # The one rule for the schedule's settings is the config section's.
    from bertforge.config import OptimSection
    with pytest.raises(ValueError, match="constant, linear"):
        OptimSection(lr_schedule="cosine")
    with pytest.raises(ValueError, match="lr_warmup"):
        OptimSection(lr_warmup=1.5)

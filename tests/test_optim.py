"""PaperSGD against Sec. 5's formula by hand, the parameter groups, and the lr schedules."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from alexnet.config import CUDA_CONVNET, PAPER, TrainConfig, replace_checked
from alexnet.errors import BadInput
from alexnet.model import build_model
from alexnet.optim import LRSchedule, PaperSGD, make_optimizer, param_groups

LRS = [0.01] * 3 + [0.001] * 3  # an lr change (0.01 -> 0.001) before the fourth step
M, WD = 0.9, 5e-4  # Sec. 5


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=(3, 4))
    a = rng.uniform(0.5, 2.0, size=(3, 4))
    b = rng.normal(size=(3, 4))
    return w0, a, b  # loss = sum(a w^2 / 2 + b w), gradient a w + b


def _paper_by_hand(w0, a, b, lrs):
    """v <- 0.9 v - 0.0005 eps w - eps grad; w <- w + v (Sec. 5), in float64 numpy."""
    w, v, out = w0.copy(), np.zeros_like(w0), []
    for lr in lrs:
        g = a * w + b
        v = M * v - WD * lr * w - lr * g
        w = w + v
        out.append(w.copy())
    return out


def _run_torch(make_opt, w0, a, b, lrs):
    w = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    at, bt = torch.tensor(a), torch.tensor(b)
    opt = make_opt([w])
    out = []
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        (0.5 * at * w**2 + bt * w).sum().backward()
        opt.step()
        out.append(w.detach().numpy().copy())
    return out


@pytest.mark.parametrize("foreach", [True, False])
def test_paper_sgd_matches_the_formula_across_an_lr_change(foreach):
    w0, a, b = _problem()
    expected = _paper_by_hand(w0, a, b, LRS)
    got = _run_torch(
        lambda p: PaperSGD(p, lr=LRS[0], momentum=M, weight_decay=WD, foreach=foreach),
        w0,
        a,
        b,
        LRS,
    )
    for step, (g, e) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-14, err_msg=f"step {step}")


def test_torch_sgd_agrees_before_the_lr_change_and_differs_right_after():
    w0, a, b = _problem(1)
    paper = _paper_by_hand(w0, a, b, LRS)
    sgd = _run_torch(
        lambda p: torch.optim.SGD(p, lr=LRS[0], momentum=M, weight_decay=WD), w0, a, b, LRS
    )
    for step in range(3):  # constant lr: the two updates are the same function
        np.testing.assert_allclose(sgd[step], paper[step], rtol=1e-12, atol=1e-14)
    # Right after the change SGD's momentum term is scaled by the new lr, the paper's is not:
    # SGD - paper = -momentum * v * (1 - 0.001 / 0.01), with v the paper's last velocity.
    v3 = paper[2] - paper[1]
    np.testing.assert_allclose(sgd[3] - paper[3], -M * v3 * (1 - 0.1), rtol=1e-8, atol=1e-14)
    assert np.abs(sgd[3] - paper[3]).max() > 1e-3


def test_paper_sgd_state_dict_round_trip():
    w0, a, b = _problem(2)
    at, bt = torch.tensor(a), torch.tensor(b)

    def steps(w, opt, n):
        for _ in range(n):
            opt.zero_grad()
            (0.5 * at * w**2 + bt * w).sum().backward()
            opt.step()

    w = nn.Parameter(torch.tensor(w0))
    opt = PaperSGD([w], lr=0.01)
    steps(w, opt, 2)
    saved_w, saved_opt = w.detach().clone(), copy.deepcopy(opt.state_dict())
    steps(w, opt, 3)

    w2 = nn.Parameter(saved_w.clone())
    opt2 = PaperSGD([w2], lr=0.5)  # the loaded state's lr wins
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["lr"] == 0.01
    steps(w2, opt2, 3)
    assert torch.equal(w, w2)


def test_paper_sgd_rejects_bad_hyperparameters():
    p = [nn.Parameter(torch.zeros(2))]
    for kwargs in (dict(lr=-1.0), dict(lr=0.1, momentum=1.0), dict(lr=0.1, weight_decay=-1)):
        with pytest.raises(ValueError):
            PaperSGD(p, **kwargs)


# --- parameter groups -----------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(8, 2)

    def conv1_parameters(self):  # as both layouts of alexnet.model
        return list(self.conv1.parameters())


def _by_name(groups):
    return {g["name"]: g for g in groups}


def test_groups_bias_lr_and_no_bias_decay_cuda_convnet():
    torch.manual_seed(0)
    model = Tiny()
    train = CUDA_CONVNET.train  # layer-params-145: bias lr 2x, no bias decay
    groups = _by_name(param_groups(model, train))
    assert set(groups) == {"conv1.weight", "conv1.bias", "weights", "biases"}
    assert groups["conv1.weight"]["params"] == [model.conv1.weight]
    assert groups["conv1.bias"]["params"] == [model.conv1.bias]
    assert groups["weights"]["params"] == [model.fc.weight]
    assert groups["biases"]["params"] == [model.fc.bias]
    for name in ("conv1.bias", "biases"):
        assert groups[name]["lr_mult"] == 2.0 and groups[name]["weight_decay"] == 0.0
        assert groups[name]["lr"] == pytest.approx(0.02)
    for name in ("conv1.weight", "weights"):
        assert groups[name]["lr_mult"] == 1.0 and groups[name]["weight_decay"] == 5e-4
        assert groups[name]["lr"] == pytest.approx(0.01)

    # One step from zero velocity with gradient 1 everywhere, by hand:
    # weights: w - 5e-4 * 0.01 * w - 0.01; biases: b - 0.02 (no decay).
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, train)
    assert isinstance(opt, PaperSGD)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    for n, p in model.named_parameters():
        w = before[n].double()
        expected = w - 0.02 if n.endswith("bias") else w - 5e-4 * 0.01 * w - 0.01
        np.testing.assert_allclose(p.detach().double().numpy(), expected.numpy(), atol=1e-7)


def test_groups_paper_decay_everything_at_one_lr():
    torch.manual_seed(0)
    model = Tiny()
    groups = _by_name(param_groups(model, PAPER.train))  # Sec. 5: one lr, decay on everything
    for g in groups.values():
        assert g["lr_mult"] == 1.0 and g["weight_decay"] == 5e-4 and g["lr"] == 0.01
    b0 = model.fc.bias.detach().clone()
    opt = make_optimizer(model, PAPER.train)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # only the decay acts: b * (1 - 5e-4 * 0.01)
    torch.testing.assert_close(model.fc.bias.detach(), b0 * (1 - 5e-6), rtol=0, atol=1e-9)


def test_groups_on_the_real_models():
    train = CUDA_CONVNET.train
    paper = build_model("paper", num_classes=10)
    g = _by_name(param_groups(paper, train))
    assert g["conv1.weight"]["params"] == [paper.conv1.weight]
    assert g["conv1.bias"]["params"] == [paper.conv1.bias]
    # Seven other weighted layers (conv2-5, fc6-8): 7 weight tensors and 7 bias vectors.
    assert len(g["weights"]["params"]) == 7 and len(g["biases"]["params"]) == 7
    assert all(p.ndim == 1 for p in g["biases"]["params"])
    total = sum(p.numel() for grp in g.values() for p in grp["params"])
    assert total == sum(p.numel() for p in paper.parameters())
    del paper

    tv = build_model("torchvision", num_classes=10)
    g = _by_name(param_groups(tv, train))
    assert g["conv1.weight"]["params"] == [tv.features[0].weight]
    assert g["conv1.bias"]["params"] == [tv.features[0].bias]
    assert len(g["weights"]["params"]) == 7 and len(g["biases"]["params"]) == 7
    del tv

    two = build_model("paper", num_classes=10, devices=["cpu", "cpu"])  # conv1.weight_0/_1
    g = _by_name(param_groups(two, train))
    names = {id(p): n for n, p in two.named_parameters()}
    assert sorted(names[id(p)] for p in g["conv1.weight"]["params"]) == [
        "conv1.weight_0",
        "conv1.weight_1",
    ]
    assert sorted(names[id(p)] for p in g["conv1.bias"]["params"]) == [
        "conv1.bias_0",
        "conv1.bias_1",
    ]


def test_make_optimizer_choices():
    model = Tiny()
    sgd = make_optimizer(model, replace_checked(PAPER.train, "train", optimizer="sgd"))
    assert type(sgd) is torch.optim.SGD
    assert all(g["momentum"] == 0.9 and g["nesterov"] is False for g in sgd.param_groups)
    with pytest.raises(ValueError, match="paper-sgd.*sgd"):
        make_optimizer(model, replace_checked(PAPER.train, "train", optimizer="adam"))


# --- schedules ------------------------------------------------------------------------------
def test_plateau_rule_on_a_hand_made_sequence():
    train = PAPER.train  # patience 3, threshold 0.001, at most 3 drops
    assert (train.plateau_patience, train.plateau_threshold, train.max_lr_drops) == (3, 0.001, 3)
    errors = {
        1: 0.90,
        2: 0.80,  # best 0.80
        3: 0.7995,  # better by 0.0005 < threshold: not an improvement (1)
        4: 0.7991,  # still within the threshold of 0.80 (2)
        5: 0.81,  # (3) -> drop at 5
        6: 0.70,  # improvement, best 0.70
        7: 0.71,  # (1)
        8: 0.699,  # exactly the threshold, not strictly better (2)
        9: 0.70,  # (3) -> drop at 9
        10: 0.72,  # (1)
        11: 0.60,  # improvement resets the count
        12: 0.61,
        13: 0.61,
        14: 0.61,  # (3) -> drop at 14, the third and last
        **{e: 0.95 for e in range(15, 31)},  # no fourth drop
    }
    sched = LRSchedule(train, steps_per_epoch=10)
    dropped = [e for e, err in errors.items() if sched.on_validation(e, err)]
    assert dropped == [5, 9, 14]
    assert sched.drops == [5, 9, 14]
    expected = {0: 1, 4.9: 1, 5: 0.1, 8.99: 0.1, 9: 0.01, 13.5: 0.01, 14: 1e-3, 30: 1e-3}
    for epoch, mult in expected.items():
        assert sched.lr_mult(epoch) == pytest.approx(mult, rel=1e-12), epoch
    opt = PaperSGD([nn.Parameter(torch.zeros(2))], lr=0.01)
    assert sched.apply(opt, 9.5) == pytest.approx(1e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_plateau_rule_patience_and_threshold_settings():
    train = TrainConfig(plateau_patience=1, plateau_threshold=0.05, max_lr_drops=1)
    sched = LRSchedule(train, steps_per_epoch=1)
    assert not sched.on_validation(1, 0.5)
    assert not sched.on_validation(2, 0.44)  # 0.06 better: improvement
    assert sched.on_validation(3, 0.40)  # 0.04 better: within the threshold, patience 1
    assert not sched.on_validation(4, 0.9) and not sched.on_validation(5, 0.9)  # max 1 drop
    assert sched.drops == [3]


def test_steps_schedule_is_a_no_op_for_validation():
    sched = LRSchedule(CUDA_CONVNET.train, steps_per_epoch=1)
    assert not any(sched.on_validation(e, 0.9) for e in range(1, 20))


def _tiny_optimizer(train):
    return make_optimizer(Tiny(), train)


def _lrs(sched, opt, epoch):
    sched.apply(opt, epoch)
    return {g["name"]: g["lr"] for g in opt.param_groups}


def test_cuda_convnet_schedule():
    train = CUDA_CONVNET.train
    sched = LRSchedule(train, steps_per_epoch=100)
    opt = _tiny_optimizer(train)
    # The logged 2012 schedule: 0.01 -> 1e-3 at 25 -> 1e-4 at 51 -> 1e-5 at 79.
    for epoch, lr in [(0, 1e-2), (24.99, 1e-2), (25, 1e-3), (50.99, 1e-3), (51, 1e-4),
                      (78.99, 1e-4), (79, 1e-5), (90.99, 1e-5)]:  # fmt: skip
        lrs = _lrs(sched, opt, epoch)
        assert lrs["weights"] == pytest.approx(lr, rel=1e-12), epoch
        # layer-params-145: bias lr 2x the initial weight lr (0.02), never lowered.
        assert lrs["biases"] == pytest.approx(0.02, rel=1e-12), epoch
    # conv1: the weights' schedule until 67, then 1e-5, then 0 from 72.
    assert _lrs(sched, opt, 66.99)["conv1.weight"] == pytest.approx(1e-4, rel=1e-12)
    assert _lrs(sched, opt, 67)["conv1.weight"] == pytest.approx(1e-5, rel=1e-12)
    assert _lrs(sched, opt, 71.99)["conv1.weight"] == pytest.approx(1e-5, rel=1e-12)
    assert _lrs(sched, opt, 72)["conv1.weight"] == 0.0
    assert _lrs(sched, opt, 80)["conv1.bias"] == 0.0
    assert _lrs(sched, opt, 70)["weights"] == pytest.approx(1e-4, rel=1e-12)
    # Colour noise off at 67.
    assert sched.lighting_on(0) and sched.lighting_on(66.99)
    assert not sched.lighting_on(67) and not sched.lighting_on(90)
    sched.apply(opt, 60)
    assert sched.drops == [25, 51]


def test_cuda_convnet_schedule_stretched_to_9_epochs():
    train = CUDA_CONVNET.train
    sched = LRSchedule(train, steps_per_epoch=100, epoch_scale=9 / 91)
    opt = _tiny_optimizer(train)
    # 25, 51, 79 of 91 epochs -> 225/91 = 2.4725, 459/91 = 5.0440, 711/91 = 7.8132 of 9.
    drops = [2.4725274725, 5.0439560440, 7.8131868132]
    for i, d in enumerate(drops):
        assert _lrs(sched, opt, d - 1e-6)["weights"] == pytest.approx(0.01 * 0.1**i, rel=1e-9)
        assert _lrs(sched, opt, d + 1e-6)["weights"] == pytest.approx(0.01 * 0.1 ** (i + 1))
    sched.apply(opt, 9.0)
    assert sched.drops == pytest.approx(drops, abs=1e-9)
    # conv1 1e-5 at 67 -> 603/91 = 6.6264, 0 at 72 -> 648/91 = 7.1209; lighting off at 6.6264.
    assert _lrs(sched, opt, 6.626)["conv1.weight"] == pytest.approx(1e-4, rel=1e-9)
    assert _lrs(sched, opt, 6.627)["conv1.weight"] == pytest.approx(1e-5, rel=1e-9)
    assert _lrs(sched, opt, 7.120)["conv1.weight"] == pytest.approx(1e-5, rel=1e-9)
    assert _lrs(sched, opt, 7.121)["conv1.weight"] == 0.0
    assert sched.lighting_on(6.626) and not sched.lighting_on(6.627)


def test_warmup():
    train = TrainConfig(lr=0.1, warmup_epochs=2, schedule="steps", milestones=(1,))
    sched = LRSchedule(train, steps_per_epoch=5)  # 10 warm-up steps
    for step in range(14):
        epoch = step / 5
        factor = min(1.0, (step + 1) / 10) * (0.1 if epoch >= 1 else 1.0)
        assert sched.lr_mult(epoch) == pytest.approx(factor, rel=1e-12), step
    assert sched.lr_mult(0) > 0  # the first step learns


def test_schedule_state_dict_round_trip():
    errors = [0.9, 0.8, 0.8, 0.8, 0.8, 0.7, 0.75, 0.75, 0.75, 0.6, 0.6, 0.6, 0.6]
    whole = LRSchedule(PAPER.train, steps_per_epoch=10)
    first = [whole.on_validation(e, err) for e, err in enumerate(errors, 1)]

    a = LRSchedule(PAPER.train, steps_per_epoch=10)
    got = [a.on_validation(e, err) for e, err in enumerate(errors[:7], 1)]
    a.apply(PaperSGD([nn.Parameter(torch.zeros(1))], lr=0.01), 7.0)
    saved = json.loads(json.dumps(a.state_dict()))  # JSON-able
    b = LRSchedule(PAPER.train, steps_per_epoch=10)
    b.load_state_dict(saved)
    assert b.epoch == 7.0 and b.drops == a.drops
    got += [b.on_validation(e, err) for e, err in enumerate(errors[7:], 8)]
    assert got == first and b.drops == whole.drops == [5, 9, 13]

    with pytest.raises(ValueError, match="plateau"):
        LRSchedule(CUDA_CONVNET.train, steps_per_epoch=1).load_state_dict(saved)


def test_schedule_rejects_bad_settings():
    with pytest.raises(ValueError, match="plateau.*steps"):
        LRSchedule(TrainConfig(schedule="cosine"), steps_per_epoch=1)
    with pytest.raises(ValueError):
        LRSchedule(PAPER.train, steps_per_epoch=0)


def test_curves_mark_schedule_drops_not_a_linear_decay():
    """curves.png's "lr / 10" lines: the trainer's recorded drops when present (none for the
    demo's linear decay, whose last logged lrs fall 20-fold); otherwise plateau flags and
    tenfold falls between logged steps."""
    from alexnet.plots import lr_drop_epochs

    lin = [{"epoch": e / 10, "lr": 0.02 * (1 - e / 10) + 1e-5} for e in range(1, 11)]
    assert lr_drop_epochs(lin, [{"epoch": 1, "lr_drops": []}]) == []
    assert lr_drop_epochs([], [{"epoch": 30, "lr_drops": [25.0]}]) == [25.0]
    steps = [{"epoch": 0.5, "lr": 0.01}, {"epoch": 1.5, "lr": 0.001}, {"epoch": 2.5, "lr": 0.001}]
    assert lr_drop_epochs(steps, [{"epoch": 1}, {"epoch": 2, "lr_dropped": True}]) == [1.5, 2]


def test_caffe_solver_is_the_papers_update_across_an_lr_change():
    """Caffe's SGD solver (the facts): v <- m v + lr (g + wd w), w <- w - v, bias lr 2x and no
    bias decay; computed here in float64 across an lr drop, where torch.optim.SGD differs."""
    from alexnet.config import CAFFE

    torch.manual_seed(0)
    model = Tiny().double()
    train = CAFFE.train
    opt = make_optimizer(model, train)
    params = dict(model.named_parameters())
    w = {k: p.detach().clone() for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in w.items()}
    grads = [{k: torch.randn_like(p) for k, p in w.items()} for _ in range(4)]
    for step, g in enumerate(grads):
        lr = train.lr if step < 2 else train.lr * 0.1
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_mult"]
        for k, p in params.items():
            p.grad = g[k].clone()
        opt.step()
        for k in w:
            bias = w[k].ndim == 1
            glr = lr * (train.bias_lr_mult if bias else 1.0)
            wd = 0.0 if bias else train.weight_decay
            v[k] = train.momentum * v[k] + glr * (g[k] + wd * w[k])
            w[k] = w[k] - v[k]
    for k, p in params.items():
        torch.testing.assert_close(p.detach(), w[k], rtol=1e-12, atol=1e-14)


def test_plateau_rule_waits_while_the_net_is_at_chance():
    """Issue 10: a run at chance keeps its lr (it has not started, so it has not stopped
    improving); once it has learned and then stalls, the rule drops the lr."""
    train = PAPER.train  # patience 3, margin 0.05
    sched = LRSchedule(train, steps_per_epoch=10, chance_error=0.9)
    at_chance = [0.90, 0.899, 0.9, 0.88, 0.9, 0.86, 0.9]  # never <= 0.85
    assert not any(sched.on_validation(e, err) for e, err in enumerate(at_chance, 1))
    assert sched.at_chance and sched.drops == [] and sched.lr_mult(7.5) == 1.0
    # It learns (0.5 is clearly below chance), then stalls for three epochs: drop at 11.
    got = [sched.on_validation(e, err) for e, err in [(8, 0.5), (9, 0.5), (10, 0.5), (11, 0.5)]]
    assert got == [False, False, False, True] and not sched.at_chance
    assert sched.drops == [11]
    # Without a chance level the rule is armed from the start (a schedule without a class count).
    old = LRSchedule(train, steps_per_epoch=10)
    assert [old.on_validation(e, 0.9) for e in (1, 2, 3, 4)] == [False, False, False, True]
    # The state survives a checkpoint.
    fresh = LRSchedule(train, steps_per_epoch=10, chance_error=0.9)
    fresh.load_state_dict(json.loads(json.dumps(LRSchedule(train, 10, chance_error=0.9)
                                                .state_dict())))  # fmt: skip
    assert fresh.at_chance


def test_min_steps_makes_a_small_splits_epochs_longer_not_more():
    """train.min_steps (the finetune profile's 300): the epochs stay the recipe's, each long
    enough for the run to have the steps, so the warm-up (1 epoch of 10) stays a tenth of it."""
    from alexnet.config import RunConfig, RunSpec, get_profile

    spec = RunSpec.checked(get_profile("finetune"), RunConfig(data="s", out="o"))
    t = spec.profile.train
    assert (t.epochs, t.min_steps, t.batch_size, t.warmup_epochs) == (10, 300, 32, 1)
    for images, steps in ((90, 30), (300, 30), (900, 30), (3200, 100), (32, 30)):
        assert spec.steps_per_epoch(images) == steps  # max(images // 32, ceil(300 / 10))
    with pytest.raises(BadInput, match="fewer than one batch"):
        spec.steps_per_epoch(31)
    demo = RunSpec.checked(get_profile("demo"), RunConfig(data="s", out="o"))
    assert demo.steps_per_epoch(90) == 2  # no floor: 90 // 32

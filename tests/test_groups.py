"""Parameter groups, l1 and decoupled weight decay: the reference maths, the group spec
(resolve_groups), FlatParams names, and every backend against the reference over the
shared GROUP_CONFIGS, one launch per step."""

import numpy as np
import pytest

import gpu_momentum as gm
from configs import (CONFIGS, GROUP_CONFIGS, GROUP_ERRORS, LR_SCHEDULE, PADDING_GRADIENTS,
                     SEGMENT_NAMES, SEGMENT_SIZES, STEPS, group_lr, grouped_reference_step,
                     hyper_at, padding_mask, problem)
from gpu_momentum.hyperparams import Hyperparameters
from gpu_momentum.groups import resolve_groups
from gpu_momentum.kernels.layout import NO_GROUP
from gpu_momentum.reference import reference_step
from harness import CpuHarness


def test_l1_adds_l1_times_the_sign_of_p():
    p = np.array([2.0, -3.0, 0.0, 0.0])
    g = np.array([0.5, 0.5, 0.5, -0.0])
    new_p, v = reference_step(p, g, np.zeros(4), lr=0.1, l1=0.25, first_step=True)
    np.testing.assert_array_equal(v, -0.1 * (g + np.array([0.25, -0.25, 0.0, 0.0])))
    np.testing.assert_array_equal(new_p, p + v)
    # sign(0) = 0 by branches: a -0.0 gradient stays -0.0, as the kernels will leave it
    assert np.signbit(reference_step(p, g, np.zeros(4), lr=0.0, l1=0.25, style="torch",
                                     first_step=True)[1][3])


@pytest.mark.parametrize("style", ["classic", "torch"])
def test_decoupled_weight_decay_scales_p_before_the_momentum_update(style):
    rng = np.random.default_rng(3)
    p, g = rng.standard_normal(100), rng.standard_normal(100)
    new_p, v = reference_step(p, g, np.zeros(100), lr=0.1, weight_decay=0.01, style=style,
                              decoupled_weight_decay=True, first_step=True)
    plain_p, plain_v = reference_step(p, g, np.zeros(100), lr=0.1, style=style,
                                      first_step=True)
    np.testing.assert_array_equal(v, plain_v)  # no weight_decay * p in the gradient
    decayed = p * (1 - 0.1 * 0.01)
    expected = decayed + v if style == "classic" else decayed - 0.1 * v
    np.testing.assert_array_equal(new_p, expected)
    coupled_p, coupled_v = reference_step(p, g, np.zeros(100), lr=0.1, weight_decay=0.01,
                                          style=style, first_step=True)
    assert not np.array_equal(coupled_v, v)


@pytest.mark.parametrize("bad, error", [(-0.1, ValueError), (float("nan"), ValueError),
                                        (float("inf"), ValueError), ("0.1", TypeError)])
def test_l1_is_validated(bad, error):
    with pytest.raises(error, match=r"Invalid l1 value"):
        Hyperparameters(lr=0.1, l1=bad)


def test_decoupled_weight_decay_is_a_flag():
    with pytest.raises(TypeError, match=r"Invalid decoupled_weight_decay value"):
        Hyperparameters(lr=0.1, decoupled_weight_decay=1)


DEFAULTS = Hyperparameters(lr=0.1, momentum=0.9)
NAMES = ["stem", "block.w", "block.b", "head.w", "head.b"]
OFFSETS = [0, 16, 48, 52, 100]
SIZES = [13, 32, 4, 47, 3]
TOTAL = 104


def test_groups_become_merged_contiguous_ranges():
    plan = resolve_groups([{"params": ["head.w", "head.b"], "lr": 0.01},
                           {"params": [0], "weight_decay": 1e-4, "l1": 1e-5}],
                          DEFAULTS, OFFSETS, SIZES, TOTAL, NAMES)
    assert [h.lr for h in plan.hypers] == [0.1, 0.01, 0.1]
    assert plan.hypers[2].weight_decay == 1e-4 and plan.hypers[2].l1 == 1e-5
    assert plan.segment_groups == (2, 0, 0, 1, 1)
    # Padding is its own range, owned by no group; neighbours of one owner merge.
    assert plan.range_ends.tolist() == [13, 16, 52, 99, 100, 103, 104]
    assert plan.range_groups.tolist() == [2, NO_GROUP, 0, 1, NO_GROUP, 1, NO_GROUP]


def test_no_groups_is_one_range_between_the_padding():
    plan = resolve_groups(None, DEFAULTS, OFFSETS, [16, 32, 4, 48, 4], TOTAL, NAMES)
    assert plan.hypers == (DEFAULTS,)
    assert (plan.range_ends.tolist(), plan.range_groups.tolist()) == ([104], [0])
    single = resolve_groups(None, DEFAULTS, [0], [7], 7)
    assert (single.range_ends.tolist(), single.range_groups.tolist()) == ([7], [0])
    empty = resolve_groups(None, DEFAULTS, [0, 0], [0, 0], 0)
    assert (empty.range_ends.tolist(), empty.range_groups.tolist()) == ([0], [0])


@pytest.mark.parametrize("offsets, sizes, total", [([0, 4], [5, 1], 8), ([0], [9], 8),
                                                   ([0, 4], [1], 8), ([-1], [1], 8)])
def test_segments_must_fit_one_after_the_other(offsets, sizes, total):
    with pytest.raises(ValueError, match=r"do not fit one after the other"):
        resolve_groups(None, DEFAULTS, offsets, sizes, total)


def _flat(backend, seed=0):
    rng = np.random.default_rng(seed)
    return gm.FlatParams.from_arrays(
        [backend.from_numpy(rng.standard_normal(size)) for size in SEGMENT_SIZES],
        names=list(SEGMENT_NAMES))


def _bits(backend, *arrays):
    return [backend.to_numpy(a).tobytes() for a in arrays]


@pytest.mark.parametrize("skip_nonfinite", [False, True], ids=["", "skip-nonfinite"])
@pytest.mark.parametrize("config", GROUP_CONFIGS)
def test_groups_match_reference(backend, config, skip_nonfinite, monkeypatch):
    """Each segment follows its group's hyperparameters, first step and lr schedule."""
    flat = _flat(backend)
    padding = padding_mask(flat.offsets, flat.sizes, flat.data.size)
    backend.assign(flat.data, np.where(padding, -3.5, backend.to_numpy(flat.data)))
    param = backend.to_numpy(flat.data)
    velocity = np.zeros_like(param)
    initialized = [False] * (1 + len(config["groups"]))
    opt = gm.MomentumSGD(flat, lr=LR_SCHEDULE[0], groups=config["groups"],
                         skip_nonfinite=skip_nonfinite, backend=backend.name,
                         **config["options"])
    launches, prepare = [], opt._backend.step_function

    def counted(*args, **kw):
        launch = prepare(*args, **kw)
        return lambda *a, **k: launches.append(1) or launch(*a, **k)

    monkeypatch.setattr(opt._backend, "step_function", counted)
    rng = np.random.default_rng(1)
    for step in range(STEPS):
        opt.lr = LR_SCHEDULE[step]
        for group, spec in zip(opt.param_groups, config["groups"]):
            group["lr"] = group_lr(spec, step)
        # Padding gradients of every kind: never read, so never a skipped step.
        grad = np.where(padding, np.resize(PADDING_GRADIENTS, param.size),
                        rng.standard_normal(param.size))
        backend.assign(flat.grad, grad)
        opt.step()
        assert not opt.last_step_skipped
        param, velocity = grouped_reference_step(param, grad, velocity, config, step,
                                                 initialized, flat.offsets, flat.sizes)
        for name, actual, expected in (("param", flat.data, param),
                                       ("velocity", opt.velocity, velocity)):
            np.testing.assert_allclose(backend.to_numpy(actual), expected, rtol=1e-12,
                                       atol=1e-12, err_msg=f"{name} after step {step + 1}")
            assert backend.to_numpy(actual)[padding].tobytes() == \
                expected[padding].tobytes(), f"{name}'s padding moved"
    assert len(launches) == STEPS  # one backend update per step, whatever the groups
    assert opt.step_count == STEPS
    assert opt.state_dict()["velocity_initialized"] == initialized


@pytest.mark.parametrize("id_, groups, error, pattern", GROUP_ERRORS,
                         ids=[e[0] for e in GROUP_ERRORS])
def test_bad_groups_are_named_and_change_nothing(backend, id_, groups, error, pattern):
    flat = _flat(backend)
    before = _bits(backend, flat.data, flat.grad)
    with pytest.raises(error, match=pattern):
        resolve_groups(groups, DEFAULTS, flat.offsets, flat.sizes, flat.data.size,
                       flat.names)
    with pytest.raises(error, match=pattern):
        gm.MomentumSGD(flat, lr=0.1, groups=groups, backend=backend.name)
    assert _bits(backend, flat.data, flat.grad) == before


def _item(key, value):
    return lambda opt: opt.param_groups[0].__setitem__(key, value)


def _ior_in_place(opt):
    groups = opt.param_groups
    groups[0] |= {"lr": 0.5, "momentum": 2.0}


def _iadd(opt):
    opt.param_groups += [{"params": [0]}]


def _imul(opt):
    opt.param_groups *= 2


def _slice_assignment(opt):
    opt.param_groups[0:1] = []


def _assign_param_groups(opt):
    opt.param_groups = []


FIXED = r"param_groups is fixed at construction \(MomentumSGD has no add_param_group\)"

# Changes to param_groups and its groups that must raise and change nothing: (id,
# mutate(optimizer), exception type, message pattern). A group's options change all
# together or not at all, through every MutableMapping method; the groups themselves are
# fixed at construction.
GROUP_SETTING_ERRORS = [
    ("item-lr", _item("lr", -0.5), ValueError, r"Invalid lr value: -0.5"),
    ("item-momentum", _item("momentum", 1.0), ValueError, r"Invalid momentum value: 1.0"),
    ("item-l1-type", _item("l1", "x"), TypeError, r"Invalid l1 value: 'x'"),
    ("item-nesterov", _item("nesterov", True), ValueError, r"nesterov needs momentum > 0"),
    ("item-params", _item("params", [0]), KeyError, r"'params' cannot be set"),
    ("item-maximize", _item("maximize", True), KeyError, r"'maximize' cannot be set"),
    ("item-new-key", _item("betas", 0.9), KeyError, r"'betas' cannot be set"),
    ("update-one-bad", lambda opt: opt.param_groups[0].update({"lr": 0.5, "momentum": 2.0}),
     ValueError, r"Invalid momentum value: 2.0"),
    ("update-keywords", lambda opt: opt.param_groups[0].update(lr=0.5, l1=-1.0), ValueError,
     r"Invalid l1 value: -1.0"),
    ("update-pairs-unknown", lambda opt: opt.param_groups[0].update(
        [("lr", 0.5), ("betas", 0.9)]), KeyError, r"'betas' cannot be set"),
    ("update-params-changed", lambda opt: opt.param_groups[0].update(
        {"lr": 0.5, "params": [0]}), KeyError, r"'params' cannot be set"),
    ("update-params-array", lambda opt: opt.param_groups[0].update(
        {"lr": 0.5, "params": np.array([4, 4])}), KeyError, r"'params' cannot be set"),
    ("update-not-pairs", lambda opt: opt.param_groups[0].update([("lr",)]), ValueError,
     r"length 1"),
    ("ior", lambda opt: opt.param_groups[0].__ior__({"lr": 0.5, "nesterov": "yes"}),
     TypeError, r"Invalid nesterov value: 'yes'"),
    ("ior-in-place", _ior_in_place, ValueError, r"Invalid momentum value: 2.0"),
    ("setdefault-new-key", lambda opt: opt.param_groups[0].setdefault("betas", 0.9),
     KeyError, r"'betas' cannot be added"),
    ("pop", lambda opt: opt.param_groups[0].pop("lr"), TypeError, r"cannot be removed"),
    ("pop-with-default", lambda opt: opt.param_groups[0].pop("lr", 0.1), TypeError,
     r"cannot be removed"),
    ("popitem", lambda opt: opt.param_groups[0].popitem(), TypeError, r"cannot be removed"),
    ("clear", lambda opt: opt.param_groups[0].clear(), TypeError, r"cannot be removed"),
    ("del", lambda opt: opt.param_groups[0].__delitem__("l1"), TypeError,
     r"cannot be removed"),
    ("append", lambda opt: opt.param_groups.append({"params": [0]}), TypeError, FIXED),
    ("extend", lambda opt: opt.param_groups.extend([{"params": [0]}]), TypeError, FIXED),
    ("insert", lambda opt: opt.param_groups.insert(0, {"params": [0]}), TypeError, FIXED),
    ("iadd", _iadd, TypeError, FIXED),
    ("imul", _imul, TypeError, FIXED),
    ("set-group", lambda opt: opt.param_groups.__setitem__(0, {"params": [0]}), TypeError,
     FIXED),
    ("set-slice", _slice_assignment, TypeError, FIXED),
    ("del-group", lambda opt: opt.param_groups.__delitem__(0), TypeError, FIXED),
    ("pop-group", lambda opt: opt.param_groups.pop(), TypeError, FIXED),
    ("remove-group", lambda opt: opt.param_groups.remove(opt.param_groups[0]), TypeError,
     FIXED),
    ("clear-groups", lambda opt: opt.param_groups.clear(), TypeError, FIXED),
    ("sort-groups", lambda opt: opt.param_groups.sort(), TypeError, FIXED),
    ("reverse-groups", lambda opt: opt.param_groups.reverse(), TypeError, FIXED),
    ("assign-param-groups", _assign_param_groups, AttributeError, r"param_groups"),
]


@pytest.mark.parametrize("id_, mutate, error, pattern", GROUP_SETTING_ERRORS,
                         ids=[case[0] for case in GROUP_SETTING_ERRORS])
def test_a_bad_group_setting_changes_nothing(backend, id_, mutate, error, pattern):
    flat = _flat(backend)
    opt = gm.MomentumSGD(flat, lr=0.1, groups=[{"params": ["head.w"], "momentum": 0.0},
                                               {"params": [0], "lr": 0.2}],
                         backend=backend.name)
    opt.step()
    state = opt.state_dict()
    groups = opt.param_groups
    before = _bits(backend, flat.data, opt.velocity)
    with pytest.raises(error, match=pattern):
        mutate(opt)
    assert _bits(backend, flat.data, opt.velocity) == before
    after = opt.state_dict()
    assert {k: v for k, v in after.items() if k != "velocity"} == \
        {k: v for k, v in state.items() if k != "velocity"}
    assert opt.param_groups is groups and len(groups) == 2


def test_group_changes_apply_all_their_keys():
    flat = _flat(CpuHarness())
    opt = gm.MomentumSGD(flat, lr=0.1, groups=[{"params": ["head.w"]}])
    group = opt.param_groups[0]
    group.update({"lr": 0.5, "momentum": 0.5}, l1=0.01)
    assert (group["lr"], group["momentum"], group["l1"]) == (0.5, 0.5, 0.01)
    group.update(group)  # "params" as it is, every option as it is
    group |= {"dampening": 0.25}
    opt.param_groups[0] |= {"weight_decay": 0.125}  # stored back as the same group
    opt.param_groups[np.int64(-1)] |= {"nesterov": False}
    assert (group["dampening"], group["weight_decay"]) == (0.25, 0.125)
    assert group.setdefault("lr", 9.0) == 0.5 and group.pop("betas", None) is None
    merged = group | {"lr": 1.0}
    assert type(merged) is dict and merged["lr"] == 1.0 and group["lr"] == 0.5
    assert ({"betas": 0.9} | group)["betas"] == 0.9
    assert opt.lr == 0.1 and opt.momentum == 0.9  # only the group changed


def test_param_groups_is_a_read_only_sequence():
    flat = _flat(CpuHarness())
    opt = gm.MomentumSGD(flat, lr=0.1, groups=[{"params": [0]}, {"params": ["head.w"]}])
    groups = opt.param_groups
    assert len(groups) == 2 and opt.param_groups is groups
    assert groups[-1]["params"] == ["head.w"] and [g["params"] for g in groups[:1]] == [[0]]
    assert groups == list(groups) and groups[1] in groups and groups.index(groups[1]) == 1
    assert gm.MomentumSGD(flat, lr=0.1).param_groups == []


def test_param_groups_read_like_torch():
    flat = _flat(CpuHarness())
    opt = gm.MomentumSGD(flat, lr=0.1, weight_decay=0.01, decoupled_weight_decay=True,
                         groups=[{"params": ["head.w", 5], "lr": 0.01, "l1": 0.001}])
    group, = opt.param_groups
    assert dict(group) == {"params": ["head.w", 5], "lr": 0.01, "momentum": 0.9,
                           "dampening": 0.0, "weight_decay": 0.01, "l1": 0.001,
                           "nesterov": False}
    group["lr"] *= 0.5
    assert opt.param_groups[0]["lr"] == 0.005 and opt.lr == 0.1
    assert opt.decoupled_weight_decay and "groups=1" in repr(opt)


def test_a_group_starts_its_velocity_when_its_momentum_does():
    """torch style creates a momentum buffer per group on that group's first step with
    momentum > 0, as torch.optim.SGD does per parameter."""
    flat = _flat(CpuHarness())
    opt = gm.MomentumSGD(flat, lr=0.1, momentum=0.0, style="torch",
                         groups=[{"params": ["head.w"], "momentum": 0.9}])
    flat.grad[...] = 1.0
    opt.step()
    assert opt.state_dict()["velocity_initialized"] == [False, True]
    assert not opt.velocity_initialized
    head = slice(flat.offsets[4], flat.offsets[4] + SEGMENT_SIZES[4])
    np.testing.assert_array_equal(opt.velocity[head], 1.0)  # fresh: v = g
    assert not opt.velocity[:flat.offsets[4]].any()  # momentum 0: left as it was
    opt.momentum = 0.5
    opt.step()
    np.testing.assert_array_equal(opt.velocity[:SEGMENT_SIZES[0]], 1.0)  # its first step
    np.testing.assert_array_equal(opt.velocity[head], 1.9)
    assert opt.velocity_initialized


def test_names_need_a_named_flat_params():
    with pytest.raises(ValueError, match=r"the FlatParams has no names"):
        resolve_groups([{"params": ["stem"]}], DEFAULTS, OFFSETS, SIZES, TOTAL)


def test_flat_params_keep_their_names():
    flat = gm.FlatParams.from_arrays([np.zeros(3), np.zeros(2)], names=["w", "b"])
    assert flat.names == ["w", "b"]
    assert gm.FlatParams.from_arrays([np.zeros(3)]).names is None


@pytest.mark.parametrize("names, error, pattern", [
    ("wb", TypeError, r"names must be a list of strings"),
    (["w"], ValueError, r"names must be 2 non-empty strings"),
    (["w", ""], ValueError, r"names must be 2 non-empty strings"),
    (["w", "w"], ValueError, r"'w' is given twice"),
])
def test_bad_names_are_refused(names, error, pattern):
    with pytest.raises(error, match=pattern):
        gm.FlatParams.from_arrays([np.zeros(3), np.zeros(2)], names=names)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("config", CONFIGS)
def test_cpu_element_variants_are_the_reference_bitwise(config, dtype):
    """The CPU loop compiles l1 and decoupled decay out where a group has none (see
    kernels.cpu._piece_loop); every variant must still be the reference, bit
    for bit, in the parameters' dtype (Numba's CPU code contracts no multiply-adds)."""
    param, grads = problem(1023, dtype=dtype)
    velocity = np.zeros_like(param)
    p, v = param.copy(), velocity.copy()
    for step, grad in enumerate(grads):
        hyper = hyper_at(config, step)
        gm.momentum_step(p, grad, v, first_step=step == 0, backend="cpu", **hyper)
        param, velocity = reference_step(param, grad, velocity, first_step=step == 0,
                                         dtype=dtype, **hyper)
        assert p.tobytes() == param.tobytes(), f"param after step {step + 1}"
        assert v.tobytes() == velocity.tobytes(), f"velocity after step {step + 1}"

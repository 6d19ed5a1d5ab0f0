"""The head/loss/labels contract (cases C-01 to C-06) and the math the docs rely on."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import Config, ConfigError
from pipeline.losses import (
    HeadLoss,
    check_contract,
    positive_probability,
    prior_logits,
    probabilities,
    resolve_pos_weight,
    to_targets,
)

LABELS_B = torch.tensor([0, 1, 1, 0, 1])
LOGITS_B1 = torch.tensor([[-1.5], [2.0], [0.3], [0.7], [-0.2]])


def make_config(name: str, num_classes: int, **loss) -> Config:
    return Config.model_validate(
        {"model": {"num_classes": num_classes}, "loss": {"name": name, **loss}}
    )


def test_flat_labels_are_shaped_like_the_logits_c01():
    loss = HeadLoss("bce_with_logits", 1)(LOGITS_B1, LABELS_B)
    by_hand = torch.stack([
        F.softplus(-z) if y == 1 else F.softplus(z)
        for z, y in zip(LOGITS_B1[:, 0], LABELS_B.tolist())
    ]).mean()
    # What a hand-written loss computes when `[B]` meets `[B, 1]`: a `[B, B]` grid.
    y = LABELS_B.float()
    broadcast = (F.softplus(-LOGITS_B1) * y + F.softplus(LOGITS_B1) * (1 - y)).mean()
    target = HeadLoss("bce_with_logits", 1).targets(LABELS_B)
    assert target.shape == (5, 1) and target.dtype == torch.float32
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert abs(loss.item() - broadcast.item()) > 1e-3  # the [B, B] grid is another value


def test_mismatched_head_is_reported_with_both_shapes():
    with pytest.raises(ValueError, match=r"\(5, 2\).*\(5, 1\)"):
        HeadLoss("bce_with_logits", 1)(torch.zeros(5, 2), LABELS_B)


def test_one_logit_with_cross_entropy_is_refused_c02_c05():
    with pytest.raises(ConfigError) as err:
        check_contract(make_config("cross_entropy", 1), 2, "index")
    message = str(err.value)
    assert "model.num_classes=1" in message
    assert "loss.name=bce_with_logits" in message
    assert "model.num_classes=2" in message


def test_bce_under_autocast_runs_in_float32_c03():
    head = HeadLoss("bce", 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.Linear(3, 1)(torch.randn(5, 3))
        assert logits.dtype == torch.bfloat16
        loss = head(logits, LABELS_B)
    assert loss.dtype == torch.float32
    expected = F.binary_cross_entropy(torch.sigmoid(logits.float()), LABELS_B.float()[:, None])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_bce_applies_the_sigmoid_itself_c04():
    logits = torch.tensor([[8.0], [-6.0], [3.0], [-2.0], [0.0]])
    loss = HeadLoss("bce", 1)(logits, LABELS_B)
    reference = F.binary_cross_entropy_with_logits(logits, LABELS_B.float()[:, None])
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_two_logits_zero_z_match_one_logit_z():
    z = torch.tensor([-2.0, 0.5, 1.7, 3.0, -0.1], requires_grad=True)
    one = HeadLoss("bce_with_logits", 1)(z[:, None], LABELS_B)
    (grad_one,) = torch.autograd.grad(one, z)
    two_logits = torch.stack([torch.zeros_like(z), z], dim=1)
    two = HeadLoss("cross_entropy", 2)(two_logits, LABELS_B)
    (grad_two,) = torch.autograd.grad(two, z)
    assert one.item() == pytest.approx(two.item(), rel=1e-6)
    assert torch.allclose(grad_one, grad_two, atol=1e-7)


def test_pos_weight_means_the_same_for_bce_and_bce_with_logits():
    a = HeadLoss("bce", 1, pos_weight=[3.0])(LOGITS_B1, LABELS_B)
    b = HeadLoss("bce_with_logits", 1, pos_weight=[3.0])(LOGITS_B1, LABELS_B)
    plain = HeadLoss("bce_with_logits", 1)(LOGITS_B1, LABELS_B)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert b.item() > plain.item()


def test_probabilities_per_head():
    probs = probabilities(LOGITS_B1, "bce_with_logits")
    assert torch.allclose(positive_probability(probs), torch.sigmoid(LOGITS_B1[:, 0]))
    two = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    soft = probabilities(two, "cross_entropy")
    assert torch.allclose(soft.sum(1), torch.ones(2))
    assert positive_probability(soft)[0].item() == pytest.approx(torch.sigmoid(
        torch.tensor(1.0)).item())


@pytest.mark.parametrize(
    ("name", "k", "classes", "extra", "needle"),
    [
        ("cross_entropy", 3, 2, {}, "model.num_classes=2"),
        ("bce_with_logits", 1, 10, {}, "loss.name=cross_entropy model.num_classes=10"),
        ("bce", 4, 4, {}, "0/1 label vectors"),
        ("cross_entropy", 2, 2, {"pos_weight": 2.0}, "loss.class_weights"),
        ("cross_entropy", 3, 3, {"class_weights": [1.0, 2.0]}, "one weight per class"),
        ("bce_with_logits", 1, 2, {"label_smoothing": 0.1}, "label_smoothing"),
    ],
)
def test_contract_violations_name_keys_and_fix(name, k, classes, extra, needle):
    with pytest.raises(ConfigError, match="do not fit") as err:
        check_contract(make_config(name, k, **extra), classes, "index")
    assert needle in str(err.value)


@pytest.mark.parametrize(("name", "k"), [("bce_with_logits", 1), ("bce", 1),
                                         ("cross_entropy", 2)])
def test_valid_binary_combinations_pass(name, k):
    check_contract(make_config(name, k), 2, "index")


# --- label formats: the one rule, and the contract around it -------------------------

VALID = [
    # (loss, K, classes in the shards, label_format)
    ("bce_with_logits", 1, 2, "index"),
    ("bce", 1, 2, "binary_float"),
    ("bce_with_logits", 1, 2, "one_hot"),
    ("bce_with_logits", 3, 3, "multi_hot"),
    ("bce", 3, 3, "one_hot"),
    ("cross_entropy", 2, 2, "binary_float"),
    ("cross_entropy", 4, 4, "one_hot"),
    ("cross_entropy", 10, 10, "index"),
]


@pytest.mark.parametrize(("loss", "k", "classes", "fmt"), VALID)
def test_valid_label_formats_pass_the_contract(loss, k, classes, fmt):
    check_contract(make_config(loss, k), classes, fmt)


@pytest.mark.parametrize(
    ("loss", "k", "classes", "fmt", "needle"),
    [
        ("cross_entropy", 3, 3, "multi_hot", "use loss.name=bce_with_logits"),
        ("bce_with_logits", 3, 3, "index", "needs 0/1 label vectors"),
        ("bce_with_logits", 2, 3, "multi_hot", "set model.num_classes=3"),
        ("bce", 1, 3, "one_hot", "use loss.name=cross_entropy model.num_classes=3"),
    ],
)
def test_label_formats_that_cannot_fit_are_refused(loss, k, classes, fmt, needle):
    with pytest.raises(ConfigError, match="do not fit") as err:
        check_contract(make_config(loss, k), classes, fmt)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("loss", "k", "fmt", "labels", "expected"),
    [
        ("bce_with_logits", 1, "index", torch.tensor([0, 1]), torch.tensor([[0.0], [1.0]])),
        ("bce", 1, "binary_float", torch.tensor([1.0, 0.0]), torch.tensor([[1.0], [0.0]])),
        ("bce_with_logits", 1, "one_hot", torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
         torch.tensor([[0.0], [1.0]])),
        ("bce_with_logits", 2, "multi_hot", torch.tensor([[1.0, 1.0], [0.0, 1.0]]),
         torch.tensor([[1.0, 1.0], [0.0, 1.0]])),
        ("cross_entropy", 3, "one_hot", torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]),
         torch.tensor([2, 0])),
        ("cross_entropy", 2, "binary_float", torch.tensor([1.0, 0.0]), torch.tensor([1, 0])),
    ],
)
def test_the_one_target_rule(loss, k, fmt, labels, expected):
    target = to_targets(labels, loss, k, fmt)
    assert target.dtype == expected.dtype
    assert torch.equal(target, expected)


def test_pos_weight_auto_is_negatives_over_positives():
    config = make_config("bce_with_logits", 1, pos_weight="auto")
    assert resolve_pos_weight(config, [150, 50], 200) == [3.0]
    multi = make_config("bce_with_logits", 2, pos_weight="auto")
    assert resolve_pos_weight(multi, [50, 100], 200) == [3.0, 1.0]
    with pytest.raises(ConfigError, match="no positives"):
        resolve_pos_weight(config, [200, 0], 200)


def test_pos_weight_list_must_match_the_head():
    with pytest.raises(ConfigError, match="loss.pos_weight has 3 values"):
        check_contract(make_config("bce_with_logits", 2, pos_weight=[1.0, 2.0, 3.0]), 2,
                       "multi_hot")


def test_prior_logits_make_the_untrained_head_predict_the_prior():
    binary = prior_logits(make_config("bce_with_logits", 1), [150, 50], 200)
    assert torch.sigmoid(binary).item() == pytest.approx(0.25, rel=1e-5)
    multi = prior_logits(make_config("cross_entropy", 3), [100, 60, 40], 200)
    assert torch.allclose(torch.softmax(multi, 0), torch.tensor([0.5, 0.3, 0.2]))


def test_fp16_without_gpu_is_refused_and_bf16_bce_allowed_c03():
    config = make_config("bce", 1)
    config.train.mixed_precision = "fp16"
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        check_contract(config, 2, "index", cuda_available=False)
    config.train.mixed_precision = "bf16"
    check_contract(config, 2, "index", cuda_available=False)

"""The paper-specific pieces of neural_batch_sampler, cavga and liac, each on a tiny example worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from engine.api import ConfigError
from engine.methods.weakly_supervised.cavga import (
    attention_expansion_loss,
    complementary_guided_attention_loss,
    grad_cam,
)
from engine.methods.weakly_supervised.liac import ACMClassifier, abnormality, logit_inducing_loss
from engine.methods.weakly_supervised.neural_batch_sampler import (
    ProfilePredictor,
    SamplerPolicy,
    balanced_bce,
    from_patches,
    prediction_reward,
    profile_stats,
    record_points,
    region_mean,
    reinforce_loss,
    sampler_states,
    standardise_profiles,
    to_patches,
)
from engine.runner import RunConfig, run_methods

# --- LIAC ------------------------------------------------------------------------------------------------------


def test_logit_inducing_loss_by_hand() -> None:
    z = torch.tensor([-1.5, -0.5, 2.0, 0.2])
    y = torch.tensor([0, 0, 1, 1])
    # normal: (−1.5 + 1)² = 0.25, (−0.5 + 1)² = 0.25 -> 0.25; anomalous: max(0, 1 − 2)² = 0, (1 − 0.2)² = 0.64 -> 0.32
    assert float(logit_inducing_loss(z, y, margin=1.0)) == pytest.approx(0.5 * (0.25 + 0.32))
    # The imbalance: ten more copies of the normal images leave the loss unchanged (classes averaged apart).
    zz = torch.cat([z, z[:2].repeat(10)])
    yy = torch.cat([y, y[:2].repeat(10)])
    assert float(logit_inducing_loss(zz, yy, margin=1.0)) == pytest.approx(0.5 * (0.25 + 0.32))
    # A batch of normal images only: half the normal term; margin 2 moves both targets.
    assert float(logit_inducing_loss(z[:2], y[:2])) == pytest.approx(0.125)
    assert float(logit_inducing_loss(z, y, margin=2.0)) == pytest.approx(0.5 * ((0.25 + 2.25) / 2 + (0 + 3.24) / 2))


def test_logit_inducing_loss_gradient_directions() -> None:
    z = torch.tensor([0.0, 0.0], requires_grad=True)
    logit_inducing_loss(z, torch.tensor([0, 1])).backward()
    assert z.grad is not None and z.grad[0] > 0 > z.grad[1]  # normal logit pushed down, anomalous up


def test_abnormality_capturing_by_hand() -> None:
    protos = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    feats = torch.tensor([[0.0, 1.0], [2.0, 2.0], [3.0, 0.0]]).t().reshape(1, 2, 1, 3)  # 3 positions, C = 2
    a = abnormality(feats, protos)
    # nearest squared distances 1, 0, 5 (to (2,2): 1 + 4) and 9 (to (0,0)) -> min 5; divided by C = 2
    torch.testing.assert_close(a, torch.tensor([[[0.5, 0.0, 2.5]]]))
    net = ACMClassifier(2, 4)
    logit, patch = net(feats, a)
    w = torch.softmax(torch.nn.functional.softplus(net.beta) * a.flatten(1), 1)
    torch.testing.assert_close(logit, (w * patch.flatten(1)).sum(1))
    assert w[0, 2] > w[0, 0] > w[0, 1]  # the most abnormal position weighs most in the image logit


# --- CAVGA -----------------------------------------------------------------------------------------------------


def test_attention_expansion_loss_by_hand() -> None:
    att = torch.tensor([[[1.0, 0.5], [0.0, 0.5]]])
    assert float(attention_expansion_loss(att)) == pytest.approx((0 + 0.5 + 1 + 0.5) / 4)
    assert float(attention_expansion_loss(torch.ones(2, 3, 3))) == 0.0  # attending everywhere costs nothing


def test_complementary_guided_attention_loss_by_hand() -> None:
    a_n = torch.tensor([[[1.0, 0.5]], [[0.0, 0.0]]])
    a_a = torch.tensor([[[0.0, 0.5]], [[1.0, 1.0]]])
    keep = torch.tensor([True, False])  # only the first normal image was classified normal
    # image 0: (1 − 1 + 0 + 1 − 0.5 + 0.5) / 2 = 0.5; image 1 is left out
    assert float(complementary_guided_attention_loss(a_n, a_a, keep)) == pytest.approx(0.5)
    assert float(complementary_guided_attention_loss(a_n, a_a, torch.tensor([True, True]))) == \
        pytest.approx((1.0 + 4.0) / 4)  # image 1: (1 − 0 + 1) twice
    assert float(complementary_guided_attention_loss(a_n, a_a, torch.tensor([False, False]))) == 0.0


def test_grad_cam_by_hand_and_differentiable() -> None:
    # class score = Σ_k w_k · mean(z_k): α_k = w_k / (h·w), attention ∝ ReLU(Σ_k w_k z_k), scaled to max 1.
    z = torch.tensor([[[[1.0, 2.0], [0.0, -1.0]], [[0.0, 1.0], [3.0, 0.0]]]], requires_grad=True)  # (1, 2, 2, 2)
    w = torch.tensor([1.0, -1.0], requires_grad=True)
    score = (w.view(1, 2) * z.mean((2, 3))).sum(1)
    att = grad_cam(z, score, create_graph=True)
    raw = torch.relu(torch.tensor([[1.0 - 0.0, 2.0 - 1.0], [0.0 - 3.0, -1.0 - 0.0]]))  # [[1, 1], [0, 0]]
    torch.testing.assert_close(att.detach(), (raw / raw.max())[None])
    # With create_graph the attention loss reaches the classifier's weights (it trains them).
    (gw,) = torch.autograd.grad(complementary_guided_attention_loss(att, torch.zeros_like(att),
                                                                    torch.tensor([True])), w)
    assert torch.isfinite(gw).all()


@pytest.mark.parametrize("method", ["cavga", "neural_batch_sampler"])
def test_k0_is_the_same_error_as_devnet(tmp_path, method: str) -> None:
    msgs = []
    for name in ("devnet", method):
        with pytest.raises(ConfigError, match="labelled anomalies") as e:
            run_methods(tmp_path, RunConfig(methods=[name], labeled_anomalies=0))
        msgs.append(str(e.value).replace(name, "METHOD"))
    assert msgs[0] == msgs[1]


# --- neural batch sampler -----------------------------------------------------------------------------------


def test_sampler_reward_by_hand() -> None:
    """R_pred1 = −(the predictor's loss): the class-balanced pixel BCE, worked out by hand."""
    logits = torch.tensor([[0.0, math.log(3.0)], [-math.log(3.0), 0.0]])   # σ = 1/2, 3/4, 1/4, 1/2
    targets = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    # positives: −log(1/2), −log(3/4); negatives: −log(1 − 1/4), −log(1 − 1/2) -> both class means equal
    expected = (math.log(2) + math.log(4 / 3)) / 2
    assert float(balanced_bce(logits, targets)) == pytest.approx(expected, rel=1e-6)
    assert prediction_reward(expected) == pytest.approx(-expected)
    # The balance: one positive pixel among many negatives weighs as much as all of them together.
    few = torch.tensor([[5.0, -5.0, -5.0, -5.0]])
    assert float(balanced_bce(few, torch.tensor([[0.0, 0.0, 0.0, 0.0]]))) == pytest.approx(
        (math.log1p(math.exp(5.0)) + 3 * math.log1p(math.exp(-5.0))) / 4, rel=1e-6)
    one_pos = float(balanced_bce(few, torch.tensor([[1.0, 0.0, 0.0, 0.0]])))
    assert one_pos == pytest.approx(math.log1p(math.exp(-5.0)), rel=1e-5)   # all four pixels right
    # A better separating predictor earns the larger reward.
    worse = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    assert prediction_reward(one_pos) > prediction_reward(float(balanced_bce(worse, torch.tensor([[1.0, 0, 0, 0]]))))


def test_sampler_states_by_hand() -> None:
    cur = torch.tensor([-2.0, -3.5])
    start = torch.tensor([-1.0, -1.5])
    torch.testing.assert_close(sampler_states(cur, start, 0.25),
                               torch.tensor([[-2.0, 1.0, 0.25], [-3.5, 2.0, 0.25]]))


def test_record_points_spread_over_the_episode() -> None:
    assert record_points(50, 10) == {5 * (t + 1): [t] for t in range(10)}
    assert record_points(8, 4) == {2: [0], 4: [1], 6: [2], 8: [3]}
    assert record_points(2, 4) == {1: [0, 1], 2: [2, 3]}       # fewer updates than entries: shared points


def test_profiles_are_standardised_per_step_by_normal_pixels() -> None:
    """The predictor's input: each recording step scaled by the normal pixels' mean and std at that step, so a
    pixel whose loss stays high while the normal ones fall stands out at the late steps."""
    normal = torch.tensor([[[[-1.0, -3.0]], [[-4.0, -6.0]]]])          # (1, T=2, 1, 2)
    mean, std = profile_stats(normal)
    torch.testing.assert_close(mean, torch.tensor([-2.0, -5.0]))
    torch.testing.assert_close(std, torch.tensor([math.sqrt(2.0), math.sqrt(2.0)]))
    anomalous = torch.tensor([[[[-2.0]], [[-2.0]]]])                    # its loss did not fall
    z = standardise_profiles(anomalous, mean, std)
    torch.testing.assert_close(z.flatten(), torch.tensor([0.0, 3.0 / math.sqrt(2.0)]))
    assert ProfilePredictor(2)(z.expand(3, 2, 4, 4).contiguous()).shape == (3, 4, 4)


@pytest.mark.parametrize("advantage_sign", [1.0, -1.0])
def test_policy_update_follows_the_advantage(advantage_sign: float) -> None:
    """One REINFORCE step makes the drawn items likelier when the reward beat the baseline, and less likely when
    it fell short."""
    torch.manual_seed(0)
    policy = SamplerPolicy(2, 8)
    states = torch.randn(6, 2)
    chosen = torch.tensor([1, 1, 4])
    before = policy(states).exp()[chosen].detach()
    loss = reinforce_loss(policy(states)[chosen], reward=0.5 + advantage_sign * 0.3, baseline=0.5)
    # the surrogate's value by hand: −(r − b) · mean log π(chosen)
    assert float(loss.detach()) == pytest.approx(-advantage_sign * 0.3 * float(before.log().mean()), rel=1e-5)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    loss.backward()
    opt.step()
    after = policy(states).exp()[chosen].detach()
    change = (after.log() - before.log()).mean()
    assert change * advantage_sign > 0


def test_to_patches_order() -> None:
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    p, grid = to_patches(x, 2, 2)
    assert grid == (2, 2) and p.shape == (8, 1, 2, 2)
    torch.testing.assert_close(p[1, 0], x[0, 0, 0:2, 2:4])   # image 0, row 0, column 1
    assert torch.equal(from_patches(p, 2, grid), x)             # non-overlapping tiles stitch back exactly
    torch.testing.assert_close(p[6, 0], x[1, 0, 2:4, 0:2])   # image 1, row 1, column 0


# --- DevNet: every normal image takes part in training ------------------------------------------------------


def test_normal_cycler_covers_every_image() -> None:
    from engine.components.weak_training import NormalCycler

    c = NormalCycler(5, torch.Generator().manual_seed(0))
    first = torch.cat([c.take(2), c.take(2), c.take(1)])
    assert sorted(first.tolist()) == [0, 1, 2, 3, 4]          # one pass = each image once
    assert sorted(torch.cat([c.take(3), c.take(2)]).tolist()) == [0, 1, 2, 3, 4]


def test_devnet_trains_on_normal_images_beyond_the_pool(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An epoch is a fixed number of batches (the virtual pool). With fewer pool slots than normal images, the
    old `normal[idx % n]` never showed the images past the pool to the network (442 of Magnetic Tile's 762)."""
    from engine import registry
    from engine.data import discover, load_split, make_synthetic_dataset
    from engine.methods.weakly_supervised import devnet as dm
    from engine.runner import split_labeled

    root = make_synthetic_dataset(tmp_path, "brick", n_train=8, n_test_good=2, n_defect_per_type=2, size=64)
    ds = discover(root)
    train, test = load_split(ds, "train", 64), load_split(ds, "test", 64)
    lab, _ = split_labeled(test, 1, seed=0)
    seen: list[torch.Tensor] = []
    real = dm.PatchScorer.forward

    def spy(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            seen.append(x[: x.shape[0] // 2].detach().clone())   # the batch's normal half
        return real(self, x)

    monkeypatch.setattr(dm.PatchScorer, "forward", spy)
    det = registry.create("devnet", epochs=8, steps_per_epoch=1, batch_size=2, augment=False)
    det.fit(train, anomalies=test.subset(lab))              # 2 pool slots, 16 normal draws over 8 images
    feats = dm.standardise(dm.backbone_input(train, det.layers, det.backbone, det.weights, "cpu"), det.mean_,
                           det.std_)
    used = {int((feats - row).flatten(1).abs().amax(1).argmin()) for batch in seen for row in batch}
    assert used == set(range(len(train)))


def test_pixel_targets_keep_thin_defects_when_shrinking() -> None:
    """A one-pixel crack at 128 px stays positive at the 64 px working size (an interpolated, thresholded mask
    lost it)."""
    from engine.api import ImageSet
    from engine.methods.weakly_supervised.neural_batch_sampler import NeuralBatchSampler

    masks = torch.zeros(2, 128, 128, dtype=torch.uint8)
    masks[0, 40, 10:90] = 1                                    # a horizontal crack, one pixel wide
    views = ImageSet(images=torch.zeros(2, 3, 128, 128, dtype=torch.uint8), labels=torch.ones(2, dtype=torch.int64),
                     masks=masks, has_mask=torch.tensor([True, False]), defect_types=["crack", "crack"])
    y = NeuralBatchSampler(size=64)._pixel_targets(views)
    assert y.shape == (2, 64, 64)
    assert y[0, 20, 5:45].eq(1).all() and int(y[0].sum()) == 40  # row 40 -> 20, columns 10..89 -> 5..44
    assert y[1].eq(1).all()                                     # no mask: every pixel counts as anomalous


def test_region_mean_by_hand() -> None:
    err = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]).view(1, 1, 3, 3)
    r = region_mean(err, 3)[0, 0]
    assert float(r[1, 1]) == pytest.approx(5.0)                       # the full 3×3 window
    assert float(r[0, 0]) == pytest.approx((1 + 2 + 4 + 5) / 4)       # a corner averages what lies inside
    assert float(r[0, 1]) == pytest.approx((1 + 2 + 3 + 4 + 5 + 6) / 6)
    assert torch.equal(region_mean(err, 1), err)

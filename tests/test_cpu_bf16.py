"""bf16 mixed-precision training on CPU: who uses it, what it changes (and what it must not), and SSIM's
statistics kept in fp32 under it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import registry
from engine.api import ConfigError
from engine.components.anomaly_map import blur_matrix
from engine.components.nets import ssim_map
from engine.components.train_loop import Objective, TrainConfig, train_loop
from engine.device import cpu_bf16, cpu_bf16_allowed, train_autocast, train_precision
from engine.runner import RunConfig, run_key, run_methods

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"


@pytest.mark.parametrize(("value", "want"), [("1", True), ("on", True), ("0", False), ("off", False)])
def test_the_switch_reads_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, want: bool) -> None:
    monkeypatch.setenv("ADLAB_CPU_BF16", value)
    assert cpu_bf16() is want


def test_a_bad_switch_value_says_what_to_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADLAB_CPU_BF16", "maybe")
    with pytest.raises(ConfigError, match="ADLAB_CPU_BF16='maybe'.*1 \\(on\\), 0 \\(off\\)"):
        cpu_bf16()


def test_only_a_method_that_allows_it_trains_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADLAB_CPU_BF16", "1")
    conv = nn.Conv2d(3, 4, 3)
    x = torch.rand(1, 3, 8, 8)
    with train_autocast("cpu"):  # outside any method: fp32
        assert conv(x).dtype == torch.float32
    with cpu_bf16_allowed(True), train_autocast("cpu"):
        assert conv(x).dtype == torch.bfloat16
        assert train_precision("cpu") == "bf16-mixed"
    with cpu_bf16_allowed(False), train_autocast("cpu"):
        assert conv(x).dtype == torch.float32
    monkeypatch.setenv("ADLAB_CPU_BF16", "0")
    with cpu_bf16_allowed(True), train_autocast("cpu"):
        assert conv(x).dtype == torch.float32
        assert train_precision("cpu") == "fp32"


def test_the_loop_reports_its_precision_and_keeps_fp32_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADLAB_CPU_BF16", "1")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    torch.manual_seed(0)
    net = nn.Linear(4, 1)

    def loss(idx: torch.Tensor) -> torch.Tensor:
        return ((net(x[idx])[:, 0].float() - y[idx]) ** 2).mean()

    cfg = TrainConfig(epochs=30, batch_size=8, lr=0.05, patience=100, seed=0)
    with cpu_bf16_allowed(True):
        res = train_loop(Objective(net.parameters(), loss), len(x), cfg, modules=[net])
    assert res.precision == "bf16-mixed" and "(bf16-mixed)" in res.summary()
    assert net.weight.dtype == torch.float32
    # it still learns: bf16 rounds the matmul's inputs (8-bit mantissa), the loss falls by orders of magnitude
    assert res.history[-1]["loss"] < 0.05 * res.history[0]["loss"]
    res32 = train_loop(Objective(net.parameters(), loss), len(x), cfg, modules=[net])
    assert res32.precision == "fp32" and "bf16" not in res32.summary()


def test_bf16_is_declared_only_by_trained_methods() -> None:
    with pytest.raises(ValueError, match="trained methods only"):
        registry.register(family="memory_bank", name="_bf16_probe", localises=True, paper="-", summary="-",
                          cpu_bf16=True)
    catalog = {m["name"]: m for m in registry.live_catalog()}
    on = {n for n, m in catalog.items() if m["cpu_bf16"]}
    assert on and all(catalog[n]["trained"] for n in on)
    # measured slower in bf16 on CPU (BatchNorm after depthwise convolutions), or lower image AUROC on every one
    # of three seeds (MemAE, VAE): they stay in fp32
    assert not on & {"uninformed_students", "stfpm", "memae", "vae"}
    for n in on:
        assert registry.info(n).factory.cpu_bf16 is True  # the class the runner builds carries the same flag


def test_the_cache_key_tells_the_precisions_apart() -> None:
    cfg = RunConfig(methods=["vae"], image_size=32)
    fp32 = run_key("d", "vae", {}, cfg, [])
    assert run_key("d", "vae", {}, cfg, [], precision="fp32") == fp32  # keys of fp32 runs are as they were
    assert run_key("d", "vae", {}, cfg, [], precision="bf16-mixed") != fp32


def test_a_run_in_bf16_is_marked_and_kept_apart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ADLAB_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(methods=["autoencoder", "deep_svdd"], image_size=32, preset="test", device="cpu")
    monkeypatch.setenv("ADLAB_CPU_BF16", "1")
    bf = {r["method"]: r for r in run_methods(SAMPLE / "brick", cfg)["runs"]}
    monkeypatch.setenv("ADLAB_CPU_BF16", "0")
    fp = {r["method"]: r for r in run_methods(SAMPLE / "brick", cfg)["runs"]}
    assert all(r["status"] == "ok" for r in [*bf.values(), *fp.values()])
    assert "(bf16-mixed)" in bf["autoencoder"]["run_notes"]["training"]
    assert "bf16" not in fp["autoencoder"]["run_notes"]["training"]
    assert bf["autoencoder"]["cache_key"] != fp["autoencoder"]["cache_key"]  # switching it off retrains, never reuses
    assert "bf16" not in bf["deep_svdd"]["run_notes"]["training"]  # not opted in: fp32 either way
    assert bf["deep_svdd"]["cache_key"] == fp["deep_svdd"]["cache_key"]
    assert (bf["autoencoder"]["train_precision"], fp["autoencoder"]["train_precision"]) == ("bf16-mixed", "fp32")
    assert bf["deep_svdd"]["train_precision"] == "fp32"


def test_the_cli_table_says_how_each_method_trained(capsys: pytest.CaptureFixture[str]) -> None:
    from engine.cli import print_table

    runs = [{"method": m, "status": "ok", "metrics": {"image_auroc": 0.9}, "timing": {}, "train_precision": p}
            for m, p in (("autoencoder", "bf16-mixed"), ("vae", "fp32"), ("padim", None))]
    print_table({"runs": runs})
    lines = capsys.readouterr().out.splitlines()
    assert "trained in" in lines[0]
    assert lines[1].split()[-1] == "bf16-mixed" and lines[2].split()[-1] == "fp32" and lines[3].split()[-1] == "-"


@pytest.mark.parametrize("n", [3, 6, 40])
@pytest.mark.parametrize("reflect", [True, False])
def test_the_blur_matrix_is_a_padded_gaussian_convolution(n: int, reflect: bool) -> None:
    if reflect and n <= 5:
        with pytest.raises(ValueError, match="reflect padding"):
            blur_matrix(n, 1.5, 5, True)
        return
    t = torch.arange(-5, 6, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / 1.5) ** 2)
    k = k / k.sum()
    v = torch.rand(4, n, dtype=torch.float64)
    padded = F.pad(v[:, None], (5, 5), mode="reflect" if reflect else "replicate")
    want = F.conv1d(padded, k.view(1, 1, -1))[:, 0]
    got = v @ blur_matrix(n, 1.5, 5, reflect, torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_an_ssim_loss_trains_after_a_prediction_built_the_blur_matrix() -> None:
    """The cached blur matrix, first built inside inference mode (an autoencoder's prediction), still serves a
    training step in the same process (DRAEM's SSIM loss after the autoencoder in one worker failed with
    "Inference tensors cannot be saved for backward")."""
    blur_matrix.cache_clear()
    x = torch.rand(1, 3, 23, 23)
    with torch.inference_mode():
        ssim_map(x, x)
    y = x.clone().requires_grad_()
    (1 - ssim_map(x, y).mean()).backward()
    assert y.grad is not None


def test_ssim_keeps_its_statistics_in_fp32_under_bf16_autocast() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    y = (x + 0.05 * torch.rand(2, 3, 32, 32, generator=g)).clamp(0, 1).requires_grad_()
    want = ssim_map(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ssim_map(x, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.mean().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()

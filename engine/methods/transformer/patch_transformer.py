"""UniAD (You et al., "A Unified Model for Multi-class Anomaly Detection", NeurIPS 2022), in its single-class form.

Frozen backbone features of four stages (strides 2, 4, 8, 16) are resized to one token grid (stride 16) and
concatenated: tokens (N, L = grid², C). During training they are perturbed by feature jittering, projected to
d_model, passed through an encoder whose attention cannot look at each token's own k×k neighbourhood
(neighbour-masked attention) and a decoder with layer-wise learned queries, and projected back: the
reconstruction (N, L, C) must equal the un-jittered tokens. Map = ‖f − f̂‖₂ per token, upsampled to the image
(N, H, W); image score = max of the map average-pooled over one token cell.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.api import ConfigError, ImageSet, Prediction, Progress
from engine.components.anomaly_map import local_average, resample_cells, to_pixel_map
from engine.components.features import extract_features
from engine.components.nets import Dropout, dropout
from engine.components.train_loop import Objective, TrainConfig, train_loop
from engine.methods.base import BaseDetector, load_module_state, module_state
from engine.registry import register


def neighbour_mask(h: int, w: int, k: int) -> torch.Tensor:
    """Attention mask (h*w, h*w) bool, True where query token i may NOT attend key token j.

    Token j is masked for token i when j lies in the k×k window centred on i (Chebyshev distance ≤ k // 2),
    the token itself included. k ≤ 0 gives an all-False mask (plain attention). k must be odd when > 0.
    """
    if k <= 0:
        return torch.zeros(h * w, h * w, dtype=torch.bool)
    if k % 2 == 0:
        raise ConfigError(f"neighbour mask size must be odd, got {k}")
    r = k // 2
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    near = ((ys[:, None] - ys[None, :]).abs() <= r) & ((xs[:, None] - xs[None, :]).abs() <= r)
    if near.all(dim=1).any():
        raise ConfigError(f"neighbour mask {k}×{k} covers the whole {h}×{w} token grid: nothing left to attend to")
    return near


class PositionEmbeddingLearned(nn.Module):
    """UniAD's learned 2-D position embedding: a row and a column embedding of d/2 each, concatenated
    [column, row] per grid cell -> (h*w, d)."""

    def __init__(self, h: int, w: int, d: int):
        super().__init__()
        if d % 2:
            raise ConfigError(f"d_model must be even for the 2-D position embedding, got {d}")
        self.h, self.w = h, w
        self.row = nn.Embedding(h, d // 2)
        self.col = nn.Embedding(w, d // 2)

    def forward(self) -> torch.Tensor:
        """() -> (h*w, d)."""
        rows = self.row.weight[:, None, :].expand(self.h, self.w, -1)
        cols = self.col.weight[None, :, :].expand(self.h, self.w, -1)
        return torch.cat([cols, rows], dim=-1).reshape(self.h * self.w, -1)


class Attention(nn.Module):
    """Multi-head attention with dropout on the attention weights, as `nn.MultiheadAttention(batch_first=True)`
    (the same parameters and names: in_proj_weight (3d, d), in_proj_bias (3d,), out_proj), whose training step
    on CPU spent half its time drawing the dropout mask: here the mask comes from `nets.dropout`'s sampler.

    query (B, Lq, d), key (B, Lk, d), value (B, Lk, d), mask (Lq, Lk) bool, True = may NOT attend -> (B, Lq, d).
    """

    def __init__(self, d: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if d % heads:
            raise ConfigError(f"d_model {d} is not divisible by {heads} heads")
        self.num_heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.out_proj = nn.Linear(d, d)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _split(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Project x (B, L, d) with the i-th third of in_proj -> (B · num_heads, L, d / num_heads)."""
        b, n, d = x.shape
        y = F.linear(x, self.in_proj_weight[i * d:(i + 1) * d], self.in_proj_bias[i * d:(i + 1) * d])
        return y.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2).reshape(-1, n, d // self.num_heads)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = query.shape
        q, k, v = self._split(query, 0), self._split(key, 1), self._split(value, 2)
        if self.training and self.dropout > 0:
            scale = q.shape[-1] ** -0.5
            if mask is None:
                w = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
            else:  # the scale and the mask in the product itself: no extra pass over the (B·heads, Lq, Lk) weights
                bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(mask, float("-inf"))
                w = torch.baddbmm(bias.expand(q.shape[0], -1, -1), q, k.transpose(1, 2), alpha=scale)
            out = torch.bmm(dropout(w.softmax(-1), self.dropout, True), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else ~mask)
        out = out.view(b, self.num_heads, n, d // self.num_heads).transpose(1, 2).reshape(b, n, d)
        return self.out_proj(out)


class _FeedForward(nn.Sequential):
    """Linear -> ReLU -> dropout -> Linear (the DETR / UniAD feed-forward block): (..., d) -> (..., d)."""

    def __init__(self, d: int, ff: int, dropout: float):
        super().__init__(nn.Linear(d, ff), nn.ReLU(inplace=True), Dropout(dropout), nn.Linear(ff, d))


class _EncoderLayer(nn.Module):
    """Post-norm encoder layer (UniAD): neighbour-masked self-attention with positions added to queries and keys,
    then the feed-forward block; dropout on both residual branches."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.attn = Attention(d, heads, dropout)
        self.norm1 = nn.LayerNorm(d)
        self.ff = _FeedForward(d, ff, dropout)
        self.norm2 = nn.LayerNorm(d)
        self.drop1, self.drop2 = Dropout(dropout), Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, L, d), pos (L, d), mask (L, L) bool -> (B, L, d)."""
        q = x + pos
        x = self.norm1(x + self.drop1(self.attn(q, q, x, mask)))
        return self.norm2(x + self.drop2(self.ff(x)))


class _DecoderLayer(nn.Module):
    """UniAD's decoder layer with its own learned query embedding (layer-wise queries).

    The queries (+ positions) attend, neighbour-masked, to the previous decoder output (the encoder output for
    the first layer), then to the encoder memory (cross-attention, also masked), then the feed-forward block;
    post-norm after each.
    """

    def __init__(self, d: int, heads: int, ff: int, dropout: float, tokens: int):
        super().__init__()
        self.query = nn.Embedding(tokens, d)
        self.self_attn = Attention(d, heads, dropout)
        self.cross_attn = Attention(d, heads, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff = _FeedForward(d, ff, dropout)
        self.drop1, self.drop2, self.drop3 = Dropout(dropout), Dropout(dropout), Dropout(dropout)

    def forward(self, out: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """out, memory (B, L, d), pos (L, d), mask (L, L) -> (B, L, d)."""
        tgt = self.query.weight.expand(out.shape[0], -1, -1)
        tgt = self.norm1(tgt + self.drop1(self.self_attn(tgt + pos, out + pos, out, mask)))
        tgt = self.norm2(tgt + self.drop2(self.cross_attn(tgt + pos, memory + pos, memory, mask)))
        return self.norm3(tgt + self.drop3(self.ff(tgt)))


class ReconstructionTransformer(nn.Module):
    """UniAD's reconstruction network: feature tokens (B, L, C) -> reconstructed tokens (B, L, C).

    Linear input projection to d, `enc_layers` neighbour-masked encoder layers, `dec_layers` decoder layers with
    layer-wise learned queries, a final LayerNorm, a linear output projection back to C. Learned 2-D positions.
    Parameters of more than one dimension start Xavier-uniform (UniAD's initialiser).
    """

    def __init__(self, in_channels: int, grid: tuple[int, int], d: int = 256, heads: int = 8, ff: int = 1024,
                 enc_layers: int = 4, dec_layers: int = 4, dropout: float = 0.1):
        super().__init__()
        tokens = grid[0] * grid[1]
        self.in_proj = nn.Linear(in_channels, d)
        self.out_proj = nn.Linear(d, in_channels)
        self.pos = PositionEmbeddingLearned(grid[0], grid[1], d)
        self.encoder = nn.ModuleList([_EncoderLayer(d, heads, ff, dropout) for _ in range(enc_layers)])
        self.decoder = nn.ModuleList([_DecoderLayer(d, heads, ff, dropout, tokens) for _ in range(max(1, dec_layers))])
        self.dec_norm = nn.LayerNorm(d)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """tokens (B, L, C), mask (L, L) bool (True = blocked) -> (B, L, C)."""
        pos = self.pos()
        mem = self.in_proj(tokens)
        for layer in self.encoder:
            mem = layer(mem, pos, mask)
        out = mem
        for layer in self.decoder:
            out = layer(out, mem, pos, mask)
        return self.out_proj(self.dec_norm(out))


def to_grid(f: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize (N, C, h, w) to (N, C, *grid) with every output cell centred where the grid's cell is.

    Shrinking averages an odd window around the source cell each output cell sits on (so a stride-8 map
    brought to a stride-16 grid averages cells 2j−1..2j+1, centred on pixel 16j like the stride-16 cell j;
    plain 2×2 pooling would centre it 4 px off); enlarging interpolates. Both go through `resample_cells`.
    """
    if tuple(f.shape[-2:]) == tuple(grid):
        return f
    factor = max(f.shape[-2] // grid[0], f.shape[-1] // grid[1])
    if factor >= 2:
        # The paper only resizes; this anti-aliasing window is ours, so border windows average real cells only.
        f = local_average(f, 2 * (factor // 2) + 1, pad="valid")
    return resample_cells(f, grid)


@register(
    family="transformer", name="uniad", localises=True, paper="You et al., NeurIPS 2022 (UniAD)",
    summary="Transformer encoder-decoder with neighbour-masked attention and layer-wise learned queries reconstructs "
            "frozen patch features; map = per-position reconstruction error.",
    notes="Follows the paper and its authors' code: features of four backbone stages (strides 2, 4, 8, 16) resized "
          "to the stride-16 token grid; feature jittering (scale 20, p = 1); a reconstruction transformer of 4 "
          "encoder and 4 decoder layers, width 256, 8 heads, feed-forward 1024, dropout 0.1, ReLU, post-norm, "
          "learned positions, layer-wise learned queries, Xavier initialisation; 7×7 neighbour masks in the "
          "encoder and in both decoder attentions; MSE loss; AdamW lr 1e-4 (weight decay 1e-4, gradient norm "
          "clipped at 0.1), ×0.1 after 800 of 1000 epochs, batch 8; map = ‖f − f̂‖₂ per token upsampled bilinearly; "
          "score = max of the map average-pooled over 16×16 px (one token cell). Differences: the bundled "
          "ImageNet EfficientNet-Lite0 (blocks.0, .1, .2, .4: 16+24+40+112 = 192 channels) instead of "
          "EfficientNet-B4's stages (24+32+56+160 = 272), which needs a download (offline); features standardised "
          "per channel with training statistics (ours); the grid is `grid`×`grid` = 16 at 256 px (the paper: 14 "
          "at 224 px); finer stages are averaged over an odd window before resizing to the grid (the paper "
          "resizes bilinearly); single-class training. fast (reduced): 1 + 1 layers of width 128, 4 heads, "
          "feed-forward 512, at most 300 steps at lr 1e-3 instead of 1000 epochs at 1e-4.",
    trained=True, cpu_bf16=True,
    presets={
        "test": {"epochs": 40, "max_steps": 120, "enc_layers": 1, "dec_layers": 1, "d_model": 64, "heads": 2,
                 "ff_dim": 256, "lr": 1e-3},
        "fast": {"max_steps": 300, "epochs": 60, "enc_layers": 1, "dec_layers": 1, "d_model": 128, "heads": 4,
                 "ff_dim": 512, "lr": 1e-3},
        "quality": {},
    },
    reduced_presets=("test", "fast"),
)
class UniAD(BaseDetector):
    """Neighbour-masked transformer reconstruction of backbone feature tokens (UniAD). Defaults are the paper's
    configuration."""

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str = "auto",
                 layers: tuple[str, ...] = ("blocks.0", "blocks.1", "blocks.2", "blocks.4"), grid: int = 16,
                 d_model: int = 256, heads: int = 8, ff_dim: int = 1024, enc_layers: int = 4, dec_layers: int = 4,
                 dropout: float = 0.1, neighbour_size: int = 7, jitter_scale: float = 20.0, jitter_prob: float = 1.0,
                 epochs: int = 1000, lr: float = 1e-4, weight_decay: float = 1e-4,
                 lr_milestones: tuple[float, ...] = (0.8,), grad_clip: float = 0.1, batch_size: int = 8,
                 sigma: float = 0.0, max_steps: int | None = None, seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.grid = grid
        self.d_model = d_model
        self.heads = heads
        self.ff_dim = ff_dim
        self.enc_layers = enc_layers
        self.dec_layers = dec_layers
        self.dropout = dropout
        self.neighbour_size = neighbour_size
        self.jitter_scale = jitter_scale
        self.jitter_prob = jitter_prob
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_milestones = tuple(lr_milestones)
        self.grad_clip = grad_clip
        self.batch_size = batch_size
        self.sigma = sigma
        self.max_steps = max_steps
        self.seed = seed

    # --- features ---------------------------------------------------------------------------------
    def _tokens(self, images: ImageSet, progress: Progress | None = None) -> torch.Tensor:
        """Standardised feature tokens (N, L, C) on the grid, L = grid², C = Σ layer channels."""
        kw = {"progress": progress} if progress else {}
        feats = extract_features(images, self.layers, backbone=self.backbone, weights=self.weights,
                                 device=self.device_, **kw)
        g = (self.grid, self.grid)
        f = torch.cat([to_grid(x, g) for x in feats], 1)  # (N, C, g, g)
        tok = f.flatten(2).transpose(1, 2)  # (N, L, C)
        if hasattr(self, "mean_"):
            tok = (tok - self.mean_) / self.std_
        return tok.contiguous()

    def _build(self, channels: int) -> None:
        self.net_ = ReconstructionTransformer(channels, (self.grid, self.grid), self.d_model, self.heads, self.ff_dim,
                                              self.enc_layers, self.dec_layers, self.dropout).to(self.device_)
        self.mask_ = neighbour_mask(self.grid, self.grid, self.neighbour_size).to(self.device_)

    def _jitter(self, tok: torch.Tensor) -> torch.Tensor:
        """Feature jittering (paper Eq. 1): Gaussian noise of std jitter_scale·‖f‖/C per token (tok (B, L, C)),
        applied to the batch with probability jitter_prob."""
        if self.jitter_scale <= 0 or self.jitter_prob <= 0:
            return tok
        if float(torch.rand(1, generator=self.generator_)) > self.jitter_prob:
            return tok
        scale = tok.norm(dim=2, keepdim=True) / tok.shape[2] * self.jitter_scale
        noise = torch.randn(tok.shape, generator=self.generator_).to(tok.device)
        return tok + noise * scale

    # --- contract -----------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        for name in ("mean_", "std_"):
            if hasattr(self, name):
                delattr(self, name)
        tok = self._tokens(train, progress)
        self.mean_ = tok.mean(dim=(0, 1))
        self.std_ = tok.std(dim=(0, 1)).clamp_min(1e-6)
        tok = ((tok - self.mean_) / self.std_).to(self.device_)
        with torch.random.fork_rng(devices=[]):  # the backbone pass may or may not have used the global RNG
            torch.manual_seed(self.seed)
            self._build(tok.shape[2])

        def loss(idx: torch.Tensor) -> torch.Tensor:
            x = tok[idx.to(self.device_)]
            rec = self.net_(self._jitter(x), self.mask_)
            return F.mse_loss(rec.float(), x)

        # The paper's fixed schedule on every training image: no held-out slice, no early stop.
        cfg = TrainConfig(max_steps=self.max_steps, epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                          batch_size=self.batch_size, cuda_batch_size=self.batch_size, val_fraction=0.0,
                          grad_clip=self.grad_clip, lr_milestones=self.lr_milestones, seed=self.seed)
        res = train_loop(Objective(self.net_.parameters(), loss, name="reconstruction"), len(train), cfg,
                         modules=[self.net_], device=self.device_, progress=progress)
        self.history_ = res.history
        self.run_notes_ = {"training": res.summary()}

    def _error_grid(self, images: ImageSet) -> torch.Tensor:
        """Per-position reconstruction error ‖f − f̂‖₂ on the token grid (N, grid, grid)."""
        tok = self._tokens(images)
        out = []
        for s in range(0, tok.shape[0], 32):
            x = tok[s:s + 32].to(self.device_)
            rec = self.net_(x, self.mask_).float()
            out.append((rec - x).norm(dim=2).cpu())
        return torch.cat(out).reshape(-1, self.grid, self.grid)

    def _predict(self, images: ImageSet) -> Prediction:
        maps = to_pixel_map(self._error_grid(images), images.size, self.sigma)
        return Prediction(scores=pooled_max(maps, self._cell_px(images.size)), maps=maps)

    def _cell_px(self, size: tuple[int, int]) -> int:
        """Side of one token cell in pixels (the paper's 16 px score pooling at 224 px / 14 tokens)."""
        return max(1, round(min(size) / self.grid))

    def _state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean_.cpu(), "std": self.std_.cpu(), **module_state("net", self.net_)}

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.mean_ = tensors["mean"]
        self.std_ = tensors["std"]
        self._build(int(self.mean_.numel()))
        load_module_state("net", self.net_, tensors)
        self.net_.eval()


def pooled_max(maps: torch.Tensor, k: int) -> torch.Tensor:
    """UniAD's image score: max of the map average-pooled over k×k windows (stride 1, no padding).
    maps (N, H, W) -> (N,)."""
    k = min(k, *maps.shape[-2:])
    return F.avg_pool2d(maps[:, None], k, stride=1).flatten(1).amax(1)


__all__ = ["Attention", "PositionEmbeddingLearned", "ReconstructionTransformer", "UniAD", "neighbour_mask",
           "pooled_max"]

"""Fusion models written compactly from their papers.

Every model maps a batch dict (``text`` (B, L, Dt) + ``text_len``, ``audio`` (B, La, Da),
``video`` (B, Lv, Dv)) to ``(pred (B,), (z_l, z_a, z_v))``: the sentiment prediction and the
per-modality representations that the dependency penalty sees (``model.dims`` gives their
widths).  In every model the z's lie on the path to the prediction.
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import (PositionalEncoding, RegressionHead, SeqEncoder, UtteranceEncoder,
                     key_padding_mask, masked_mean)


class FusionModel(nn.Module):
    dims: tuple[int, int, int]

    def encode(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def fuse(self, zl, za, zv, batch) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: dict):
        zl, za, zv = self.encode(batch)
        return self.fuse(zl, za, zv, batch), (zl, za, zv)

    def optimizer_groups(self, lr: float) -> list[dict]:
        """Parameter groups for the model's optimizer: one group at ``lr`` by default;
        models with a pretrained encoder give it a smaller rate."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]


class EFLSTM(FusionModel):
    """Early fusion: per-modality linear embeddings (the z's: text mean-pooled over words),
    concatenated at every time step (utterance-level audio/video broadcast over the words)
    and read by a single LSTM."""

    def __init__(self, in_dims, d: int = 32, hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        dt, da, dv = in_dims
        self.dims = (d, d, d)
        self.pt, self.pa, self.pv = nn.Linear(dt, d), nn.Linear(da, d), nn.Linear(dv, d)
        self.drop = nn.Dropout(dropout)
        self.lstm = SeqEncoder(3 * d, hidden, hidden, dropout)
        self.head = RegressionHead(hidden, hidden, dropout)

    def encode(self, batch):
        self._steps = self.pt(self.drop(batch["text"]))
        zl = masked_mean(self._steps, batch["text_len"])
        za = self.pa(self.drop(batch["audio"].mean(1)))
        zv = self.pv(self.drop(batch["video"].mean(1)))
        return zl, za, zv

    def fuse(self, zl, za, zv, batch):
        steps = self._steps
        L = steps.shape[1]
        x = torch.cat([steps, za[:, None].expand(-1, L, -1), zv[:, None].expand(-1, L, -1)], -1)
        return self.head(self.lstm(x, batch["text_len"]))


class LFLSTM(FusionModel):
    """Late fusion: one LSTM per modality, final states (the z's) concatenated -> MLP."""

    def __init__(self, in_dims, d: int = 32, hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        dt, da, dv = in_dims
        self.dims = (d, d, d)
        self.et = SeqEncoder(dt, hidden, d, dropout, in_dropout=dropout)
        self.ea = SeqEncoder(da, hidden, d, dropout, in_dropout=dropout)
        self.ev = SeqEncoder(dv, hidden, d, dropout, in_dropout=dropout)
        self.head = RegressionHead(3 * d, hidden, dropout)

    def encode(self, batch):
        return (self.et(batch["text"], batch["text_len"]), self.ea(batch["audio"]), self.ev(batch["video"]))

    def fuse(self, zl, za, zv, batch):
        return self.head(torch.cat([zl, za, zv], -1))


class _SubnetModel(FusionModel):
    """TFN/LMF modality embedding subnetworks: LSTM for text, MLPs for the utterance-level
    audio and video (Zadeh et al. 2017, Sec. 3.1)."""

    def __init__(self, in_dims, d, hidden, dropout):
        super().__init__()
        dt, da, dv = in_dims
        self.dims = (d, d, d)
        self.et = SeqEncoder(dt, hidden, d, dropout, in_dropout=dropout)
        self.ea = UtteranceEncoder(da, hidden, d, dropout)
        self.ev = UtteranceEncoder(dv, hidden, d, dropout)

    def encode(self, batch):
        return (self.et(batch["text"], batch["text_len"]), self.ea(batch["audio"]), self.ev(batch["video"]))


def _one(z: torch.Tensor) -> torch.Tensor:
    return torch.cat([z, torch.ones_like(z[:, :1])], -1)


class TFN(_SubnetModel):
    """Tensor Fusion Network (Zadeh et al., EMNLP 2017): z_m <- [z_m; 1]; fusion is the
    3-way outer product (unimodal, bimodal and trimodal terms), flattened -> MLP."""

    def __init__(self, in_dims, d: int = 16, hidden: int = 64, dropout: float = 0.1):
        super().__init__(in_dims, d, hidden, dropout)
        self.drop = nn.Dropout(dropout)
        self.head = RegressionHead((d + 1) ** 3, hidden, dropout)

    def fuse(self, zl, za, zv, batch):
        t = torch.einsum("bi,bj,bk->bijk", _one(zl), _one(za), _one(zv)).flatten(1)
        return self.head(self.drop(t))


class LMF(_SubnetModel):
    """Low-rank Multimodal Fusion (Liu et al., ACL 2018): the TFN weight tensor factorised in
    rank-r modality factors, h = sum_r w_r prod_m ([z_m; 1] W_m^(r)) + b."""

    def __init__(self, in_dims, d: int = 32, hidden: int = 64, dropout: float = 0.1, rank: int = 4):
        super().__init__(in_dims, d, hidden, dropout)
        self.factors = nn.ParameterList([nn.Parameter(torch.empty(rank, d + 1, hidden)) for _ in range(3)])
        for f in self.factors:
            nn.init.xavier_normal_(f)
        self.rank_w = nn.Parameter(torch.full((1, rank), 1.0 / rank))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.head = RegressionHead(hidden, hidden, dropout)

    def fuse(self, zl, za, zv, batch):
        prod = None
        for z, w in zip((zl, za, zv), self.factors):
            f = torch.einsum("bi,rio->rbo", _one(z), w)
            prod = f if prod is None else prod * f
        h = torch.einsum("xr,rbo->bo", self.rank_w, prod) + self.bias
        return self.head(torch.relu(h))


class CrossmodalBlock(nn.Module):
    """Pre-LN transformer block whose queries come from the target modality and keys/values
    from the source (MulT's crossmodal attention); with ``source=None`` it is self-attention."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.ln_q, self.ln_kv, self.ln_ff = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Dropout(dropout), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, src=None, src_mask=None):
        q = self.ln_q(x)
        kv = q if src is None else self.ln_kv(src)
        x = x + self.drop(self.attn(q, kv, kv, key_padding_mask=src_mask, need_weights=False)[0])
        return x + self.drop(self.ff(self.ln_ff(x)))


class MulT(FusionModel):
    """Multimodal Transformer (Tsai et al., ACL 2019), compact: Conv1d(k=1) projections +
    positions; for each target modality two crossmodal transformers (from the other two
    modalities), concatenated and passed through a self-attention layer; the last valid step
    of each target stream -> linear -> z_m; the concatenation of the z's -> MLP."""

    def __init__(self, in_dims, d: int = 32, hidden: int = 64, dropout: float = 0.1,
                 heads: int = 4, layers: int = 1):
        super().__init__()
        if d % heads:
            raise ValueError(f"mult: --d {d} must be divisible by the number of heads ({heads})")
        self.dims = (d, d, d)
        self.proj = nn.ModuleList([nn.Conv1d(di, d, 1, bias=False) for di in in_dims])
        self.pos = PositionalEncoding(d)
        self.in_drop = nn.Dropout(dropout)
        pairs = [(t, s) for t in range(3) for s in range(3) if s != t]
        self.cross = nn.ModuleDict({f"{t}{s}": nn.ModuleList([CrossmodalBlock(d, heads, dropout) for _ in range(layers)])
                                    for t, s in pairs})
        self.selfattn = nn.ModuleList([CrossmodalBlock(2 * d, heads, dropout) for _ in range(3)])
        self.out = nn.ModuleList([nn.Linear(2 * d, d) for _ in range(3)])
        self.head = RegressionHead(3 * d, hidden, dropout)

    def encode(self, batch):
        xs = [batch["text"], batch["audio"], batch["video"]]
        lens = [batch["text_len"], None, None]
        # the k=1 convolutions as the matrix products they are: oneDNN's convolution kernels
        # (forward and backward) depend on the CPU (models/numerics.py); same parameters
        hs = [self.in_drop(self.pos(nn.functional.linear(x, p.weight[..., 0]))) for p, x in zip(self.proj, xs)]
        masks = [key_padding_mask(ln, h.shape[1], h.device) for ln, h in zip(lens, hs)]
        zs = []
        for t in range(3):
            streams = []
            for s in range(3):
                if s == t:
                    continue
                h = hs[t]
                for blk in self.cross[f"{t}{s}"]:
                    h = blk(h, hs[s], masks[s])
                streams.append(h)
            h = self.selfattn[t](torch.cat(streams, -1), None, masks[t])
            if lens[t] is not None and h.shape[1] > 1:
                last = h[torch.arange(h.shape[0], device=h.device), lens[t] - 1]
            else:
                last = h[:, -1]
            zs.append(self.out[t](last))
        return tuple(zs)

    def fuse(self, zl, za, zv, batch):
        return self.head(torch.cat([zl, za, zv], -1))

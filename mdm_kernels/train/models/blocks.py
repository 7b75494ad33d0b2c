"""Shared building blocks of the fusion models."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from .numerics import no_onednn


def mlp(d_in: int, hidden: int, d_out: int, dropout: float = 0.0, layers: int = 2) -> nn.Sequential:
    mods: list[nn.Module] = []
    d = d_in
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout)]
        d = hidden
    mods.append(nn.Linear(d, d_out))
    return nn.Sequential(*mods)


class SeqEncoder(nn.Module):
    """LSTM over a padded (B, L, D) sequence; the last valid hidden state -> Linear -> (B, d_out)."""

    def __init__(self, d_in: int, hidden: int, d_out: int, dropout: float = 0.0, in_dropout: float = 0.0):
        super().__init__()
        self.in_drop = nn.Dropout(in_dropout)
        self.lstm = nn.LSTM(d_in, hidden, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = self.in_drop(x)
        with no_onednn():  # oneDNN's LSTM kernels depend on the CPU (models/numerics.py)
            if lengths is None or x.shape[1] == 1:
                _, (h, _) = self.lstm(x)
            else:
                packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
                _, (h, _) = self.lstm(packed)
        return self.out(self.drop(h[-1]))


class UtteranceEncoder(nn.Module):
    """MLP subnetwork for a length-1 (utterance-level) modality: (B, 1, D) -> (B, d_out)."""

    def __init__(self, d_in: int, hidden: int, d_out: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_in, hidden), nn.ReLU(),
                                 nn.Linear(hidden, d_out))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x.mean(1) if lengths is None else masked_mean(x, lengths))


def masked_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).to(x.dtype)
    return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)


def encoder_for(d_in: int, hidden: int, d_out: int, sequence: bool, dropout: float = 0.0) -> nn.Module:
    return SeqEncoder(d_in, hidden, d_out, dropout) if sequence else UtteranceEncoder(d_in, hidden, d_out, dropout)


class RegressionHead(nn.Module):
    """Fusion vector -> sentiment in [-3, 3] (3 * tanh keeps the range)."""

    def __init__(self, d_in: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.net = mlp(d_in, hidden, 1, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return 3.0 * torch.tanh(self.net(h).squeeze(-1) / 3.0)


class PositionalEncoding(nn.Module):
    def __init__(self, d: int, max_len: int = 512):
        super().__init__()
        pos = torch.arange(max_len)[:, None]
        div = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
        pe = torch.zeros(max_len, d)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div[: d // 2])
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[: x.shape[1]]


def key_padding_mask(lengths: torch.Tensor | None, L: int, device) -> torch.Tensor | None:
    if lengths is None or L == 1:
        return None
    return torch.arange(L, device=device)[None, :] >= lengths[:, None]

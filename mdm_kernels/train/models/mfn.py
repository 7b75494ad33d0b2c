"""Memory Fusion Network (Zadeh et al., AAAI 2018, "Memory Fusion Network for Multi-view
Sequential Learning"), written from the paper's equations.

Three components, stepped together over the word time steps t = 1..T:

1. **System of LSTMs**: one LSTM per modality n, states (h_t^n, c_t^n).  The utterance-level
   audio and video vectors are fed at every word step (the words set the clock).
2. **Delta-memory Attention Network**: the memories of all LSTMs at t-1 and t,
   c^[t-1,t] = [c_{t-1}; c_t] (concatenated over modalities), are scored by a network D_a
   with a softmax output, a^[t-1,t] = softmax(D_a(c^[t-1,t])), and attended:
   ĉ^[t-1,t] = c^[t-1,t] ⊙ a^[t-1,t].
3. **Multi-view Gated Memory** u_t: proposal û_t = D_u(ĉ), retain gate γ1_t = σ(D_γ1(ĉ)),
   update gate γ2_t = σ(D_γ2(ĉ)); u_t = γ1_t ⊙ u_{t-1} + γ2_t ⊙ tanh(û_t).

Output: the final LSTM hidden states and the final memory u_T feed the regression head.  The
penalty's z's are the final hidden state of each modality's LSTM projected to ``d`` (they lie
on the path to the prediction: the head reads [z_l; z_a; z_v; u_T]).  Steps past a
sequence's length leave every state unchanged (padding is ignored).
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import RegressionHead, mlp
from .fusion import FusionModel


class MFN(FusionModel):
    """Shapes: ``text`` (B, T, Dt) + ``text_len`` (B,), ``audio`` (B, La, Da), ``video``
    (B, Lv, Dv) (time-averaged to one vector each) -> pred (B,), z's (B, d) each.

    Args: ``d`` z width; ``hidden`` LSTM width of every modality and width of the D_a, D_u,
    D_γ networks; ``mem`` width of the gated memory u (default ``hidden``)."""

    def __init__(self, in_dims, d: int = 32, hidden: int = 64, dropout: float = 0.1, mem: int | None = None):
        super().__init__()
        dt, da, dv = in_dims
        mem = hidden if mem is None else mem
        self.dims = (d, d, d)
        self.drop = nn.Dropout(dropout)
        self.cells = nn.ModuleList([nn.LSTMCell(di, hidden) for di in (dt, da, dv)])
        cat = 2 * 3 * hidden  # c^[t-1,t]: memories of the three LSTMs at t-1 and t
        self.attn = mlp(cat, hidden, cat, dropout)        # D_a (softmax applied in forward)
        self.proposal = mlp(cat, hidden, mem, dropout)    # D_u
        self.retain = mlp(cat, hidden, mem, dropout)      # D_γ1
        self.update = mlp(cat, hidden, mem, dropout)      # D_γ2
        self.out = nn.ModuleList([nn.Linear(hidden, d) for _ in range(3)])
        self.head = RegressionHead(3 * d + mem, hidden, dropout)
        self.hidden, self.mem = hidden, mem
        self._memory = None

    def encode(self, batch):
        text = self.drop(batch["text"])
        audio = self.drop(batch["audio"].mean(1))
        video = self.drop(batch["video"].mean(1))
        B, T, _ = text.shape
        lengths = batch.get("text_len")
        if lengths is None:
            lengths = torch.full((B,), T, device=text.device)
        zeros = text.new_zeros(B, self.hidden)
        h = [zeros] * 3
        c = [zeros] * 3
        u = text.new_zeros(B, self.mem)
        for t in range(T):
            live = (t < lengths).to(text.dtype)[:, None]  # 1 where step t is a real word
            steps = [cell(x, (hi, ci)) for cell, x, hi, ci in zip(self.cells, (text[:, t], audio, video), h, c)]
            c_prev_now = torch.cat(c + [s[1] for s in steps], -1)          # c^[t-1,t]
            attended = c_prev_now * torch.softmax(self.attn(c_prev_now), -1)  # ĉ^[t-1,t]
            u_new = (torch.sigmoid(self.retain(attended)) * u
                     + torch.sigmoid(self.update(attended)) * torch.tanh(self.proposal(attended)))
            h = [live * s[0] + (1 - live) * hi for s, hi in zip(steps, h)]
            c = [live * s[1] + (1 - live) * ci for s, ci in zip(steps, c)]
            u = live * u_new + (1 - live) * u
        self._memory = u
        return tuple(o(self.drop(hi)) for o, hi in zip(self.out, h))

    def fuse(self, zl, za, zv, batch):
        return self.head(torch.cat([zl, za, zv, self._memory], -1))

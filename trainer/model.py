"""A small RoBERTa-style encoder with a masked-language-model head.

Pre-LN transformer blocks built on F.scaled_dot_product_attention, learned
absolute position embeddings, and an LM head whose decoder shares its weight
with the token embedding. The loss is computed only on the masked positions:
the hidden states of rows with labels != -100 are gathered before the head, so
the (vocab-sized) projection runs on ~15% of the tokens instead of all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class EncoderConfig:
    vocab_size: int
    max_len: int
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 1024
    dropout: float = 0.1
    pad_id: int | None = None
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.pad_id is not None and not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id {self.pad_id} is outside the vocabulary (size {self.vocab_size})")


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        # (B, L, D) -> (B, H, L, D/H)
        q, k, v = (t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, L, D)
        return self.resid_drop(self.proj(y))


class FeedForward(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN encoder layer: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg)
        self.ln_ffn = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), attn_mask)
        return x + self.ffn(self.ln_ffn(x))


class LMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder (weight tied to the token embedding) + bias."""

    def __init__(self, cfg: EncoderConfig, embedding: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.decoder.weight = embedding.weight  # tied

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.ln(F.gelu(self.dense(h))))


class MaskedLM(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_id)
        self.pos_emb = nn.Embedding(config.max_len, config.d_model)
        self.emb_ln = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.emb_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.lm_head = LMHead(config, self.tok_emb)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (the tied decoder weight is counted once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        return n

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states, shape (B, L, d_model)."""
        B, L = input_ids.shape
        if L > self.config.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len {self.config.max_len}")
        pos = torch.arange(L, device=input_ids.device)
        x = self.emb_drop(self.emb_ln(self.tok_emb(input_ids) + self.pos_emb(pos)))

        attn_mask = None
        if attention_mask is not None:
            keep = attention_mask.bool()
            # A row with no real token at all would softmax over nothing (NaN);
            # let such rows attend everywhere, their outputs are never used.
            keep = keep | ~keep.any(dim=-1, keepdim=True)
            attn_mask = keep[:, None, None, :]  # (B, 1, 1, L): broadcast over heads and queries

        for block in self.blocks:
            x = block(x, attn_mask)
        return self.ln_f(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (logits, loss).

        Without labels: logits for every position, shape (B, L, vocab_size), loss None.
        With labels: only the N positions where labels != -100 go through the LM
        head, so logits has shape (N, vocab_size) in row-major (batch, position)
        order, and loss is their mean cross-entropy.
        """
        h = self.encode(input_ids, attention_mask)
        if labels is None:
            return self.lm_head(h), None

        selected = labels != IGNORE_INDEX
        h = h[selected]  # (N, d_model)
        targets = labels[selected]
        logits = self.lm_head(h)
        if targets.numel() == 0:
            # Nothing masked in this batch: a zero loss that still has a graph.
            return logits, logits.sum() * 0.0
        loss = F.cross_entropy(logits.float(), targets)
        return logits, loss


def describe(model: MaskedLM) -> str:
    c = model.config
    n = model.num_parameters()
    return (
        f"MaskedLM {n / 1e6:.2f}M params (d_model={c.d_model}, layers={c.n_layers}, "
        f"heads={c.n_heads}, d_ff={c.d_ff}, vocab={c.vocab_size}, max_len={c.max_len})"
    )


__all__ = ["EncoderConfig", "MaskedLM", "IGNORE_INDEX", "describe"]

"""Export a checkpoint as a Hugging Face model directory: ``python -m trainer export CHECKPOINT DIR``.

The trainer's encoder (model.py) is, layer for layer, transformers' RoBERTa-PreLayerNorm
(``RobertaPreLayerNormForMaskedLM``): embeddings (token + position, a zero token type) -> LayerNorm ->
dropout; pre-LN blocks (x + attn(LN(x)), x + ffn(LN(x)), exact GELU); a final LayerNorm; an LM head
dense -> GELU -> LayerNorm -> decoder tied to the token embedding, plus a bias. Post-LN BERT or RoBERTa
classes would not reproduce its outputs.

One difference is positions: RoBERTa numbers a row's real tokens from ``pad_id + 1`` and gives pads
the pad row, the trainer numbers every position from 0. The exported table holds the trainer's row i
at ``pad_id + 1 + i`` (rows up to ``pad_id`` are zero), so every real token of a right-padded row (as
the service sends them) gets the trainer's embedding and the trainer's logits; only the outputs at
pad positions differ, which attention never lets a real token see.

The directory holds config.json, model.safetensors, and the dataset's tokenizer (tokenizer.json and
tokenizer_config.json, with the dataset's special tokens and a ``cls ... sep`` template, as the
service frames sequences), so ``AutoModelForMaskedLM`` and ``AutoTokenizer`` load it as is.
Needs the ``hf`` extra (transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from .model import EncoderConfig

ROLE_TOKENS = {"cls": ("cls_token", "bos_token"), "sep": ("sep_token", "eos_token"), "pad": ("pad_token",),
               "mask": ("mask_token",), "unk": ("unk_token",)}  # fmt: skip


def hf_config(cfg: EncoderConfig, special: Mapping[str, int | None]) -> Any:
    """The transformers config that reproduces ``cfg``'s model."""
    from transformers import RobertaPreLayerNormConfig

    if cfg.pad_id is None:
        raise ValueError("the checkpoint's model has no pad id: RoBERTa's position numbering needs one")
    return RobertaPreLayerNormConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff, hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.pad_id + 1 + cfg.max_len, type_vocab_size=1, layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad_id, bos_token_id=special.get("cls"), eos_token_id=special.get("sep"),
        tie_word_embeddings=True,
    )  # fmt: skip


def hf_state_dict(state: Mapping[str, torch.Tensor], cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """The trainer's weights under RoBERTa-PreLayerNorm's names (see the module docstring for positions)."""
    assert cfg.pad_id is not None  # hf_config refuses a model without one first
    base, d = "roberta_prelayernorm.", cfg.d_model
    positions = torch.zeros(cfg.pad_id + 1 + cfg.max_len, d, dtype=state["pos_emb.weight"].dtype)
    positions[cfg.pad_id + 1 :] = state["pos_emb.weight"]
    out = {
        f"{base}embeddings.word_embeddings.weight": state["tok_emb.weight"],
        f"{base}embeddings.position_embeddings.weight": positions,
        f"{base}embeddings.token_type_embeddings.weight": torch.zeros(1, d, dtype=positions.dtype),
        f"{base}embeddings.LayerNorm.weight": state["emb_ln.weight"],
        f"{base}embeddings.LayerNorm.bias": state["emb_ln.bias"],
        f"{base}LayerNorm.weight": state["ln_f.weight"],
        f"{base}LayerNorm.bias": state["ln_f.bias"],
        "lm_head.dense.weight": state["lm_head.dense.weight"],
        "lm_head.dense.bias": state["lm_head.dense.bias"],
        "lm_head.layer_norm.weight": state["lm_head.ln.weight"],
        "lm_head.layer_norm.bias": state["lm_head.ln.bias"],
        "lm_head.decoder.weight": state["tok_emb.weight"],
        "lm_head.decoder.bias": state["lm_head.decoder.bias"],
        "lm_head.bias": state["lm_head.decoder.bias"],
    }
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"{base}encoder.layer.{i}."
        for part, (w, b) in zip(("query", "key", "value"), zip(state[f"{src}attn.qkv.weight"].split(d),
                                                               state[f"{src}attn.qkv.bias"].split(d))):  # fmt: skip
            out[f"{dst}attention.self.{part}.weight"] = w
            out[f"{dst}attention.self.{part}.bias"] = b
        pairs = {"attention.output.dense": "attn.proj", "attention.LayerNorm": "ln_attn",
                 "intermediate.LayerNorm": "ln_ffn", "intermediate.dense": "ffn.fc", "output.dense": "ffn.proj"}  # fmt: skip
        for name, ours in pairs.items():
            out[f"{dst}{name}.weight"] = state[f"{src}{ours}.weight"]
            out[f"{dst}{name}.bias"] = state[f"{src}{ours}.bias"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def save_tokenizer(tokenizer_json: str, special: Mapping[str, int | None], out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json for ``AutoTokenizer``; a tokenizer without a post-processor
    gets the ``cls $A sep`` framing the service gives every sequence."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(tokenizer_json)
    names = {role: tok.id_to_token(i) for role, i in special.items() if i is not None}
    if tok.post_processor is None and "cls" in names and "sep" in names:
        cls, sep = names["cls"], names["sep"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} {sep} $B {sep}",
            special_tokens=[(cls, special["cls"]), (sep, special["sep"])],
        )  # fmt: skip
    roles = {attr: names[role] for role, attrs in ROLE_TOKENS.items() if role in names for attr in attrs}
    PreTrainedTokenizerFast(tokenizer_object=tok, **roles).save_pretrained(out_dir)


def export(checkpoint: dict, out_dir: str | os.PathLike, tokenizer_json: str | None,
           special: Mapping[str, int | None]) -> Path:  # fmt: skip
    """Write ``checkpoint``'s model (and the tokenizer, when given) to ``out_dir``."""
    from transformers import RobertaPreLayerNormForMaskedLM

    cfg = EncoderConfig(**checkpoint["model_config"])
    model = RobertaPreLayerNormForMaskedLM(hf_config(cfg, special))
    model.load_state_dict(hf_state_dict(checkpoint["model"], cfg), strict=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_json is not None:
        save_tokenizer(tokenizer_json, special, out)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer export",
        description="Write a checkpoint as a Hugging Face model directory (config.json, model.safetensors, "
        "tokenizer.json) that transformers.AutoModelForMaskedLM.from_pretrained loads.",
    )  # fmt: skip
    p.add_argument("checkpoint", help="a checkpoint written by python -m trainer --checkpoint")
    p.add_argument("dir", help="the directory to write (created if missing)")
    p.add_argument("--url", default=os.environ.get("MASKSERVE_URL", "http://127.0.0.1:8000"),
                   help="the service to read the dataset's tokenizer from (env MASKSERVE_URL)")
    p.add_argument("--dataset", default=None, help="the dataset whose tokenizer to write [default: the checkpoint's]")
    p.add_argument("--tokenizer", metavar="FILE", default=None,
                   help="a tokenizer.json to write instead of the dataset's (no service needed; special tokens "
                        "are then found by their usual names)")
    return p


def _special_from_tokenizer(tokenizer_json: str) -> dict[str, int | None]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    candidates = {"cls": ("<s>", "[CLS]"), "sep": ("</s>", "[SEP]"), "pad": ("<pad>", "[PAD]"),
                  "mask": ("<mask>", "[MASK]"), "unk": ("<unk>", "[UNK]")}  # fmt: skip
    return {role: next((tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None), None)
            for role, names in candidates.items()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .loop import load_checkpoint

    try:
        ckpt = load_checkpoint(args.checkpoint)
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        print(f"trainer export: error: cannot read checkpoint {args.checkpoint}: {exc}", file=sys.stderr)
        return 1
    try:
        if args.tokenizer:
            tokenizer_json = Path(args.tokenizer).read_text(encoding="utf-8")
            special = _special_from_tokenizer(tokenizer_json)
        else:
            tokenizer_json, special = _from_service(args, ckpt)
        out = export(ckpt, args.dir, tokenizer_json, special)
    except ImportError as exc:
        print(f"trainer export: error: {exc}; install the hf extra (pip install 'maskserve[hf]')", file=sys.stderr)
        return 1
    except (ValueError, OSError, KeyError) as exc:
        print(f"trainer export: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} (RobertaPreLayerNormForMaskedLM)")
    return 0


def _from_service(args: argparse.Namespace, ckpt: dict) -> tuple[str, dict[str, int | None]]:
    from client import Client, MaskserveError

    dataset = args.dataset or (ckpt.get("data") or {}).get("dataset")
    if not dataset:
        raise ValueError("the checkpoint names no dataset: pass --dataset or --tokenizer")
    try:
        with Client(args.url, token=os.environ.get("MASKSERVE_TOKEN") or None) as c:
            info = c.dataset(dataset)
            tokenizer_json = json.dumps(c.tokenizer(dataset))
    except MaskserveError as exc:
        raise ValueError(f"dataset {dataset!r} at {args.url}: {exc}") from None
    return tokenizer_json, dict(info.get("special_tokens") or {})

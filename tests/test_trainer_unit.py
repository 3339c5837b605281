"""Unit tests for trainer/: model, schedule, training loop, checkpoints, CLI.

Everything runs on the CPU with synthetic batches; no service is needed.
"""

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from trainer import EncoderConfig, MaskedLM, TrainConfig, load_checkpoint, train
from trainer.loop import lr_at, param_groups

PAD, MASK, VOCAB, SEQ_LEN = 0, 1, 40, 16


def tiny_config(**overrides) -> EncoderConfig:
    kw = dict(vocab_size=VOCAB, max_len=SEQ_LEN, d_model=32, n_layers=2, n_heads=2, d_ff=64,
              dropout=0.0, pad_id=PAD)
    kw.update(overrides)
    return EncoderConfig(**kw)


def make_corpus(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n fixed random sequences; every other one is padded at the tail."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, SEQ_LEN), generator=g)
    mask = torch.ones(n, SEQ_LEN, dtype=torch.long)
    for i in range(1, n, 2):
        mask[i, SEQ_LEN - 3 - i % 4:] = 0
    ids[mask == 0] = PAD
    return ids, mask


def synthetic_batches(corpus, batch_size=16, seed=0, start=0, p=0.25):
    """Batch k is a pure function of (seed, k): sequences from the corpus, masked at random."""
    ids_all, mask_all = corpus
    k = start
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        idx = torch.randint(len(ids_all), (batch_size,), generator=g)
        ids, mask = ids_all[idx].clone(), mask_all[idx].clone()
        sel = (torch.rand(ids.shape, generator=g) < p) & (mask == 1)
        sel[:, 0] |= ~sel.any(dim=1)  # at least one masked token per row
        labels = torch.where(sel, ids, torch.full_like(ids, -100))
        ids[sel] = MASK
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}
        k += 1


def take(it, n):
    return [next(it) for _ in range(n)]


# ---------------------------------------------------------------- model

def test_forward_shapes_and_masked_only_loss_matches_full_reference():
    torch.manual_seed(0)
    model = MaskedLM(tiny_config()).eval()
    batch = next(synthetic_batches(make_corpus(), batch_size=4))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

    full_logits, no_loss = model(ids, mask)
    assert full_logits.shape == (4, SEQ_LEN, VOCAB)
    assert no_loss is None

    logits, loss = model(ids, mask, labels)
    selected = labels != -100
    assert logits.shape == (int(selected.sum()), VOCAB)
    torch.testing.assert_close(logits, full_logits[selected])
    reference = F.cross_entropy(full_logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, reference)
    # Only a minority of positions is scored, so a loss over every real position differs.
    assert 0 < selected.float().mean() < 0.5
    scored_everywhere = torch.where(selected, labels, torch.where(mask.bool(), ids, -100))
    assert not torch.allclose(loss, F.cross_entropy(full_logits.reshape(-1, VOCAB),
                                                    scored_everywhere.reshape(-1), ignore_index=-100))


def test_loss_is_zero_with_graph_when_nothing_is_masked():
    model = MaskedLM(tiny_config())
    ids = torch.randint(2, VOCAB, (2, SEQ_LEN))
    _, loss = model(ids, torch.ones_like(ids), torch.full_like(ids, -100))
    assert loss.item() == 0.0
    loss.backward()  # must not raise


def test_decoder_weight_is_tied_to_token_embedding():
    model = MaskedLM(tiny_config())
    assert model.lm_head.decoder.weight is model.tok_emb.weight
    ids = torch.randint(2, VOCAB, (2, SEQ_LEN))
    before, _ = model(ids)
    with torch.no_grad():
        model.tok_emb.weight[5] += 1.0
    after, _ = model(ids)
    # Token 5 is scored by the (shared) row 5 of the embedding matrix.
    assert not torch.allclose(before[..., 5], after[..., 5])
    # Counted once.
    untied = sum(p.numel() for p in model.parameters()) + model.tok_emb.weight.numel()
    assert model.num_parameters() == untied - model.tok_emb.weight.numel()
    # Survives a state_dict round trip.
    clone = MaskedLM(tiny_config())
    clone.load_state_dict(model.state_dict())
    assert clone.lm_head.decoder.weight is clone.tok_emb.weight
    torch.testing.assert_close(clone.lm_head.decoder.weight, model.tok_emb.weight)


def test_padding_does_not_change_outputs_at_real_positions():
    torch.manual_seed(0)
    model = MaskedLM(tiny_config()).eval()
    n_real = 10
    ids = torch.randint(2, VOCAB, (1, SEQ_LEN))
    mask = torch.zeros(1, SEQ_LEN, dtype=torch.long)
    mask[:, :n_real] = 1

    other = ids.clone()
    other[:, n_real:] = torch.randint(2, VOCAB, (1, SEQ_LEN - n_real))
    out_a, _ = model(ids, mask)
    out_b, _ = model(other, mask)
    torch.testing.assert_close(out_a[:, :n_real], out_b[:, :n_real])
    # Same as running the unpadded sequence on its own.
    out_short, _ = model(ids[:, :n_real], torch.ones(1, n_real, dtype=torch.long))
    torch.testing.assert_close(out_a[:, :n_real], out_short, atol=1e-5, rtol=1e-5)
    # And without the mask the padded tokens do leak in (the check above has teeth).
    out_nomask, _ = model(other, None)
    assert not torch.allclose(out_a[:, :n_real], out_nomask[:, :n_real], atol=1e-4)


def test_fully_padded_row_does_not_produce_nan():
    model = MaskedLM(tiny_config()).eval()
    ids = torch.randint(2, VOCAB, (2, SEQ_LEN))
    mask = torch.ones_like(ids)
    mask[1] = 0
    out, _ = model(ids, mask)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- schedule and optimiser

def test_lr_schedule_warmup_then_linear_decay_to_zero():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(5e-4)
    assert lr_at(99, cfg) == pytest.approx(1e-3 / 90)  # decay spans steps - warmup = 90 steps
    assert lr_at(100, cfg) == 0.0
    no_warmup = TrainConfig(steps=50, lr=2e-3, warmup_steps=0)
    assert lr_at(0, no_warmup) == pytest.approx(2e-3)
    assert lr_at(25, no_warmup) == pytest.approx(1e-3)


def test_no_weight_decay_on_biases_and_layernorm():
    model = MaskedLM(tiny_config())
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.emb_ln.weight) in no_decay_ids
    assert id(model.lm_head.decoder.bias) in no_decay_ids
    assert id(model.blocks[0].attn.qkv.bias) in no_decay_ids
    assert id(model.blocks[0].attn.qkv.weight) not in no_decay_ids
    assert all(p.dim() >= 2 for p in decay["params"])
    n = len(decay["params"]) + len(no_decay["params"])
    assert n == len(list(model.parameters()))


# ---------------------------------------------------------------- training

def test_train_loss_falls_on_a_tiny_task():
    torch.manual_seed(0)
    model = MaskedLM(tiny_config(d_model=64, d_ff=128))
    cfg = TrainConfig(steps=60, lr=1e-2, warmup_steps=6, log_every=20, device="cpu", seed=0)
    lines = []
    result = train(model, synthetic_batches(make_corpus(8), batch_size=32), cfg, log=lines.append)
    assert len(result.losses) == 60 and result.final_step == 60
    assert result.losses[0] == pytest.approx(math.log(VOCAB), abs=0.3)  # chance level at init
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.35 * first and last < 1.2, (first, last)
    assert result.sequences_per_sec > 0 and result.elapsed > 0
    step_lines = [line for line in lines if line.startswith("step")]
    assert len(step_lines) == 3
    assert all(k in step_lines[0] for k in ("loss", "lr", "seq/s", "tok/s", "data wait", "compute"))


def test_train_stops_when_the_data_runs_out():
    model = MaskedLM(tiny_config())
    batches = take(synthetic_batches(make_corpus()), 7)
    result = train(model, batches, TrainConfig(steps=20, device="cpu", log_every=5), log=None)
    assert result.final_step == 7 and len(result.losses) == 7


def test_a_run_until_the_data_ends_goes_past_its_estimate_and_the_horizon_moves_the_schedule():
    """On a job the run stops when the data does, not at cfg.steps; the horizon moves where the lr ends."""
    from trainer.attach import JobHorizon

    class Leased(dict):  # a batch as a job stream yields it: its place in the job in the metadata
        def __init__(self, arrays, index):
            super().__init__(arrays)
            self.metadata = {"epoch": 0, "index": index}

    # this worker gets every other batch of a 24-batch job (another worker takes the rest): 12 steps
    batches = [Leased(b, 2 * i) for i, b in enumerate(take(synthetic_batches(make_corpus()), 12))]
    cfg = TrainConfig(steps=5, device="cpu", log_every=0, until_data_ends=True)
    lrs = []
    result = train(MaskedLM(tiny_config()), batches, cfg, log=None, horizon=JobHorizon(24, 1),
                   on_step=lambda step, info: lrs.append(info["lr"]))  # fmt: skip
    assert result.final_step == 12 and len(lrs) == 12
    assert cfg.steps == 12  # the schedule ended with the worker's last batch
    # past the first estimate (5) the lr still decays smoothly toward 0 at the worker's last batch
    assert all(a > b > 0 for a, b in zip(lrs, lrs[1:])) and lrs[-1] <= cfg.lr * 2 / 12


def test_the_job_horizon_estimates_a_workers_share():
    from trainer.attach import JobHorizon

    alone = JobHorizon(10, 3)
    assert [alone(k + 1, {"epoch": k // 10, "index": k % 10}) for k in range(30)] == [30] * 30
    # one of three workers: it gets places 1, 4, 7, ... of 30
    third = JobHorizon(10, 3, workers=1)
    ends = [third(k + 1, {"epoch": p // 10, "index": p % 10}) for k, p in enumerate(range(1, 30, 3))]
    assert ends[1:] == [10] * 9 and ends[0] == 1 + 28  # a lone first batch: the guess (alone) until a second
    # two ranks in lockstep guess half from the first batch
    assert JobHorizon(10, 3, workers=2)(1, {"epoch": 0, "index": 0}) == 1 + round(29 / 2)


def test_checkpoint_roundtrip_and_exact_resume(tmp_path):
    corpus = make_corpus()
    cfg = TrainConfig(steps=20, lr=2e-3, warmup_steps=4, log_every=5, device="cpu", seed=0)

    torch.manual_seed(0)
    straight = MaskedLM(tiny_config())
    train(straight, synthetic_batches(corpus, seed=3), cfg, log=None)

    path = tmp_path / "ckpt.pt"
    torch.manual_seed(0)
    first_half = MaskedLM(tiny_config())
    half_cfg = TrainConfig(**{**cfg.__dict__, "checkpoint": str(path), "checkpoint_every": 5})
    batches = take(synthetic_batches(corpus, seed=3), 10)  # the stream ends at step 10
    train(first_half, batches, half_cfg, log=None,
          data_state=lambda step: {"dataset": "toy", "seed": 3, "step": step})

    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 10
    assert ckpt["data"] == {"dataset": "toy", "seed": 3, "step": 10}
    assert ckpt["train_config"]["steps"] == 20
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr_at(9, cfg))
    assert {"model_config", "model", "optimizer", "scheduler"} <= ckpt.keys()

    resumed = MaskedLM(EncoderConfig(**ckpt["model_config"]))
    resumed.load_state_dict(ckpt["model"])
    for (name, a), b in zip(first_half.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name

    result = train(resumed, synthetic_batches(corpus, seed=3, start=ckpt["step"]), cfg,
                   start_step=ckpt["step"], optimizer_state=ckpt["optimizer"], log=None)
    assert result.final_step == 20 and len(result.losses) == 10
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    # Without the optimizer state the run diverges from the uninterrupted one.
    fresh_opt = MaskedLM(EncoderConfig(**ckpt["model_config"]))
    fresh_opt.load_state_dict(ckpt["model"])
    train(fresh_opt, synthetic_batches(corpus, seed=3, start=10), cfg, start_step=10, log=None)
    assert not torch.allclose(fresh_opt.tok_emb.weight, straight.tok_emb.weight, atol=1e-6)


def test_resume_is_bit_exact_with_dropout(tmp_path):
    """The checkpoint carries the generator states dropout draws from: a resumed run draws the same
    dropout masks as the uninterrupted one and ends with bit-identical weights."""
    corpus = make_corpus()
    cfg = TrainConfig(steps=12, lr=2e-3, warmup_steps=2, log_every=4, device="cpu", seed=5)

    torch.manual_seed(0)
    straight = MaskedLM(tiny_config(dropout=0.3))
    train(straight, synthetic_batches(corpus, seed=1), cfg, log=None)

    path = tmp_path / "ckpt.pt"
    torch.manual_seed(0)
    first = MaskedLM(tiny_config(dropout=0.3))
    train(first, take(synthetic_batches(corpus, seed=1), 7),
          TrainConfig(**{**cfg.__dict__, "checkpoint": str(path)}), log=None)
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 7 and "rng" in ckpt

    def resume(rng):
        torch.manual_seed(1234)  # whatever the process did before must not matter
        model = MaskedLM(EncoderConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        train(model, synthetic_batches(corpus, seed=1, start=7), cfg, start_step=7,
              optimizer_state=ckpt["optimizer"], rng=rng, log=None)
        return model

    resumed = resume(ckpt["rng"])
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # without the saved states the dropout stream differs, and so do the weights
    reseeded = resume(None)
    assert not torch.equal(reseeded.tok_emb.weight, straight.tok_emb.weight)


# ---------------------------------------------------------------- command line

class FakeMaskserveError(Exception):
    pass


class FakeBatch:
    def __init__(self, step, tensors):
        self.step, self.epoch, self._tensors = step, 0, tensors

    def torch(self, device=None):
        return {k: v.to(device) for k, v in self._tensors.items()}


class FakeStream:
    def __init__(self, batch_size, seed, start, steps):
        self._gen = synthetic_batches(make_corpus(), batch_size=batch_size, seed=seed, start=start)
        self._step, self._end = start, None if steps is None else start + steps
        self.closed = False

    def __iter__(self):
        return self

    def __next__(self):
        if self._end is not None and self._step >= self._end:
            raise StopIteration
        self._step += 1
        return FakeBatch(self._step - 1, next(self._gen))

    def close(self):
        self.closed = True


def fake_client_module(calls):
    class Client:
        def __init__(self, base_url, token=None, timeout=60.0):
            self.base_url = base_url

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

        def close(self):
            pass

        def dataset(self, name):
            if name != "toy":
                raise FakeMaskserveError(f"unknown dataset {name!r}")
            return {"name": "toy", "seq_len": SEQ_LEN, "vocab_size": VOCAB, "num_sequences": 8,
                    "num_tokens": 8 * SEQ_LEN,
                    "special_tokens": {"cls": None, "sep": None, "pad": PAD, "mask": MASK, "unk": None}}

        def batches(self, name, batch_size=32, seed=0, start=0, steps=None, prefetch=4, **masking):
            calls.append(dict(batch_size=batch_size, seed=seed, start=start, steps=steps, masking=masking))
            stream = FakeStream(batch_size, seed, start, steps)
            calls[-1]["stream"] = stream
            return stream

    class FakeJobStream:  # never made here: these runs use stateless streams
        pass

    class FakeJobCancelled(FakeMaskserveError):
        pass

    class FakeJobConflict(FakeMaskserveError):
        conflicts: list = []

    mod = types.ModuleType("client")
    mod.Client, mod.MaskserveError, mod.JobStream, mod.JobCancelled, mod.JobConflict = (
        Client, FakeMaskserveError, FakeJobStream, FakeJobCancelled, FakeJobConflict
    )
    return mod


def test_cli_trains_checkpoints_resumes_and_reports_errors(tmp_path, monkeypatch, capsys):
    from trainer.__main__ import main

    calls = []
    monkeypatch.setitem(sys.modules, "client", fake_client_module(calls))
    path = tmp_path / "run.pt"
    small = ["--d-model", "32", "--layers", "1", "--heads", "2", "--device", "cpu", "--log-every", "5"]

    assert main(["--dataset", "toy", "--steps", "10", "--batch-size", "8", "--seed", "2",
                 "--checkpoint", str(path), *small]) == 0
    out = capsys.readouterr().out
    assert "done: loss" in out and "step     10/10" in out
    assert calls[-1]["start"] == 0 and calls[-1]["steps"] == 10 and calls[-1]["stream"].closed
    assert load_checkpoint(path)["step"] == 10

    assert main(["--dataset", "toy", "--resume", str(path), "--steps", "15", *small]) == 0
    assert calls[-1]["start"] == 10 and calls[-1]["seed"] == 2 and calls[-1]["batch_size"] == 8
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 15 and ckpt["data"]["seed"] == 2 and ckpt["data"]["step"] == 15
    capsys.readouterr()

    assert main(["--dataset", "nope", *small]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("trainer: error:") and "nope" in err and "\n" not in err


def test_every_masking_option_of_the_service_is_a_flag():
    """The trainer exposes each field of the service's masking parameters as a flag, and passes it on."""
    from service.masking.params import MaskingParams
    from trainer.__main__ import _masking, build_parser
    from trainer.data import masking_options

    parser = build_parser()
    flags = {opt for action in parser._actions for opt in action.option_strings}
    missing = [f for f in MaskingParams.model_fields if "--" + f.replace("_", "-") not in flags]
    assert not missing, f"masking options of the service without a trainer flag: {missing}"
    args = parser.parse_args(["--dataset", "d", "--unit", "span", "--span-p", "0.3", "--span-max", "5"])
    sent = masking_options(_masking(args, {}))
    assert (sent["unit"], sent["span_p"], sent["span_max"]) == ("span", 0.3, 5)
    assert "span_p" not in masking_options(_masking(parser.parse_args(["--dataset", "d"]), {}))  # the service's default


# ---- mixtures: the flags, attaching, the shares, several held-out sets ----------------------------------


def test_mixture_flags_parse_and_are_checked():
    from trainer.args import build_parser, data_flags

    parser = build_parser()
    args = parser.parse_args(["--job", "j", "--source", "wiki=3", "--source", "books=1:repeat", "--until", "wiki",
                              "--eval-dataset", "wiki-heldout", "--eval-dataset", "books-heldout"])  # fmt: skip
    assert args.source == [{"dataset": "wiki", "weight": 3.0, "repeat": False},
                           {"dataset": "books", "weight": 1.0, "repeat": True}]  # fmt: skip
    assert args.eval_dataset == ["wiki-heldout", "books-heldout"] and args.dataset is None
    assert args.interpolation is None  # left out: an existing job's own is kept
    assert data_flags(args) is None
    assert data_flags(parser.parse_args(["--job", "j"])) is None  # an existing job names its data
    assert parser.parse_args(["--dataset", "d", "--eval-dataset", "h"]).eval_dataset == ["h"]
    wrong = {
        ("--source", "a=1"): "--job",
        ("--dataset", "d", "--num-samples", "5"): "--num-samples",
        ("--job", "j", "--dataset", "b", "--source", "a=1"): "first --source",
        ("--steps", "5"): "--dataset",
    }
    for argv, said in wrong.items():
        assert said in data_flags(parser.parse_args(list(argv))), argv
    with pytest.raises(SystemExit):
        parser.parse_args(["--job", "j", "--source", "a=0"])


def test_attaching_compares_only_the_mixture_flags_given():
    from trainer.args import build_parser
    from trainer.attach import describe_conflicts, requested

    config = {"dataset": "wiki", "sources": [{"dataset": "wiki", "weight": 3.0, "repeat": False},
                                             {"dataset": "books", "weight": 1.0, "repeat": True}],
              "num_samples": None, "until": "wiki", "curriculum": None, "interpolation": "step", "mixture_block": 256,
              "batch_size": 16, "seed": 4, "epochs": 2, "masking": {"mlm_probability": 0.15}}  # fmt: skip
    parser = build_parser()
    assert requested(config, parser.parse_args(["--job", "j"])) == config  # no flags: the job's own config
    asked = requested(config, parser.parse_args(["--job", "j", "--source", "books=1", "--source", "wiki=1",
                                                 "--interpolation", "linear", "--batch-size", "8"]))  # fmt: skip
    assert asked["dataset"] == "books" and [s["dataset"] for s in asked["sources"]] == ["books", "wiki"]
    assert asked["interpolation"] == "linear" and asked["batch_size"] == 8 and asked["until"] == "wiki"
    told = describe_conflicts("j", [{"field": "sources", "job": config["sources"], "requested": asked["sources"]},
                                    {"field": "interpolation", "job": "step", "requested": "linear"}])  # fmt: skip
    assert "--source books=1 wiki=1 (the job's: wiki=3 books=1:repeat)" in told
    assert "--interpolation linear (the job's: step)" in told


def test_source_shares_per_interval_and_over_the_run():
    from trainer.runlog import SourceShares

    shares = SourceShares(["wiki", "books"], rows={"wiki": 6, "books": 2})  # a resumed run's counts
    assert shares.fields == ["share:wiki", "share:books", "total_share:wiki", "total_share:books"]
    step = shares.add(["wiki", "books", "books", "books"])
    assert step == {"share:wiki": 0.25, "share:books": 0.75, "total_share:wiki": round(7 / 12, 6),
                    "total_share:books": round(5 / 12, 6)}  # fmt: skip
    shares.add(["books"] * 4)
    assert shares.note() == " | rows wiki 12.5% (so far 43.8%), books 87.5% (so far 56.2%)"
    shares.add(["wiki"] * 2)
    assert shares.note().startswith(" | rows wiki 100.0% (so far 50.0%)")  # a new interval after each note
    assert shares.add(None)["share:wiki"] == 0  # a batch without sources counts nothing


def test_metrics_keep_extra_columns_through_a_resume(tmp_path):
    from trainer.evaluate import FIELDS, MetricsWriter, read_metrics

    path = tmp_path / "m.csv"
    fields = [*FIELDS, "share:wiki"]
    w = MetricsWriter(path, fields=fields)
    w.write([{"step": s, "epoch": 0, "split": "train", "loss": 1.0, "accuracy": 0.5, "tokens": 10, "lr": 0.1,
              "share:wiki": s / 10} for s in (1, 2, 3)])  # fmt: skip
    w.write([{"step": 3, "epoch": 0, "split": "heldout:wiki-heldout", "loss": 2.0, "accuracy": 0.1, "tokens": 9}])
    w.close()
    MetricsWriter(path, resume_step=2, fields=fields).close()
    rows = read_metrics(path)
    assert [(r["step"], r["split"], r["share:wiki"]) for r in rows] == [(1, "train", 0.1), (2, "train", 0.2)]

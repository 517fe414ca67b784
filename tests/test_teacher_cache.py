"""The teacher-logit cache: the KD loss read from it equals ``--kd-top-k`` with the live
teacher (per token, at TP × PP × DP against one process), and the cache itself is the same
whatever layout wrote it."""

from __future__ import annotations

import pytest
import torch

from minitron_megatron.checkpoint import find_checkpoint
from minitron_megatron.config import ParallelConfig
from minitron_megatron.data.loaders import DataConfig
from minitron_megatron.distill.config import KDConfig, TrainConfig
from minitron_megatron.distill.kd_loss import (
    global_top_k,
    top_k_kd_loss,
    vocab_parallel_kd_loss,
)
from minitron_megatron.distill.teacher_cache import (
    TeacherCache,
    TeacherCacheConfig,
    shard_path,
    shard_ranges,
)
from minitron_megatron.distill.teacher_cache_write import write_teacher_cache
from minitron_megatron.distill.training import Trainer
from minitron_megatron.runtime.distributed import LaunchEnv, init_distributed, shutdown
from minitron_megatron.testing.multiprocess import run_distributed

K, STEPS, GBS, SEQ, PER_SHARD = 8, 3, 8, 32, 10
RTOL = 1e-5
# (TP, PP) on 4 ranks: DP is what remains (2, 2, 1, 4)
LAYOUTS = [(2, 1), (1, 2), (2, 2), (1, 1)]
METRICS = ("loss", "kd_loss", "ce_loss", "grad_norm")


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_loss_from_the_cached_top_k_equals_the_live_top_k(temperature):
    """Per token: τ²·KL, CE and the gradient of the student's logits from the top-k values (as
    stored: relative to the row max, fp32 and fp16) and ids equal the live ``top_k`` loss on the
    teacher's logits; a smaller k' reads the first k' entries."""
    gen = torch.Generator().manual_seed(0)
    s, b, vocab = 6, 3, 40
    teacher = torch.randn(s, b, vocab, generator=gen) * 3
    student = torch.randn(s, b, vocab, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab, (b, s), generator=gen)

    def loss(fn):
        x = student.detach().clone().requires_grad_(True)
        kd, ce = fn(x * 1.0)
        (kd.sum() + 0.3 * ce.sum()).backward()
        return kd, ce, x.grad

    values, ids = global_top_k(teacher.transpose(0, 1).reshape(-1, vocab), K, None, 0)
    values = (values - values[:, :1]).view(b, s, K).transpose(0, 1)  # stored relative to max
    ids = ids.view(b, s, K).transpose(0, 1).int()
    for k, dtype, tol in ((K, torch.float32, 1e-5), (K // 2, torch.float32, 1e-5),
                          (K, torch.float16, 2e-3)):
        live = loss(lambda x, k=k: vocab_parallel_kd_loss(
            x, teacher, labels=labels.t(), temperature=temperature, top_k=k))
        cached = loss(lambda x, k=k, dtype=dtype: top_k_kd_loss(
            x, values[..., :k].to(dtype), ids[..., :k], labels=labels.t(),
            temperature=temperature))
        for a, e in zip(cached, live, strict=True):
            torch.testing.assert_close(a, e, rtol=tol, atol=tol)


def cache_and_steps(env, teacher, student, data_path, root, layouts, live):
    """Per (TP, PP): the cache written at that layout (its tensors, from every rank's view of
    the files) and ``STEPS`` KD steps reading it; with ``live`` also the steps with the live
    teacher and ``--kd-top-k``."""
    out = []
    data = DataConfig(data_path=data_path, seq_length=SEQ)
    try:
        for tp, pp in layouts:
            ps = init_distributed(env, ParallelConfig(tensor_model_parallel_size=tp,
                                                      pipeline_model_parallel_size=pp))
            cache_dir = f"{root}/cache-{tp}{pp}"
            write_teacher_cache(find_checkpoint(teacher), ps, data, num_samples=STEPS * GBS,
                                micro_batch_size=2, save=cache_dir,
                                config=TeacherCacheConfig(top_k=K, dtype="fp32",
                                                          samples_per_shard=PER_SHARD))
            from safetensors.torch import load_file

            files = [load_file(shard_path(cache_dir, a, b))
                     for a, b in shard_ranges(STEPS * GBS, PER_SHARD)]
            runs = {"cached": dict(teacher=None, teacher_cache=TeacherCache(cache_dir))}
            if live:
                runs["live"] = dict(teacher=find_checkpoint(teacher))
            metrics = {}
            for name, source in runs.items():
                trainer = Trainer(
                    train=TrainConfig(save=f"{root}/{name}-{tp}{pp}", train_iters=STEPS,
                                      global_batch_size=GBS, micro_batch_size=2, lr=3e-3,
                                      lr_warmup_iters=1, clip_grad=1.0),
                    kd=KDConfig(top_k=K, ce_weight=0.2, temperature=2.0), data=data,
                    student=find_checkpoint(student), ps=ps, **source)
                assert name == "live" or trainer.model.teacher is None  # no teacher in memory
                metrics[name] = [[step[k] for k in METRICS]
                                 for step in (trainer.train_step() for _ in range(STEPS))]
            out.append((files, metrics))
    finally:
        shutdown()
    return out


@pytest.mark.multiprocess
def test_cached_distillation_matches_the_live_top_k_at_every_layout(
        llama_ckpt_untied, student_ckpt, tiny_dataset, tmp_path):
    args = (str(llama_ckpt_untied), str(student_ckpt), tiny_dataset)
    [(ref_files, ref)] = cache_and_steps(LaunchEnv(), *args, str(tmp_path / "ref"), [(1, 1)],
                                         live=True)
    # one process: the cached run is the live top-k run
    torch.testing.assert_close(torch.tensor(ref["cached"]), torch.tensor(ref["live"]),
                               rtol=RTOL, atol=0.0)
    assert ref["live"][-1][0] < ref["live"][0][0]  # the steps do train
    per_rank = run_distributed(cache_and_steps, 4, *args, str(tmp_path / "par"), LAYOUTS,
                               False, timeout=600)
    for rank, results in enumerate(per_rank):
        for (tp, pp), (files, metrics) in zip(LAYOUTS, results, strict=True):
            where = f"TP={tp} PP={pp} rank {rank}"
            for ref_file, got in zip(ref_files, files, strict=True):
                assert torch.equal(got["indices"], ref_file["indices"]), where
                assert torch.equal(got["digest"], ref_file["digest"]), where
                for key in ("values", "lse"):
                    torch.testing.assert_close(got[key], ref_file[key], rtol=RTOL, atol=1e-5,
                                               msg=lambda m, w=where, k=key: f"{w} {k}: {m}")
            torch.testing.assert_close(torch.tensor(metrics["cached"]),
                                       torch.tensor(ref["live"]), rtol=RTOL, atol=0.0,
                                       msg=lambda m, w=where: f"{w}: {m}")


# ---------------------------------------------------------------------- the CLI and its refusals
def cache_args(teacher, data, save, *extra, iters=STEPS, k=K):
    return ["teacher-cache", "--teacher", str(teacher), "--save", str(save), "--data-path", data,
            "--seq-length", str(SEQ), "--train-iters", str(iters), "--global-batch-size",
            str(GBS), "--micro-batch-size", "2", "--cache-top-k", str(k),
            "--cache-samples-per-shard", str(PER_SHARD), *extra]


def distill_args(cache, student, data, save, *extra, iters=STEPS):
    return ["distill", "--teacher-cache", str(cache), "--student", str(student), "--save",
            str(save), "--data-path", data, "--seq-length", str(SEQ), "--train-iters",
            str(iters), "--global-batch-size", str(GBS), "--micro-batch-size", "2",
            "--lr", "3e-3", *extra]


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory, llama_ckpt_untied, tiny_dataset):
    """A cache written by the CLI (fp16), and how long each shard file is."""
    from minitron_megatron.cli import main

    root = tmp_path_factory.mktemp("cli") / "cache"
    main(cache_args(llama_ckpt_untied, tiny_dataset, root))
    return root


def test_cli_cache_then_distill_reads_it(cli_cache, student_ckpt, tiny_dataset, tmp_path,
                                         capsys):
    """The CLI writes a resumable fp16 cache of the stated size, and ``distill --teacher-cache``
    trains from it with a falling loss."""
    import json

    from minitron_megatron.cli import main

    manifest = json.loads((cli_cache / "cache.json").read_text())
    assert manifest["bytes_per_token"] == K * (2 + 4) + 4
    files = sorted((cli_cache / "shards").iterdir())
    assert [f.name for f in files] == [shard_path(cli_cache, a, b).name
                                      for a, b in shard_ranges(STEPS * GBS, PER_SHARD)]
    payload = sum(f.stat().st_size for f in files)
    assert payload >= STEPS * GBS * SEQ * manifest["bytes_per_token"]
    main(distill_args(cli_cache, student_ckpt, tiny_dataset, tmp_path / "kd",
                      "--log-interval", "1", "--eval-interval", "1", "--eval-iters", "1"))
    metrics = [json.loads(line) for line in
               (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    kd = [m["kd_loss"] for m in metrics if "kd_loss" in m]
    assert len(kd) == STEPS and kd[-1] < kd[0]
    # held-out samples are not cached: their evaluation is the student's CE alone
    evals = [m for m in metrics if "val_loss" in m]
    assert len(evals) == STEPS + 1 and not any("val_kd_loss" in m for m in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    run_config = json.loads(next((tmp_path / "kd").glob("iter_*/run_config.json")).read_text())
    assert run_config["teacher"] is None and run_config["kd"]["top_k"] == K


def test_an_interrupted_cache_resumes_with_the_missing_shards_only(cli_cache, llama_ckpt_untied,
                                                                   tiny_dataset, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from minitron_megatron.cli import main

    root = tmp_path / "cache"
    shutil.copytree(cli_cache, root)
    files = sorted((root / "shards").iterdir())
    before = {f.name: f.stat().st_mtime_ns for f in files}
    lost = files[1]
    expected = load_file(lost)
    lost.unlink()
    main(cache_args(llama_ckpt_untied, tiny_dataset, root))
    after = {f.name: f.stat().st_mtime_ns for f in sorted((root / "shards").iterdir())}
    assert after.keys() == before.keys()
    assert all(after[n] == before[n] for n in before if n != lost.name)  # untouched
    again = load_file(lost)
    assert all(torch.equal(again[k], expected[k]) for k in expected)


REFUSALS = {
    "another seed": (dict(seed="99"), "was made for other samples: seed"),
    "more samples than cached": (dict(iters=STEPS + 1), "holds 24 training samples, the run "
                                                        "needs 32"),
    "a larger k": (dict(extra=("--kd-top-k", str(K + 1))), "exceeds the teacher cache's k"),
    "intermediate pairs": (dict(extra=("--kd-intermediate", "0:1")),
                           "needs the teacher's hidden states"),
    "reverse KL": (dict(extra=("--kd-reverse",)), "cannot use a teacher cache"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_distill_refuses_a_cache_that_does_not_fit_in_one_line(case, cli_cache, student_ckpt,
                                                               tiny_dataset, tmp_path, capsys):
    from tests.cli_helpers import fail_one_line

    change, message = REFUSALS[case]
    argv = distill_args(cli_cache, student_ckpt, tiny_dataset, tmp_path / "kd",
                        *change.get("extra", ()), iters=change.get("iters", STEPS))
    if "seed" in change:
        argv += ["--seed", change["seed"]]
    assert message in fail_one_line(argv, capsys)
    assert not (tmp_path / "kd").exists()  # refused before any work


def test_cache_refusals_before_any_work(cli_cache, llama_ckpt_untied, student_ckpt,
                                        tiny_dataset, tmp_path, capsys, monkeypatch):
    import shutil

    from minitron_megatron.distill import teacher_cache
    from tests.cli_helpers import fail_one_line

    # an incomplete cache is named as such
    root = tmp_path / "incomplete"
    shutil.copytree(cli_cache, root)
    next((root / "shards").iterdir()).unlink()
    line = fail_one_line(distill_args(root, student_ckpt, tiny_dataset, tmp_path / "kd"), capsys)
    assert "is incomplete (1 shards missing" in line
    # another k in the same directory needs --overwrite
    line = fail_one_line(cache_args(llama_ckpt_untied, tiny_dataset, cli_cache, k=4), capsys)
    assert "holds a teacher cache made with other settings (top_k, bytes_per_token)" in line
    # not enough free disk: stated in GB, before the teacher is loaded
    monkeypatch.setattr(teacher_cache.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    line = fail_one_line(cache_args(llama_ckpt_untied, tiny_dataset, tmp_path / "new"), capsys)
    needed = STEPS * GBS * SEQ * (K * 6 + 4)  # 52 bytes per token
    assert f"needs {needed / 1e3:.2f} kB" in line and "only 1.00 kB are free" in line
    assert not (tmp_path / "new").exists()


def test_a_changed_dataset_is_caught_by_the_token_digests(cli_cache, student_ckpt, tmp_path,
                                                          tiny_tokenizer, capsys):
    """Same path, split, seed and length, other text: sample 0's tokens differ from those the
    cache was computed on."""
    import json
    import shutil

    from minitron_megatron.data.preprocess import preprocess
    from tests.cli_helpers import fail_one_line

    manifest = json.loads((cli_cache / "cache.json").read_text())
    root = tmp_path / "cache"
    shutil.copytree(cli_cache, root)
    corpus = tmp_path / "other.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"other words number {i} " * 30}) + "\n"
                              for i in range(200)))
    prefix = tmp_path / "other"
    preprocess(corpus, tiny_tokenizer, prefix)
    manifest["data"]["data_path"] = str(prefix.resolve())
    (root / "cache.json").write_text(json.dumps(manifest))
    line = fail_one_line(distill_args(root, student_ckpt, str(prefix), tmp_path / "kd"), capsys)
    assert "training sample 0 differs from the one the teacher cache" in line

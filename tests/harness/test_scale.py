"""Scale-out: the device policy, batch autotuning and OOM halving, the executors (local and Ray),
and resume after a driver dies.  Every device code path runs here on the CPU."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import os
import threading

import pandas as pd
import pytest
import torch
from torch import nn

from robustbench_lite import (
    ModelCache,
    ModelSpec,
    create_attack,
    create_defense,
    create_model,
    evaluate,
    train_or_load,
)
from robustbench_lite.cli import build_parser, main
from robustbench_lite.core.device import (
    CPU_CHUNK_BYTES,
    Chunked,
    DevicePolicy,
    decide_policy,
    halving_on_oom,
    largest_activation_bytes,
    make_policy,
)
from robustbench_lite.harness import autotune
from robustbench_lite.harness.plan import Plan
from robustbench_lite.harness.presets import get_preset
from robustbench_lite.harness.ray_executor import RayExecutor
from robustbench_lite.harness.run import LocalExecutor, RunContext, run_group, run_plan
from robustbench_lite.harness.store import Store
from robustbench_lite.report import leaderboard

evaluate_mod = importlib.import_module("robustbench_lite.eval.evasion")  # the package re-exports the function
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
TIMING = ["seconds", "train_seconds", "code_version"]


# -- the device policy ----------------------------------------------------------------------------
def test_policy_on_cpu_is_plain_float32_unless_asked():
    p = decide_policy(CPU, "auto")
    assert (p.train_dtype, p.attack_dtype, p.eval_dtype) == (None, None, None)
    assert not (p.train_channels_last or p.pin_memory or p.cudnn_benchmark)
    assert p.channels_last  # evaluation runs channels_last everywhere: a layout, not a precision
    assert p.chunk_bytes == CPU_CHUNK_BYTES  # attack passes in cache-sized chunks
    asked = decide_policy(CPU, "bf16", autocast_eval=True)
    assert asked.train_dtype == asked.attack_dtype == asked.eval_dtype == torch.bfloat16
    assert make_policy("cpu") == p


def test_policy_on_cuda_autocasts_training_and_attacks_but_not_evaluation_by_default():
    bf = decide_policy(CUDA, "auto", bf16_supported=True)
    assert bf.train_dtype == bf.attack_dtype == torch.bfloat16 and bf.eval_dtype is None
    assert bf.channels_last and bf.train_channels_last and bf.pin_memory and bf.cudnn_benchmark
    assert bf.chunk_bytes is None and bf.chunked(nn.Identity()).__class__ is nn.Identity  # whole batches on a GPU
    fp = decide_policy(CUDA, "auto", bf16_supported=False)
    assert fp.train_dtype == torch.float16 and fp.eval_dtype is None
    assert decide_policy(CUDA, "auto", True, bf16_supported=True).eval_dtype == torch.bfloat16
    off = decide_policy(CUDA, "off")
    assert off.train_dtype is None and off.channels_last  # precision and layout are separate choices
    assert bf.precision_tag() == "bfloat16" and off.precision_tag() is None


def test_chunked_passes_give_the_logits_and_input_gradients_of_one_pass():
    """Chunks hold as many rows as fit the byte budget of the largest activation (small-cnn on
    28x28: 32 maps of 28x28 floats); the numbers are exactly those of one pass over the batch."""
    torch.manual_seed(0)
    model = create_model("small-cnn", (1, 28, 28), 10).eval().to(memory_format=torch.channels_last)
    x = torch.rand(100, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (100,))
    chunked = DevicePolicy(CPU, channels_last=True, chunk_bytes=CPU_CHUNK_BYTES).chunked(model)
    assert isinstance(chunked, Chunked)
    results = []
    for net in (model, chunked):
        xx = x.clone().requires_grad_(True)
        logits = net(xx)
        (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), xx)
        results.append((logits, grad))
    assert chunked.rows == CPU_CHUNK_BYTES // (32 * 28 * 28 * 4) < 100  # it did split the batch
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    with pytest.raises(ValueError, match="chunk_bytes"):
        Chunked(model, 0)


def test_chunk_measurement_leaves_a_randomized_models_draws_alone():
    class Noisy(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :3] + torch.randn(x.shape[0], 3)

    sample = torch.rand(1, 1, 4, 4)
    before = torch.get_rng_state()
    assert largest_activation_bytes(Noisy(), sample) == 16 * 4  # the input is the largest
    assert torch.equal(torch.get_rng_state(), before)


def test_chunked_hands_non_tensor_outputs_to_the_callers_checks():
    class Pair(nn.Module):
        def forward(self, x):
            return x.flatten(1), x.flatten(1)

    out = Chunked(Pair(), 64)(torch.rand(10, 1, 4, 4))  # 4 rows a chunk
    assert isinstance(out, tuple) and out[0].shape == (10, 16)


def test_evaluate_gives_the_same_records_with_and_without_chunked_passes(fmnist_model, fmnist):
    attacks = [create_attack("fgsm", eps=0.1), create_attack("pgd", eps=0.1, steps=5),
               create_attack("square", eps=0.1, queries=60, p_init=0.3)]
    runs = [evaluate(copy.deepcopy(fmnist_model), attacks, fmnist.test, n=120, probe_iterations=False, adaptive=False,
                     policy=dataclasses.replace(make_policy("cpu"), chunk_bytes=chunk))
            for chunk in (None, 1 << 19)]  # 5 rows a chunk
    for a, b in zip(runs[0].records, runs[1].records, strict=True):
        assert torch.equal(a.robust, b.robust), a.attack.name
        assert (a.grad_evals, a.forward_evals) == (b.grad_evals, b.forward_evals)


def test_policy_rejects_bad_flags_naming_the_fix():
    with pytest.raises(ValueError, match="auto, off, bf16, fp16|one of"):
        decide_policy(CPU, "fp8")
    with pytest.raises(ValueError, match="--autocast"):
        decide_policy(CPU, "off", autocast_eval=True)
    with pytest.raises(ValueError, match="stage"):
        decide_policy(CPU).autocast("backward")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            make_policy("cuda")


def test_training_context_sets_cudnn_benchmark_and_restores_it():
    before = torch.backends.cudnn.benchmark
    with DevicePolicy(CPU, cudnn_benchmark=True).training():
        assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark == before
    with DevicePolicy(CPU).training():
        assert torch.backends.cudnn.benchmark == before


def test_grad_scaler_only_for_float16_training():
    assert not decide_policy(CPU, "bf16").grad_scaler().is_enabled()
    assert not decide_policy(CPU, "off").grad_scaler().is_enabled()
    assert decide_policy(CPU, "fp16").grad_scaler().is_enabled()


def test_channels_last_moves_give_the_same_logits(digits_model, digits):
    x = digits.test.x[:16]
    plain = DevicePolicy(CPU)
    assert plain.batch_to(x) is x  # already there: no copy
    cl = DevicePolicy(CPU, channels_last=True)
    xb = cl.batch_to(x)
    assert xb.is_contiguous(memory_format=torch.channels_last)
    model = cl.model_to(copy.deepcopy(digits_model))
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model(xb), digits_model(x), rtol=1e-4, atol=1e-5)


def test_cpu_training_keeps_the_contiguous_layout_and_its_exact_weights(digits):
    """Evaluation layout must not leak into CPU training: the CPU policy trains exactly as the
    all-contiguous one does (same weights to the bit), and leaves the model in the evaluation
    layout afterwards only through ``model_to``."""
    spec, defense = ModelSpec("small-cnn"), create_defense("standard", epochs=1, seed=0)
    torch.manual_seed(0)
    a, b = spec.build(digits), spec.build(digits)
    b.load_state_dict(a.state_dict())
    defense.fit(a, digits, progress=False, policy=make_policy("cpu"))
    defense.fit(b, digits, progress=False, policy=DevicePolicy(CPU))
    for (name, wa), wb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(wa, wb), name
    conv = next(m for m in a.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()
    make_policy("cpu").model_to(a)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_evaluate_gives_the_users_model_back_in_its_layout(digits_model, digits, tmp_path):
    """Evaluation runs channels_last, but the caller's model comes back as it was: still
    contiguous, so e.g. safetensors can save it."""
    from safetensors.torch import save_file

    model = copy.deepcopy(digits_model)
    conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]  # several input channels
    assert conv.in_channels > 1 and conv.weight.is_contiguous()  # as train_or_load hands it out
    seen = []
    orig = conv.forward
    conv.forward = lambda x: (seen.append(conv.weight.is_contiguous(memory_format=torch.channels_last)), orig(x))[1]
    evaluate(model, [create_attack("fgsm", eps=0.1)], digits.test, n=32, adaptive=False, probe_iterations=False)
    assert seen and all(seen)  # it did run channels_last
    assert conv.weight.is_contiguous()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))


def test_bf16_autocast_training_runs_and_gets_its_own_cache_key(digits, tmp_path):
    cache = ModelCache(tmp_path)
    defense = create_defense("standard", epochs=1, batch_size=128, lr=3e-3)
    fp32 = train_or_load(ModelSpec("small-cnn"), defense, digits, cache, policy=make_policy("cpu"), progress=False)
    bf16 = train_or_load(ModelSpec("small-cnn"), defense, digits, cache, policy=make_policy("cpu", "bf16"), progress=False)
    assert fp32.key != bf16.key and not bf16.from_cache
    assert bf16.sidecar["device"]["train_dtype"] == "bfloat16"
    assert bf16.sidecar["clean_acc"] > 0.5 and abs(bf16.sidecar["clean_acc"] - fp32.sidecar["clean_acc"]) < 0.1


def test_bf16_attacks_stay_within_tolerance_of_float32(digits_model, digits):
    attacks = [create_attack("pgd", eps=0.1, steps=10)]
    fp32 = evaluate(digits_model, attacks, digits.test, n=150, policy=make_policy("cpu"))
    bf16 = evaluate(digits_model, attacks, digits.test, n=150, policy=make_policy("cpu", "bf16"))
    assert torch.equal(fp32.correct, bf16.correct)  # evaluation stays float32 by default
    assert abs(fp32.records[0].robust_acc - bf16.records[0].robust_acc) <= 0.05


# -- OOM halving and autotuning -------------------------------------------------------------------
def _oom(*_):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


def test_halving_on_oom_halves_until_it_fits_and_lets_other_errors_through():
    seen = []

    def job(b):
        seen.append(b)
        return _oom() if b > 100 else b * 2

    assert halving_on_oom(job, 500) == (124, 62)
    assert seen == [500, 250, 125, 62]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        halving_on_oom(_oom, 4, min_batch=2)
    with pytest.raises(ZeroDivisionError):
        halving_on_oom(lambda b: 1 / 0, 500)


def test_an_attack_that_runs_out_of_memory_is_rerun_with_half_the_batch(digits_model, digits, monkeypatch):
    attacks = [create_attack("pgd", eps=0.1, steps=5)]
    reference = evaluate(digits_model, attacks, digits.test, n=200, batch_size=62)
    real, seen = evaluate_mod.run_attack, []

    def fragile(*args, batch_size, **kw):  # the attack "needs" more memory than 64 points allow
        seen.append(batch_size)
        if batch_size > 64:
            _oom()
        return real(*args, batch_size=batch_size, **kw)

    monkeypatch.setattr(evaluate_mod, "run_attack", fragile)
    ev = evaluate(digits_model, attacks, digits.test, n=200, batch_size=500)
    assert seen == [500, 250, 125, 62]
    rec = ev.records[0]
    assert rec.error == "" and torch.equal(rec.robust, reference.records[0].robust)


def test_candidates_are_bounded_by_n():
    assert autotune.candidate_batches(5000) == (64, 128, 256, 500, 1000, 2000)
    assert autotune.candidate_batches(200) == (64, 128, 200)
    assert autotune.candidate_batches(50) == (50,)
    with pytest.raises(ValueError):
        autotune.candidate_batches(0)


def test_probe_picks_the_fastest_and_skips_batches_above_an_oom():
    cost = {64: 3.0, 128: 1.0, 256: 2.0, 500: 1.5}
    calls = []

    def timer(model, x, y, b, kind, policy, clock):
        calls.append(b)
        return _oom() if b >= 1000 else cost[b]

    x, y = torch.zeros(3000, 1, 2, 2), torch.zeros(3000, dtype=torch.long)
    t = autotune.probe(None, x, y, policy=make_policy("cpu"), rounds=3, timer=timer)
    assert t[128] == 1.0 and t[1000] == t[2000] == float("inf")
    assert autotune.pick(t) == 128
    assert calls.count(1000) == 1 and 2000 not in calls  # once out of memory, larger ones are not tried
    assert autotune.pick({64: 1.0, 128: 1.0}) == 128  # ties go to the larger batch


def test_tuner_probes_for_real_once_and_then_reads_its_cache(digits_model, digits, tmp_path, monkeypatch):
    tuner = autotune.BatchTuner(tmp_path / "autotune.json", candidates=(16, 32, 64), rounds=1)
    x, y, policy = digits.test.x[:64], digits.test.y[:64], make_policy("cpu")
    for step in autotune.PASSES:
        assert tuner.batch_for(digits_model, "model-a", step, x, y, policy) in (16, 32, 64)
    table = json.loads((tmp_path / "autotune.json").read_text())
    assert len(table) == 2 and all(set(e["seconds"]) == {"16", "32", "64"} for e in table.values())
    monkeypatch.setattr(autotune, "probe", lambda *a, **k: pytest.fail("probed again despite the cache"))
    first = next(iter(table.values()))["batch"]
    assert tuner.batch_for(digits_model, "model-a", "grad", x, y, policy) == table[tuner.cache_key("model-a", "grad", policy, 64)]["batch"]
    assert first in (16, 32, 64)


def test_batch_size_auto_end_to_end(tmp_path):
    summary = run_plan(get_preset("smoke").plan(n=100), workdir=tmp_path, batch_size="auto", progress=False)
    assert summary.computed == 5 and summary.errors == 0
    table = json.loads((tmp_path / "autotune.json").read_text())
    (key,) = [k for k in table if "|grad|cpu|" in k]
    assert table[key]["batch"] in autotune.candidate_batches(100)
    with pytest.raises(ValueError, match="auto"):
        run_plan(get_preset("smoke").plan(), workdir=tmp_path, batch_size=0, progress=False)
    # the per-group function returns rows and leaves the store alone (only the driver writes it)
    plan = get_preset("smoke").plan(n=100)
    with Store(tmp_path / "store.sqlite") as s:
        before = {r.key: r for r in s.rows()}
    ctx = RunContext(workdir=str(tmp_path), batch_size="auto", progress=False)
    rows = run_group(plan.cells, ctx)
    with Store(tmp_path / "store.sqlite") as s:
        assert {r.key: r for r in s.rows()} == before
    attack_rows = [r for r, _ in rows if r.attack != "worst_case"]
    assert sorted(r.key for r in attack_rows) == sorted(c.key for c in plan.cells)
    assert {r.key for r, _ in rows} == set(before)  # the same cells and worst cases the driver stored
    assert all(before[r.key].robust_acc == r.robust_acc for r in attack_rows)  # same model, same batch: same numbers


def test_cli_batch_size_and_ray_executor_resources():
    assert build_parser().parse_args(["run", "--batch-size", "auto"]).batch_size == "auto"
    assert build_parser().parse_args(["run", "--batch-size", "256", "--executor", "ray"]).batch_size == 256
    ex = RayExecutor(num_cpus=2)
    assert ex.resources({"CPU": 8.0}) == {"num_cpus": 1}
    assert ex.resources({"CPU": 8.0, "GPU": 4.0}) == {"num_gpus": 1.0, "num_cpus": 1}


def test_cli_takes_batch_size_auto_and_rejects_a_bad_one(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["run", "--batch-size", "zero", "--workdir", str(tmp_path)])
    assert "--batch-size" in capsys.readouterr().err


# -- executors and resume -------------------------------------------------------------------------
def _two_groups(n: int = 120) -> Plan:
    """The smoke preset with a second seed of the defense: two (data, model, defense) groups."""
    cells = get_preset("smoke").plan(n=n).cells
    reseeded = tuple(
        dataclasses.replace(c, defense=dataclasses.replace(c.defense, params={**c.defense.params, "seed": 1}))
        for c in cells
    )
    return Plan("two-groups", cells + reseeded)


class DiesAfter:
    """An executor whose driver is killed once ``rows`` attack rows are stored: inside the row
    callback, or between groups (an evasion evaluation commits its rows as one unit; kills inside
    an evaluation are the stage tests' business, in test_resume.py)."""

    def __init__(self, inner, rows: int) -> None:
        self.inner, self.rows, self.stored = inner, rows, 0

    def _count(self, n: int) -> None:
        self.stored += n
        if self.stored >= self.rows:
            raise KeyboardInterrupt

    def run(self, tasks, ctx, on_row=None, sink=None, progress=None):
        def dying_on_row(row, mask):
            on_row(row, mask)
            self._count(1)

        streamed = 0
        for task, rows in self.inner.run(tasks, ctx, dying_on_row, sink=sink, progress=progress):
            yield task, rows  # the driver stores these before asking for the next group
            if self.stored == streamed:  # nothing came through the callback: count the group's rows
                self._count(sum(r.attack != "worst_case" for r, _ in rows))
            streamed = self.stored


def _csvs(workdir):
    with Store(workdir / "store.sqlite") as s:
        rows = s.rows()
    out = {}
    for p in leaderboard.write(rows, workdir / "lb"):
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
        out[p.name] = df.drop(columns=[c for c in TIMING if c in df.columns]).to_csv(index=False)
    return out


def _finished(workdir):
    with Store(workdir / "store.sqlite") as s:
        return {r.key for r in s.rows() if r.status == "ok" and r.attack != "worst_case"}


def _kill_and_resume(tmp_path, make_executor, rows):
    plan = _two_groups()
    with pytest.raises(KeyboardInterrupt):
        run_plan(plan, workdir=tmp_path, progress=False, executor=DiesAfter(make_executor(), rows))
    finished = _finished(tmp_path)
    assert len(finished) == rows  # what landed before the kill, and nothing else
    resumed = run_plan(plan, workdir=tmp_path, progress=False, executor=make_executor())
    assert resumed.skipped == rows and resumed.computed == 10 - rows and resumed.errors == 0
    assert not finished & set(resumed.computed_keys)
    return resumed


def test_killed_driver_local_rerun_recomputes_no_finished_cell(tmp_path):
    _kill_and_resume(tmp_path, LocalExecutor, rows=5)  # after the first group was committed


def _ray_executor():
    pytest.importorskip("ray")
    return RayExecutor(num_cpus=2)


@pytest.mark.slow
def test_ray_smoke_gives_the_local_csvs_and_a_killed_driver_recomputes_no_finished_cell(tmp_path):
    pytest.importorskip("ray")
    run_plan(_two_groups(), workdir=tmp_path / "local", progress=False)
    _kill_and_resume(tmp_path / "ray", _ray_executor, rows=5)  # after the first group's task returned
    local, on_ray = _csvs(tmp_path / "local"), _csvs(tmp_path / "ray")
    assert sorted(local) == sorted(on_ray) and len(local) >= 3
    for name in local:
        assert local[name] == on_ray[name], name


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("RBL_LONG_TESTS"),
    reason="two quick presets at once, beyond the suite's time budget (BENCHMARKS.md): set RBL_LONG_TESTS=1",
)
def test_quick_preset_through_ray_gives_the_local_leaderboards(tmp_path):
    """Both runs at once (the Ray run's work is in its worker process), to halve the wall time."""
    ray = pytest.importorskip("ray")
    plan = get_preset("quick").plan()
    errors = []
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # in the main thread

    def on_ray():
        try:
            run_plan(plan, workdir=tmp_path / "ray", progress=False, executor=RayExecutor())
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    try:
        thread = threading.Thread(target=on_ray)
        thread.start()
        local = run_plan(plan, workdir=tmp_path / "local", progress=False)
        thread.join()
    finally:
        ray.shutdown()
    assert not errors, errors
    assert local.errors == 0 and local.computed == len(plan.cells)
    a, b = _csvs(tmp_path / "local"), _csvs(tmp_path / "ray")
    assert sorted(a) == sorted(b) and len(a) >= 4
    for name in a:
        assert a[name] == b[name], name

"""Bad inputs and faults of train.py: one table row per case.

Each row runs the command line in-process (train.main) and checks the exit status, that stderr is
exactly one line (`error: ...`, or `warning: ...` where the run recovers), no traceback, and the
words that name the problem and the fix. Where a row leaves a run to finish, its losses are
compared with an uninterrupted run's: nothing already written was lost.

A read-only directory is real: permissions removed, and, as root (which ignores them), the
effective user switched to `nobody` for the call, so orbax's C++ writes are refused too. A full
disk is injected at orbax's save, as OSError(ENOSPC); `test_a_real_write_failure_is_one_line`
makes a real one (a file size limit) in a subprocess, where orbax logs its tracebacks.
"""

import contextlib
import errno
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

import train
from cllm_jax.checkpoint import Checkpointer
from cllm_jax.train.metrics_log import MetricsLog, read_metrics
from tests.test_checkpoint_resume import write_config, write_inputs

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534


class Stop(Exception):
    """Raised after a chosen step to leave a run unfinished (checkpoints 3 and 6 written)."""


@pytest.fixture(scope="module")
def base():
    """A world-readable directory (the `nobody` user must read the inputs of read-only rows)."""
    path = Path(tempfile.mkdtemp(prefix="cllm-bad-train-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs(base):
    return write_inputs(base / "inputs")


@pytest.fixture(scope="module")
def straight(base, inputs):
    """An uninterrupted 8-step run: the losses every recovered run must reproduce."""
    config = config_file(base / "straight", inputs)
    assert train.main(["--config", str(config)]) == 0
    return base / "straight" / "run"


def config_file(directory: Path, inputs, **sections) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    sections = {"optim": {"max_steps": 8}, "checkpoint": {"every": 3, "keep": 2}, **sections}
    return write_config(directory / "c.yaml", directory / "run", *inputs, **sections)


def stopped_after(step: int, config: Path) -> None:
    from cllm_jax.train.config import load_config
    from cllm_jax.train.loop import run

    def after_step(s):
        if s == step:
            raise Stop

    with pytest.raises(Stop):
        run(load_config(config), after_step=after_step)


@contextlib.contextmanager
def read_only(directory: Path):
    paths = [directory, *directory.rglob("*")]
    modes = {p: p.stat().st_mode for p in paths}
    for p in paths:
        p.chmod(modes[p] & ~0o222)
    root = os.geteuid() == 0
    if root:
        os.seteuid(NOBODY)
    try:
        yield
    finally:
        if root:
            os.seteuid(0)
        for p in paths:
            p.chmod(modes[p])


def same_losses(run_dir: Path, straight: Path) -> None:
    a, b = read_metrics(straight), read_metrics(run_dir)
    assert [m["step"] for m in b] == [m["step"] for m in a]
    np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], rtol=1e-6)


# ---------------------------------------------------------------- the cases
# Each returns (argv, directory to make read-only or None, check after the run or None).


def unknown_train_key(d, inputs, monkeypatch, straight):
    return ["--config", str(config_file(d, inputs)), "optim.lrr=1"], None, None


def unknown_pipeline_key(d, inputs, monkeypatch, straight):
    return ["pipeline", "--config", str(ROOT / "configs" / "smollm2_gsm8k.yaml"), "collect.limitt=2"], None, None


def negative_lr(d, inputs, monkeypatch, straight):
    return ["--config", str(config_file(d, inputs)), "optim.lr=-1e-3"], None, lambda: not (d / "run").exists()


def nan_lr(d, inputs, monkeypatch, straight):
    return ["--config", str(config_file(d, inputs)), "optim.lr=.nan"], None, None


def gated_without_adapter(d, inputs, monkeypatch, straight):
    return ["--config", str(config_file(d, inputs)), "adapter.gated=true"], None, lambda: not (d / "run").exists()


def targets_without_adapter(d, inputs, monkeypatch, straight):
    return ["--config", str(config_file(d, inputs)), "adapter.targets=[q,v]"], None, None


def pipeline_negative_recycle(d, inputs, monkeypatch, straight):
    """A bad evaluation setting fails when the config loads, before collection and training run."""
    return ["pipeline", "--config", str(ROOT / "configs" / "smollm2_gsm8k.yaml"), f"run_dir={d / 'run'}",
            "evaluate.recycle=-1"], None, lambda: not (d / "run").exists()


def pipeline_negative_row_option(d, inputs, monkeypatch, straight):
    return ["pipeline", "--config", str(ROOT / "configs" / "smollm2_gsm8k.yaml"), f"run_dir={d / 'run'}",
            "evaluate.rows=[{weights: base, method: ar}, {weights: cllm, method: jacobi-rolling, recycle: -2}]"], \
        None, lambda: not (d / "run").exists()


def pipeline_yaml_list(d, inputs, monkeypatch, straight):
    d.mkdir(parents=True, exist_ok=True)
    (d / "list.yaml").write_text("- collect\n- train\n")
    return ["pipeline", "--config", str(d / "list.yaml")], None, None


def misspelt_pipeline_section(d, inputs, monkeypatch, straight):
    d.mkdir(parents=True, exist_ok=True)
    (d / "p.yaml").write_text((ROOT / "configs" / "smollm2_gsm8k.yaml").read_text().replace("collect:", "colect:"))
    return ["pipeline", "--config", str(d / "p.yaml")], None, lambda: not (ROOT / "runs" / "colect").exists()


def unfinished_collection(d, inputs, monkeypatch, straight):
    """Training on a collection whose summary says it is unfinished: one warning line that counts the prompts
    it holds (a killed collection's summary still says 0), and it trains."""
    collection = d / "collection"
    collection.mkdir(parents=True, exist_ok=True)
    shutil.copy(inputs[1], collection / "trajectories.jsonl")
    (collection / "summary.json").write_text('{"format": "cllm_jax.trajectories/1", "complete": false, '
                                             '"counts": {"prompts": 0}}')
    config = config_file(d, inputs)
    return ["--config", str(config), f"data.trajectories=[{collection}]"], None, lambda: (
        d / "run" / "export" / "config.json").is_file()


def no_trajectories(d, inputs, monkeypatch, straight):
    return ["--config", str(config_file(d, inputs)), "data.trajectories=[]"], None, None


def read_only_new_run_dir(d, inputs, monkeypatch, straight):
    (d / "ro").mkdir(parents=True)
    return ["--config", str(config_file(d / "cfg", inputs)), f"run_dir={d / 'ro' / 'run'}"], d / "ro", (
        lambda: not (d / "ro" / "run").exists())


def read_only_unfinished_run(d, inputs, monkeypatch, straight):
    config = config_file(d, inputs)
    stopped_after(4, config)
    before = (d / "run" / "metrics.jsonl").read_text()
    return ["--config", str(config)], d / "run", lambda: (d / "run" / "metrics.jsonl").read_text() == before


def full_disk(d, inputs, monkeypatch, straight):
    real = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step >= 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    config = config_file(d, inputs)

    def check():  # step 3's checkpoint survives, and with space again the run ends as if never stopped
        monkeypatch.setattr(ocp.CheckpointManager, "save", real)
        assert [m["step"] for m in read_metrics(d / "run")] == list(range(1, 7))
        assert train.main(["--config", str(config)]) == 0
        same_losses(d / "run", straight)
        return True

    return ["--config", str(config)], None, check


def full_disk_at_metrics(d, inputs, monkeypatch, straight):
    real = MetricsLog.write

    def write(self, step, *args, **kwargs):
        if step == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(d / "run" / "metrics.jsonl"))
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(MetricsLog, "write", write)
    config = config_file(d, inputs)

    def check():
        monkeypatch.setattr(MetricsLog, "write", real)
        assert train.main(["--config", str(config)]) == 0  # resumes from step 3
        same_losses(d / "run", straight)
        return True

    return ["--config", str(config)], None, check


def _damaged(d, inputs, straight, stop, lose):
    config = config_file(d, inputs)
    stopped_after(stop, config)
    step_dir = d / "run" / "checkpoints" / str(max(3, stop // 3 * 3))
    lose(step_dir)

    def check():
        if stop >= 6:  # resumed from step 3, finished, exported; the damaged step kept aside
            same_losses(d / "run", straight)
            assert (d / "run" / "export" / "config.json").is_file()
            assert (step_dir.parent / f"{step_dir.name}.damaged").is_dir()
            assert Checkpointer(step_dir.parent).all_steps() == [6, 8]  # step 6 written again
        else:  # nothing to fall back to: nothing moved
            assert step_dir.is_dir()
        return True

    return ["--config", str(config)], None, check


def largest_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def damaged_latest_data_file(d, inputs, monkeypatch, straight):
    return _damaged(d, inputs, straight, 7, lambda s: largest_file(s / "state").unlink())


def damaged_latest_metadata(d, inputs, monkeypatch, straight):
    return _damaged(d, inputs, straight, 7, lambda s: (s / "state" / "_METADATA").unlink())


def damaged_only_checkpoint(d, inputs, monkeypatch, straight):
    return _damaged(d, inputs, straight, 4, lambda s: (s / "state" / "_METADATA").unlink())


def collapse(d, inputs, monkeypatch, straight):
    config = config_file(d, inputs, optim={"max_steps": 8, "lr": 1e6, "warmup_ratio": 0.0},
                         checkpoint={"every": 1, "keep": 3})
    return ["--config", str(config)], None, lambda: not (d / "run" / "export").exists()


def nan_loss(d, inputs, monkeypatch, straight):
    # warm-up makes step 1's learning rate 0, so checkpoint 1 is good and checkpoint 2 is not
    config = config_file(d, inputs, optim={"max_steps": 8, "lr": 1e30, "warmup_ratio": 0.25},
                         checkpoint={"every": 1, "keep": 3})
    return ["--config", str(config)], None, lambda: not (d / "run" / "export").exists()


CASES = [  # (case, exit status, the one stderr line)
    (unknown_train_key, 1, r"error: unknown key optim\.lrr in section 'optim': did you mean optim\.lr\? "
                           r"\(valid: .*\blr\b"),
    (unknown_pipeline_key, 1, r"error: unknown key collect\.limitt .*did you mean collect\.limit\? "
                              r"\(valid: .*\blimit\b"),
    (no_trajectories, 1, r"error: data\.trajectories is empty: give the collection directories"),
    (negative_lr, 1, r"error: optim\.lr must be at least 0, got -0\.001$"),
    (nan_lr, 1, r"error: optim\.lr must be a finite number, got nan$"),
    (gated_without_adapter, 1, r"error: adapter\.gated is set but adapter\.rank is 0 \(full fine-tuning, no "
                               r"adapter\): set adapter\.rank \(e\.g\. 16\) or drop adapter\.gated$"),
    (targets_without_adapter, 1, r"error: adapter\.targets is set but adapter\.rank is 0"),
    (pipeline_negative_recycle, 1, r"error: evaluate: the row jacobi-multiblock \+ recycling \(cllm\): recycle must "
                                   r"be at least 0, got -1$"),
    (pipeline_negative_row_option, 1, r"error: evaluate\.rows: recycle must be at least 0, got -2$"),
    (pipeline_yaml_list, 1, r"error: .*list\.yaml must hold a mapping of sections \(run_dir, collect, train"),
    (misspelt_pipeline_section, 1, r"error: unknown key colect in the config: did you mean collect\? \(valid: "),
    (unfinished_collection, 0, r"warning: .*/collection is an unfinished collection \(8 prompts so far\): "
                               r"training on what it holds; rerun its collection to complete it$"),
    (read_only_new_run_dir, 1, r"error: Permission denied: .*/ro/run: make it writable"),
    (read_only_unfinished_run, 1, r"error: Permission denied: .*/run/metrics\.jsonl\.tmp: make it writable"),
    (full_disk, 1, r"error: cannot write a checkpoint in .*/run/checkpoints \(No space left on device\): free "
                   r"disk space or make it writable, then rerun the same command to resume from step 3$"),
    (full_disk_at_metrics, 1, r"error: No space left on device: .*/run/metrics\.jsonl: free disk space, then rerun "
                              r"the same command to resume from the latest checkpoint$"),
    (damaged_latest_data_file, 0, r"warning: checkpoint step 6 is damaged \(.+\), set aside as "
                                  r".*/checkpoints/6\.damaged; resumed from step 3$"),
    (damaged_latest_metadata, 0, r"warning: checkpoint step 6 is damaged \(state/_METADATA is missing\), set "
                                 r"aside as .*/checkpoints/6\.damaged; resumed from step 3$"),
    (damaged_only_checkpoint, 1, r"error: checkpoint step 3 in .*/checkpoints is damaged \(state/_METADATA is "
                                 r"missing\) and "
                                 r"none before it restores: move .*/checkpoints/3 aside"),
    (collapse, 1, r"error: training collapsed to a uniform prediction at step 2 \(gradient norm 0, AR loss "
                  r"4\.8520 = log\(vocab size 128\)\); stopped without exporting, no checkpoint is good \(step 1 "
                  r"holds the parameters that produced it\)\. .*lower optim\.lr"),
    (nan_loss, 1, r"error: training diverged at step 3 \(loss=nan.*\); stopped without exporting, the last "
                  r"good checkpoint is step 1 in .*/checkpoints\. .*lower optim\.lr"),
]


@pytest.mark.parametrize("case, status, line", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_is_one_line(case, status, line, base, inputs, straight, monkeypatch, capsys):
    directory = base / case.__name__
    argv, ro_dir, check = case(directory, inputs, monkeypatch, straight)
    capsys.readouterr()
    with read_only(ro_dir) if ro_dir is not None else contextlib.nullcontext():
        code = train.main(argv)
    err = capsys.readouterr().err
    assert code == status, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.match(line, err.strip()), err
    assert check is None or check()


def test_a_finished_run_reruns_read_only_without_writing(straight, capsys):
    files = {p: p.stat().st_mtime_ns for p in straight.rglob("*")}
    with read_only(straight):
        code = train.main(["--config", str(straight.parent / "c.yaml")])
    out, err = capsys.readouterr()
    assert code == 0 and err == "", err
    assert out.startswith(f"trained 8 steps in {straight}; last loss ") and "model exported to" in out
    assert {p: p.stat().st_mtime_ns for p in straight.rglob("*")} == files


def test_a_drafter_run_ends_naming_its_own_loss_terms(base, inputs, capsys):
    config = config_file(base / "drafter", inputs, optim={"max_steps": 2}, adapter={"rank": 4, "alpha": 8},
                         drafter={"placeholders": 2, "anchors": 4})
    capsys.readouterr()
    assert train.main(["--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    assert re.search(r"last loss [\d.]+ \(draft [\d.]+, first_draft [\d.]+\); model exported to", out), out


def test_a_real_write_failure_is_one_line(base, inputs):
    """A file size limit makes tensorstore's writes fail for real: orbax then logs hundreds of lines."""
    config = config_file(base / "fsize", inputs)
    limited = ("import resource, runpy, signal, sys\n"
               "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of dying\n"
               "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))\n"
               "sys.argv = sys.argv[1:]\n"
               "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", limited, str(ROOT / "train.py"), "--config", str(config)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: cannot write a checkpoint in {base / 'fsize' / 'run' / 'checkpoints'} (File too large): free disk "
        f"space or make it writable, then rerun the same command to start again"], proc.stderr[-3000:]
    # the asynchronous save of step 3 fails in the background and is reported at step 6's save
    assert [m["step"] for m in read_metrics(base / "fsize" / "run")] == [1, 2, 3, 4, 5, 6]


def test_a_damaged_checkpoint_in_a_real_process_is_one_line(base, inputs):
    """A truncated data file in the newest checkpoint: in a real process the failed reads' coroutines
    and tensorstore's callbacks report again at exit; stderr must still be the one warning line."""
    config = config_file(base / "truncated", inputs)
    stopped_after(7, config)
    data = largest_file(base / "truncated" / "run" / "checkpoints" / "6" / "state")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(config)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        f"warning: checkpoint step 6 is damaged (a data file cannot be read: missing, truncated or corrupt), set "
        f"aside as {base / 'truncated' / 'run' / 'checkpoints' / '6.damaged'}; resumed from step 3"], proc.stderr[-3000:]


def test_the_reads_a_damaged_restore_abandons_are_not_logged():
    """asyncio logs a future nobody awaited whenever it is collected: the other reads of a damaged
    checkpoint's restore (set aside already, in one warning line) must not reach stderr, at any time;
    any other asyncio error still does."""
    import logging

    from cllm_jax.cli.common import _drop_abandoned_checkpoint_writes

    def record(error):
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "Future exception was never retrieved",
                                 None, (type(error), error, None))

    damaged = ValueError('OUT_OF_RANGE: Error reading "opt_state.1.0.nu.layers.q_proj.value/0.0.0" in OCDBT database '
                         'at local file "/tmp/run/checkpoints/6/state/": Requested byte range [610899, 640315) is not '
                         'valid for value of size 321732')
    failed_save = OSError("No space left on device: /tmp/run/checkpoints/6.orbax-checkpoint-tmp-0/state")
    assert not _drop_abandoned_checkpoint_writes(record(damaged))
    assert not _drop_abandoned_checkpoint_writes(record(failed_save))
    assert _drop_abandoned_checkpoint_writes(record(RuntimeError("something else entirely")))

"""Bad inputs and faults of decode.py and `decode.py collect`: one table row per case.

Each row runs the command line in-process (decode.main) and checks: exit status != 0, exactly one
line on stderr, no traceback, and the words that name the problem and the fix. Faults a test
cannot cause for real here (a read-only directory when running as root, a full disk) are simulated
at the file-system calls; then the follow-up tests check that nothing already written was lost.
"""

import builtins
import errno
import json
import os
from pathlib import Path

import pytest

import decode
from cllm_jax.data import writer
from cllm_jax.data.trajectories import PROGRESS_FILE, SUMMARY_FILE, TRAJECTORIES_FILE
from tests.tiny import save_tiny_chat_model, torch_model

QUESTIONS = [f"What is {a} times {b}?" for a, b in [(2, 3), (4, 5), (6, 7)]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):  # no tokenizer, context 512: decoding from token ids
    path = tmp_path_factory.mktemp("tiny") / "model"
    torch_model("llama", num_key_value_heads=2).save_pretrained(path)
    return path


CHAT_DIR = []  # the chat model's directory, for setups that copy it


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):  # SmolLM2's tokenizer: collection needs one
    path = tmp_path_factory.mktemp("chat") / "model"
    save_tiny_chat_model(path)
    CHAT_DIR[:] = [path]
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "q.jsonl"
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    return path


def read_only(monkeypatch, directory: Path) -> None:
    """Make `directory` read-only; as root (which ignores permissions) refuse writes under it instead."""
    directory.mkdir(parents=True, exist_ok=True)
    for p in [directory, *directory.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    if os.geteuid() != 0:
        return
    inside = lambda p: Path(os.fspath(p)).resolve().is_relative_to(directory.resolve())  # noqa: E731
    denied = lambda p: PermissionError(errno.EACCES, "Permission denied", os.fspath(p))  # noqa: E731
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and inside(file) and any(c in mode for c in "wax+"):
            raise denied(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise denied(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if inside(path):
            raise denied(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)


def disk_full_after(monkeypatch, prompts_written: int) -> None:
    """The disk fills up during the write of prompt number `prompts_written`: half of it lands."""
    real, calls = writer._append, []

    def append(f, payload):
        calls.append(f.name)
        if sum(name.endswith(TRAJECTORIES_FILE) for name in calls) > prompts_written:
            f.write(payload[: len(payload) // 2])
            f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, payload)

    monkeypatch.setattr(writer, "_append", append)


def run_dir_without_export(tmp):
    run = tmp / "run"
    (run / "checkpoints" / "10").mkdir(parents=True)
    (run / "config.yaml").write_text("run_dir: run\n")
    return {"RUN": str(run)}


def escaping_chat_template(tmp):
    """A model whose chat template reaches for Python internals (jinja2's sandbox refuses it)."""
    import shutil

    model = tmp / "escaping"
    shutil.copytree(CHAT_DIR[0], model)
    for path in model.glob("chat_template.jinja"):
        path.write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    return {"ESCAPING": str(model)}


def empty_file(tmp):
    (tmp / "empty.jsonl").write_text("")
    return {"EMPTY": str(tmp / "empty.jsonl")}


COLLECT = ["collect", "--model", "CHAT", "--prompts", "PROMPTS", "--out", "OUT", "--block-size", "4",
           "--max-new-tokens", "8", "--batch-size", "1"]  # fmt: skip


def collect_with(**changes):
    argv = list(COLLECT)
    for flag, value in changes.items():
        argv[argv.index("--" + flag.replace("_", "-")) + 1] = value
    return argv


# (case, argv, setup, message fragment)
CASES = [
    ("temperature<0", ["--temperature", "-1", "--prompt-ids", "1,2"], None, "--temperature must be at least 0, got -1"),
    ("temperature nan", ["--temperature", "nan", "--prompt-ids", "1,2"], None,
     "--temperature must be a finite number, got nan"),
    ("top-p>1", ["--temperature", "1", "--top-p", "2", "--prompt-ids", "1,2"], None, "--top-p must be at most 1, got 2"),
    ("top-p=0", ["--temperature", "1", "--top-p", "0", "--prompt-ids", "1,2"], None, "--top-p must be above 0, got 0"),
    ("top-p under greedy", ["--top-p", "0.9", "--prompt-ids", "1,2"], None,
     "--top-k / --top-p filter sampling, but decoding is greedy: give --temperature above 0"),
    ("max-new=0", ["--max-new-tokens", "0", "--prompt-ids", "1,2"], None, "--max-new-tokens must be at least 1, got 0"),
    ("recycle with ar", ["--method", "ar", "--recycle", "2", "--prompt-ids", "1,2"], None,
     "--recycle does not apply to --method ar"),
    ("blocks with jacobi", ["--method", "jacobi", "--blocks", "3", "--prompt-ids", "1,2"], None,
     "--blocks does not apply to --method jacobi"),
    ("lossless without adapter", ["--method", "jacobi-lossless", "--prompt-ids", "1,2"], None,
     "method jacobi-lossless drafts with an adapter but the model has none"),
    ("missing draft adapter", ["--draft-adapter", "OUT", "--method", "jacobi-rolling", "--prompt-ids", "1,2"], None,
     "cannot read OUT/adapter_config.json"),
    ("cache larger than memory", ["--batch-size", "100000000", "--prompt-ids", "1,2"], None,
     "lower the batch size or the number of new tokens"),
    ("batch=0", ["--batch-size", "0", "--prompt-ids", "1,2"], None, "--batch-size must be at least 1"),
    ("batch<0", ["--batch-size", "-1", "--prompt-ids", "1,2"], None, "--batch-size must be at least 1"),
    ("block>context", ["--method", "jacobi", "--block-size", "600", "--prompt-ids", "1,2"], None,
     "--block-size 600 does not fit the model's context of 512 tokens"),
    ("run without export", ["--model", "RUN", "--prompt-ids", "1,2"], run_dir_without_export,
     "no exported model yet (RUN/export is missing): training has not finished; rerun the same train.py"),
    ("empty --prompts", ["--prompts", "EMPTY"], empty_file, "EMPTY is empty (no prompt lines)"),
    ("chat template escaping the sandbox", ["--model", "ESCAPING", "--prompt", "hi"], escaping_chat_template,
     "the model's chat template tries something unsafe"),
    ("collect batch=0", collect_with(batch_size="0"), None, "--batch-size must be at least 1"),
    ("collect block=0", collect_with(block_size="0"), None, "--block-size must be at least 1"),
    ("collect max-new=0", collect_with(max_new_tokens="0"), None, "--max-new-tokens must be at least 1"),
    ("collect empty prompts", collect_with(prompts="EMPTY"), empty_file, "EMPTY is empty (no prompt lines)"),
    ("collect read-only new --out", collect_with(out="RO/new"), "read-only",
     "cannot write RO/new: Permission denied; make it writable or choose another --out"),
    ("collect full disk", COLLECT, "disk-full",
     "cannot write OUT/trajectories.jsonl: No space left on device; free disk space (or use another --out), "
     "then rerun the same command to resume"),
]


@pytest.mark.parametrize("case, argv, setup, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, argv, setup, message, tiny_dir, chat_dir, prompts, tmp_path, monkeypatch,
                               capsys):  # fmt: skip
    names = {"CHAT": str(chat_dir), "PROMPTS": str(prompts), "OUT": str(tmp_path / "out"), "RO": str(tmp_path / "ro")}
    if callable(setup):
        names |= setup(tmp_path)
    elif setup == "read-only":
        read_only(monkeypatch, tmp_path / "ro")
    elif setup == "disk-full":
        disk_full_after(monkeypatch, prompts_written=1)
    if argv[0] != "collect" and "--model" not in argv:
        argv = ["--model", str(tiny_dir), *argv]
    substitute = lambda text: next((text.replace(k, v) for k, v in names.items() if k in text), text)  # noqa: E731
    status = decode.main([substitute(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if "\r" not in line and line.strip()]  # progress bars aside
    assert status != 0, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert substitute(message) in lines[0], err
    if case == "collect empty prompts":
        assert not (tmp_path / "out").exists()  # nothing created, so nothing marked complete


def test_full_disk_loses_nothing_and_resumes_exactly(chat_dir, prompts, tmp_path, monkeypatch, capsys):
    argv = [a.replace("CHAT", str(chat_dir)).replace("PROMPTS", str(prompts)) for a in COLLECT]
    assert decode.main([a.replace("OUT", str(tmp_path / "whole")) for a in argv]) == 0
    with monkeypatch.context() as m:
        disk_full_after(m, prompts_written=2)
        assert decode.main([a.replace("OUT", str(tmp_path / "full")) for a in argv]) != 0
    written = (tmp_path / "full" / TRAJECTORIES_FILE).read_bytes()
    whole = (tmp_path / "whole" / TRAJECTORIES_FILE).read_bytes()
    assert whole.startswith(written[: len(written) - 1]) and len(written) > 0  # the two prompts + half a third
    assert not json.loads((tmp_path / "full" / SUMMARY_FILE).read_text())["complete"]
    assert decode.main([a.replace("OUT", str(tmp_path / "full")) for a in argv]) == 0  # space freed: resume
    for name in (TRAJECTORIES_FILE, PROGRESS_FILE, SUMMARY_FILE):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_finished_collection_on_a_read_only_directory_writes_nothing(chat_dir, prompts, tmp_path, monkeypatch):
    argv = [a.replace("CHAT", str(chat_dir)).replace("PROMPTS", str(prompts)).replace("OUT", str(tmp_path / "ro"))
            for a in COLLECT]  # fmt: skip
    assert decode.main(argv) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "ro").iterdir()}
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, mode="r", *a, **k: opened.append((str(f), mode)) or
                        real_open(f, mode, *a, **k))  # fmt: skip
    read_only(monkeypatch, tmp_path / "ro")
    assert decode.main(argv) == 0  # nothing left to do: it finishes, and prints the summary
    assert [f for f, mode in opened if "ro" in Path(f).parts and any(c in mode for c in "wax+")] == []
    assert any(f.endswith(TRAJECTORIES_FILE) for f, _ in opened)  # it was read (for the summary), not appended to
    assert {p.name: p.read_bytes() for p in (tmp_path / "ro").iterdir()} == before

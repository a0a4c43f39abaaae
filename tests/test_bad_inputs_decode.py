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
def tiny_dir(tmp_path_factory):  # no tokenizer, context 512, vocabulary 128: decoding from token ids
    path = tmp_path_factory.mktemp("tiny") / "model"
    torch_model("llama", num_key_value_heads=2).save_pretrained(path)
    ADAPTER[:] = [_save_adapter(path, tmp_path_factory.mktemp("adapter") / "adapter")]
    return path


ADAPTER = []  # a PEFT adapter for the tiny model, for setups that damage a copy of it


def _save_adapter(model_dir: Path, path: Path) -> Path:
    from cllm_jax.model.adapter import AdapterConfig, attach
    from cllm_jax.weights.load import load_model
    from cllm_jax.weights.peft import save_adapter

    model = load_model(model_dir).model
    attach(model, AdapterConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj")))
    return save_adapter(model, path, base_model=str(model_dir))


def adapter_copy(tmp, change_config=None, change_tensors=None, cut=False):
    import shutil

    from safetensors.numpy import load_file, save_file

    path = tmp / "adapter"
    shutil.copytree(ADAPTER[0], path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if change_config is not None:
        config_file.write_text(json.dumps(change_config(json.loads(config_file.read_text()))))
    if change_tensors is not None:
        tensors = load_file(weights_file)
        change_tensors(tensors)
        save_file(tensors, weights_file, metadata={"format": "pt"})
    if cut:
        weights_file.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])
    return {"ADAPTER": str(path)}


def without(key):
    return lambda tmp: adapter_copy(tmp, change_config=lambda c: {k: v for k, v in c.items() if k != key})


def config_with(**values):
    return lambda tmp: adapter_copy(tmp, change_config=lambda c: c | values)


V_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


def tensor_holding(value):
    def change(tensors):
        tensors[V_B] = tensors[V_B].copy()
        tensors[V_B][3, 1] = value
    return lambda tmp: adapter_copy(tmp, change_tensors=change)


def full_training_run(tmp):
    (tmp / "full").mkdir()
    (tmp / "full" / "export").symlink_to(TINY[0], target_is_directory=True)
    (tmp / "full" / "config.yaml").write_text("run_dir: full\n")
    return {"FULLRUN": str(tmp / "full")}


TINY = []


def a_directory(tmp):
    (tmp / "prompts").mkdir()
    return {"PDIR": str(tmp / "prompts")}


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
    ("top-k beyond the vocabulary", ["--temperature", "1", "--top-k", "1000", "--prompt-ids", "1,2"], None,
     "--top-k 1000 is more tokens than the model's vocabulary of 128: give at most 128"),
    ("seed beyond 64 bits", ["--seed", str(2**64), "--prompt-ids", "1,2"], None,
     f"--seed must be at most {2**63 - 1}, got {2**64}"),
    ("guess seed beyond 64 bits", ["--method", "jacobi", "--init", "random-vocab", "--guess-seed", str(2**64),
                                   "--prompt-ids", "1,2"], None, f"--guess-seed must be at most {2**63 - 1}, got {2**64}"),
    ("recycling beyond memory", ["--method", "jacobi-rolling", "--recycle", "100000000", "--prompt-ids", "1,2"], None,
     "lower the batch size or the number of new tokens (or --recycle)"),
    ("adapter safetensors cut short", ["--draft-adapter", "ADAPTER", "--prompt-ids", "1,2"],
     lambda tmp: adapter_copy(tmp, cut=True), "cannot read ADAPTER/adapter_model.safetensors"),
    ("adapter config a list", ["--draft-adapter", "ADAPTER", "--prompt-ids", "1,2"],
     lambda tmp: adapter_copy(tmp, change_config=lambda c: [c]),
     "ADAPTER/adapter_config.json holds a list, not an adapter config"),
    ("adapter config without r", ["--draft-adapter", "ADAPTER", "--prompt-ids", "1,2"], without("r"),
     "ADAPTER/adapter_config.json has no 'r'"),
    ("adapter config without lora_alpha", ["--draft-adapter", "ADAPTER", "--prompt-ids", "1,2"], without("lora_alpha"),
     "ADAPTER/adapter_config.json has no 'lora_alpha'"),
    ("adapter rank a string", ["--draft-adapter", "ADAPTER", "--prompt-ids", "1,2"], config_with(r="4"),
     "ADAPTER/adapter_config.json: r must be a positive number (whole), got '4'"),
    ("adapter use_rslora", ["--draft-adapter", "ADAPTER", "--prompt-ids", "1,2"], config_with(use_rslora=True),
     "sets use_rslora=True, which this loader does not support"),
    ("adapter layers_to_transform", ["--draft-adapter", "ADAPTER", "--prompt-ids", "1,2"],
     config_with(layers_to_transform=[0]), "sets layers_to_transform=[0], which this loader does not support"),
    ("adapter tensor NaN", ["--draft-adapter", "ADAPTER", "--prompt-ids", "1,2"], tensor_holding(float("nan")),
     f"ADAPTER/adapter_model.safetensors: tensor {V_B} holds NaN or infinite values"),
    ("adapter tensor inf", ["--draft-adapter", "ADAPTER", "--prompt-ids", "1,2"], tensor_holding(float("-inf")),
     f"ADAPTER/adapter_model.safetensors: tensor {V_B} holds NaN or infinite values"),
    ("draft adapter a full training run", ["--draft-adapter", "FULLRUN", "--prompt-ids", "1,2"], full_training_run,
     "FULLRUN trained the whole model, not an adapter"),
    ("merge the drafter of jacobi-lossless", ["--draft-adapter", "ADAPTER", "--merge-adapter", "--method",
                                              "jacobi-lossless", "--prompt-ids", "1,2"], adapter_copy,
     "method jacobi-lossless drafts with the adapter, which merging would fold into the weights"),
    ("--prompts a directory", ["--prompts", "PDIR"], a_directory, "PDIR is a directory: give a JSONL file"),
    ("demo --limit 0", ["demo", "--limit", "0"], None, "demo --limit must be at least 1, got 0"),
    ("acceptance --drafts 0", ["acceptance", "--draft-adapter", "smollm2-gsm8k", "--drafts", "0", "--prompt-ids",
                               "1,2"], None, "acceptance --drafts must be at least 1, got 0"),
    ("acceptance of a consistency adapter", ["acceptance", "--model", "TINYDIR", "--draft-adapter", "ADAPTER",
                                             "--prompt-ids", "1,2"], adapter_copy,
     "--draft-adapter ADAPTER is not a placeholder drafter (it has no placeholder embeddings)"),
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
    names = {"CHAT": str(chat_dir), "PROMPTS": str(prompts), "OUT": str(tmp_path / "out"), "RO": str(tmp_path / "ro"),
             "TINYDIR": str(tiny_dir)}
    TINY[:] = [tiny_dir]
    if callable(setup):
        names |= setup(tmp_path)
    elif setup == "read-only":
        read_only(monkeypatch, tmp_path / "ro")
    elif setup == "disk-full":
        disk_full_after(monkeypatch, prompts_written=1)
    if argv[0] not in ("collect", "demo", "acceptance") and "--model" not in argv:
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


def test_an_over_long_chat_line_is_its_one_error_line(chat_dir, monkeypatch, capsys):
    """Longer than the tokenizer's nominal maximum (8192), not only the model's context: no warning first."""
    import io
    import logging

    logged = []  # transformers logs to a stream of its own, which the capture may not see: take its records
    handler = logging.Handler(logging.WARNING)
    handler.emit = logged.append
    logging.getLogger("transformers").addHandler(handler)
    monkeypatch.setattr("sys.stdin", io.StringIO("word " * 9000 + "\n"))
    try:
        assert decode.main(["chat", "--model", str(chat_dir), "--method", "ar", "--max-new-tokens", "4"]) == 0
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    lines = capsys.readouterr().err.splitlines()
    assert [r.getMessage() for r in logged] == []
    assert len(lines) == 2 and lines[0].startswith("chatting with"), lines
    assert lines[1].startswith("[error: prompt 0 has 90") and "exceeds the context of 2048" in lines[1], lines


def test_draft_adapter_takes_the_run_that_trained_it(tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "export").symlink_to(ADAPTER[0], target_is_directory=True)
    outputs = []
    for adapter in (ADAPTER[0], run):
        argv = ["--model", str(tiny_dir), "--draft-adapter", str(adapter), "--method", "jacobi-rolling",
                "--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--json"]
        assert decode.main(argv) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0]["method"] == outputs[1]["method"] == "jacobi-lossless"
    assert outputs[0]["token_ids"] == outputs[1]["token_ids"]


def test_running_out_of_memory_is_one_line(tiny_dir, monkeypatch, capsys):
    """XLA's allocation failure (a long prompt's prefill at a large batch) names the settings that shrink it."""
    import jax

    from cllm_jax.decode.engine import Decoder

    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 29395389256 bytes.\nmore")

    monkeypatch.setattr(Decoder, "_run", exhausted)
    status = decode.main(["--model", str(tiny_dir), "--prompt-ids", "1,2"])
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if "\r" not in line and line.strip()]
    assert status == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("error: out of memory (Out of memory allocating 29395389256 bytes.): lower "
                               "--batch-size or --max-new-tokens, or shorten the longest prompts"), err


def test_a_prefill_beyond_memory_is_refused_before_compiling(tiny_dir, monkeypatch, capsys):
    """A prompt whose KV cache fits but whose prefill does not (its attention grows with the prompt squared) is
    one line before XLA is asked; a short prompt at the same free memory decodes."""
    import os

    real = os.sysconf
    # 4 MiB free: the tiny model's cache for a 400-token prompt is 0.5 MiB, its prefill's scores 16 MiB
    monkeypatch.setattr(os, "sysconf", lambda name: 1024 if name == "SC_AVPHYS_PAGES" else real(name))
    assert decode.main(["--model", str(tiny_dir), "--prompt-ids", "5,6,7", "--max-new-tokens", "8"]) == 0
    capsys.readouterr()
    long_prompt = ",".join(str(3 + i % 100) for i in range(400))
    status = decode.main(["--model", str(tiny_dir), "--prompt-ids", long_prompt, "--max-new-tokens", "8"])
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if "\r" not in line and line.strip()]
    assert status == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("error: the KV cache for 1 rows of 1024 positions and the prefill of 512-token prompts "
                               "needs 16.5 MiB but 4.0 MiB are free"), err
    assert lines[0].endswith("lower the batch size, the number of new tokens or the prompts' length"), err

"""decode.py chat driven through its standard input: turns, /method, /reset, end of input, Ctrl-C."""

import io

import pytest

import decode
from cllm_jax.decode.engine import Decoder
from cllm_jax.decode.options import Batching
from cllm_jax.weights.load import load_model
from tests.tiny import decode as tiny_decode, save_tiny_chat_model

MAX_NEW = 20


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "model"
    save_tiny_chat_model(path)
    return path


def whole_answer(loaded, messages, method):
    """The turn decoded in one call, not streamed: what the chat must have shown."""
    tokenizer = loaded.tokenizer
    (result,) = tiny_decode(loaded.model, [tokenizer.chat_ids(messages)], method=method, max_new_tokens=MAX_NEW,
                       block_size=8, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    return tokenizer.decode(result.token_ids)


def test_two_turns_method_switch_reset_and_end_of_input(chat_dir, monkeypatch, capsys):
    questions = ["What is 2 + 2?", "And 3 + 3?", "Hello there"]
    stdin = f"{questions[0]}\n/method ar\n{questions[1]}\n/reset\n{questions[2]}\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    status = decode.main(["chat", "--model", str(chat_dir), "--method", "jacobi", "--block-size", "8",
                          "--max-new-tokens", str(MAX_NEW)])  # fmt: skip
    out, err = capsys.readouterr()
    assert status == 0 and "Traceback" not in err, err

    loaded = load_model(chat_dir)
    first = whole_answer(loaded, [{"role": "user", "content": questions[0]}], "jacobi")
    history = [{"role": "user", "content": questions[0]}, {"role": "assistant", "content": first},
               {"role": "user", "content": questions[1]}]  # fmt: skip
    second = whole_answer(loaded, history, "ar")
    third = whole_answer(loaded, [{"role": "user", "content": questions[2]}], "ar")  # /reset forgot the rest
    assert len({first, second, third}) == 3  # the three prompts really differ
    assert out == f"{first}\n{second}\n{third}\n"

    stats = [line for line in err.splitlines() if "TPF" in line]
    assert [line.split(":")[0] for line in stats] == ["[jacobi", "[ar", "[ar"]
    assert all(f"{MAX_NEW} tokens" in line and "tokens/s]" in line for line in stats), err
    assert "[method: ar]" in err and "[conversation cleared]" in err


def test_streamed_pieces_arrive_per_block(chat_dir):
    from cllm_jax.decode.chat import ChatSession

    loaded = load_model(chat_dir)
    options = Decoder(loaded.model, "jacobi-rolling", max_new_tokens=MAX_NEW, block_size=8,
                      eos_id=loaded.tokenizer.eos_token_id, pad_id=loaded.tokenizer.pad_token_id).options
    pieces = []
    session = ChatSession(loaded, lambda method: (method, loaded.model, options, Batching()), "jacobi-rolling")
    answer, stats = session.reply("Count to ten.", on_text=pieces.append)
    assert len([p for p in pieces if p]) >= 2  # 20 tokens in blocks of 8: shown in three steps, not at the end
    assert "".join(pieces) == answer == whole_answer(loaded, [{"role": "user", "content": "Count to ten."}], "ar")
    assert stats.tokens == MAX_NEW and stats.forward_passes >= 3


class _CtrlC(io.StringIO):
    def readline(self, *args):
        raise KeyboardInterrupt


@pytest.mark.parametrize("stdin", [io.StringIO(""), _CtrlC()], ids=["end of input", "Ctrl-C"])
def test_clean_exit(chat_dir, monkeypatch, capsys, stdin):
    monkeypatch.setattr("sys.stdin", stdin)
    assert decode.main(["chat", "--model", str(chat_dir), "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err


def test_a_bad_line_is_one_error_and_the_conversation_goes_on(chat_dir, monkeypatch, capsys):
    long_line = "word " * 3000  # longer than the model's context of 2048
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9 \xff\n" + long_line.encode() + b"\nWhat is 2 + 2?\n"),
                             encoding="utf-8")
    monkeypatch.setattr("sys.stdin", stdin)
    status = decode.main(["chat", "--model", str(chat_dir), "--method", "ar", "--max-new-tokens", str(MAX_NEW)])
    out, err = capsys.readouterr()
    assert status == 0 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("[error:")]
    assert len(errors) == 2 and "not UTF-8" in errors[0] and "exceeds the context of 2048" in errors[1], err
    loaded = load_model(chat_dir)
    assert out == whole_answer(loaded, [{"role": "user", "content": "What is 2 + 2?"}], "ar") + "\n"

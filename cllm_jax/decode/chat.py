"""A multi-turn chat under the model's chat template, its answers streamed as they are decoded.

The decoding functions are whole jitted generations (one `lax.while_loop` each), which cannot hand
tokens out while they run. So a turn is decoded in chunks: each chunk is one call for at most
`stream_tokens` new tokens, fed the conversation plus everything generated so far, and its tokens
are shown as soon as it returns. Chunking does not change the answer: greedy decoding, and sampling
(its noise is keyed by position), continue a prefix exactly as one long call would.

The default chunk is one block plus one token: a call's prefill gives the first token, one Jacobi
block settles the next n, and the pass that confirms the block predicts token n + 1 for free. So
a chunk costs what one block costs inside a long generation plus the prefill, which the turn's
figures include: the chat's TPF is (n + 1) / (1 + k) for a block settled in k passes, against n / k
in one long call (1.63 instead of 1.70 at k = 9.4, n = 16). AR is unaffected: its TPF stays 1.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from cllm_jax.decode.engine import Decoder
from cllm_jax.decode.options import JacobiOptions
from cllm_jax.decode.registry import METHODS
from cllm_jax.errors import InputError
from cllm_jax.weights.load import LoadedModel


AR_CHUNK = 16  # tokens AR decodes per call before showing them


@dataclasses.dataclass(frozen=True)
class TurnStats:
    tokens: int
    forward_passes: int
    seconds: float  # decoding wall time, compilation excluded
    compile_seconds: float

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(1, self.forward_passes)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class TextStream:
    """Turns a growing list of token ids into text deltas, holding back a half-decoded character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.shown = tokenizer, ""

    def delta(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return ""
        new, self.shown = text[len(self.shown) :], text
        return new


class ChatSession:
    """The conversation so far and how to answer; `reply` decodes one turn (library code: no printing).

    `setup(method)` gives (method name, model, options, batching) for a method name: the command line
    builds them from its flags, so switching methods keeps the flags that apply to the new one. One
    conversation is one prompt: of the batching, only the guesses' seed applies.
    """

    def __init__(self, loaded: LoadedModel, setup: Callable[[str], tuple], method: str, system: str | None = None,
                 stream_tokens: int | None = None):  # fmt: skip
        if loaded.tokenizer is None or not loaded.tokenizer.has_chat_template:
            raise InputError(f"{loaded.path} has no chat template: chat needs an instruction-tuned model")
        self.loaded, self.system, self.setup = loaded, system, setup
        self.stream_tokens = stream_tokens
        self._decoders: dict[tuple[str, int], Decoder] = {}
        self.messages: list[dict] = []
        self.set_method(method)
        self.reset()

    def set_method(self, method: str) -> None:
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
        self.method, self.model, self.options, batching = self.setup(method)
        self.guess_seed = batching.guess_seed

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        return self.loaded.tokenizer.chat_ids(self.messages)

    def _decoder(self, budget: int) -> Decoder:
        key = (self.method, budget)  # one compiled function per (method, chunk size, prompt bucket)
        if key not in self._decoders:
            options = self.options.replace(max_new_tokens=budget)
            self._decoders[key] = Decoder(self.model, self.method, options=options, guess_seed=self.guess_seed)
        return self._decoders[key]

    def reply(self, text: str, on_text: Callable[[str], None] = lambda delta: None) -> tuple[str, TurnStats]:
        """Answer `text`, calling on_text with each new piece of the answer; the turn joins the history."""
        self.messages.append({"role": "user", "content": text})
        prompt, tokenizer = self.prompt_ids(), self.loaded.tokenizer
        block = self.options.block_size if isinstance(self.options, JacobiOptions) else AR_CHUNK
        chunk = self.stream_tokens or block + 1  # (module docstring)
        generated: list[int] = []
        passes, seconds, compile_seconds = 0, 0.0, 0.0
        stream = TextStream(tokenizer)
        try:
            while len(generated) < self.options.max_new_tokens:
                budget = min(chunk, self.options.max_new_tokens - len(generated))
                start = time.perf_counter()
                (result,) = self._decoder(budget).generate([prompt + generated])
                seconds += time.perf_counter() - start - result.compile_seconds
                compile_seconds += result.compile_seconds
                passes += result.forward_passes
                generated += result.token_ids
                on_text(stream.delta(generated))
                if len(result.token_ids) < budget or self.options.eos_id in result.token_ids:
                    break  # EOS
        except BaseException:
            self.messages.pop()  # an interrupted turn leaves no half answer in the history
            raise
        answer = tokenizer.decode(generated)
        on_text(answer[len(stream.shown) :])  # whatever was held back
        self.messages.append({"role": "assistant", "content": answer})
        return answer, TurnStats(len(generated), passes, seconds, compile_seconds)

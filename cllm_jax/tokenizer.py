"""The tokenizer: a thin wrapper around a transformers fast tokenizer.

It is built either from a Hugging Face directory or, fully offline, from the vocabulary that a GGUF
file carries in its metadata. Chat prompts are rendered by transformers' own `apply_chat_template`,
so the ids are exactly the ones transformers would produce.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RawTokenizer
from transformers import PreTrainedTokenizerFast

from cllm_jax.errors import CheckpointError, ConfigError

# llama.cpp token types (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4

# Split patterns of the pre-tokenizers llama.cpp names in `tokenizer.ggml.pre`, applied before the
# byte-level mapping. Byte-level BPE merges are only right if text is split the way it was in training.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(name: str | None):
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's own split regex
    if name in (None, "default", "gpt2"):
        return gpt2
    if name == "smollm":
        # SmolLM's tokenizer.json and llama.cpp both split every digit off before GPT-2's regex.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    split = {"qwen2": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT}.get(name)
    if split is None:
        raise CheckpointError(
            f"GGUF pre-tokenizer {name!r} is not supported (supported: gpt2, smollm, qwen2, llama-bpe): "
            "use a Hugging Face directory with tokenizer.json instead"
        )
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _value(field):
    # Accept both plain values and gguf.ReaderField objects (GGUFReader.fields).
    return field.contents() if hasattr(field, "contents") else field


class Tokenizer:
    """Encode/decode text and render chat prompts; `hf` is the wrapped transformers tokenizer."""

    def __init__(self, hf_tokenizer: PreTrainedTokenizerFast):
        self.hf = hf_tokenizer
        # transformers warns of a text longer than the tokenizer's nominal maximum; the decoder checks the
        # model's real context itself and refuses in one line, which the warning would only precede
        self.hf.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(
                f"no tokenizer.json in {path}: save the tokenizer next to the model (tokenizer.save_pretrained)"
            )
        try:
            hf = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load the tokenizer in {path} ({e}): re-save it with save_pretrained") from e
        return cls(hf)

    @classmethod
    def from_gguf_metadata(cls, fields: Mapping) -> Tokenizer:
        """Build the byte-level BPE tokenizer described by GGUF metadata (`GGUFReader.fields` or plain values)."""
        meta = {key: _value(field) for key, field in fields.items() if key.startswith(("tokenizer.", "general."))}
        context = _value(fields.get(f"{meta.get('general.architecture')}.context_length"))
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise CheckpointError(
                f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2 byte-level BPE): "
                "use a Hugging Face directory with tokenizer.json instead"
            )
        tokens = list(meta["tokenizer.ggml.tokens"])
        merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]
        raw = RawTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        raw.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        raw.decoder = decoders.ByteLevel()

        # Control tokens must be special, or "<|im_start|>" in a prompt is cut into characters.
        token_types = list(meta.get("tokenizer.ggml.token_type", []))
        raw.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types) if k == _CONTROL]
        )
        raw.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, token_types) if k == _USER_DEFINED]
        )

        def token(key: str) -> str | None:
            index = meta.get(f"tokenizer.ggml.{key}")
            return tokens[index] if index is not None and 0 <= index < len(tokens) else None

        hf = PreTrainedTokenizerFast(
            tokenizer_object=raw,
            bos_token=token("bos_token_id"),
            eos_token=token("eos_token_id"),
            unk_token=token("unknown_token_id"),
            pad_token=token("padding_token_id"),
            # Passing these makes transformers build the post-processor that adds BOS/EOS.
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
            clean_up_tokenization_spaces=False,  # byte-level BPE decodes exactly; no space fix-ups
            **({"model_max_length": int(context)} if context else {}),
        )
        return cls(hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with BOS/EOS only where the tokenizer is configured to add them."""
        return self.hf.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def chat_ids(self, prompt: str | list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of a chat prompt (a user message, or a list of {"role", "content"} messages)."""
        if not self.has_chat_template:
            raise ConfigError("the tokenizer has no chat template: encode the prompt as plain text instead")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        import jinja2

        try:
            ids = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                              return_dict=False)
        except jinja2.exceptions.SecurityError as e:  # transformers renders templates in jinja2's sandbox
            raise CheckpointError(f"the model's chat template tries something unsafe ({e}) and was refused: "
                                  f"fix chat_template in its tokenizer files, or pass --no-chat") from None
        except jinja2.exceptions.TemplateError as e:
            raise CheckpointError(f"the model's chat template does not render ({e}): fix chat_template in its "
                                  f"tokenizer files, or pass --no-chat") from None
        return list(ids)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def pad_token_id(self) -> int | None:
        """The pad id, or the EOS id when the tokenizer defines none (padded positions are masked anyway)."""
        return self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.eos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (a model's embedding may have more rows)."""
        return len(self.hf)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and the chat template into `path`."""
        self.hf.save_pretrained(str(path))

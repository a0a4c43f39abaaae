"""Errors shown to the user as one line: what is wrong and how to fix it.

They also derive from ValueError, so callers that only know the standard library can catch them.
"""


class CllmError(Exception):
    """Base class of every error cllm_jax reports to the user."""


class CheckpointError(CllmError, ValueError):
    """A model or tokenizer file or directory is missing, unreadable or unsupported."""


class DataError(CllmError, ValueError):
    """A data set or trajectory file is missing or malformed."""


class ConfigError(CllmError, ValueError):
    """A configuration value or command-line option is invalid."""


class InputError(CllmError, ValueError):
    """Bad decoding input: a prompt longer than the context, token ids outside the vocabulary."""


class CllmWarning(UserWarning):
    """Something the user should know that did not stop the job (the CLI prints it as one line)."""

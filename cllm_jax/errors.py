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


def describe_differences(there: dict, now: dict, limit: int = 3) -> str:
    """`a.b: X there, Y now; ...` for the leaves of two nested dicts that differ (the first `limit`),
    so a refusal to mix two runs names the setting, not a slice of a dictionary."""

    def leaves(value, prefix=""):
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in leaves(item, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): value}

    a, b = leaves(there), leaves(now)
    keys = [k for k in sorted(set(a) | set(b), key=str) if a.get(k, "<absent>") != b.get(k, "<absent>")]
    shown = "; ".join(f"{k}: {a.get(k, '<absent>')!r} there, {b.get(k, '<absent>')!r} now" for k in keys[:limit])
    return shown + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")

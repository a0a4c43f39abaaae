"""What users would otherwise run: transformers' torch generate (greedy, and prompt-lookup decoding)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class TorchGeneration:
    token_ids: list[int]
    seconds: float


def load_torch_model(model_dir: str | Path):
    """transformers' own model class on the same checkpoint directory our loader reads."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()


def torch_generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None,
                   prompt_lookup_num_tokens: int | None = None) -> list[TorchGeneration]:  # fmt: skip
    """Batch-1 greedy generate per prompt, timed one by one (the user-facing default)."""
    import torch

    results = []
    extra = {"prompt_lookup_num_tokens": prompt_lookup_num_tokens} if prompt_lookup_num_tokens else {}
    with torch.inference_mode():
        for ids in prompts:
            inputs = torch.tensor([ids])
            start = time.perf_counter()
            out = model.generate(
                inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=eos_id, pad_token_id=eos_id if eos_id is not None else 0, **extra,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            results.append(TorchGeneration(out[0, len(ids) :].tolist(), seconds))
    return results

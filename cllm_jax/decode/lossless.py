"""Lossless CLLM decoding: a consistency-trained adapter drafts, the base model verifies.

The rolling (K = 1) or multiblock window of cllm_jax/decode/window.py, with the base model as the
verifier and the adapted model as the drafter, both in each single forward pass
(cllm_jax/decode/drafting.py gives the two layouts). Every committed token is the base model's
own choice: the output equals the base model's autoregressive output token for token, under greedy
decoding and under the project's seeded sampling (sampling.py), whatever the adapter drafts. The
adapter decides only how many tokens each pass settles.

The model passed in must carry an adapter (cllm_jax/model/adapter.py): its weights are the base,
its adapter the drafter.
"""

from __future__ import annotations

import dataclasses
import math

from cllm_jax.decode import drafting
from cllm_jax.decode.options import JacobiOptions, option
from cllm_jax.decode.window import Window


@dataclasses.dataclass(frozen=True, kw_only=True)
class LosslessOptions(JacobiOptions):
    layout: str = option("rows", "rows: a base row and an adapter row per prompt; gated: one row, the adapter "
                         "only on the draft copy (needs a gated adapter)", choices=drafting.LOSSLESS_LAYOUTS)
    blocks: int = option(1, "K: blocks in flight at most (1: the rolling window)", at_least=1)
    spawn_ratio: float = option(0.85, "spawn a block behind the newest once ceil(r * n) of it are accepted",
                                above=0.0, at_most=1.0)

    def window(self) -> Window:
        return Window(self.blocks, math.ceil(self.spawn_ratio * self.block_size), 0, self.layout)

    @property
    def lookahead(self) -> int:
        return self.blocks * self.block_size

    def cache_shape(self, batch: int, slots: int) -> tuple[int, int]:
        return drafting.cache_shape(self.layout, batch, slots, self.lookahead)

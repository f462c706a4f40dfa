"""PoolingParams: what an embedding request asks, apart from sampling (nothing is sampled for it).

The prompt's final hidden states (after the last norm) are reduced to one vector as the prompt is
computed, chunk by chunk: the last token's (`"last"`, what decoder embedding models such as
Qwen3-Embedding are trained for) or their mean. The request finishes when its prompt is computed.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import shown
from .sampling_params import SamplingParamsError

POOLING_KINDS = ("last", "mean")


@dataclass(frozen=True)
class PoolingParams:
    pooling: str = "last"  # "last" or "mean"
    normalize: bool = True  # L2-normalise the vector (what cosine similarity expects)

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_KINDS:
            raise SamplingParamsError(f"pooling must be one of {', '.join(POOLING_KINDS)}, got {shown(self.pooling)}", "pooling")
        if not isinstance(self.normalize, bool):
            raise SamplingParamsError(f"normalize must be a boolean, got {shown(self.normalize)}", "normalize")

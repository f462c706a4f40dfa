"""Linear and embedding layers whose weights belong to a linear method.

A method (vLLM's pattern, sized down) owns a layer's weight storage: `create_weights` makes it,
`load` takes one checkpoint tensor (a shard of a fused layer, or the whole weight), `finish`
runs once every shard is in, and `apply` computes x·Wᵀ. Dense float is one method; packed GGML
blocks another. A fused layer (q/k/v, gate/up) declares its shard sizes, and its loader places
each shard — the one path that tensor-parallel sharding can later use too.

Weights start uninitialised (torch.empty): they are always loaded.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from .. import kernels
from ..distributed import RankRows, TensorParallel, span
from ..errors import PagedLLMError
from .dequant import dequantize
from .quant import REPACK_TYPE, PackedWeight, quantize

log = logging.getLogger(__name__)

INT8_MAX_ROWS = 32  # up to this many rows the int8 kernel beats dequantise + GEMM (measured, docs/benchmarks.md)
GEMM_TILE_BYTES = 4 * 2**20  # dequantised weight rows per GEMM call (1 MB tiles were 3-7% slower here)


class WeightLoadError(PagedLLMError, ValueError):
    """Weights that do not fit the model: a missing, unexpected or mis-shaped tensor."""


Weight = torch.Tensor | PackedWeight


class LinearMethod(ABC):
    """How one layer stores and multiplies its weight."""

    gemm_dtype: torch.dtype | None = None  # where products of many rows run in another dtype than x's

    @abstractmethod
    def create_weights(self, layer: "Linear") -> None: ...

    @abstractmethod
    def load(self, layer: "Linear", shard: int, tensor: Weight) -> None: ...

    def finish(self, layer: "Linear") -> None:
        """Called once all shards are loaded."""

    @abstractmethod
    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor: ...

    def activation_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the product reads x in. A caller holding activations only for products (the
        MLP's intermediate) can keep them in it and save a conversion each way."""
        return x.dtype

    @abstractmethod
    def embedding(self, layer: "Linear", ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W, for a layer that is also a token embedding."""

    @abstractmethod
    def weight_bytes(self, layer: "Linear") -> int: ...

    @abstractmethod
    def row_norms(self, layer: "Linear") -> torch.Tensor:
        """‖W_i‖ of every output row, in float32."""


class DenseMethod(LinearMethod):
    """Float weights in the model's dtype; quantised checkpoint tensors are dequantised at load."""

    def create_weights(self, layer: "Linear") -> None:
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features), requires_grad=False)

    def load(self, layer: "Linear", shard: int, tensor: Weight) -> None:
        if isinstance(tensor, PackedWeight):
            tensor = dequantize(tensor.data.numpy(), tensor.qtype, tensor.shape)
        target = layer.weight.data.narrow(0, layer.shard_offset(shard), layer.shard_sizes[shard])
        if len(layer.shard_sizes) == 1 and tensor.dtype == target.dtype and tensor.device == target.device:
            layer.weight.data = tensor  # take the loader's tensor as it is: no second copy of the weights
            return
        with torch.no_grad():
            target.copy_(tensor)

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        # A packed layer before this one may hand over bfloat16 (its GEMM's type; a file can keep a
        # narrow matrix float beside packed ones, as a shared expert of 48 columns).
        return F.linear(x.to(layer.weight.dtype), layer.weight)

    def embedding(self, layer: "Linear", ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)

    def weight_bytes(self, layer: "Linear") -> int:
        return layer.weight.numel() * layer.weight.element_size()

    def row_norms(self, layer: "Linear") -> torch.Tensor:
        return layer.weight.float().norm(dim=1)


@dataclass
class PackedMethod(LinearMethod):
    """GGML blocks multiplied in place by the CPU kernels (pagedllm.kernels).

    Each shard keeps its own type, so q/k/v of different formats still run as one product.
    Float tensors are quantised to `quantize_to`; GGML types without a kernel are repacked to
    Q8_0. Few rows go through the int8 kernel, more through dequantised tiles and torch's GEMM
    in `gemm_dtype` (bfloat16 where the CPU multiplies it natively).
    """

    quantize_to: GGMLQuantizationType = REPACK_TYPE
    gemm_dtype: torch.dtype = torch.float32
    isa: int = 0
    int8_activations: bool = True  # False for the output head (15-bit): int8 rounding there flips near-tied tokens

    def create_weights(self, layer: "Linear") -> None:
        layer.parts: list[PackedWeight | None] = [None] * len(layer.shard_sizes)

    def load(self, layer: "Linear", shard: int, tensor: Weight) -> None:
        if not isinstance(tensor, PackedWeight):
            tensor = quantize(tensor, self.quantize_to)
        elif not tensor.has_kernel:
            tensor = _repack(tensor)
        layer.parts[shard] = tensor

    def finish(self, layer: "Linear") -> None:
        layer.part_data = [p.data for p in layer.parts]
        layer.part_types = [int(p.qtype) for p in layer.parts]

    @staticmethod
    def _through_gemm(x: torch.Tensor) -> bool:
        """Many rows go to the dequantise-and-GEMM path, few to the integer kernels."""
        return x.numel() > INT8_MAX_ROWS * x.shape[-1]

    def activation_dtype(self, x: torch.Tensor) -> torch.dtype:
        return self.gemm_dtype if self._through_gemm(x) else x.dtype

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.pagedllm_quant
        rows = x.reshape(-1, layer.in_features)
        if self._through_gemm(rows):
            # The GEMM writes its own dtype: asked in that dtype, the product comes back unconverted.
            out_dtype = x.dtype if x.dtype == self.gemm_dtype else torch.float32
            out = torch.empty(rows.shape[0], layer.out_features, dtype=out_dtype)
            tile = max(16, GEMM_TILE_BYTES // (layer.in_features * 2))
            ops.matmul_dequant(rows.to(self.gemm_dtype), layer.part_data, layer.part_types, layer.in_features, out,
                               tile, self.isa)
        else:
            out = torch.empty(rows.shape[0], layer.out_features)
            if self.int8_activations:
                xq = ops.quantize_q8(rows.float(), self.isa)
                ops.matmul_q8(xq, layer.part_data, layer.part_types, layer.in_features, out, self.isa)
            else:
                ops.matmul_q15(rows.float(), layer.part_data, layer.part_types, layer.in_features, out, self.isa)
        return out.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)

    def embedding(self, layer: "Linear", ids: torch.Tensor) -> torch.Tensor:
        (part,) = layer.parts  # an embedding table is never fused
        rows = part.data.index_select(0, ids.reshape(-1))
        out = torch.ops.pagedllm_quant.dequantize(rows, int(part.qtype), layer.in_features, torch.float32, self.isa)
        return out.reshape(*ids.shape, layer.in_features)

    def weight_bytes(self, layer: "Linear") -> int:
        return sum(p.data.numel() for p in layer.parts)

    def row_norms(self, layer: "Linear") -> torch.Tensor:
        """Dequantised a tile of rows at a time: a whole head in float would be a second copy of it."""
        norms = []
        for part in layer.parts:
            for rows in part.data.split(max(1, GEMM_TILE_BYTES // (4 * layer.in_features))):
                values = torch.ops.pagedllm_quant.dequantize(rows, int(part.qtype), layer.in_features, torch.float32,
                                                             self.isa)
                norms.append(values.norm(dim=1))
        return torch.cat(norms)


def _repack(weight: PackedWeight) -> PackedWeight:
    return quantize(dequantize(weight.data.numpy(), weight.qtype, weight.shape), REPACK_TYPE)


class Linear(nn.Module):
    """y = x·Wᵀ (+ b). `shard_sizes` splits the output rows of a fused layer into its checkpoint tensors."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 shard_sizes: tuple[int, ...] | None = None, method: LinearMethod | None = None,
                 parallel: str | None = None, tp: TensorParallel | None = None,
                 rank_slices: tuple[RankRows, ...] = ()):
        """`parallel`: "column" or "row" under tensor parallelism `tp`: the sizes given are this rank's,
        `rank_slices` where they sit in the checkpoint's tensors — each shard's rows (column), or the
        input columns (row)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        parallel = parallel if tp is not None and tp.size > 1 else None
        self.parallel, self.tp, self.rank_slices = (parallel, tp, rank_slices) if parallel else (None, None, ())
        self.shard_sizes = shard_sizes or (out_features,)
        self.method = method or DenseMethod()
        self.method.create_weights(self)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.checkpoint_names: tuple[str, ...] = ()  # the checkpoint tensors (less .weight) of each shard
        self.reduce = True  # a row-parallel layer sums the ranks' partial products (False: its caller does)
        self.lora = None  # LoRA adapters' updates of this layer (lora/layers.py: LoRALayer), where any apply

    def shard_offset(self, shard: int) -> int:
        return sum(self.shard_sizes[:shard])

    def load_shard(self, shard: int, tensor: Weight, name: str, leaf: str = "weight") -> None:
        """The per-parameter loader: place checkpoint tensor `name` as shard `shard` of W (or of b)."""
        expected = (self.shard_sizes[shard], self.in_features)[: 2 if leaf == "weight" else 1]
        if self.tp is not None:
            tensor = self._rank_slice(tensor, expected, shard, name, leaf)
        if tuple(tensor.shape) != expected:
            raise WeightLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {expected}")
        if leaf == "weight":
            self.method.load(self, shard, tensor)
            return
        if isinstance(tensor, PackedWeight):
            raise WeightLoadError(f"tensor {name!r}: a quantised bias is not supported")
        if self.bias is None:
            raise WeightLoadError(f"unexpected tensor {name!r}: the model's layer has no bias")
        with torch.no_grad():
            self.bias.data.narrow(0, self.shard_offset(shard), self.shard_sizes[shard]).copy_(tensor)

    def _rank_slice(self, tensor: Weight, expected: tuple[int, ...], shard: int, name: str, leaf: str) -> Weight:
        """This rank's slice of a whole checkpoint tensor: its output rows of a column-parallel layer,
        its input columns of a row-parallel one (a row-parallel bias is whole: added once, after the sum)."""
        dim = 1 if self.parallel == "row" else 0
        if self.parallel == "row" and leaf == "bias":
            return tensor
        rows = self.rank_slices[0 if self.parallel == "row" else shard]
        whole = expected[:dim] + (rows.size,) + expected[dim + 1:]
        if tuple(tensor.shape) != whole:
            raise WeightLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {whole}")
        if isinstance(tensor, PackedWeight):
            return _packed_slice(tensor, dim, rows, name)
        return rows.take(tensor, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.method.apply(self, x)
        if self.lora is not None:
            out = self.lora(x, out)
        if self.parallel == "row":
            if self.reduce:
                out = self.tp.all_reduce(out)  # each rank's partial product over its input columns
            elif self.tp.rank:
                return out  # the caller sums the partial outputs: the bias goes in once, from rank 0
        return out if self.bias is None else out + self.bias


def _packed_slice(tensor: PackedWeight, dim: int, rows: RankRows, name: str) -> PackedWeight:
    """The ranges `rows` of a packed tensor's rows (whole rows of blocks) or of its columns (on blocks)."""
    if dim == 0:
        return PackedWeight(tensor.qtype, rows.take(tensor.data), tensor.cols)
    block, block_bytes = GGML_QUANT_SIZES[tensor.qtype]
    if any(start % block or length % block for start, length in rows.ranges):
        raise WeightLoadError(f"tensor {name!r}: a slice of {rows.count} columns does not fall on its "
                              f"{block}-value blocks")
    def in_bytes(values: int) -> int:
        return values // block * block_bytes

    byte_rows = RankRows(in_bytes(rows.size), tuple((in_bytes(start), in_bytes(length)) for start, length in rows.ranges))
    return PackedWeight(tensor.qtype, byte_rows.take(tensor.data, 1).contiguous(), rows.count)


class Embedding(Linear):
    """A token embedding: rows of W looked up by id. As a tied output head it is also a Linear.
    Under tensor parallelism each rank holds a slice of the vocabulary (its rows from `vocab_start`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, method: LinearMethod | None = None,
                 tp: TensorParallel | None = None):
        first, count = span(num_embeddings, tp)
        super().__init__(embedding_dim, count, method=method, parallel="column", tp=tp,
                         rank_slices=(RankRows.span(first, count, num_embeddings),))
        self.vocab_start = first

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.method.embedding(self, ids)
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.out_features)
        rows = self.method.embedding(self, torch.where(mine, local, 0))
        return self.tp.all_reduce(rows * mine[..., None].to(rows.dtype))  # each id's row comes from its rank


@dataclass(frozen=True)
class LinearPlan:
    """Which method each layer gets, from where its checkpoint tensors are packed.

    packed: canonical names of checkpoint tensors stored as GGML blocks (a layer with any such
    shard runs packed); quantize_to: quantise every float linear weight at load to this type
    (the `int8` / `int4` choices for Hugging Face checkpoints).
    """

    packed: frozenset[str] = frozenset()
    quantize_to: GGMLQuantizationType | None = None
    device: str = "cpu"
    tp: TensorParallel | None = None  # tensor parallelism: this rank's place in the group

    def linear(self, prefix: str, shards: dict[str, int], in_features: int, bias: bool = False,
               keep_float: bool = False, parallel: str | None = None,
               rank_slices: tuple[RankRows, ...] = ()) -> Linear:
        """A layer fusing the checkpoint tensors `prefix.<shard>.weight` (shard name → rows), in order;
        `parallel` ("column" / "row"): split over the plan's tensor-parallel group (Linear's rank_slices)."""
        names = [f"{prefix}.{shard}.weight" for shard in shards]
        layer = Linear(in_features, sum(shards.values()), bias=bias, shard_sizes=tuple(shards.values()),
                       method=self.method_for(names, in_features, keep_float=keep_float), parallel=parallel,
                       tp=self.tp, rank_slices=rank_slices)
        layer.checkpoint_names = tuple(f"{prefix}.{shard}" for shard in shards)
        return layer

    def method_for(self, tensor_names: list[str], in_features: int, output_head: bool = False,
                   keep_float: bool = False) -> LinearMethod:
        """`keep_float`: not quantised at load, only run packed as the checkpoint stores it (routers:
        a rounded router picks other experts, and llama.cpp keeps them float too)."""
        quantize = self.quantize_to is not None and not keep_float
        wants_packed = quantize or any(name in self.packed for name in tensor_names)
        if not wants_packed:
            return DenseMethod()
        return packed_method(self.device, in_features, self.quantize_to or REPACK_TYPE, output_head)


def packed_method(device: str, in_features: int, quantize_to: GGMLQuantizationType,
                  output_head: bool) -> LinearMethod:
    """The method for quantised weights on `device`: the CPU kernels on the CPU, weight-only integer
    groups elsewhere (layers/weight_only.py); float where neither applies."""
    if in_features % 32 == 0 and torch.device(device).type != "cpu":
        from .weight_only import WeightOnlyMethod  # it builds on this module

        return WeightOnlyMethod(quantize_to=quantize_to, device=device)
    if in_features % 32 or not kernels.quant_kernels_available():
        _warn_dense_once(device, in_features)
        return DenseMethod()
    return PackedMethod(quantize_to=quantize_to, gemm_dtype=_gemm_dtype(),
                        isa=kernels.best_isa_id(), int8_activations=not output_head)


_warned: set[tuple[str, int]] = set()


def _warn_dense_once(device: str, in_features: int) -> None:
    if (device, in_features) not in _warned:
        _warned.add((device, in_features))
        log.warning("quantised weights need rows of a multiple of 32 values (and, on the CPU, its kernels) "
                    "(device %s, %d columns): these layers are dequantised to float", device, in_features)


def _gemm_dtype() -> torch.dtype:
    """bfloat16 where the CPU multiplies it natively (AVX-512 BF16, AMX), else float32."""
    return torch.bfloat16 if kernels.cpu_multiplies_bfloat16() else torch.float32

"""vLLM's Llama and Qwen2 with HydraLoRA adapters on their parallel linear layers.

Imported by vLLM (never by hydrabench itself) when a checkpoint's config names one of these
classes. Per token and per target module the update is that of `HydraLoraLinear.forward`:

    y = W x + sum_i (g_i(x) * alpha / r) B_i A_i x,    g = softmax(R x) in float32, or 1/N

or of the layers read in those terms (`AdapterTerms`): molora's `MoLoraLinear` (the softmax's
top k, renormalised) and flylora's `FlyLoraLinear` (r heads of rank 1, g = the 0/1 mask of the
top k of A x + d).

Tensor parallelism: A and the router are replicated and B is sharded like the base layer's
output (column-parallel qkv_proj, gate_up_proj). A row-parallel layer (o_proj, down_proj) sees only
its slice of x's features, so A and the router hold the matching columns, and the partial A·x and
router logits are all-reduced (in float32) before the softmax (or FlyLoRA's top-k); B is then
whole on every rank and the update is added after the base layer's own all-reduce.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce
from vllm.model_executor.layers.linear import (
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.utils import AutoWeightsLoader

from hydrabench.serving.plugin import (
    ADAPTER_DIR,
    TARGETS,
    AdapterTerms,
    PluginError,
    check_adapter_config,
    read_adapter_config,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"


class HydraLoraAdapter(nn.Module):
    """One target module's adapter, this rank's share of it.

    `lora_B` is [out, N*r]: the N heads' B_i side by side (HydraLoraLinear's `b_cat`), its rows
    this rank's rows of the target's output. `router` [N, in] for the softmax gate, `expert_bias`
    [N] (FlyLoRA's d) for the mask gate.
    """

    def __init__(self, terms: AdapterTerms, in_features: int, out_features: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.r, self.num_heads, self.scaling = terms.r, terms.num_heads, terms.scaling
        self.gate, self.top_k = terms.gate, terms.top_k
        a_rows = self.r if terms.shared_a else self.num_heads * self.r

        def frozen(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)

        self.lora_A = frozen(a_rows, in_features)
        self.lora_B = frozen(out_features, self.num_heads * self.r)
        self.router = frozen(self.num_heads, in_features) if self.gate == "softmax" else None
        self.expert_bias = frozen(self.num_heads) if self.gate == "mask" else None

    def head_weights(self, low_rank: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        """The float32 gate g [..., N] from A·x ([..., N or 1, r]) and the router logits, in
        the hf layers' own order of operations."""
        if self.gate == "uniform":
            return low_rank.new_full((*low_rank.shape[:-2], self.num_heads),
                                     1.0 / self.num_heads, dtype=torch.float32)
        if self.gate == "mask":  # FlyLoRA.chosen: top-k of A x + d in A's dtype, weight 1 each
            scores = low_rank.squeeze(-1) + self.expert_bias
            chosen = scores.topk(self.top_k, dim=-1).indices
            return torch.zeros_like(scores, dtype=torch.float32).scatter(-1, chosen, 1.0)
        probs = torch.softmax(logits, dim=-1)
        if self.top_k is None:
            return probs
        top, chosen = probs.topk(self.top_k, dim=-1)  # MoLoraLinear.compute_gate
        return torch.zeros_like(probs).scatter(-1, chosen, top / top.sum(-1, keepdim=True))

    def update(self, low_rank: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        """sum_i (g_i * scaling) B_i (A_i x) from A·x ([..., r] or [..., N*r]) and the float32
        router logits (None: no router)."""
        low_rank = low_rank.unflatten(-1, (-1, self.r))
        weights = (self.head_weights(low_rank, logits) * self.scaling).to(low_rank.dtype)
        return F.linear((weights.unsqueeze(-1) * low_rank).flatten(-2), self.lora_B)


class HydraLoraParallelLinear(nn.Module):
    """A vLLM parallel linear layer plus the HydraLoRA update of each target module it holds,
    each added to its slice of the (possibly fused) output."""

    def __init__(self, base: LinearBase, targets: dict[str, int | None], terms: AdapterTerms,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.base = base
        self.row_parallel = isinstance(base, RowParallelLinear)
        tp_size, tp_rank = base.tp_size, base.tp_rank
        # shards: (local offset, local size, first row in the target's full output) per output
        # shard of this rank; input_columns: (first, count) of x's features this rank sees.
        if self.row_parallel:
            if tp_size > 1 and not (base.input_is_parallel and base.reduce_results):
                raise PluginError(f"{type(base).__name__} without input_is_parallel and "
                                  f"reduce_results is not served by hydrabench's plugin")
            in_features = base.input_size_per_partition
            shards = [(0, base.output_size_per_partition, 0)]
            self.input_columns = (tp_rank * in_features, in_features)
        elif isinstance(base, QKVParallelLinear | MergedColumnParallelLinear):
            if getattr(base, "num_kv_head_replicas", 1) > 1 and {"k_proj", "v_proj"} & set(targets):
                raise PluginError("adapting k_proj or v_proj with fewer key/value heads than "
                                  "tensor-parallel ranks (replicated heads) is not verified")
            in_features = base.input_size_per_partition
            sizes = base.output_partition_sizes
            offsets = [sum(sizes[:k]) for k in range(len(sizes))]
            shards = [(offsets[k], sizes[k], tp_rank * sizes[k]) for k in range(len(sizes))]
            self.input_columns = (0, in_features)
        else:
            raise PluginError(f"hydrabench's plugin does not adapt {type(base).__name__}")
        # Every shard of the output in order: (target or None, local offset, local size).
        self.layout: list[tuple[str | None, int, int]] = []
        self.target_rows: dict[str, tuple[int, int]] = {}
        by_shard = {shard: name for name, shard in targets.items()}
        for k, (offset, size, first_row) in enumerate(shards):
            name = by_shard.get(None if self.row_parallel else k)
            self.layout.append((name, offset, size))
            if name is not None:
                self.target_rows[name] = (first_row, size)
        self.adapters = nn.ModuleDict({
            name: HydraLoraAdapter(terms, in_features, self.target_rows[name][1], dtype)
            for name in targets})
        # A row-parallel layer's A·x and logits are partial sums over the ranks' input slices.
        self.reduce_partials = self.row_parallel and tp_size > 1

    def _low_rank_and_logits(self, adapter: HydraLoraAdapter,
                             x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.reduce_partials:  # HydraLoraLinear.forward's own order of operations
            x = x.to(adapter.lora_A.dtype)
            low_rank = F.linear(x, adapter.lora_A)
            logits = None if adapter.router is None else F.linear(x.float(),
                                                                  adapter.router.float())
            return low_rank, logits
        stacked = adapter.lora_A if adapter.router is None else torch.cat(
            [adapter.lora_A, adapter.router])
        total = tensor_model_parallel_all_reduce(F.linear(x.float(), stacked.float()))
        low_rank = total[..., :adapter.lora_A.shape[0]].to(adapter.lora_A.dtype)
        logits = None if adapter.router is None else total[..., adapter.lora_A.shape[0]:]
        return low_rank, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        output = self.base(x)
        result, bias = output if self.base.return_bias else (output, None)
        pieces = []
        for name, offset, size in self.layout:
            piece = result[..., offset:offset + size]
            if name is not None:
                adapter = self.adapters[name]
                piece = piece + adapter.update(*self._low_rank_and_logits(adapter, x)).to(
                    result.dtype)
            pieces.append(piece)
        result = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
        return (result, bias) if self.base.return_bias else result

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The base layer's checkpoint weights, loaded as vLLM would without the wrapper: by the
        layer's own load_weights (fused layers: it reads each shard's id), else param by param."""
        own = getattr(self.base, "load_weights", None)
        names = own(weights) if own is not None else AutoWeightsLoader(self.base).load_weights(
            weights)
        return {f"base.{name}" for name in names}

    @torch.no_grad()
    def load_adapter(self, name: str, saved: dict[str, torch.Tensor], source: str) -> None:
        """Copy this rank's share of one target's tensors in the plugin's layout (`plugin_layout`:
        lora_A [a_rows, in], lora_B [out, N*r], router [N, in], expert_bias [N])."""
        adapter = self.adapters[name]
        first_row, rows = self.target_rows[name]
        start, columns = self.input_columns
        for key in ("lora_A", "lora_B", "router", "expert_bias"):
            param, tensor = getattr(adapter, key), saved.get(key)
            if (param is None) != (tensor is None):
                raise PluginError(f"{source}.{key}: the adapter config's gate does not match "
                                  f"its tensors")
            if param is None:
                continue
            try:  # d is added after A·x is whole: every rank holds all of it
                tensor = (tensor.narrow(0, first_row, rows) if key == "lora_B" else tensor
                          if key == "expert_bias" else tensor.narrow(1, start, columns))
            except (RuntimeError, IndexError):
                tensor = None
            if tensor is None or tensor.shape != param.shape:
                raise PluginError(f"{source}.{key}: the saved tensor does not fit this model "
                                  f"(its share here is {tuple(param.shape)})")
            param.copy_(tensor)


def plugin_layout(form: str, tensors: dict[str, torch.Tensor],
                  source: str) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(one target's tensors in the plugin's layout, the saved keys read) from an adapter saved in
    `form` (its config's `method`: hydralora, molora or flylora); `source` is the target's HF
    module path."""
    if form == "flylora":  # FlyLoraLinear: A [r, in], B [out, r] (already b_cat), d [r]
        keys = {"lora_A": f"{source}.lora_A", "lora_B": f"{source}.lora_B",
                "expert_bias": f"{source}.expert_bias"}
    else:  # HydraLoraLinear (molora's too): B [N, out, r]
        keys = {"lora_A": f"{source}.lora_A.weight", "lora_B": f"{source}.lora_B",
                "router": f"{source}.router.weight"}
    missing = [key for key in ("lora_A", "lora_B") if keys[key] not in tensors]
    if missing:
        raise PluginError(f"the adapter has no {keys[missing[0]]}")
    saved = {key: tensors[k] for key, k in keys.items() if k in tensors}
    if form != "flylora":
        lora_b = saved["lora_B"]
        if lora_b.dim() != 3:
            raise PluginError(f"{source}.lora_B: expected [heads, out, r], got "
                              f"{tuple(lora_b.shape)}")
        heads, out_full, r = lora_b.shape
        saved["lora_B"] = lora_b.permute(1, 0, 2).reshape(out_full, heads * r)
    return saved, {keys[key] for key in saved}


class HydraLoraMixin:
    """Wraps the model's target layers after vLLM built it; loads the adapter after the base
    weights. The adapter is read from `<model dir>/hydralora/` as its method saved it."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        if vllm_config.parallel_config.pipeline_parallel_size != 1:
            raise PluginError("hydrabench's vLLM plugin does not support pipeline parallelism")
        self.adapter_dir = Path(vllm_config.model_config.model) / ADAPTER_DIR
        config = read_adapter_config(Path(vllm_config.model_config.model))
        terms = check_adapter_config(config, get_tensor_model_parallel_world_size())
        self.adapter_format = config["method"]
        fused: dict[str, dict[str, int | None]] = {}
        for target in terms.target_modules:
            layer, shard = TARGETS[target]
            fused.setdefault(layer, {})[target] = shard
        for path, module in list(self.named_modules()):
            parent, _, child = path.rpartition(".")
            if child in fused and isinstance(module, LinearBase):
                setattr(self.get_submodule(parent), child, HydraLoraParallelLinear(
                    module, fused[child], terms, vllm_config.model_config.dtype))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        path = self.adapter_dir / ADAPTER_WEIGHTS
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as err:
            raise PluginError(f"cannot read the adapter {path}: {err}") from None
        used = set()
        for layer_path, layer in self.named_modules():
            if not isinstance(layer, HydraLoraParallelLinear):
                continue
            parent = layer_path.rpartition(".")[0]
            for name in layer.adapters:
                source = f"{parent}.{name}"  # the HF module path the adapter was saved under
                try:
                    saved, keys = plugin_layout(self.adapter_format, tensors, source)
                except PluginError as err:
                    raise PluginError(f"{path}: {err}") from None
                layer.load_adapter(name, saved, source)
                used |= keys
                loaded |= {f"{layer_path}.adapters.{name}.{p}"
                           for p, _ in layer.adapters[name].named_parameters()}
        unexpected = sorted(set(tensors) - used)
        if unexpected:
            raise PluginError(f"{path} holds tensors this model has no place for: "
                              f"{', '.join(unexpected[:3])}")
        return loaded


class HydraLoraLlamaForCausalLM(HydraLoraMixin, LlamaForCausalLM):
    pass


class HydraLoraQwen2ForCausalLM(HydraLoraMixin, Qwen2ForCausalLM):
    pass

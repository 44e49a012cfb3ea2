"""`flylora`: FlyLoRA (Zou et al., NeurIPS 2025; code: gfyddha/FlyLoRA), LoRA with an
implicit rank-wise mixture of experts after the fly olfactory circuit. For an adapted linear
layer with frozen weight W (in -> out)::

    y = A dropout(x)                     A: r x in, frozen, sparse random
    S(x) = the k largest coordinates of y + d
    out = W x + (alpha / r) * B (y ⊙ 1[S(x)])    only B (out x r, zero at start) trains

- A: each row holds p = max(1, int(in · sparsity)) non-zero entries at random columns, drawn
  N(0, 1/r^2) (its `sparse` init); sparsity (`--sparsity`, in (0, 1]) defaults to k / r, what its
  peft fork computes (p = in // (r // k)).
- d (r) balances the load without a loss, as its code: after each training forward,
  d_i <- d_i + u · sign(mean(c) - c_i), c_i = how many tokens chose coordinate i, u = 0.01 (its
  `bias_u`). d is not trained by the optimizer; it is saved with B.
- Defaults (its paper's main setting and flylora.py's): r = 32, k = 8 (`--top-k`); and alpha =
  64 (2r at that r; `--alpha` sets another, `--rank` alone keeps 64), so that B's update is
  scaled by alpha / r = 2, as LoRA r=8's on the tiny profile (16 / 8). The profile's alpha
  (16 on tiny, set for its r = 8) left the scaling at 0.5 once r = 32: with A frozen and A x
  small, B's Adam-sized steps then moved the output a quarter as much, and on tiny FlyLoRA
  scored near the untrained base on `general` (seed 0: base 14.0, flylora 16.3 at alpha 16 and
  25.0 at alpha 64, LoRA r=8 37.0). On tiny A x is smaller still than on the paper's models:
  A's entries are N(0, 1/r^2) whatever the width, so |A x| grows with sqrt(in · sparsity), and
  in = 128 here.

Taken from its peft fork (peft/src/peft/tuners/lora/layer.py, what finetune.py trains): the
top-k is of y + d, signed, and only y (not d) reaches B; its standalone flylora.py takes |y + d|
instead. Departures: d moves in training forwards only (the fork also moves it while evaluating,
which would make scores depend on the order of the evaluated documents), and gradients flow
through A to x (the fork computes A x under no_grad, which stops the adapter's gradient to the
layers below; flylora.py does not). Padding tokens are counted in c, as in the code.

%Param: the total is what trains, B (out · r per layer); the activated parameters, what one
token's forward uses of it, are B's k chosen columns (out · k), the record's
`percent_param_active`. The frozen sparse A (r · in · sparsity non-zero entries per layer, k · in
at the default sparsity) is counted in neither: it is not trained (it is saved, as it is random).

Merge status: none (the top-k mask depends on every token). Served unmerged by hydrabench's vLLM
plugin, which reads this adapter as r heads of rank 1 (A's rows, B's columns) gated by the 0/1
top-k mask of A x + d, exactly as hf.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from hydrabench.atomic import write_bytes_atomic
from hydrabench.config.spec import RunSpec
from hydrabench.data.records import InstructionRecord
from hydrabench.errors import SpecError
from hydrabench.methods.api import Method
from hydrabench.methods.hydralora_layer import bases_in_place

RANK, TOP_K = 32, 8  # the paper's main setting, flylora.py's defaults
ALPHA = 2 * RANK  # alpha / r = 2, as LoRA r=8 with the tiny profile's alpha 16
BIAS_U = 0.01  # the code's bias_u
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


@dataclass(frozen=True)
class FlyLoraConfig:
    r: int
    k: int
    alpha: float
    dropout: float
    sparsity: float  # share of non-zero entries per row of A
    target_modules: tuple[str, ...]
    bias_u: float = BIAS_U


class FlyLoraLinear(nn.Module):
    """A frozen `nn.Linear` plus FlyLoRA's update: frozen sparse A, top-k of A x + d, trained B."""

    def __init__(self, base: nn.Linear, config: FlyLoraConfig) -> None:
        super().__init__()
        if not 1 <= config.k <= config.r:
            raise ValueError(f"k must be in [1, r={config.r}], got {config.k}")
        self.base = base.requires_grad_(False)
        self.r, self.k, self.bias_u = config.r, config.k, config.bias_u
        self.scaling = config.alpha / config.r
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        nonzero = max(1, int(base.in_features * config.sparsity))
        a = torch.zeros(config.r, base.in_features, **factory)
        for row in range(config.r):
            columns = torch.randperm(base.in_features, device=a.device)[:nonzero]
            a[row, columns] = torch.randn(nonzero, **factory) / config.r
        self.register_buffer("lora_A", a)  # a buffer: frozen, and not an adapter parameter
        self.register_buffer("expert_bias", torch.zeros(config.r, **factory))  # d
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.r, **factory))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def chosen(self, y: torch.Tensor) -> torch.Tensor:
        """The top-k coordinates of y + d per token, as a 0/1 mask shaped as y."""
        selected = (y + self.expert_bias).topk(self.k, dim=-1).indices
        return torch.zeros_like(y).scatter(-1, selected, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        y = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        mask = self.chosen(y.detach())
        if self.training:
            self._balance(mask)
        return result + (F.linear(y * mask, self.lora_B) * self.scaling).to(result.dtype)

    @torch.no_grad()
    def _balance(self, mask: torch.Tensor) -> None:
        counts = mask.reshape(-1, self.r).sum(dim=0)
        self.expert_bias.add_(self.bias_u * torch.sign(counts.mean() - counts))

    def extra_repr(self) -> str:
        return f"r={self.r}, k={self.k}, scaling={self.scaling}"


def flylora_layers(model: nn.Module) -> dict[str, FlyLoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FlyLoraLinear)}


def base_layers_in_place(model: nn.Module) -> AbstractContextManager[None]:
    """Inside the block every FlyLoRA layer is its frozen base linear again (the plugin's export
    saves the base checkpoint so)."""
    return bases_in_place(model, flylora_layers(model))


def apply_flylora(model: nn.Module, config: FlyLoraConfig) -> nn.Module:
    """Wrap every `nn.Linear` named in `config.target_modules` and freeze the rest."""
    targets = [n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.rpartition(".")[2] in config.target_modules]
    model.requires_grad_(False)
    for path in targets:
        base = model.get_submodule(path)
        layer = FlyLoraLinear(base, config)
        layer.train(base.training)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    model.flylora_config = config
    return model


def spec_config(spec: RunSpec) -> FlyLoraConfig:
    adapter = spec.adapter
    k = adapter.top_k if adapter.top_k is not None else TOP_K
    return FlyLoraConfig(r=adapter.rank, k=k, alpha=adapter.alpha, dropout=adapter.dropout,
                         sparsity=adapter.sparsity if adapter.sparsity is not None
                         else k / adapter.rank,
                         target_modules=tuple(adapter.target_modules))


def _check(spec: RunSpec, records: Sequence[InstructionRecord]) -> None:
    k = spec.adapter.top_k if spec.adapter.top_k is not None else TOP_K
    if k > spec.adapter.rank:
        raise SpecError(f"flylora: top_k ({k}) must be at most the rank ({spec.adapter.rank})")


def _adapt(model: nn.Module, spec: RunSpec, records: Sequence[InstructionRecord]) -> nn.Module:
    return apply_flylora(model, spec_config(spec))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{path}.{name}": tensor for path, layer in flylora_layers(model).items()
            for name, tensor in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B),
                                 ("expert_bias", layer.expert_bias))}


def save_flylora(model: nn.Module, directory: Path) -> None:
    """A (it is random), B and d as safetensors; the config as JSON."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in _state(model).items()}
    write_bytes_atomic(out / WEIGHTS_NAME, safetensors_bytes(tensors))
    config = {"method": "flylora", **asdict(model.flylora_config)}
    write_bytes_atomic(out / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())


def load_flylora(model: nn.Module, directory: Path) -> nn.Module:
    meta = json.loads((Path(directory) / CONFIG_NAME).read_text())
    meta.pop("method")
    meta["target_modules"] = tuple(meta["target_modules"])
    apply_flylora(model, FlyLoraConfig(**meta))
    tensors = load_file(str(Path(directory) / WEIGHTS_NAME))
    state = _state(model)
    if set(tensors) != set(state):
        raise ValueError(f"{directory}: FlyLoRA tensors do not match the model's adapted layers")
    with torch.no_grad():
        for key, tensor in state.items():
            tensor.copy_(tensors[key])
    return model


def active_parameters(model: nn.Module) -> int:
    """B's entries one token uses: its k chosen columns in every layer."""
    return sum(layer.lora_B.shape[0] * layer.k for layer in flylora_layers(model).values())


METHOD = Method(
    name="flylora", description="FlyLoRA: frozen sparse random A, top-k of A x (+ balancing "
    "bias) per token, only B trains", adapt=_adapt, save=save_flylora, load=load_flylora,
    merge=None, check=_check, active_parameters=active_parameters,
    base_layers_in_place=base_layers_in_place,
    adapter_defaults={"rank": RANK, "top_k": TOP_K, "alpha": ALPHA})

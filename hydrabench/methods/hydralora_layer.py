"""HydraLoRA's layer library (arXiv 2404.19245): one shared LoRA ``A``, ``N`` ``B`` heads, a
per-token router. The registry entries on it are in hydrabench/methods/hydralora.py.

For an adapted linear layer with frozen weight ``W`` (in -> out)::

    y = W x + (alpha / r) * sum_i g_i(x) * B_i A dropout(x),    g(x) = softmax(R x)

With ``shared_a=False`` every head has its own ``A_i`` (``sum_i g_i B_i A_i x``): a dense
mixture of whole LoRA experts, LoRAMoE's structure and the paper's "without shared A" ablation.

Routing is dense (every head contributes, no top-k) and computed per token, with the router
logits and softmax in float32. As in the reference code, ``A`` and ``R`` use the ``nn.Linear``
default Kaiming-uniform init and every ``B_i`` starts at zero, so the adapted model is exactly
the base model at initialisation.

Dropout differs from the reference code on purpose: here one mask on ``x`` serves every head
(``A x`` is computed once); the reference calls ``lora_dropout(x)`` once per head, a separate
mask per head, which needs N masked copies of ``x`` through ``A``. benchmarks/bench_layer.py
(variant ``hydralora per-head dropout``; --quick, 1 thread, busy 2-core CPU) measured that at
2.1x this layer's forward+backward at the tiny model's 128->128 shape (1024 tokens; 2.7x of what
the adapter adds) and 1.05x, within noise, at LLaMA-2-7B's 4096->4096 (256 tokens): a measurable
cost, so one mask stays. Both have the same expectation and differ only in training noise;
evaluation has no dropout. ``head_dropout=True`` (R-LoRA's multi-head dropout) instead drops
``A x`` with an independent mask per head, ``B_i dropout_i(A x)``, as R-LoRA's code does.

Serving: because ``g`` depends on each token, HydraLoRA cannot be merged exactly into ``W``.
:func:`merge_hydralora` offers two approximations, a uniform gate (``1/N``) and the mean router
gate over a calibration set (:func:`mean_router_gates`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from hydrabench.atomic import write_bytes_atomic

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
GATES = ("softmax", "uniform")
# Fields written to adapter_config.json; balance_loss_coef is a training-only knob.
_SAVED_FIELDS = ("r", "num_heads", "alpha", "dropout", "target_modules", "gate", "shared_a",
                 "base_model_id")


class HydraLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a HydraLoRA update (shared ``A``, ``N`` ``B`` heads, router).

    ``gate="uniform"`` is the paper's Fig. 6 "without gate" ablation: every head gets weight
    ``1/N``. In that case no router is created (``self.router is None``) so the ablation has no
    dead parameters and :func:`router_parameters` counts none.

    Set ``record_gates = True`` (or use :func:`recording_gates`) to keep the float32 gate of
    the last forward in ``last_gate`` (shape ``[..., N]``, not detached so a balancing loss can
    backpropagate into the router); it is off by default to avoid holding extra activations.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        num_heads: int,
        alpha: float,
        dropout: float = 0.0,
        gate: str = "softmax",
        shared_a: bool = True,
        head_dropout: bool = False,
    ) -> None:
        super().__init__()
        if r < 1 or num_heads < 1:
            raise ValueError(f"r and num_heads must be >= 1, got r={r}, num_heads={num_heads}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        self.base = base
        self.base.requires_grad_(False)
        self.r = r
        self.num_heads = num_heads
        self.scaling = alpha / r
        self.gate = gate
        self.shared_a = shared_a
        self.head_dropout = head_dropout
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        # A is created before the router so its init does not depend on the gate type. Without
        # sharing, the N heads' A_i are stacked as one [N*r, in] matrix: still one GEMM.
        a_rows = r if shared_a else num_heads * r
        self.lora_A = nn.Linear(base.in_features, a_rows, bias=False, **factory)
        self.lora_B = nn.Parameter(torch.zeros(num_heads, base.out_features, r, **factory))
        self.router = (
            nn.Linear(base.in_features, num_heads, bias=False, **factory)
            if gate == "softmax"
            else None
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.record_gates = False
        self.last_gate: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def compute_gate(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token head weights ``g(x)``, shape ``[..., N]``, in float32."""
        if self.router is None:
            return torch.full(
                (*x.shape[:-1], self.num_heads),
                1.0 / self.num_heads,
                dtype=torch.float32,
                device=x.device,
            )
        # float32 logits/softmax as in the reference code: keeps the gate precise under bf16.
        logits = F.linear(x.float(), self.router.weight.float())
        return torch.softmax(logits, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        x = x.to(self.lora_A.weight.dtype)
        # one GEMM for A: [..., r] or [..., N*r]
        low_rank = self.lora_A(x if self.head_dropout else self.dropout(x))
        # [..., 1, r] (shared A, broadcast to every head) or [..., N, r] (one A per head)
        low_rank = low_rank.unflatten(-1, (-1, self.r))
        if self.head_dropout:  # an independent mask per head, on A x
            low_rank = self.dropout(low_rank.expand(*low_rank.shape[:-2], self.num_heads, self.r))
        gate = self.compute_gate(x)
        if self.record_gates:
            self.last_gate = gate
        # Fold the scaling into the small [..., N] gate, then weight the low-rank activations
        # per head ([..., N*r]) and contract with all heads in a single matmul. This beats a
        # 3-operand einsum (which materialises [..., N, out]); measured ~4x faster on CPU.
        weights = (gate * self.scaling).to(low_rank.dtype)
        mixed = (weights.unsqueeze(-1) * low_rank).flatten(-2)
        b_cat = self.lora_B.permute(1, 0, 2).reshape(self.out_features, -1)  # [out, N*r]
        return result + F.linear(mixed, b_cat).to(result.dtype)

    def delta_weight(self, gate: torch.Tensor) -> torch.Tensor:
        """Dense ``[out, in]`` update ``scaling * sum_i g_i B_i A_i`` for a fixed gate ``g``."""
        return self._delta_weight_f32(gate).to(self.base.weight.dtype)

    def _delta_weight_f32(self, gate: torch.Tensor) -> torch.Tensor:
        # float32 so that merging into a bf16 base weight rounds only once.
        if gate.shape != (self.num_heads,):
            raise ValueError(f"gate must have shape ({self.num_heads},), got {tuple(gate.shape)}")
        gate = gate.float().to(self.lora_B.device)
        a = self.lora_A.weight.float()
        if self.shared_a:
            return self.scaling * (torch.einsum("h,hor->or", gate, self.lora_B.float()) @ a)
        a_heads = a.unflatten(0, (self.num_heads, self.r))  # [N, r, in]
        return self.scaling * torch.einsum("h,hor,hri->oi", gate, self.lora_B.float(), a_heads)

    def extra_repr(self) -> str:
        return (f"r={self.r}, num_heads={self.num_heads}, scaling={self.scaling}, "
                f"gate={self.gate}, shared_a={self.shared_a}")


@dataclass
class HydraLoraConfig:
    """Hyper-parameters of a HydraLoRA adapter (defaults follow the reference code)."""

    r: int = 8
    num_heads: int = 4
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    gate: str = "softmax"
    shared_a: bool = True  # False: one A per head (LoRAMoE's experts)
    head_dropout: bool = False  # R-LoRA's dropout mask per head; training-only, like the next
    # The reference code defines a load-balancing loss but never applies it, hence 0.
    balance_loss_coef: float = 0.0
    base_model_id: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            raise TypeError("target_modules must be a sequence of names, not a single string")
        self.target_modules = tuple(self.target_modules)
        problems = []
        if self.r < 1:
            problems.append(f"r must be >= 1 (got {self.r})")
        if self.num_heads < 1:
            problems.append(f"num_heads must be >= 1 (got {self.num_heads})")
        if not self.alpha > 0:
            problems.append(f"alpha must be > 0 (got {self.alpha})")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.gate not in GATES:
            problems.append(f"gate must be one of {GATES} (got {self.gate!r})")
        if not self.target_modules:
            problems.append("target_modules must not be empty")
        if self.balance_loss_coef < 0:
            problems.append(f"balance_loss_coef must be >= 0 (got {self.balance_loss_coef})")
        if problems:
            raise ValueError("invalid HydraLoraConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of all fields."""
        out = asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HydraLoraConfig:
        """Build from a dict such as adapter_config.json (its ``method`` key is ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"method"})
        if unknown:
            raise ValueError(f"unknown HydraLoraConfig keys: {unknown}")
        return cls(**{k: v for k, v in data.items() if k in known})


def hydralora_layers(model: nn.Module) -> dict[str, HydraLoraLinear]:
    """All HydraLoRA layers of ``model`` keyed by module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, HydraLoraLinear)}


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path), child, new)


def apply_hydralora(model: nn.Module, config: HydraLoraConfig) -> nn.Module:
    """Wrap every ``nn.Linear`` named in ``config.target_modules`` (in place) and freeze the rest.

    Afterwards only ``lora_A``, ``lora_B`` and (for ``gate="softmax"``) ``router`` are
    trainable. The config is kept on ``model.hydralora_config`` for :func:`save_hydralora`.
    """
    if hydralora_layers(model):
        raise ValueError("model already has HydraLoRA layers; apply_hydralora on a fresh model")
    linear_paths = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    targets = [p for p in linear_paths if p.rpartition(".")[2] in config.target_modules]
    missing = sorted(set(config.target_modules) - {p.rpartition(".")[2] for p in targets})
    if missing:
        available = sorted({p.rpartition(".")[2] for p in linear_paths})
        raise ValueError(
            f"target module(s) {missing} match no nn.Linear in the model; "
            f"available linear layer names: {available}"
        )
    model.requires_grad_(False)
    for path in targets:
        base = model.get_submodule(path)
        layer = HydraLoraLinear(base, config.r, config.num_heads, config.alpha, config.dropout,
                                config.gate, config.shared_a, config.head_dropout)
        # New modules start in train mode; inherit the wrapped layer's mode so an eval model
        # does not silently get active adapter dropout.
        layer.train(base.training)
        _replace_module(model, path, layer)
    model.hydralora_config = config
    return model


def router_parameters(model: nn.Module) -> int:
    """The routers' parameters (the rest of what HydraLoRA adds is the adapter: A and B)."""
    return sum(layer.router.weight.numel() for layer in hydralora_layers(model).values()
               if layer.router is not None)


@contextmanager
def bases_in_place(model: nn.Module, layers: Mapping[str, nn.Module]) -> Iterator[None]:
    """Inside the block each of ``layers`` (module path -> a layer wrapping its frozen linear
    as ``.base``) is that base linear again, so ``save_pretrained`` writes the base checkpoint
    itself; the layers come back afterwards."""
    layers = dict(layers)
    for path, layer in layers.items():
        _replace_module(model, path, layer.base)
    try:
        yield
    finally:
        for path, layer in layers.items():
            _replace_module(model, path, layer)


def base_layers_in_place(model: nn.Module) -> AbstractContextManager[None]:
    """:func:`bases_in_place` of every HydraLoRA layer."""
    return bases_in_place(model, hydralora_layers(model))


# --------------------------------------------------------------------------- gate recording


@contextmanager
def recording_gates(model: nn.Module) -> Iterator[dict[str, HydraLoraLinear]]:
    """Make every HydraLoRA layer keep its last gate inside the ``with`` block.

    Recorded gates are dropped on exit so they do not pin activation memory.
    """
    layers = hydralora_layers(model)
    for layer in layers.values():
        layer.record_gates = True
    try:
        yield layers
    finally:
        for layer in layers.values():
            layer.record_gates = False
            layer.last_gate = None


def _flat_tokens(gate: torch.Tensor, mask: torch.Tensor | None, path: str) -> torch.Tensor:
    """Gate rows ``[tokens, N]``, keeping only tokens where ``mask`` is non-zero."""
    if mask is None:
        return gate.reshape(-1, gate.shape[-1])
    if gate.shape[:-1] != mask.shape:
        raise ValueError(
            f"{path}: gate shape {tuple(gate.shape)} does not match mask {tuple(mask.shape)}"
        )
    return gate[mask.to(device=gate.device, dtype=torch.bool)]


def load_balancing_loss(
    model: nn.Module, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Shazeer et al. (2017) importance loss: CV^2 of the per-head mean gate, mean over layers.

    Uses the gates recorded in the last forward, so run that forward inside
    :func:`recording_gates` (or with ``record_gates = True``); raises ``RuntimeError``
    otherwise. With ``attention_mask`` (``[batch, seq]``) padding tokens are excluded.
    Multiply by ``HydraLoraConfig.balance_loss_coef`` before adding it to the task loss.
    """
    losses = []
    for path, layer in hydralora_layers(model).items():
        if layer.last_gate is None:
            continue
        importance = _flat_tokens(layer.last_gate, attention_mask, path).mean(dim=0)
        # Population variance (correction=0): a perfectly balanced gate gives exactly 0.
        cv2 = importance.var(correction=0) / importance.mean().square()
        losses.append(cv2)
    if not losses:
        raise RuntimeError(
            "no recorded gates: run the forward pass inside recording_gates(model) first"
        )
    return torch.stack(losses).mean()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (the first one's; CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def mean_router_gates(
    model: nn.Module, input_ids_batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Mean float32 gate over all non-padding tokens, per HydraLoRA layer (for router-mean merge).

    Each batch is either an ``input_ids`` tensor or a mapping with ``input_ids`` and an
    optional ``attention_mask`` (e.g. a tokenizer output); masked tokens are excluded.
    The model runs in eval mode (restored afterwards) so dropout does not perturb the gates.
    Batches move to the model's device (its parameters'): tokenizers give CPU tensors, and a
    CUDA model fed them would fail, or run elsewhere than the model.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    try:
        with recording_gates(model) as layers:
            for batch in input_ids_batches:
                if isinstance(batch, torch.Tensor):
                    batch = {"input_ids": batch}
                batch = {name: value.to(device) if isinstance(value, torch.Tensor) else value
                         for name, value in batch.items()}
                mask = batch.get("attention_mask")
                model(**batch)
                for path, layer in layers.items():
                    rows = _flat_tokens(layer.last_gate, mask, path)
                    sums[path] = sums.get(path, 0) + rows.sum(dim=0)
                    counts[path] = counts.get(path, 0) + rows.shape[0]
    finally:
        model.train(was_training)
    if not counts or min(counts.values()) == 0:
        raise ValueError("mean_router_gates needs at least one non-padding token")
    return {path: sums[path] / counts[path] for path in sums}


# --------------------------------------------------------------------------- merging


@torch.no_grad()
def merge_hydralora(model: nn.Module, gate: str | Mapping[str, torch.Tensor]) -> nn.Module:
    """Replace each HydraLoRA layer by an ``nn.Linear`` with weight ``W + delta_weight(g)``.

    ``gate="uniform"`` uses ``g = 1/N``; a mapping (module path -> gate vector, e.g. from
    :func:`mean_router_gates`) gives the router-mean merge. Both are approximations unless
    the router is actually constant, since the true gate varies per token.
    """
    if isinstance(gate, str) and gate != "uniform":
        raise ValueError(f"gate must be 'uniform' or a dict of per-layer gates, got {gate!r}")
    layers = hydralora_layers(model)
    if not isinstance(gate, str):
        missing = sorted(set(layers) - set(gate))
        if missing:
            raise ValueError(f"no gate given for HydraLoRA layer(s): {missing}")
    for path, layer in layers.items():
        if isinstance(gate, str):
            g = torch.full((layer.num_heads,), 1.0 / layer.num_heads)
        else:
            g = gate[path]
        base = layer.base
        merged = nn.Linear(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        merged.weight.copy_(base.weight.float() + layer._delta_weight_f32(g))
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        merged.requires_grad_(False)
        _replace_module(model, path, merged)
    if hasattr(model, "hydralora_config"):
        del model.hydralora_config
    return model


# --------------------------------------------------------------------------- save / load


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter and router parameters keyed by full module path (base weights excluded)."""
    return {
        f"{path}.{name}": param
        for path, layer in hydralora_layers(model).items()
        for name, param in layer.named_parameters()
        if not name.startswith("base.")
    }


def save_hydralora(model: nn.Module, directory: str | os.PathLike[str],
                   extra: Mapping[str, Any] | None = None) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` to ``directory``.

    ``extra`` adds to (or overrides, e.g. ``method``) the config: a format built on this layer
    (molora's top_k), read back by its own loader with :func:`load_hydralora_tensors`.
    """
    config = getattr(model, "hydralora_config", None)
    if config is None:
        raise ValueError("model has no hydralora_config; was apply_hydralora called on it?")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in _adapter_state(model).items()}
    write_bytes_atomic(out / ADAPTER_WEIGHTS_NAME, safetensors_bytes(tensors))
    full = config.to_dict()
    meta = {"method": "hydralora", **{k: full[k] for k in _SAVED_FIELDS}, **(extra or {})}
    write_bytes_atomic(out / ADAPTER_CONFIG_NAME, (json.dumps(meta, indent=2) + "\n").encode())


def load_hydralora(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Apply the saved HydraLoRA config to a fresh base ``model`` and load its tensors strictly."""
    src = Path(directory)
    meta = json.loads((src / ADAPTER_CONFIG_NAME).read_text())
    if meta.get("method") != "hydralora":
        raise ValueError(f"{src / ADAPTER_CONFIG_NAME} is not a HydraLoRA adapter: {meta!r}")
    return load_hydralora_tensors(apply_hydralora(model, HydraLoraConfig.from_dict(meta)), src)


def load_hydralora_tensors(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Load the saved tensors strictly into ``model``'s HydraLoRA layers (already applied)."""
    tensors = load_file(str(Path(directory) / ADAPTER_WEIGHTS_NAME))
    params = _adapter_state(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"adapter keys mismatch: missing={missing}, unexpected={unexpected}")
    with torch.no_grad():
        for key, param in params.items():
            if tensors[key].shape != param.shape:
                raise ValueError(
                    f"{key}: saved shape {tuple(tensors[key].shape)} != {tuple(param.shape)}"
                )
            param.copy_(tensors[key])
    return model


__all__ = [
    "HydraLoraConfig",
    "HydraLoraLinear",
    "apply_hydralora",
    "base_layers_in_place",
    "bases_in_place",
    "hydralora_layers",
    "load_balancing_loss",
    "load_hydralora",
    "load_hydralora_tensors",
    "mean_router_gates",
    "merge_hydralora",
    "recording_gates",
    "router_parameters",
    "save_hydralora",
]

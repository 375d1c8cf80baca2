"""Fully sharded training (FSDP2): each process holds 1/N of every parameter.

Sharded are the trainable `A`, `B`, `s` with their gradients and AdamW moments, and the
frozen tensors that dominate LR-QAT's memory: Φ0 in its φ format (a frozen Parameter, see
`layers.frozen`), embeddings, norms and head. Zero points and biases are small buffers
and stay replicated. Wrapping policy: one FSDP unit per decoder block (the classes in
the model's `_no_split_modules`, as Accelerate's transformer policy picks them), whose
parameters are gathered just before the block runs and freed after it; the root unit
holds the embeddings, final norm and head.

We call torch's `fully_shard` ourselves rather than through Accelerate, whose FSDP
exists only on GPUs: so the code CI tests on CPU processes (gloo) is the code that runs
on GPUs (NCCL). A run asks for sharding the Accelerate way, with `accelerate launch`
and a config whose `distributed_type` is `FSDP` (`configs/accelerate/fsdp.yaml`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from lrqat.errors import LrqatError


def fsdp_requested() -> bool:
    """True under `accelerate launch` with an FSDP config, in a run of several processes."""
    wanted = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    return wanted and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def block_classes(model: nn.Module) -> tuple[type[nn.Module], ...]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    # a block sharded already is an instance of FSDP's subclass of its class
    classes = {type(m) for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)}
    if not classes:
        raise LrqatError(
            f"FSDP: cannot find the decoder blocks of {type(model).__name__} (its `_no_split_modules` "
            "names none of its modules): run with DDP (configs/accelerate/ddp.yaml) instead."
        )
    return tuple(classes)


def process_mesh(device: torch.device) -> DeviceMesh:
    """The one-dimensional mesh of every process on `device`'s type: what FSDP shards over."""
    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_model(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard `model` in place over `mesh`, one unit per decoder block (blocks a streamed
    build sharded already are left as they are), then the root."""
    for module in [m for m in model.modules() if isinstance(m, block_classes(model))]:
        if not isinstance(module, FSDPModule):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class BlockSharding:
    """FSDP applied while a model is streamed in (`--load stream` under an FSDP launch):
    each decoder block is sharded as soon as its layers are built, so no process holds
    more than one block whole; the root (embeddings, final norm, head) is sharded when
    training starts (`distribute`). Every process reads the checkpoint itself and keeps
    only its shards. A meta twin of each block, taken before it is sharded, makes the
    skeleton the trained model is gathered into (`skeleton`)."""

    def __init__(self, device: torch.device) -> None:
        self.mesh = process_mesh(device)
        self.twins: dict[int, nn.Module] = {}
        self.layers: nn.ModuleList | None = None

    def __call__(self, index: int, layers: nn.ModuleList) -> None:
        """Block `index` of `layers` is complete: keep its twin, shard it."""
        self.layers = layers
        self.twins[index] = meta_skeleton(layers[index])
        fully_shard(layers[index], mesh=self.mesh)

    def skeleton(self, model: nn.Module) -> nn.Module:
        """A meta-device copy of `model` with each sharded block's twin in its place."""
        if self.layers is None:
            return meta_skeleton(model)
        blocks = list(self.layers)
        for index, twin in self.twins.items():
            self.layers[index] = twin
        try:
            return meta_skeleton(model)
        finally:
            for index, block in enumerate(blocks):
                self.layers[index] = block


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor from a shard (a collective: every process must call it), or
    the tensor itself when it is not sharded."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """What this process holds of `tensor`."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and saved buffers live on the meta device: its
    structure at no memory cost, to be filled from a full state dict after training.
    Unsaved buffers (rotary frequencies) are small and copied as they are."""
    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def gather_model(sharded: nn.Module, skeleton: nn.Module) -> nn.Module | None:
    """The trained model whole in the main process only: `skeleton` (from `meta_skeleton`
    before sharding) filled with the gathered tensors of `sharded`, so merging,
    evaluation and saving work on plain tensors; None in the other processes, which
    never hold a full copy (a collective: every process must call it)."""
    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    skeleton.load_state_dict(state, assign=True)
    if hasattr(skeleton, "tie_weights"):
        skeleton.tie_weights()
    for name, p in skeleton.named_parameters():
        if p.is_meta:
            raise LrqatError(f"FSDP: {name} was not restored after training (a tensor the state dict does not hold).")
    return skeleton


def distribute(
    model: nn.Module, build_optimizer: Callable[[nn.Module], torch.optim.Optimizer], accelerator: Accelerator,
    sharding: BlockSharding | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module | None]:
    """The one fork between sharded and replicated training.

    FSDP (requested by the launch config): keep a meta-device skeleton of `model` to
    gather into after training, shard it (its blocks may be sharded already by a
    streamed build: `sharding`), then build the optimizer over the shards.
    Otherwise: build the optimizer, and let Accelerate wrap both (DDP in a run of
    several processes, nothing in one). Returns `(model, optimizer, skeleton or None)`.
    """
    if fsdp_requested():
        skeleton = sharding.skeleton(model) if sharding is not None else meta_skeleton(model)
        mesh = sharding.mesh if sharding is not None else process_mesh(accelerator.device)
        model = shard_model(model, mesh)
        return model, build_optimizer(model), skeleton
    model, optimizer = accelerator.prepare(model, build_optimizer(model))
    return model, optimizer, None

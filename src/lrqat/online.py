"""What a forward pass applies beyond the weights: the activation/KV quantizers and the
online halves of the rotations. One place decides it, for training, the merged model
and a reloaded one alike, so they compute the same function."""

from __future__ import annotations

from torch import nn

from lrqat.activations import ActSpec, install
from lrqat.rotation import RotationRecord, check_rotatable, down_proj_names, online_transforms, rotate_model


def planned_rotation(rotate: str, act: ActSpec) -> RotationRecord:
    """The rotation a run with these settings applies: R1/R2 always under `hadamard`;
    R4 online when activations are quantized (down_proj's input is the worst outlier
    carrier); R3 online when Q or K is quantized."""
    if rotate == "none":
        return RotationRecord()
    return RotationRecord("hadamard", online_down_proj=act.bits < 16, online_qk=act.bits < 16 or act.kv_bits < 16)


def check_model(model: nn.Module, rotate: str) -> None:
    """Refuse, before any evaluation, a model the requested rotation cannot take."""
    if rotate != "none":
        check_rotatable(model)


def apply_online(model: nn.Module, act: ActSpec, record: RotationRecord, linears: list[str]) -> None:
    """Install the quantizers of `act` on `linears` and on Q/K/V, and the online
    rotations of `record` (R4 on every down_proj, R3 on Q/K). Idempotent."""
    r4, r3 = online_transforms(model.config, record)
    rotations = {name: r4 for name in down_proj_names(model)} if r4 is not None else {}
    install(model, act, linears, rotations, r3)


def prepare(model: nn.Module, act: ActSpec, rotate: str, seed: int, linears: list[str]) -> RotationRecord:
    """Rotate the float `model` as `rotate` asks (R1/R2 and R4's weight half merged),
    then install its online parts and quantizers; return the record to save."""
    record = planned_rotation(rotate, act)
    if record.kind != "none":
        rotate_model(model, seed, record.online_down_proj, record.online_qk)
    apply_online(model, act, record, linears)
    return record

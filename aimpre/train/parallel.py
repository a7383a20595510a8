"""Parallelising the model, per block: activation checkpointing -> float8 -> torch.compile -> FSDP2 (torchtitan's
order: the float8 swap must precede compile, which traces the swapped modules, and sharding, which shards them).

Each step keeps the parameter names (a flag for recomputation, ``Float8Linear`` subclasses ``nn.Linear`` and keeps
its plain ``weight``, in-place ``Module.compile``), so checkpoints and exports look the same whatever was applied.

Float8 training (``trainer.precision=fp8``) follows torchtitan's float8 converter (torchtitan
``components/quantization/float8.py``) with torchao's ``convert_to_float8_training``: the linears of every
transformer block (``attn.qkv``, ``attn.proj``, ``mlp.fc1_g/fc1_x/fc2``, in the encoder, the decoder and any text
tower) run their three GEMMs (output, input gradient, weight gradient) in float8 with dynamic scales, while the
patch embedding, heads, embeddings and norms stay in bf16 autocast. Recipe ``tensorwise`` (the default) scales each
tensor by one number and uses cuBLAS's tensorwise float8 GEMM, the fastest recipe on Hopper and the only one
whose weights FSDP could all-gather in float8; ``rowwise`` (a scale per row, CUTLASS) is more accurate and slower.
FSDP's float8 all-gather (``enable_fsdp_float8_all_gather`` + ``precompute_float8_dynamic_scale_for_fsdp``) is not
used: it turns every sharded weight into torchao's ``WeightWithDynamicFloat8CastTensor``, which would then travel
into our sharded checkpoints (their safe reader allows plain tensors only) and exports; FSDP all-gathers the bf16
weights instead (twice the bytes of float8, overlapped with compute), and each block casts them to float8.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from aimpre.config import FP8_RECIPES, ConfigError
from aimpre.model.layers import Block

M = TypeVar("M", bound=nn.Module)

FP8_ALIGN = 16  # float8 GEMMs (torch._scaled_mm) need both dimensions of a weight divisible by 16
FP8_INSTALL = "pip install 'aimpre[fp8]'"


def blocks(model: nn.Module) -> list[Block]:
    """Every transformer block of any objective's model: encoder, decoder, text tower."""
    return [b for b in model.modules() if isinstance(b, Block)]


def compile_blocks(model: nn.Module, areas: int | None = None, backend: object = "inductor") -> None:
    """``torch.compile`` each block; with ``areas`` (native resolution), one static graph per area.

    A native batch has one of ``areas`` sequence lengths (2^n patches, n in ``data.native_log2_area``; a canvas and
    its transpose give the same [B, T, C] block input, B = tokens per step / T). Left to its default, dynamo
    compiles the first length static and the second as one dynamic-shape graph (``automatic_dynamic_shapes``):
    2 graphs per kind of block, but kernels for symbolic shapes. Here every length gets its own specialised graph
    (``dynamic=False``), so each area runs kernels tuned for it, and the count is bounded by the areas: per kind
    of block (encoder, decoder, text tower) one graph per area, compiled once, none again on a repeat
    (``tests/test_native_eval.py`` counts them). All blocks share ``Block.forward``'s code object and its
    recompile limit (8 by default, fewer than the paper's 6 areas x encoder and decoder = 12), so the limit is
    raised to the graphs expected: past it dynamo would run the remaining lengths eagerly.

    Args:
        model: any objective's model, in place.
        areas: the number of distinct sequence lengths; None: a fixed resolution (the default behaviour).
        backend: ``torch.compile``'s backend (tests count graphs with ``torch._dynamo.testing.CompileCounter``).
    """
    owned = blocks(model)
    if areas is None:
        for block in owned:
            block.compile(backend=backend)
        return
    kinds = {name.split(".")[0] for name, m in model.named_modules() if isinstance(m, Block)}  # encoder, decoder
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, areas * max(1, len(kinds)))
    for block in owned:
        block.compile(backend=backend, dynamic=False)


def fp8_problem(device: torch.device) -> str | None:
    """Why float8 training cannot run on ``device`` (a one-line error naming ``trainer.precision``), or None.

    It runs on CUDA GPUs with float8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell) and, slowly,
    on CPU (torchao's float8 GEMMs have a CPU path: the tests use it).
    """
    key = "config key 'trainer.precision': fp8"
    try:
        import torchao.float8  # noqa: F401
    except ImportError as e:
        import importlib.util

        if importlib.util.find_spec("torchao") is None:
            return f"{key} needs torchao, which is not installed: {FP8_INSTALL}"
        return f"{key}: torchao is installed but does not import ({e}); reinstall a build for torch {torch.__version__}"
    if device.type == "cuda" and torch.cuda.is_available():  # (without CUDA, Lightning says so itself)
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(device)
            return (f"{key} needs float8 tensor cores (CUDA compute capability >= 8.9: L4, L40S, H100, H200, B200); "
                    f"{name} has {major}.{minor}: use trainer.precision=bf16-mixed")  # fmt: skip
    elif device.type != "cpu":
        return f"{key} runs on CUDA GPUs of compute capability >= 8.9 (or on CPU, slowly), not on {device.type}"
    return None


def check_fp8(device: torch.device) -> None:
    """Raises ConfigError (naming ``trainer.precision``) if float8 training cannot run on ``device``."""
    problem = fp8_problem(device)
    if problem:
        raise ConfigError(problem)


def convert_fp8(model: nn.Module, recipe: str = "tensorwise") -> tuple[list[str], list[str]]:
    """Swaps the linears of every transformer block for torchao's ``Float8Linear``, in place; returns
    ``fp8_linears(model)``: the names of the converted linears, and of those left in bf16 because a dimension is
    not a multiple of 16.

    Args:
        model: any objective's model; only linears inside its ``Block``s are converted.
        recipe: torchao's float8 recipe, ``tensorwise`` or ``rowwise`` (``trainer.fp8_recipe``).
    """
    if recipe not in FP8_RECIPES:
        raise ConfigError(f"config key 'trainer.fp8_recipe': {recipe!r} is not one of {', '.join(FP8_RECIPES)}")
    problem = fp8_problem(torch.device("cpu"))  # torchao present and importable
    if problem:
        raise ConfigError(problem)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if recipe == "rowwise":  # as torchtitan: inductor must round float8 casts as eager does (pytorch#150859)
        from torch._inductor import config as inductor_config

        inductor_config.emulate_precision_casts = True
    inside = {id(m) for b in blocks(model) for m in b.modules()}

    def take(module: nn.Module, name: str) -> bool:  # torchao asks for every nn.Linear of the model
        assert isinstance(module, nn.Linear)
        return id(module) in inside and module.in_features % FP8_ALIGN == 0 and module.out_features % FP8_ALIGN == 0

    convert_to_float8_training(model, module_filter_fn=take, config=Float8LinearConfig.from_recipe_name(recipe))
    return fp8_linears(model)


def fp8_linears(model: nn.Module) -> tuple[list[str], list[str]]:
    """The names of the transformer blocks' linears that train in float8 (torchao's ``Float8Linear``), and of
    those that do not."""
    try:
        from torchao.float8.float8_linear import Float8Linear
    except ImportError:  # then nothing was converted
        Float8Linear = ()
    inside = {id(m) for b in blocks(model) for m in b.modules()}
    linears = [(n, m) for n, m in model.named_modules() if id(m) in inside and isinstance(m, nn.Linear)]
    fp8 = [n for n, m in linears if isinstance(m, Float8Linear)]
    return fp8, [n for n, _ in linears if n not in fp8]


def parallelize(
    model: M,
    *,
    recompute: bool = False,
    fp8: str | None = None,
    compile: bool = False,
    mesh: DeviceMesh | None = None,
    param_dtype: torch.dtype | None = None,
    compile_areas: int | None = None,
) -> M:
    """Applies, in order: activation checkpointing, float8 linears, compile, then FSDP2 ``fully_shard`` of every
    block and of the whole model (the embeddings, norms and heads) over ``mesh``.

    Args:
        model: the model, in place.
        recompute: recompute each block in backward.
        fp8: a float8 recipe (``convert_fp8``) for the blocks' linears; None: no float8.
        compile: ``torch.compile`` each block.
        mesh: the data-parallel device mesh to shard over; None: no sharding (DDP or one device).
        param_dtype: FSDP2 compute dtype of parameters (bf16 for bf16 training); gradients reduce in fp32.
        compile_areas: native resolution: how many areas (sequence lengths) the batches take (``compile_blocks``).
    """
    for block in blocks(model):
        block.recompute = recompute
    if fp8 is not None:
        convert_fp8(model, fp8)
    if compile:
        compile_blocks(model, compile_areas)
    if mesh is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    return model

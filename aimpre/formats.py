"""Tensor names and configs of the AIMv2 encoder in timm and in Hugging Face transformers, both ways.

Checked against the installed sources of timm 1.0.31 and transformers 5.23:
- timm ``models/vision_transformer.py``, ``aimv2_{large,huge,1b,3b}_patch14_{224,336,448}``: ``class_token=False``,
  RMSNorm inside ``patch_embed`` (``embed_norm_layer``), ``pos_embed`` [1, N, d] added with no class slot,
  ``fc_norm=False`` so the final RMSNorm is ``norm``, and ``forward_features`` returns the final-norm tokens.
  Our parameter names are timm's: a timm state dict *is* ours.
- transformers ``models/aimv2/modeling_aimv2.py``, ``Aimv2VisionModel``: ``embeddings.patch_embed`` (conv with
  bias), ``embeddings.rms_norm``, ``embeddings.position_embedding`` (an nn.Embedding [N, d]);
  ``encoder.layers.i.{rms_norm1, attention.{q,k,v,out}_proj, rms_norm2, ffn.{gate,up,down}_proj}``; the final
  ``rms_norm`` (``last_hidden_state`` comes after it); ``use_head`` adds a pooling head outside the trunk.
  To HF: rename, split the fused qkv rows into q, k, v, drop pos_embed's batch axis. Nothing is approximated.
  Exports set ``use_head`` with a head that averages the tokens (``hf_mean_head``), so ``pooler_output`` is the
  mean of ``last_hidden_state``, the pooling timm's ``global_pool="avg"`` gives; loading drops the head.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, fields, replace
from typing import Any, get_type_hints

import torch
from torch import Tensor

from aimpre.config import model_size_problem, short
from aimpre.model import SIZES, ModelConfig

State = dict[str, Tensor]
ENCODER_FIELDS = ("size", "img_size", "patch_size", "width", "depth", "heads", "mlp_hidden", "norm_eps")
# recorded too when the encoder has MoE blocks (model.moe_experts > 0): the shape of its feed-forwards
MOE_FIELDS = ("moe_experts", "moe_top_k", "moe_blocks", "moe_hidden")
# recorded too when the positions are not a learned table (model.pos_embed=sincos2d: the native-resolution AIMv2)
POS_FIELDS = ("pos_embed",)
POS_EMBEDS = ("learned", "sincos2d")
# timm's SwiGLU width is int(embed_dim * mlp_ratio); these are the ratios its aimv2_* entry points pass.
TIMM_MLP_RATIO = {"large": 2.75, "huge": 2.6667, "1b": 2.75, "3b": 2.6667}
TIMM_NAME = re.compile(r"aimv2_(large|huge|1b|3b)_patch(\d+)_(\d+)")
_TIMM_ARGS = {"embed_dim": "width", "depth": "depth", "num_heads": "heads", "img_size": "img_size",
              "patch_size": "patch_size"}  # fmt: skip

_HF_TOP = {
    "patch_embed.proj.weight": "embeddings.patch_embed.weight",
    "patch_embed.proj.bias": "embeddings.patch_embed.bias",
    "patch_embed.norm.weight": "embeddings.rms_norm.weight",
    "norm.weight": "rms_norm.weight",
}
_HF_BLOCK = {  # ours under blocks.i. -> HF under encoder.layers.i.; attn.qkv is split (see to_hf)
    "norm1.weight": "rms_norm1.weight",
    "attn.proj.weight": "attention.out_proj.weight",
    "norm2.weight": "rms_norm2.weight",
    "mlp.fc1_g.weight": "ffn.gate_proj.weight",
    "mlp.fc1_x.weight": "ffn.up_proj.weight",
    "mlp.fc2.weight": "ffn.down_proj.weight",
}
# apple/ml-aim's original names (and the first HF hub uploads) -> timm's, as timm's ``_convert_aimv2`` renames them.
_APPLE_RENAMES = (
    ("preprocessor.patchifier.", "patch_embed."), ("preprocessor.pos_embed", "pos_embed"), ("trunk.", ""),
    ("post_trunk_norm.", "norm."), ("norm_1", "norm1"), ("norm_2", "norm2"),
    ("mlp.fc1", "mlp.fc1_g"), ("mlp.fc3", "mlp.fc1_x"),
)  # fmt: skip


class ExportError(ValueError):
    """A file to export or load is not what it should be; the message names the file and the key."""


# ---- tensor names -----------------------------------------------------------------------------------------------


def to_hf(state: State) -> State:
    """Our (timm) encoder state dict -> ``Aimv2VisionModel``'s."""
    out: State = {}
    for k, v in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
        if k == "pos_embed":
            out["embeddings.position_embedding.weight"] = v[0]  # [1, N, d] -> [N, d], an nn.Embedding table
        elif k in _HF_TOP:
            out[_HF_TOP[k]] = v
        elif m and m[2] in _HF_BLOCK:
            out[f"encoder.layers.{m[1]}.{_HF_BLOCK[m[2]]}"] = v
        elif m and m[2] == "attn.qkv.weight":
            # rows are [q; k; v], each [C, C] (ours and timm's layout: view(B, T, 3, heads, head_dim))
            for name, w in zip("qkv", v.chunk(3, dim=0), strict=True):
                out[f"encoder.layers.{m[1]}.attention.{name}_proj.weight"] = w.clone()  # no shared storage
        else:
            raise ExportError(f"encoder tensor {k!r} has no Hugging Face name")
    return out


def hf_mean_head(width: int, dtype: torch.dtype) -> State:
    """``Aimv2AttentionPoolingHead`` weights that compute the mean of the tokens exactly: zero keys make every
    attention score 0, so the softmax is uniform; values and the output projection are the identity."""
    eye = torch.eye(width, dtype=dtype)
    return {
        "head.cls_token": torch.zeros(1, 1, width, dtype=dtype),
        "head.k_proj.weight": torch.zeros(width, width, dtype=dtype),
        "head.v_proj.weight": eye,
        "head.output_proj.weight": eye.clone(),  # no shared storage (safetensors refuses it)
        "head.output_proj.bias": torch.zeros(width, dtype=dtype),
    }


def from_hf(state: State, where: str) -> State:
    """``Aimv2VisionModel`` (or ``Aimv2Model``'s ``vision_model.``) state dict -> ours; a pooling head is dropped."""
    if any(k.startswith("vision_model.") for k in state):
        state = {k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.")}
    top = {v: k for k, v in _HF_TOP.items()}
    block = {v: k for k, v in _HF_BLOCK.items()}
    out: State = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for k, v in state.items():
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", k)
        q = re.fullmatch(r"attention\.([qkv])_proj\.weight", m[2]) if m else None
        if k == "embeddings.position_embedding.weight":
            out["pos_embed"] = v[None]  # [N, d] -> [1, N, d]
        elif k in top:
            out[top[k]] = v
        elif k.startswith("head."):
            continue  # the attention-pooling head of use_head=True checkpoints is not part of the trunk
        elif m and m[2] in block:
            out[f"blocks.{m[1]}.{block[m[2]]}"] = v
        elif m and q:
            qkv.setdefault(m[1], {})[q[1]] = v
        else:
            raise ExportError(f"{where}: tensor {k!r} is not part of an Aimv2VisionModel without biases")
    for i, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ExportError(f"{where}: layer {i} has {sorted(parts)} of the q/k/v projections, not all three")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]])  # 3 x [C, C] -> [3C, C]
    return out


def from_timm(state: State) -> State:
    """timm (or apple/ml-aim original) names -> ours; a classifier head, if any, is dropped."""
    if any(k.startswith(("trunk.", "preprocessor.")) for k in state):
        renamed = {}
        for k, v in state.items():
            for old, new in _APPLE_RENAMES:
                k = k.replace(old, new)
            renamed[k] = v
        state = renamed
    return {k: v for k, v in state.items() if not k.startswith("head.")}


# ---- configs ----------------------------------------------------------------------------------------------------


def _size_name(cfg: ModelConfig) -> str:
    """The named size with this encoder shape, else "custom"."""
    base = ModelConfig()
    for name, over in SIZES.items():
        if all(getattr(cfg, k) == over.get(k, getattr(base, k)) for k in ("width", "depth", "heads", "mlp_hidden")):
            return name
    return "custom"


def _field(where: str, key: str, value: Any, tp: Any) -> Any:
    """``value`` as the ModelConfig field ``key`` of type ``tp``, or an error naming the file and field."""
    if tp is int or tp == int | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        ok = ok or (value is None and tp is not int)
        want = "a positive integer"
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        want = "a finite number"
    elif tp == list[int] | None:  # moe_blocks: block indices (negatives count from the end), or null
        ok = value is None or (
            isinstance(value, list) and 0 < len(value) <= 1024 and all(type(v) is int for v in value)
        )
        want = "a list of block indices or null"
    else:
        ok, want = isinstance(value, str), "a string"
    if not ok:
        raise ExportError(f"{where}: encoder field {key!r} must be {want}, got {short(value, 60)}")
    return value


def encoder_config(values: dict[str, Any], where: str) -> ModelConfig:
    """A ModelConfig from encoder fields (decoder fields keep their defaults; no "size" means look it up)."""
    if not isinstance(values, dict):
        raise ExportError(f"{where}: the encoder fields must be an object, got {short(values, 60)}")
    unknown = sorted(set(values) - {f.name for f in fields(ModelConfig)})
    if unknown:
        raise ExportError(f"{where}: unknown encoder field(s) {unknown}; known: {', '.join(ENCODER_FIELDS)}")
    hints = get_type_hints(ModelConfig)
    cfg = replace(ModelConfig(), **{k: _field(where, k, v, hints[k]) for k, v in values.items()})
    if cfg.norm_eps <= 0:
        raise ExportError(f"{where}: encoder field 'norm_eps' must be positive, got {cfg.norm_eps}")
    if cfg.width % cfg.heads:
        raise ExportError(f"{where}: width {cfg.width} is not divisible by heads {cfg.heads}")
    if cfg.img_size % cfg.patch_size:
        raise ExportError(f"{where}: img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
    if cfg.pos_embed not in POS_EMBEDS:
        raise ExportError(f"{where}: encoder field 'pos_embed' {short(cfg.pos_embed, 40)} is not one of {POS_EMBEDS}")
    if cfg.pos_embed == "sincos2d" and cfg.width % 4:
        raise ExportError(f"{where}: a sincos2d encoder needs a width divisible by 4, got {cfg.width}")
    if cfg.moe_experts and not 1 <= cfg.moe_top_k <= cfg.moe_experts:
        raise ExportError(f"{where}: encoder field 'moe_top_k' {cfg.moe_top_k} must be in 1..moe_experts")
    if cfg.moe_experts and any(not -cfg.depth <= b < cfg.depth for b in cfg.moe_blocks or []):
        raise ExportError(f"{where}: encoder field 'moe_blocks' {cfg.moe_blocks} names blocks outside 0..depth-1")
    problem = model_size_problem(cfg)  # checked before any model of this size is built, even on meta
    if problem is not None:
        raise ExportError(f"{where}: encoder field {problem[0]!r}: {problem[1]}")
    return cfg if "size" in values else replace(cfg, size=_size_name(cfg))


def timm_architecture(cfg: ModelConfig) -> tuple[str, str | None]:
    """The ``architecture`` of a timm export and, for a shape timm never released, a pretrained tag naming ours.

    A released shape gets timm's own name (``aimv2_huge_patch14_336``) and no tag. Any other (a tiny model, a large
    one cut to 12 blocks) has no name in timm: it is built by a registered AIMv2 constructor with config.json's
    ``model_args`` carrying the whole shape, as timm's own ``save_for_hf`` records a model built with custom
    arguments, so the architecture must stay that constructor (``aimv2_large_patch14_224``: ``timm.create_model``
    refuses an unknown name or tag). The tag (``aimpre_tiny_6x192_p14_112``, in ``pretrained_cfg.tag``, which a
    loaded model's ``pretrained_cfg`` keeps) says the weights are not that model.

    Args:
        cfg: the encoder's config.
    """
    ref = {**asdict(ModelConfig()), **SIZES.get(cfg.size, {})}  # the named size's shape
    released = (
        cfg.size in TIMM_MLP_RATIO
        and cfg.patch_size == 14
        and cfg.img_size in (224, 336, 448)
        and all(getattr(cfg, k) == ref[k] for k in ("width", "depth", "heads", "mlp_hidden"))
    )
    if released:
        return f"aimv2_{cfg.size}_patch14_{cfg.img_size}", None
    return "aimv2_large_patch14_224", f"aimpre_{cfg.size}_{cfg.depth}x{cfg.width}_p{cfg.patch_size}_{cfg.img_size}"


def timm_config(cfg: ModelConfig, pre: dict[str, Any]) -> dict[str, Any]:
    """timm's hub ``config.json``: ``timm.create_model("local-dir:DIR", pretrained=True)`` rebuilds and loads it.

    Args:
        cfg: the encoder's config.
        pre: preprocessing (``mean``, ``std``).
    """
    ratio = cfg.mlp_hidden / cfg.width
    if int(cfg.width * ratio) != cfg.mlp_hidden:  # timm takes int(width * ratio): nudge a ratio that rounds down
        ratio = (cfg.mlp_hidden + 0.5) / cfg.width
    arch, tag = timm_architecture(cfg)
    s = cfg.img_size
    return {
        "architecture": arch, "num_classes": 0, "num_features": cfg.width, "global_pool": "avg",
        "model_args": {"img_size": s, "patch_size": cfg.patch_size, "embed_dim": cfg.width, "depth": cfg.depth,
                       "num_heads": cfg.heads, "mlp_ratio": ratio, "num_classes": 0, "global_pool": "avg"},
        "pretrained_cfg": {"input_size": [3, s, s], "fixed_input_size": True, "interpolation": "bicubic",
                           "crop_pct": 1.0, "crop_mode": "center", "mean": pre["mean"], "std": pre["std"],
                           "num_classes": 0, "first_conv": "patch_embed.proj", "classifier": "head",
                           **({"tag": tag} if tag else {})},
    }  # fmt: skip


def hf_config(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """``config.json`` of an ``Aimv2VisionModel`` (Aimv2VisionConfig's field names); dtype "fp32" or "bf16".

    A sincos2d encoder is ``is_native``: transformers then has no position table and computes the 2D sin-cos
    embedding of each input's grid (``build_2d_sinusoidal_position_embedding``, rotated to ml-aim's
    ``[sin_w | cos_w | sin_h | cos_h]``: ours), so it takes any image whose sides are multiples of the patch.
    """
    return {
        "architectures": ["Aimv2VisionModel"], "model_type": "aimv2_vision_model",
        "hidden_size": cfg.width, "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.heads, "num_channels": 3, "image_size": cfg.img_size,
        "patch_size": cfg.patch_size, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "qkv_bias": False,
        "mlp_bias": False, "use_head": True, "is_native": cfg.pos_embed == "sincos2d", "attention_dropout": 0.0,
        "initializer_range": 0.02, "dtype": "bfloat16" if dtype == "bf16" else "float32",
    }  # fmt: skip


def hf_preprocessor(pre: dict[str, Any]) -> dict[str, Any]:
    """A CLIPImageProcessor config: shortest side to img_size, centre crop, the mean/std trained with."""
    s = pre["img_size"]
    return {
        "image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "size": {"shortest_edge": s}, "resample": 3, "do_center_crop": True, "crop_size": {"height": s, "width": s},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": pre["mean"], "image_std": pre["std"],
    }  # fmt: skip


def config_from_hf(conf: dict[str, Any], where: str) -> ModelConfig:
    """Our encoder config from an ``Aimv2VisionConfig`` (or ``Aimv2Config``) ``config.json``."""
    if conf.get("model_type") == "aimv2" and "vision_config" in conf:
        conf = conf["vision_config"] or {}
        if not isinstance(conf, dict):
            raise ExportError(f"{where}: vision_config must be an object, got {short(conf, 60)}")
    native = conf.get("is_native", False)
    if not isinstance(native, bool):
        raise ExportError(f"{where}: is_native must be true or false, got {short(native, 60)}")
    for key, want in (("qkv_bias", False), ("mlp_bias", False), ("hidden_act", "silu"), ("num_channels", 3)):
        if conf.get(key, want) != want:
            raise ExportError(f"{where}: {key}={short(conf[key], 60)} is not supported (AIMv2 has {want!r})")
    d = ModelConfig()  # Aimv2VisionConfig's defaults are AIMv2-L at 224 px, as ours
    names = {"hidden_size": "width", "num_hidden_layers": "depth", "num_attention_heads": "heads",
             "intermediate_size": "mlp_hidden", "image_size": "img_size", "patch_size": "patch_size",
             "rms_norm_eps": "norm_eps"}  # fmt: skip
    hints = get_type_hints(ModelConfig)  # checked under HF's names, the ones the file has
    values = {ours: _field(where, hf, conf.get(hf, getattr(d, ours)), hints[ours]) for hf, ours in names.items()}
    # is_native: no position table, 2D sin-cos of each input's grid (the native-resolution AIMv2-L)
    return encoder_config({**values, **({"pos_embed": "sincos2d"} if native else {})}, where)


def config_from_timm(conf: dict[str, Any], where: str) -> ModelConfig:
    """Our encoder config from timm's hub ``config.json`` (architecture name + optional ``model_args``)."""
    arch = str(conf.get("architecture", ""))
    m = TIMM_NAME.fullmatch(arch.split(".")[0])
    if m is None:
        raise ExportError(f"{where}: architecture {arch!r} is not an AIMv2 model (aimv2_<size>_patch<p>_<res>)")
    values: dict[str, Any] = {**SIZES[m[1]], "patch_size": int(m[2]), "img_size": int(m[3])}
    ratio = TIMM_MLP_RATIO[m[1]]
    args = conf.get("model_args") or {}
    if not isinstance(args, dict):
        raise ExportError(f"{where}: model_args must be an object, got {short(args, 60)}")
    for k, v in args.items():
        if k in _TIMM_ARGS:
            if isinstance(v, list | tuple):  # img_size / patch_size may be (h, w): only squares are supported
                if not v or any(x != v[0] for x in v):
                    raise ExportError(f"{where}: model_args.{k}={short(v, 60)} is not square")
                v = v[0]
            values[_TIMM_ARGS[k]] = _field(where, f"model_args.{k}", v, int)
        elif k == "mlp_ratio":
            ratio = _field(where, "model_args.mlp_ratio", v, float)
        elif k not in ("num_classes", "global_pool") and not (k == "in_chans" and v == 3):
            raise ExportError(f"{where}: model_args.{k}={short(v, 60)} is not supported: it would change the encoder")
    values["mlp_hidden"] = int(values["width"] * ratio)
    return encoder_config(values, where)

"""Hugging Face folder -> GGUF, written by us with the ``gguf`` package.

Why our own writer: MLX-LM's ``fuse --export-gguf`` refuses Qwen2, and
llama.cpp's ``convert_hf_to_gguf.py`` needs llama.cpp's source tree and
refuses tokenizers whose pre-tokenizer hash it does not know. Qwen2 and the
Llama family are simple enough to write directly:

* metadata: ``general.*`` (name, base model), ``<arch>.*`` hyper-parameters,
  the tokenizer (``gpt2`` byte-level BPE, every id with its token type,
  merges, bos/eos/pad ids) and the project's chat template;
* tensors: HF names mapped with ``gguf``'s own tensor-name map; 1-D tensors
  (norms, biases) always F32, matrices in the chosen type; the tensors the
  family's registry class names (Llama's q/k, see
  :mod:`fishtune.export.architectures`) permuted to llama.cpp's rope layout;
  tied embeddings are not duplicated (llama.cpp reuses ``token_embd`` when
  ``output.weight`` is absent).

Tensors are streamed: all tensor infos are computed from the safetensors
headers first, then each tensor is read, converted and written on its own,
so memory stays bounded by the largest single tensor.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fishtune.errors import UserError, clip
from fishtune.export.architectures import Architecture, for_hf_config, permute_rope
from fishtune.export.gguf_types import WRITER_TYPES
from fishtune.fileio import atomic_path, read_json_object
from fishtune.project import ExportFiles, ProjectMeta
from fishtune.template import PromptTemplate

logger = logging.getLogger(__name__)


@dataclass
class TensorPlan:
    """One GGUF tensor: where it comes from and how it is stored."""

    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]  # numpy order (rows, cols)
    qtype: Any  # gguf.GGMLQuantizationType
    nbytes: int
    file: Path
    rope_heads: int | None = None  # permuted to llama.cpp's rope layout by this many heads (Llama q/k)


@dataclass
class HFModel:
    """A validated Hugging Face model folder."""

    path: Path
    config: dict[str, Any]
    architecture: Architecture
    tensor_files: dict[str, Path]  # hf tensor name -> safetensors file
    tokenizer_json: dict[str, Any]
    tokenizer_config: dict[str, Any]

    @property
    def arch(self) -> str:
        """The GGUF architecture name (``general.architecture``, the key prefix)."""
        return self.architecture.gguf_arch

    # ---- hyper-parameters ---------------------------------------------------
    def hp(self, *keys: str, default: Any = None, required: bool = True) -> Any:
        for k in keys:
            if self.config.get(k) is not None:
                return self.config[k]
        if required and default is None:
            raise UserError(f"{self.path / ExportFiles.CONFIG}: missing {keys[0]!r}; the HF export is incomplete")
        return default

    @property
    def n_layers(self) -> int:
        return int(self.hp("num_hidden_layers"))

    @property
    def n_head(self) -> int:
        return int(self.hp("num_attention_heads"))

    @property
    def n_head_kv(self) -> int:
        return int(self.hp("num_key_value_heads", default=self.n_head))

    @property
    def hidden(self) -> int:
        return int(self.hp("hidden_size"))

    @property
    def head_dim(self) -> int:
        return int(self.config.get("head_dim") or self.hidden // self.n_head)

    @property
    def rope_theta(self) -> float:
        """``rope_theta`` (transformers < 5) or ``rope_parameters.rope_theta`` (>= 5)."""
        if self.config.get("rope_theta") is not None:
            return float(self.config["rope_theta"])
        params = self.config.get("rope_parameters") or {}
        if isinstance(params, dict) and params.get("rope_theta") is not None:
            return float(params["rope_theta"])
        return 10000.0  # transformers' default for both families

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path} is missing; {path.parent} is not a complete HF model folder ({what})")
    return read_json_object(path, "re-run convert_to_huggingface.py")


def _safetensors_header(path: Path) -> dict[str, Any]:
    """Tensor names/shapes/dtypes from a safetensors header (no data read)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not a valid safetensors file ({exc}); re-run convert_to_huggingface.py") from None
    header.pop("__metadata__", None)
    return header


def _tensor_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file: a single file, or shards listed in the index."""
    index = path / ExportFiles.WEIGHTS_INDEX
    single = path / ExportFiles.WEIGHTS
    if index.is_file():
        weight_map = _read_json(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index}: missing 'weight_map'; re-run convert_to_huggingface.py")
        files: dict[str, Path] = {}
        for name, fname in weight_map.items():
            f = path / fname
            if not f.is_file():
                raise UserError(f"{f} is missing (listed in {index.name} for {name}); the HF export is incomplete")
            files[name] = f
        return files
    if single.is_file():
        return {name: single for name in _safetensors_header(single)}
    raise UserError(f"{single} is missing (and no {index.name}); {path} holds no safetensors weights")


def read_hf_model(hf_dir: str | os.PathLike) -> HFModel:
    """Validate an HF folder; every problem is a UserError naming the file."""
    path = Path(hf_dir)
    if not path.is_dir():
        raise UserError(
            f"HF model folder {path} does not exist; run convert_to_huggingface.py first or pass --hf-model-dir"
        )
    config = _read_json(path / ExportFiles.CONFIG, "model config")
    architecture = for_hf_config(config, str(path / ExportFiles.CONFIG))
    rope_scaling = config.get("rope_scaling") or {}
    rope_type = (rope_scaling.get("rope_type") or rope_scaling.get("type")) if isinstance(rope_scaling, dict) else None
    if rope_type not in (None, "default"):
        raise UserError(f"{path / ExportFiles.CONFIG}: rope_scaling type {rope_type!r} is not supported; only plain rope")
    tensor_files = _tensor_files(path)
    tok = _read_json(path / ExportFiles.TOKENIZER, "tokenizer")
    tok_cfg = _read_json(path / ExportFiles.TOKENIZER_CONFIG, "tokenizer config")
    return HFModel(path, config, architecture, tensor_files, tok, tok_cfg)


# ---- tokenizer -----------------------------------------------------------------


@dataclass
class Vocab:
    tokens: list[str]
    toktypes: list[int]
    merges: list[str]
    token_to_id: dict[str, int]
    add_bos: bool


def _looks_special(token: str) -> bool:
    # llama.cpp's converter also treats unflagged <|...|> tokens as control tokens.
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))


def _adds_bos(tok: dict[str, Any], tok_cfg: dict[str, Any]) -> bool:
    if "add_bos_token" in tok_cfg:
        return bool(tok_cfg["add_bos_token"])
    pp = tok.get("post_processor") or {}
    procs = pp.get("processors", [pp]) if pp.get("type") == "Sequence" else [pp]
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            return bool(single) and "SpecialToken" in single[0]
    return False


def read_vocab(model: HFModel) -> Vocab:
    """Every id 0..vocab_size-1 with its type, like llama.cpp's converter."""
    tok = model.tokenizer_json
    path = model.path / ExportFiles.TOKENIZER
    bpe = tok.get("model") or {}
    if bpe.get("type") != "BPE" or not isinstance(bpe.get("vocab"), dict):
        raise UserError(f"{path}: tokenizer model {bpe.get('type')!r} is not supported; only byte-level BPE")
    if bpe.get("byte_fallback"):
        raise UserError(f"{path}: SentencePiece-style (byte_fallback) BPE is not supported; only byte-level BPE")
    token_to_id: dict[str, int] = dict(bpe["vocab"])
    added: dict[int, dict[str, Any]] = {}
    for a in tok.get("added_tokens") or []:
        added[int(a["id"])] = a
        token_to_id[a["content"]] = int(a["id"])
    id_to_token = {i: t for t, i in token_to_id.items()}
    n_max = max(id_to_token) + 1
    vocab_size = int(model.config.get("vocab_size") or n_max)
    if n_max > vocab_size:
        raise UserError(
            f"{path}: token id {n_max - 1} >= vocab_size {vocab_size} in config.json; tokenizer and model disagree"
        )
    import gguf

    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        t = id_to_token.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")  # llama.cpp's converter pads the same way
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(t)
            special = added[i].get("special") or _looks_special(t)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges") or []]
    if not merges:
        raise UserError(f"{path}: BPE merges are missing; the tokenizer file is incomplete")
    return Vocab(tokens, types, merges, token_to_id, _adds_bos(tok, model.tokenizer_config))


def _special_id(vocab: Vocab, value: Any) -> int | None:
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str):
        return vocab.token_to_id.get(value)
    return None


def special_token_ids(model: HFModel, vocab: Vocab, template: PromptTemplate) -> dict[str, int]:
    """bos/eos/pad ids. eos is the template's end token: what the model learned to emit."""
    eos = vocab.token_to_id.get(template.end_token)
    if eos is None:
        raise UserError(
            f"{model.path / ExportFiles.TOKENIZER}: template {template.name!r} ends answers with {template.end_token!r}, "
            "which the tokenizer lacks; pick another --template"
        )
    cfg, tc = model.config, model.tokenizer_config
    bos = _special_id(vocab, tc.get("bos_token"))
    if bos is None and isinstance(cfg.get("bos_token_id"), int):
        bos = cfg["bos_token_id"]
    pad = _special_id(vocab, tc.get("pad_token"))
    if pad is None and isinstance(cfg.get("pad_token_id"), int):
        pad = cfg["pad_token_id"]
    ids = {"eos": eos, "bos": bos if bos is not None else eos, "pad": pad if pad is not None else eos}
    return ids


# ---- tensors -------------------------------------------------------------------


def _qtype(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name]


def _plan_one(model: HFModel, hf_name: str, shape: tuple[int, ...], file: Path, gguf_name: str,
              out_type: str) -> TensorPlan:
    import gguf

    if len(shape) <= 1:
        qt = _qtype("F32")  # norms and biases stay F32 (llama.cpp's converter does the same)
    else:
        qt = _qtype(out_type)
        if out_type == "Q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[qt][0] != 0:
            qt = _qtype("F16")  # row not a multiple of 32: same fallback as llama.cpp's converter
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    n = int(np.prod(shape)) if shape else 1
    return TensorPlan(hf_name, gguf_name, shape, qt, n // block * type_size, file,
                      model.architecture.rope_heads(hf_name, model))


def _gguf_order(p: TensorPlan) -> tuple:
    """llama.cpp's converter order: token_embd first, then the blocks, output last.

    Any order loads, but a stable one keeps files reproducible.
    """
    m = re.match(r"blk\.(\d+)\.(.*)", p.gguf_name)
    if p.gguf_name.startswith("token_embd"):
        return (0, 0, p.gguf_name)
    if m:
        return (1, int(m.group(1)), m.group(2))
    return (2, 0, p.gguf_name)


def _check_complete(model: HFModel, plans: list[TensorPlan]) -> None:
    names = {p.gguf_name for p in plans}
    if "token_embd.weight" not in names:
        raise UserError(f"{model.path}: no model.embed_tokens.weight tensor; the HF export is incomplete")
    if "output.weight" not in names and not model.tied:
        raise UserError(f"{model.path}: lm_head.weight is missing and tie_word_embeddings is false")
    expected = model.n_layers
    blocks = {int(m.group(1)) for p in plans if (m := re.match(r"blk\.(\d+)\.", p.gguf_name))}
    if blocks != set(range(expected)):
        raise UserError(f"{model.path}: found layers {sorted(blocks)[:5]}... but config.json says {expected}")


def plan_tensors(model: HFModel, out_type: str) -> list[TensorPlan]:
    """Every GGUF tensor with its final shape, type and byte size (no data read)."""
    import gguf

    if out_type not in WRITER_TYPES:
        raise ValueError(out_type)
    name_map = gguf.get_tensor_name_map(model.architecture.model_arch(), model.n_layers)
    headers: dict[Path, dict[str, Any]] = {}
    plans: list[TensorPlan] = []
    for hf_name, f in model.tensor_files.items():
        if hf_name.endswith(("rotary_emb.inv_freq", ".attn.masked_bias")):
            continue  # buffers, not weights
        if hf_name == "lm_head.weight" and model.tied:
            continue  # tied: llama.cpp reuses token_embd.weight as the output matrix
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"{f}: tensor {hf_name!r} has no GGUF name for {model.arch}; unexpected checkpoint layout")
        if f not in headers:
            headers[f] = _safetensors_header(f)
        info = headers[f].get(hf_name)
        if info is None:
            raise UserError(f"{f}: tensor {hf_name!r} (listed in the index) is not in the file")
        shape = tuple(int(x) for x in info["shape"])
        plans.append(_plan_one(model, hf_name, shape, f, gguf_name, out_type))
    _check_complete(model, plans)
    return sorted(plans, key=_gguf_order)


def load_tensor(model: HFModel, plan: TensorPlan) -> np.ndarray:
    """Read one tensor as float32 numpy (bf16 and f16 are widened), in the GGUF layout."""
    from safetensors import safe_open

    with safe_open(str(plan.file), framework="pt") as f:
        t = f.get_tensor(plan.hf_name)
    arr = t.float().numpy()
    return permute_rope(arr, plan.rope_heads) if plan.rope_heads else arr


def convert_tensor(arr: np.ndarray, qtype) -> np.ndarray:
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(arr.astype(np.float16))
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)


# ---- metadata ------------------------------------------------------------------


def file_type_for(out_type: str) -> int:
    import gguf

    return {
        "F32": gguf.LlamaFileType.ALL_F32,
        "F16": gguf.LlamaFileType.MOSTLY_F16,
        "BF16": gguf.LlamaFileType.MOSTLY_BF16,
        "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[out_type]


def _short_name(base_model: str) -> str:
    return base_model.rstrip("/").split("/")[-1]


def model_name(base_model: str, meta: ProjectMeta) -> str:
    """general.name: the base model's short name plus the fine-tune."""
    short = _short_name(base_model) or "model"
    adapter = meta.extra.get("adapter_path") or meta.extra.get("adapter")
    suffix = f" ({Path(str(adapter)).name})" if adapter else ""
    return f"{short} fish-care{suffix}"


def _general_metadata(meta: ProjectMeta, out_type: str) -> list[tuple[str, str, Any]]:
    base = meta.base_model
    kv: list[tuple[str, str, Any]] = [
        ("general.type", "string", "model"),
        ("general.name", "string", model_name(base, meta)),
        ("general.basename", "string", _short_name(base)),
        ("general.finetune", "string", "fish-care"),
        ("general.base_model.count", "uint32", 1),
        ("general.base_model.0.name", "string", _short_name(base)),
    ]
    if "/" in base and not os.path.exists(base):
        kv += [
            ("general.base_model.0.organization", "string", base.split("/")[0]),
            ("general.base_model.0.repo_url", "string", f"https://huggingface.co/{base}"),
        ]
    kv.append(("general.file_type", "uint32", int(file_type_for(out_type))))
    return kv


def _hyper_parameters(model: HFModel, n_vocab: int) -> list[tuple[str, str, Any]]:
    arch = model.arch
    kv: list[tuple[str, str, Any]] = [
        (f"{arch}.block_count", "uint32", model.n_layers),
        (f"{arch}.context_length", "uint32", int(model.hp("max_position_embeddings"))),
        (f"{arch}.embedding_length", "uint32", model.hidden),
        (f"{arch}.feed_forward_length", "uint32", int(model.hp("intermediate_size"))),
        (f"{arch}.attention.head_count", "uint32", model.n_head),
        (f"{arch}.attention.head_count_kv", "uint32", model.n_head_kv),
        (f"{arch}.rope.freq_base", "float32", model.rope_theta),
        (f"{arch}.attention.layer_norm_rms_epsilon", "float32", float(model.hp("rms_norm_eps"))),
    ]
    if model.config.get("head_dim") and model.head_dim != model.hidden // model.n_head:
        kv += [(f"{arch}.attention.key_length", "uint32", model.head_dim),
               (f"{arch}.attention.value_length", "uint32", model.head_dim)]
    return kv + model.architecture.extra_metadata(model, n_vocab)


def _tokenizer_metadata(model: HFModel, vocab: Vocab, template: PromptTemplate) -> list[tuple[str, str, Any]]:
    ids = special_token_ids(model, vocab, template)
    return [
        ("tokenizer.ggml.model", "string", "gpt2"),
        ("tokenizer.ggml.pre", "string", model.architecture.tokenizer_pre),
        ("tokenizer.ggml.tokens", "array", vocab.tokens),
        ("tokenizer.ggml.token_type", "array", vocab.toktypes),
        ("tokenizer.ggml.merges", "array", vocab.merges),
        ("tokenizer.ggml.bos_token_id", "uint32", ids["bos"]),
        ("tokenizer.ggml.eos_token_id", "uint32", ids["eos"]),
        ("tokenizer.ggml.padding_token_id", "uint32", ids["pad"]),
        ("tokenizer.ggml.add_bos_token", "bool", vocab.add_bos),
        ("tokenizer.ggml.add_eos_token", "bool", False),
        ("tokenizer.chat_template", "string", template.jinja_chat_template()),
    ]


def build_metadata(model: HFModel, meta: ProjectMeta, out_type: str) -> list[tuple[str, str, Any]]:
    """(key, kind, value) triples; kind names the GGUFWriter add_* method."""
    import gguf

    vocab = read_vocab(model)
    kv = _general_metadata(meta, out_type) + _hyper_parameters(model, len(vocab.tokens))
    if out_type == "Q8_0":
        kv.append(("general.quantization_version", "uint32", gguf.GGML_QUANT_VERSION))
    return kv + _tokenizer_metadata(model, vocab, meta.prompt_template)


# ---- writing -------------------------------------------------------------------


@dataclass
class WriteResult:
    path: Path
    out_type: str
    n_tensors: int
    nbytes: int
    type_counts: dict[str, int]


def _fmt_value(v: Any) -> str:
    if isinstance(v, list):
        head = ", ".join(repr(x) for x in v[:3])
        return f"[{head}, ...] ({len(v)} items)"
    return clip(repr(v), 100)


def describe(model: HFModel, meta: ProjectMeta, out_type: str) -> str:
    """The --dry-run text: metadata and the tensor table."""
    kv = build_metadata(model, meta, out_type)
    plans = plan_tensors(model, out_type)
    lines = [f"metadata ({len(kv) + 1} keys):", f"  general.architecture = {model.arch!r}"]
    lines += [f"  {k} = {_fmt_value(v)}" for k, _, v in kv]
    lines.append(f"tensors ({len(plans)}):")
    lines.append(f"  {'gguf name':<28} {'hf name':<48} {'shape':<16} {'type':<6} {'MB':>9}")
    for p in plans:
        lines.append(
            f"  {p.gguf_name:<28} {p.hf_name:<48} {str(list(p.shape)):<16} {p.qtype.name:<6} {p.nbytes / 1e6:>9.2f}"
        )
    total = sum(p.nbytes for p in plans)
    lines.append(f"total tensor data: {total / 1e6:.2f} MB")
    return "\n".join(lines)


def _write_tensors(writer: Any, model: HFModel, plans: list[TensorPlan], label: str, progress: bool) -> None:
    """Stream every tensor: read, convert, write, one at a time."""
    from tqdm import tqdm

    total = sum(p.nbytes for p in plans)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {label}", disable=not progress) as bar:
        for p in plans:
            data = convert_tensor(load_tensor(model, p), p.qtype)
            if data.nbytes != p.nbytes:
                raise RuntimeError(f"{p.hf_name}: {data.nbytes} bytes, planned {p.nbytes}")
            writer.write_tensor_data(data)
            bar.update(p.nbytes)
            del data


def write_gguf(
    model: HFModel,
    meta: ProjectMeta,
    out_path: str | os.PathLike,
    out_type: str = "F16",
    progress: bool = True,
) -> WriteResult:
    """Write ``out_path`` atomically (a temp file renamed into place), one tensor at a time."""
    import gguf

    out_path = Path(out_path)
    out_type = out_type.upper()
    kv = build_metadata(model, meta, out_type)
    plans = plan_tensors(model, out_type)
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=model.arch)
        try:
            for key, kind, value in kv:
                if kind == "array" and key == "tokenizer.ggml.token_type":
                    writer.add_key_value(key, [int(x) for x in value], gguf.GGUFValueType.ARRAY)
                else:
                    getattr(writer, f"add_{kind}")(key, value)
            for p in plans:
                writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            _write_tensors(writer, model, plans, out_path.name, progress)
        finally:
            writer.close()
    counts: dict[str, int] = {}
    for p in plans:
        counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
    size = out_path.stat().st_size
    logger.debug("wrote %s (%s, %d tensors, %.2f MB)", out_path, out_type, len(plans), size / 1e6)
    return WriteResult(out_path, out_type, len(plans), size, counts)


__all__ = ["HFModel", "TensorPlan", "Vocab", "WriteResult", "read_hf_model", "read_vocab", "special_token_ids",
           "plan_tensors", "load_tensor", "convert_tensor", "build_metadata", "describe", "write_gguf"]

"""The model families the exports support: one registered class each.

Like llama.cpp's ``convert_hf_to_gguf.py``, every family is a class that
holds its facts (names in transformers, MLX-LM and GGUF, llama.cpp's
tokenizer pre-type, which tensors llama.cpp wants in another rope layout,
extra GGUF keys), and the HF export, the GGUF writer and the verifier ask the
registry instead of comparing strings. Input of any other family is refused
by name, listing the supported ones. A new family is one more
``@register`` class (the GGUF tensor names come from ``gguf``'s own map for
``gguf_arch``).
"""
from __future__ import annotations

from typing import Any, ClassVar

from fishtune.errors import UserError

_REGISTRY: list["Architecture"] = []  # in registration order (the order errors list them in)


class Architecture:
    """One model family. Subclasses set the class attributes; the methods have working defaults."""

    model_type: ClassVar[str]  # config.json "model_type" (what MLX-LM loads by)
    hf_class: ClassVar[str]  # config.json "architectures"[0] (what transformers loads)
    gguf_arch: ClassVar[str]  # general.architecture and the prefix of the hyper-parameter keys
    gguf_enum: ClassVar[str]  # the member of gguf.MODEL_ARCH (its tensor-name map)
    tokenizer_pre: ClassVar[str]  # tokenizer.ggml.pre: llama.cpp's pre-tokenizer
    # HF weight names (by suffix) that llama.cpp wants in its interleaved rope layout,
    # with the attribute of the model (gguf_writer.HFModel) that gives their head count.
    rope_permuted: ClassVar[dict[str, str]] = {}

    def model_arch(self):
        """``gguf.MODEL_ARCH`` member (for ``gguf.get_tensor_name_map``)."""
        import gguf

        return gguf.MODEL_ARCH[self.gguf_enum]

    def rope_heads(self, hf_name: str, model: Any) -> int | None:
        """Head count to permute ``hf_name`` by for llama.cpp's rope layout; None: stored as in HF.

        ``model``: a :class:`fishtune.export.gguf_writer.HFModel` (its hyper-parameters).
        """
        for suffix, heads in self.rope_permuted.items():
            if hf_name.endswith((f"{suffix}.weight", f"{suffix}.bias")):
                return int(getattr(model, heads))
        return None

    def extra_metadata(self, model: Any, n_vocab: int) -> list[tuple[str, str, Any]]:
        """GGUF keys this family's llama.cpp loader reads beyond the common ones: (key, kind, value)."""
        return []

    def __repr__(self) -> str:
        return f"<architecture {self.hf_class}>"


def register(cls: type[Architecture]) -> type[Architecture]:
    """Class decorator: add a family to the registry."""
    _REGISTRY.append(cls())
    return cls


@register
class Qwen2(Architecture):
    """Qwen2: NeoX rope (HF's rotate-half layout is llama.cpp's too), q/k/v biases."""

    model_type = "qwen2"
    hf_class = "Qwen2ForCausalLM"
    gguf_arch = "qwen2"
    gguf_enum = "QWEN2"
    tokenizer_pre = "qwen2"


@register
class Llama(Architecture):
    """The Llama family: q/k rows permuted to llama.cpp's interleaved rope, no biases."""

    model_type = "llama"
    hf_class = "LlamaForCausalLM"
    gguf_arch = "llama"
    gguf_enum = "LLAMA"
    tokenizer_pre = "llama-bpe"
    rope_permuted = {"q_proj": "n_head", "k_proj": "n_head_kv"}

    def extra_metadata(self, model: Any, n_vocab: int) -> list[tuple[str, str, Any]]:
        return [(f"{self.gguf_arch}.vocab_size", "uint32", n_vocab),
                (f"{self.gguf_arch}.rope.dimension_count", "uint32", model.head_dim)]


def architectures() -> tuple[Architecture, ...]:
    return tuple(_REGISTRY)


def _unsupported(where: str, value: Any, supported: list[str]) -> UserError:
    return UserError(f"{where}: architecture {value!r} is not supported; supported: {', '.join(supported)}")


def by_model_type(model_type: Any, where: str) -> Architecture:
    """The family of an MLX / HF config's ``model_type`` (the HF export: MLX-LM loads by it)."""
    for arch in _REGISTRY:
        if arch.model_type == model_type:
            return arch
    raise _unsupported(where, model_type, [a.model_type for a in _REGISTRY])


def for_hf_config(config: dict[str, Any], where: str) -> Architecture:
    """The family of an HF folder's ``config.json``: ``architectures[0]``, else ``model_type``."""
    classes = config.get("architectures") or []
    if not classes:
        return by_model_type(config.get("model_type"), where)
    for arch in _REGISTRY:
        if arch.hf_class == classes[0]:
            return arch
    raise _unsupported(where, classes[0], [a.hf_class for a in _REGISTRY])


def permute_rope(w, n_head: int):
    """HF (rotate-half) -> llama.cpp's interleaved rope layout for q/k rows (numpy array)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def inverse_permute_rope(w, n_head: int):
    """Undo :func:`permute_rope` (llama.cpp layout -> HF)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


__all__ = ["Architecture", "register", "Qwen2", "Llama", "architectures", "by_model_type", "for_hf_config",
           "permute_rope", "inverse_permute_rope"]

"""One tokenizer type for every model source: a `tokenizers.Tokenizer` plus what the model
file says about BOS/EOS and the chat template."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from ..errors import PagedLLMError
from ..models.loaders import ModelSource
from ..models.loaders.gguf_file import open_gguf
from ..models.loaders.hf_loader import read_json
from .chat_template import render_chat
from .gguf_vocab import build_gguf_tokenizer

# Tokens that end a turn in common chat formats, recognised when a model's metadata names only EOS.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>", "<|eom_id|>")
# gpt-oss's harmony (its o200k_harmony vocabulary): <|return|> and <|call|> end a reply; <|end|> closes one message
# of it (the reasoning, before the answer) and must not stop generation, whatever a file names (llama.cpp's rule).
_HARMONY_ENDS, _HARMONY_MESSAGE_END = ("<|return|>", "<|call|>"), "<|end|>"


class TokenizerError(PagedLLMError, ValueError):
    """Tokenizer files that are missing or unreadable."""


# (prefix, suffix, middle) tokens of the fill-in-the-middle conventions code models use.
FIM_TOKEN_NAMES = (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, Granite
                   ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SantaCoder
                   ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
                   ("<PRE>", "<SUF>", "<MID>"))  # CodeLlama


@dataclass
class Tokenizer:
    backend: HFTokenizer
    bos_token_id: int | None
    eos_token_id: int | None
    stop_token_ids: frozenset[int]  # every id that ends generation (EOS, end-of-turn)
    chat_template: str | None
    add_bos: bool

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def fill_in_the_middle(self, prefix: str, suffix: str) -> list[int] | None:
        """The prompt that asks for the text between `prefix` and `suffix` (prefix-suffix-middle order, as
        llama.cpp's /infill), in the first FIM convention whose tokens this vocabulary has; None without one."""
        for names in FIM_TOKEN_NAMES:
            ids = [self.token_to_id(name) for name in names]
            if None not in ids:
                pre, suf, mid = ids
                bos = [self.bos_token_id] if self.add_bos and self.bos_token_id is not None else []
                return (bos + [pre] + self.encode(prefix, add_special_tokens=False) + [suf]
                        + self.encode(suffix, add_special_tokens=False) + [mid])
        return None

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def special_token_id(self, text: str) -> int | None:
        """The id of `text` where it is one special token (a control token that decoding skips by default)."""
        token_id = self.token_to_id(text)
        return token_id if token_id is not None and token_id in _special_ids(self.backend) else None

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **variables: Any) -> str:
        """`variables`: more names the template may read (a request's chat_template_kwargs: enable_thinking…)."""
        if not self.chat_template:
            raise TokenizerError("this model has no chat template; use `generate` with a plain prompt")
        return render_chat(self.chat_template, messages, add_generation_prompt, **variables,
                           bos_token=self._text(self.bos_token_id), eos_token=self._text(self.eos_token_id))

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **variables: Any) -> list[int]:
        # The rendered template already holds BOS where the model wants one.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **variables),
                           add_special_tokens=False)

    def _text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")


def _stop_ids(backend: HFTokenizer, eos_ids: list[int]) -> frozenset[int]:
    ids = {i for i in eos_ids if i is not None}
    known = ids | _special_ids(backend)
    harmony = backend.token_to_id(_HARMONY_ENDS[0]) in known
    ids |= {i for t in (_HARMONY_ENDS if harmony else _END_OF_TURN)
            if (i := backend.token_to_id(t)) is not None and i in known}
    if harmony:
        ids.discard(backend.token_to_id(_HARMONY_MESSAGE_END))
    return frozenset(ids)


def _special_ids(backend: HFTokenizer) -> set[int]:
    return {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}


def _with_bos(backend: HFTokenizer, bos_id: int | None) -> None:
    if bos_id is None:
        return
    bos = backend.id_to_token(bos_id)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])


def load_tokenizer(source: ModelSource) -> Tokenizer:
    return _from_gguf(source.path) if source.kind == "gguf" else _from_hf_folder(source.path)


def _from_gguf(path: Path) -> Tokenizer:
    meta = open_gguf(path).metadata
    backend = build_gguf_tokenizer(meta, str(path))
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama"))
    if add_bos:
        _with_bos(backend, bos)
    extra = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
    return Tokenizer(backend, bos, eos, _stop_ids(backend, [eos, *extra]),
                     meta.get("tokenizer.chat_template"), add_bos)


def _token_id(backend: HFTokenizer, value: Any) -> int | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config files
        value = value.get("content")
    return backend.token_to_id(value) if isinstance(value, str) else None


def _from_hf_folder(folder: Path) -> Tokenizer:
    if not (folder / "tokenizer.json").is_file():
        raise TokenizerError(f"{folder}: tokenizer.json is missing (pagedllm reads the fast-tokenizer format)")
    try:
        backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as exc:  # the tokenizers library raises bare Exceptions for bad files
        raise TokenizerError(f"{folder / 'tokenizer.json'}: {exc}") from None
    tcfg = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    gen = read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    template = tcfg.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    bos, eos = _token_id(backend, tcfg.get("bos_token")), _token_id(backend, tcfg.get("eos_token"))
    gen_eos = gen.get("eos_token_id", [])
    eos_ids = [eos, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])]
    add_bos = backend.post_processor is not None and bos is not None and bos in backend.encode("a").ids
    return Tokenizer(backend, bos, eos, _stop_ids(backend, eos_ids), template if isinstance(template, str) else None,
                     add_bos)

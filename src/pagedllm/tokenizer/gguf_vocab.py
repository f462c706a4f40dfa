"""Build a `tokenizers.Tokenizer` from a GGUF file's `tokenizer.ggml.*` metadata.

Two vocabulary kinds, as llama.cpp names them:
- "gpt2": byte-level BPE with merges; text is split first by the regexes llama.cpp uses for
  the file's `tokenizer.ggml.pre` (applied one after another, like llama.cpp).
- "llama": SentencePiece BPE with byte fallback; merges are recovered from the token scores.
Tokens marked CONTROL become special tokens, USER_DEFINED ones added tokens.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..errors import PagedLLMError, shown

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# o200k (gpt-4o, gpt-oss; llama.cpp's GPT4O, its regex as written in the tokenizer.json)
_O200K = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp's pre-tokenizer regexes, keyed by `tokenizer.ggml.pre` (llama-vocab.cpp).
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    **{name: (_GPT2,) for name in ("default", "gpt2", "mpt", "olmo", "jais", "trillion")},
    **{name: (r"\p{N}", _GPT2) for name in
       ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")},
    **{name: (_LLAMA3,) for name in
       ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "smaug-bpe", "dbrx")},
    **{name: (_QWEN2,) for name in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")},
    **{name: (_LLAMA3,) for name in ("chatglm-bpe", "glm4")},  # llama.cpp's CHATGLM4: llama3's regex
    "bloom": (r" ?[^(\s|.,!?…。，、।۔،)]+",),
    **{name: (_O200K,) for name in ("gpt-4o", "llama4")},
}
# Pre-tokenizers whose words found whole in the vocabulary skip the merges (llama.cpp's ignore_merges).
IGNORE_MERGES = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "glm4"})


class GGUFTokenizerError(PagedLLMError, ValueError):
    """GGUF tokenizer metadata that cannot be turned into a tokenizer."""


def build_gguf_tokenizer(meta: dict[str, Any], path: str) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise GGUFTokenizerError(f"{path}: tokenizer.ggml.tokens is missing or empty")
    token_types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))]
    if len(token_types) != len(tokens):
        raise GGUFTokenizerError(f"{path}: {len(token_types)} token types for {len(tokens)} tokens")
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(meta, tokens, path)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(meta, tokens, token_types, path)
    else:
        raise GGUFTokenizerError(f"{path}: tokenizer model {shown(kind)} is not supported (pagedllm supports gpt2, llama)")
    _add_special_tokens(tokenizer, tokens, token_types)
    return tokenizer


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)  # a duplicated spelling keeps its first id, as llama.cpp does
    return vocab


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], path: str) -> Tokenizer:
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise GGUFTokenizerError(f"{path}: a gpt2 tokenizer needs tokenizer.ggml.merges")
    pairs = [tuple(m.split(" ", 1)) for m in merges if " " in m]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_REGEXES:
        raise GGUFTokenizerError(
            f"{path}: pre-tokenizer {shown(pre)} is not supported; known: {', '.join(sorted(PRE_TOKENIZER_REGEXES))}")
    tokenizer = Tokenizer(models.BPE(vocab=_vocab(tokens), merges=pairs, fuse_unk=False,
                                     ignore_merges=pre in IGNORE_MERGES))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_REGEXES[pre]]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], token_types: list[int], path: str) -> Tokenizer:
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise GGUFTokenizerError(f"{path}: a llama tokenizer needs one score per token")
    vocab = _vocab(tokens)
    mergeable = {t: float(s) for t, s, kind in zip(tokens, scores, token_types) if kind == TOKEN_NORMAL}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    bpe = models.BPE(vocab=vocab, merges=_merges_from_scores(vocab, mergeable),
                     unk_token=tokens[unk_id] if 0 <= unk_id < len(tokens) else None,
                     fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(bpe)
    # Gemma's vocabulary adds no space in front of the text (add_space_prefix false), so its decoder
    # must not strip one either.
    space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Replace(" ", "\u2581")]
    decoding = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        steps.insert(0, normalizers.Prepend("\u2581"))
        decoding.append(decoders.Strip(" ", 1, 0))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence(decoding)
    return tokenizer


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SentencePiece keeps no merge list: a pair merges into a token, best-scored token first."""
    ranked = []
    for token, score in scores.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        ranked += [(-score, order, pair) for order, pair in enumerate(pairs)]
    ranked.sort(key=lambda r: (r[0], vocab["".join(r[2])], r[1]))
    return [pair for _, _, pair in ranked]


def _add_special_tokens(tokenizer: Tokenizer, tokens: list[str], token_types: list[int]) -> None:
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types) if k == TOKEN_CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, token_types)
            if k == TOKEN_USER_DEFINED]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user)

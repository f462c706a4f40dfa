from .detokenizer import IncrementalDetokenizer
from .tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer", "TokenizerError", "load_tokenizer"]

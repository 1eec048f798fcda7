"""The tokenizer loader lives with the runtime (titans_train/data/tokenizer.py), which must never
import this offline package; the data jobs use it from there under its old name."""

from titans_train.data.tokenizer import BYTES, EOS_CANDIDATES, TextTokenizer, load_tokenizer

__all__ = ["BYTES", "EOS_CANDIDATES", "TextTokenizer", "load_tokenizer"]

"""Text in, token ids out and back: a thin wrapper over a Hugging Face fast tokenizer."""

import json
from functools import lru_cache
from pathlib import Path

from transformers import AutoTokenizer

from xllm.engine.errors import InvalidParameter


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-printable-character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class Tokenizer:
    def __init__(self, folder: Path):
        self.hf = AutoTokenizer.from_pretrained(folder)
        self.vocab_size = len(self.hf)
        self.eos_token_ids = self._eos_ids(folder)
        self._byte_level = self._is_byte_level()
        self._special_ids = set(self.hf.all_special_ids)
        # No token spans more characters than its vocabulary string has (a byte-level
        # string has one character per byte): a bound on characters per token.
        self.max_token_chars = max(len(piece) for piece in self.hf.get_vocab())

    def _eos_ids(self, folder: Path) -> set[int]:
        ids = set()
        gen = folder / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.hf.eos_token_id is not None:
            ids.add(self.hf.eos_token_id)
        return ids

    def _is_byte_level(self) -> bool:
        decoder = json.loads(self.hf.backend_tokenizer.to_str()).get("decoder") or {}
        kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
        return "ByteLevel" in kinds

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.hf.chat_template:
            raise InvalidParameter(
                "messages", "this model has no chat template; use /v1/completions")
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def token_text(self, token_id: int) -> str:
        """The token's own text (special tokens included), for logprobs."""
        return self.hf.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> list[int]:
        """The token's raw bytes (a byte-level token may be part of a character)."""
        piece = self.hf.convert_ids_to_tokens(token_id)
        if self._byte_level and not self.is_special(token_id):
            table = _byte_decoder()
            if piece is not None and all(c in table for c in piece):
                return [table[c] for c in piece]
        return list(self.token_text(token_id).encode("utf-8"))

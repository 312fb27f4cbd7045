"""The model runner: owns the model and its KV cache, runs one forward pass per step.

The engine hands it one `SeqInput` per scheduled sequence (its prompt, the new
token ids, where they start, the block table, which positions need logits); it
lays them end to end into flat tensors, sets the attention context (metadata
and KV cache), runs the model once for prefill chunks and decodes together, and
returns the logits asked for.

For a vision model the runner also owns the encoder cache: an image's embeddings are
computed in the first step that reads one of its tokens and kept until a step reads
its last token (a prefill chunk may end inside an image).
"""

import gc
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xllm import ops
from xllm.config import EngineConfig
from xllm.inputs import PromptInput
from xllm.model.config import ARCHITECTURES
from xllm.model.context import AttentionContext, set_context
from xllm.model.loader import iterate_weights

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ENCODER_CACHE_IMAGES = 32  # image embeddings kept at most (a bound for abandoned requests)


@dataclass
class SeqInput:
    """One sequence's share of a step."""

    prompt: PromptInput  # the request's prompt (its images and positions are read from it)
    token_ids: list[int]  # the new tokens of this step
    start: int  # their first position (tokens already in the cache)
    block_table: list[int]
    logit_offsets: list[int]  # offsets into token_ids whose next-token logits are wanted
    write_kv: bool = True  # False: the tokens' keys and values are in the cache already


class ModelRunner:
    def __init__(self, folder: Path, hf_config, config: EngineConfig, max_model_len: int):
        torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
        torch.manual_seed(config.seed)
        self.dtype = DTYPES[config.dtype]
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.folder = folder
        self.hf_config = hf_config
        self.model = self._load_model()
        self.vocab_size = hf_config.get_text_config().vocab_size
        self.encoder_cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.num_blocks = config.num_blocks or self._blocks_for(config.kv_cache_memory)
        self.k_cache: torch.Tensor | None = None  # [layers, blocks, block_size, kv heads, dim]
        self.v_cache: torch.Tensor | None = None
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []  # per-layer views
        self._allocate_kv_cache()

    def _load_model(self) -> torch.nn.Module:
        model = ARCHITECTURES[self.hf_config.model_type](self.hf_config, self.max_model_len)
        model.load_weights(iterate_weights(self.folder))
        return model.to(self.dtype).eval()

    def sleep(self, level: int = 1) -> None:
        """Free the KV cache; level 2 frees the weights too. Harmless when already asleep."""
        self.k_cache = self.v_cache = None
        self.kv_caches = []
        self.encoder_cache.clear()
        if level >= 2 and self.model is not None:
            self.model = None
        gc.collect()
        logger.info("asleep (level %d)", level)

    def wake_up(self) -> None:
        """Reload the weights if they were freed and re-create the KV cache (zeroed)."""
        if self.model is None:
            self.model = self._load_model()
        if self.k_cache is None:
            self._allocate_kv_cache()
        logger.info("awake")

    def _blocks_for(self, memory: int) -> int:
        block = int(np.prod(self.model.kv_block_shape(self.block_size)))
        per_block = 2 * len(self.model.layers) * block
        return max(1, memory // (per_block * torch.finfo(self.dtype).bits // 8))

    def _allocate_kv_cache(self) -> None:
        shape = (len(self.model.layers), self.num_blocks,
                 *self.model.kv_block_shape(self.block_size))
        self.k_cache = torch.zeros(shape, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, dtype=self.dtype)
        self.kv_caches = list(zip(self.k_cache.unbind(0), self.v_cache.unbind(0)))
        logger.info("KV cache: %d blocks of %d tokens", self.num_blocks, self.block_size)

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy KV-cache blocks (src, dst) in every layer: a beam's copy on write."""
        ops.copy_blocks(self.k_cache, self.v_cache, torch.tensor(pairs, dtype=torch.int64))

    @torch.inference_mode()
    def run(self, batch: list[SeqInput]) -> torch.Tensor:
        """Forward the batch; return float32 logits [rows, vocab]: for each input in order,
        one row per logit offset."""
        input_ids, positions, slots, logit_rows = [], [], [], []
        query_start, seq_lens = [0], []
        bs = self.block_size
        max_blocks = max(len(s.block_table) for s in batch)
        tables = np.zeros((len(batch), max_blocks), dtype=np.int32)
        multimodal = any(s.prompt.positions is not None for s in batch)
        for i, s in enumerate(batch):
            n = len(s.token_ids)
            offset = query_start[-1]
            input_ids.extend(s.token_ids)
            pos = np.arange(s.start, s.start + n)
            table = np.asarray(s.block_table, dtype=np.int64)
            tables[i, : len(table)] = table
            positions.append(self._positions(s.prompt, pos) if multimodal else pos)
            slots.append(table[pos // bs] * bs + pos % bs if s.write_kv else np.full(n, -1))
            logit_rows.extend(offset + o for o in s.logit_offsets)
            query_start.append(offset + n)
            seq_lens.append(s.start + n)
        set_context(
            AttentionContext(
                slot_mapping=torch.from_numpy(np.concatenate(slots)),
                query_start_loc=torch.tensor(query_start, dtype=torch.int32),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                block_tables=torch.from_numpy(tables),
                kv_caches=self.kv_caches,
            )
        )
        ids = torch.tensor(input_ids, dtype=torch.long)
        pos = torch.from_numpy(np.concatenate(positions, axis=-1))
        try:
            images = self._image_embeds(batch, query_start) if any(
                s.prompt.images for s in batch) else None
            hidden = self.model(ids, pos) if images is None else self.model(ids, pos, *images)
        finally:
            set_context(None)
        rows = torch.tensor(logit_rows, dtype=torch.long)
        return self.model.logits(hidden[rows]).float()

    @staticmethod
    def _positions(prompt: PromptInput, pos: np.ndarray) -> np.ndarray:
        """The [3, n] M-RoPE positions of a sequence's tokens at indices `pos`."""
        if prompt.positions is None:
            return np.broadcast_to(pos, (3, len(pos)))
        inside = pos[pos < len(prompt)]
        after = pos[len(inside):] + prompt.position_delta
        return np.concatenate([prompt.positions[:, inside],
                               np.broadcast_to(after, (3, len(after)))], axis=1)

    def _image_embeds(self, batch: list[SeqInput], query_start: list[int]
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The batch rows of image placeholder tokens and their embeddings (None: no image
        token in this step); runs the vision encoder on the images not in the encoder cache,
        and drops those read to the end."""
        wanted = [(s, start, image) for s, start in zip(batch, query_start)
                  for image in s.prompt.images_in(s.start, s.start + len(s.token_ids))]
        if not wanted:
            return None
        new = {image.digest: image for _, _, image in wanted
               if image.digest not in self.encoder_cache}
        if new:
            images = list(new.values())
            embeds = self.model.embed_images(torch.cat([im.pixel_values for im in images]),
                                             [im.grid_thw for im in images])
            for image, part in zip(images, embeds.split([im.num_tokens for im in images])):
                self.encoder_cache[image.digest] = part
        rows, parts, done = [], [], set()
        for s, start, image in wanted:
            lo = max(s.start, image.offset)
            hi = min(s.start + len(s.token_ids), image.end)
            rows.append(np.arange(lo, hi) - s.start + start)
            self.encoder_cache.move_to_end(image.digest)
            parts.append(self.encoder_cache[image.digest][lo - image.offset : hi - image.offset])
            if hi == image.end:
                done.add(image.digest)
        for digest in done:
            self.encoder_cache.pop(digest, None)
        while len(self.encoder_cache) > ENCODER_CACHE_IMAGES:
            self.encoder_cache.popitem(last=False)
        return torch.from_numpy(np.concatenate(rows)), torch.cat(parts)

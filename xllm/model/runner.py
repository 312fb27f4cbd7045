"""The model runner: owns the model and its KV cache, runs one forward pass per step.

The engine hands it one `SeqInput` per scheduled sequence (its prompt, the new
token ids, where they start, the block table, which positions need logits); it
lays them end to end into flat tensors, sets the attention context (metadata
and KV cache), runs the model once for prefill chunks and decodes together, and
returns the logits asked for. On CUDA the model, the KV cache and the logits stay on
the GPU, the inputs arrive through pinned buffers (`device.Staging`), and a decode step
replays a CUDA graph (`cuda_graphs`).

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
from xllm.model.cuda_graphs import DecodeGraphs
from xllm.model.device import (
    MATMUL_PRECISIONS,
    Staging,
    free_gpu_memory,
    huge_page_copies,
    resolve_device,
    resolve_dtype,
    resolve_kv_cache_dtype,
    zeros,
)
from xllm.model.llama import (
    allow_bf16_products,
    allow_int8_products,
    move_weights,
    pack_float_linears,
    quantize_linears,
)
from xllm.model.loader import gguf_source, iterate_weights

logger = logging.getLogger(__name__)

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
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        if self.device.type == "cpu":
            torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
        torch.manual_seed(config.seed)
        self.config = config
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        # CUDA: block tables of one width (CUDA graphs, a split choice that does not change).
        self.table_width = -(-max_model_len // config.block_size)
        self.folder = folder
        self.hf_config = hf_config
        self.staging = Staging(self.device)
        self.model = self._load_model()
        self.vocab_size = hf_config.get_text_config().vocab_size
        self.encoder_cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.num_blocks = config.num_blocks or self._blocks_for(self._kv_cache_memory())
        self.k_cache: torch.Tensor | None = None  # [layers, blocks, block_size, kv heads, dim]
        self.v_cache: torch.Tensor | None = None
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []  # per-layer views
        self.graphs: DecodeGraphs | None = None
        self._allocate_kv_cache()

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def _load_model(self) -> torch.nn.Module:
        if self.config.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul_precision {self.config.matmul_precision!r}: "
                             + " or ".join(MATMUL_PRECISIONS))
        model = ARCHITECTURES[self.hf_config.model_type](self.hf_config, self.max_model_len)
        gguf = gguf_source(self.config.model)
        if gguf is not None and self.config.quantization == "auto":
            text = self.hf_config.get_text_config()
            from xllm.model.gguf_weights import iterate_gguf_weights  # needs gguf: GGUF only

            model.load_weights(iterate_gguf_weights(
                gguf, text.model_type, text.num_attention_heads, text.num_key_value_heads))
        else:
            model.load_weights(iterate_weights(self.folder))
        if self.config.quantization == "int8":
            logger.info("int8 weights for %d linear layers", quantize_linears(model))
        if self.config.matmul_precision == "medium":
            logger.info("bfloat16 products allowed in %d linear layers",
                        allow_bf16_products(model))
        elif self.config.matmul_precision == "low" and not self.on_cuda:
            logger.info("int8 products in %d linear layers", allow_int8_products(model))
            if not ops.int8_products_fast():
                logger.warning("this CPU lacks AVX-512 VNNI: int8 products run a portable "
                               "loop, slower than --matmul-precision highest")
        model = model.to(device=self.device, dtype=self.dtype).eval()
        if not self.on_cuda and ops.available("cpp"):
            logger.info("float32 weights of %d linear layers packed in panels",
                        pack_float_linears(model))
        if not self.on_cuda:
            moved = move_weights(model, huge_page_copies)
            logger.info("weights: %.1f MB in one block, huge pages asked for", moved / 1e6)
        return model

    def _kv_cache_memory(self) -> int:
        """Bytes for the KV cache: as configured, else the CPU's default, else what the GPU
        has left under --gpu-memory-utilization after the peak of a full prefill step."""
        if self.config.kv_cache_memory:
            return self.config.kv_cache_memory
        if not self.on_cuda:
            return self.config.cpu_kv_cache_memory
        return free_gpu_memory(self.device, self.config.gpu_memory_utilization,
                               self._activation_peak())

    @torch.inference_mode()
    def _activation_peak(self) -> int:
        """Bytes a step of max_num_batched_tokens prompt tokens (every row's logits asked
        for) takes beyond the weights, measured on a KV cache of just enough blocks."""
        tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        blocks = -(-tokens // self.block_size)
        shape = (blocks, *self.model.kv_block_shape(self.block_size))
        caches = [(torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
                   torch.zeros(shape, dtype=self.kv_dtype, device=self.device))
                  for _ in self.model.layers]
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        positions = torch.arange(tokens, device=self.device)
        set_context(AttentionContext(
            slot_mapping=positions, seq_lens=torch.tensor([tokens], device=self.device,
                                                          dtype=torch.int32),
            query_start_loc=torch.tensor([0, tokens], device=self.device, dtype=torch.int32),
            block_tables=torch.arange(blocks, device=self.device,
                                      dtype=torch.int32)[None], kv_caches=caches))
        try:
            hidden = self.model(torch.zeros(tokens, dtype=torch.long, device=self.device),
                                positions)
            self.model.logits(hidden).float()
        finally:
            set_context(None)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del caches
        torch.cuda.empty_cache()
        return peak

    def sleep(self, level: int = 1) -> None:
        """Free the KV cache; level 2 frees the weights too. Harmless when already asleep."""
        self.k_cache = self.v_cache = None
        self.kv_caches = []
        self.graphs = None
        self.encoder_cache.clear()
        if level >= 2 and self.model is not None:
            self.model = None
        gc.collect()
        if self.on_cuda:
            torch.cuda.empty_cache()
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
        return max(1, memory // (per_block * self.kv_dtype.itemsize))

    def _allocate_kv_cache(self) -> None:
        shape = (len(self.model.layers), self.num_blocks,
                 *self.model.kv_block_shape(self.block_size))
        self.k_cache = zeros(shape, self.kv_dtype, self.device)
        self.v_cache = zeros(shape, self.kv_dtype, self.device)
        self.kv_caches = list(zip(self.k_cache.unbind(0), self.v_cache.unbind(0)))
        logger.info("KV cache: %d blocks of %d tokens in %s on %s", self.num_blocks,
                    self.block_size, self.kv_dtype, self.device)
        if self.on_cuda and not self.config.enforce_eager:
            self.graphs = DecodeGraphs(self.model, self.kv_caches, self.config.max_num_seqs,
                                       self.table_width, self.device)
            self.graphs.capture()

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy KV-cache blocks (src, dst) in every layer: a beam's copy on write."""
        ops.copy_blocks(self.k_cache, self.v_cache,
                        torch.tensor(pairs, dtype=torch.int64, device=self.device))

    @torch.inference_mode()
    def run(self, batch: list[SeqInput]) -> torch.Tensor:
        """Forward the batch; return float32 logits [rows, vocab] on the device: for each
        input in order, one row per logit offset."""
        input_ids, positions, slots, logit_rows = [], [], [], []
        query_start, seq_lens = [0], []
        bs = self.block_size
        width = self.table_width if self.on_cuda else max(len(s.block_table) for s in batch)
        tables = np.zeros((len(batch), width), dtype=np.int32)
        multimodal = any(s.prompt.positions is not None and s.start < len(s.prompt)
                         for s in batch)
        for i, s in enumerate(batch):
            n = len(s.token_ids)
            offset = query_start[-1]
            input_ids.extend(s.token_ids)
            pos = np.arange(s.start, s.start + n)
            table = np.asarray(s.block_table, dtype=np.int64)
            tables[i, : len(table)] = table
            if multimodal:
                positions.append(self._positions(s.prompt, pos))
            else:  # after an image prompt, a token's three M-RoPE positions are one
                delta = s.prompt.position_delta
                positions.append(pos + delta * (pos >= len(s.prompt)) if delta else pos)
            slots.append(table[pos // bs] * bs + pos % bs if s.write_kv else np.full(n, -1))
            logit_rows.extend(offset + o for o in s.logit_offsets)
            query_start.append(offset + n)
            seq_lens.append(s.start + n)
        stage = self.staging
        ids = stage("ids", np.asarray(input_ids, dtype=np.int64))
        pos = stage("positions", np.concatenate(positions, axis=-1))
        slot_mapping = stage("slots", np.concatenate(slots))
        lens = stage("seq_lens", np.asarray(seq_lens, dtype=np.int32))
        block_tables = stage("tables", tables)
        rows = stage("rows", np.asarray(logit_rows, dtype=np.int64))
        if pos.dim() == 1 and self._graph_fits(batch, len(input_ids)):
            hidden = self.graphs.run(ids, pos, slot_mapping, lens, block_tables)
        else:
            set_context(AttentionContext(
                slot_mapping=slot_mapping,
                query_start_loc=stage("query_start", np.asarray(query_start, dtype=np.int32)),
                seq_lens=lens, block_tables=block_tables, kv_caches=self.kv_caches))
            try:
                images = self._image_embeds(batch, query_start) if any(
                    s.prompt.images for s in batch) else None
                hidden = self.model(ids, pos) if images is None else \
                    self.model(ids, pos, *images)
            finally:
                set_context(None)
        return self.model.logits(hidden[rows]).float()

    def _graph_fits(self, batch: list[SeqInput], num_tokens: int) -> bool:
        """Whether a captured decode graph serves this step: one token per sequence, each
        writing its KV, no image token, and few enough sequences."""
        return (self.graphs is not None and num_tokens == len(batch)
                and len(batch) <= self.graphs.max_batch
                and all(s.write_kv and not s.prompt.images_in(s.start, s.start + 1)
                        for s in batch))

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
            patches = torch.cat([im.pixel_values for im in images]).to(self.device)
            embeds = self.model.embed_images(patches, [im.grid_thw for im in images])
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
        return self.staging("image_rows", np.concatenate(rows)), torch.cat(parts)

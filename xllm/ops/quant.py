"""Quantized weight formats: the byte layout of one row, and the weight that holds them.

A quantized weight [N, K] is a uint8 tensor [N, row_bytes]: each row is K / block blocks of
block_bytes bytes, laid out exactly as in GGUF files (ggml's block structs), after a
row_header of bytes (int8's per-row scale). Rows are independent, so fused projections are
rows stacked, and a permutation of rows is a permutation of weight rows.

- q8_0: 32 weights; f16 d, int8 q[32]; w = d * q.
- q4_0: 32 weights; f16 d, u8 qs[16] (weight j in the low nibble of qs[j], j + 16 in the
  high one); w = d * (q - 8).
- q4_1: as q4_0 with f16 d, f16 m first; w = d * q + m.
- q4_k: 256 weights in 8 sub-blocks of 32; f16 d, f16 dmin, 12 bytes of 6-bit scales and
  mins, u8 qs[128] (sub-blocks 2c and 2c + 1 in the low and high nibbles of qs[32c:32c+32]);
  w = d * scale_j * q - dmin * min_j.
- q6_k: 256 weights; u8 ql[128], u8 qh[64], int8 scales[16], f16 d; w = d * scales[i // 16] *
  (q - 32) with q six bits (see `reference.dequantize`).
- int8: xllm's weight-only int8: f32 scale, int8 q[K] (K a multiple of 32); w = scale * q.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantFormat:
    name: str
    block: int  # weights per block
    block_bytes: int
    row_header: int = 0  # bytes before the first block of a row

    def row_bytes(self, k: int) -> int:
        if k % self.block:
            raise ValueError(f"{self.name} needs K a multiple of {self.block}, got {k}")
        return self.row_header + k // self.block * self.block_bytes

    def columns(self, row_bytes: int) -> int:
        """K of a row of row_bytes bytes."""
        blocks, rest = divmod(row_bytes - self.row_header, self.block_bytes)
        if rest or blocks < 0:
            raise ValueError(f"{row_bytes} bytes are not whole {self.name} blocks")
        return blocks * self.block


FORMATS = {
    f.name: f
    for f in (
        QuantFormat("q8_0", 32, 34),
        QuantFormat("q4_0", 32, 18),
        QuantFormat("q4_1", 32, 20),
        QuantFormat("q4_k", 256, 144),
        QuantFormat("q6_k", 256, 210),
        QuantFormat("int8", 32, 32, row_header=4),
    )
}


def quant_format(qtype: str) -> QuantFormat:
    try:
        return FORMATS[qtype]
    except KeyError:
        known = ", ".join(FORMATS)
        raise ValueError(f"unknown quantized format {qtype!r} (known: {known})") from None


@dataclass
class QuantizedTensor:
    """A quantized weight [N, K]: data is uint8 [N, row_bytes] in `qtype`'s layout."""

    qtype: str
    data: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], quant_format(self.qtype).columns(self.data.shape[1])


def quantize_int8(weight: torch.Tensor) -> QuantizedTensor:
    """Weight-only int8 with one scale per output row (symmetric, round to nearest)."""
    n, k = weight.shape
    fmt = FORMATS["int8"]
    fmt.row_bytes(k)  # checks K
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    data = torch.empty(n, fmt.row_header + k, dtype=torch.uint8, device=weight.device)
    data[:, :4] = scale[:, None].view(torch.uint8)
    data[:, 4:] = q.view(torch.uint8)
    return QuantizedTensor("int8", data)


# Int8 products (`--matmul-precision low`): x is rounded to int8 per block of 32 and meets the
# integer weights of these formats, packed by `pack_int8` (csrc/int8_linear.cpp multiplies).
INT8_FORMATS = ("q8_0", "q4_0", "q4_1", "int8")
INT8_PANEL = 16  # W rows per panel
# The packed layouts (int8 rows take q8_0's, their row scale as every block's d). Integer
# weights are stored unsigned: w = d * (q - zero) (+ m for q4_1).
INT8_ZERO = {"q8_0": 128, "q4_0": 8, "q4_1": 0}


@dataclass
class Int8Packed:
    """W [n, k] of a `INT8_FORMATS` format, packed for int8 products in the layout qtype
    (a key of `INT8_ZERO`).

    data: uint8 [ceil(n / 16), k / 32, block_bytes]: panel p holds rows 16p .. 16p + 15 (rows
    past n are zeros), block b their weights b * 32 .. b * 32 + 31, as
    - the weights: q8_0: 512 bytes, byte 64g + 4j + t = q(j, 4g + t) + 128 (g < 8); q4_0 and
      q4_1: 256 bytes, byte 64g + 4j + t = GGUF's byte 4g + t of row j's block (g < 4): the
      low nibble q(j, 4g + t), the high one q(j, 16 + 4g + t);
    - then d of the 16 rows (float32), and for q4_1 m of the 16 rows (float32).
    """

    qtype: str
    data: torch.Tensor
    n: int
    k: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k


def int8_weight_bytes(layout: str) -> int:
    """Bytes of the weights of one panel's block in `Int8Packed.data` (its scales follow)."""
    return 512 if layout == "q8_0" else 256


def int8_block_bytes(layout: str) -> int:
    """Bytes of one panel's block in `Int8Packed.data`."""
    return int8_weight_bytes(layout) + 4 * INT8_PANEL * (2 if layout == "q4_1" else 1)


def pack_int8(w: QuantizedTensor) -> Int8Packed:
    """W's rows packed for int8 products (see `Int8Packed`); the same weights."""
    if w.qtype not in INT8_FORMATS:
        raise ValueError(f"int8 products take {', '.join(INT8_FORMATS)} weights, not {w.qtype}")
    n, k = w.shape
    blocks, panels = k // 32, -(-n // INT8_PANEL)
    if w.qtype == "int8":  # q8_0 blocks whose d is the row's float32 scale
        layout, q = "q8_0", w.data[:, 4:].reshape(n, blocks, 32) ^ 0x80
        scales = [w.data[:, :4].contiguous().view(torch.float32).expand(n, blocks)]
    else:
        layout, b = w.qtype, w.data.view(n, blocks, FORMATS[w.qtype].block_bytes)

        def f16(at: int) -> torch.Tensor:  # [n, B]
            return b[..., at:at + 2].contiguous().view(torch.float16).float().squeeze(-1)

        if w.qtype == "q8_0":
            q, scales = b[..., 2:] ^ 0x80, [f16(0)]
        elif w.qtype == "q4_0":
            q, scales = b[..., 2:], [f16(0)]
        else:
            q, scales = b[..., 4:], [f16(0), f16(2)]

    def in_panels(t: torch.Tensor) -> torch.Tensor:  # [n, B, ...] -> [P, 16, B, ...], zeros after n
        out = t.new_zeros(panels * INT8_PANEL, *t.shape[1:])
        out[:n] = t
        return out.view(panels, INT8_PANEL, *t.shape[1:])

    # byte 64g + 4j + t of a block: byte 4g + t of row j's
    weights = in_panels(q).unflatten(-1, (-1, 4)).permute(0, 2, 3, 1, 4).reshape(panels, blocks, -1)
    parts = [weights]
    parts += [in_panels(d).permute(0, 2, 1).contiguous().view(torch.uint8) for d in scales]
    return Int8Packed(layout, torch.cat(parts, dim=-1).contiguous(), n, k)

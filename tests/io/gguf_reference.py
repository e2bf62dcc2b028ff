#!/usr/bin/env python3
"""Writes a GGUF with gguf-py (the reference implementation) for test_ggml_quants.cpp.

For every type gguf-py can quantize, tensor "<type>.src" holds random fp32 rows, "<type>" the
rows quantized by gguf.quants.quantize and "<type>.deq" gguf.quants.dequantize of those bytes.
For the K types, which gguf-py only dequantizes, "<type>" holds random blocks (with finite fp16
scales) and "<type>.deq" their dequantization. A few metadata keys of every value type let the
C++ side check that it reads a file written by an independent writer.

usage: gguf_reference.py OUTPUT.gguf
"""
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

QUANTIZABLE = [T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
# Byte offsets of the fp16 super-block scales (d, dmin) within one K block.
K_SCALE_OFFSETS = {
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}


def source_rows(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    x = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(0.05)
    x[0, :] = 0.0                          # scale 0
    x[1, :] = np.float32(0.25)             # max == min
    x[2, : cols // 2] *= np.float32(1e4)   # a large range in one half
    x[3, :] = np.round(x[3, :] * 64) / 64  # ties in the rounding
    return x


def main() -> None:
    out = sys.argv[1]
    rng = np.random.default_rng(20240607)
    w = gguf.GGUFWriter(out, arch="qalora-reference")
    w.add_uint8("ref.u8", 200)
    w.add_int8("ref.i8", -5)
    w.add_uint16("ref.u16", 65000)
    w.add_int16("ref.i16", -32000)
    w.add_uint32("ref.u32", 4000000000)
    w.add_int32("ref.i32", -2000000000)
    w.add_float32("ref.f32", 0.1)
    w.add_uint64("ref.u64", 2**63 + 5)
    w.add_int64("ref.i64", -(2**62))
    w.add_float64("ref.f64", 0.1)
    w.add_bool("ref.bool", True)
    w.add_string("ref.string", "héllo\nworld")
    w.add_array("ref.strings", ["a", "", "ccc"])
    w.add_array("ref.ints", [1, -2, 3])
    w.add_array("ref.floats", [0.5, -1.25])
    w.add_array("ref.nested", [[1, 2], [3]])

    for qt in QUANTIZABLE:
        src = source_rows(rng, 5, 96)
        q = gguf.quants.quantize(src, qt)
        w.add_tensor(f"{qt.name}.src", src)
        w.add_tensor(qt.name, q, raw_dtype=qt)
        w.add_tensor(f"{qt.name}.deq", gguf.quants.dequantize(q, qt).astype(np.float32))

    for qt, offsets in K_SCALE_OFFSETS.items():
        block_size, type_size = gguf.GGML_QUANT_SIZES[qt]
        rows, blocks_per_row = 3, 2
        raw = rng.integers(0, 256, size=(rows, blocks_per_row, type_size), dtype=np.uint8)
        scales = (rng.standard_normal((rows, blocks_per_row, len(offsets))) * 0.01).astype(np.float16)
        for k, off in enumerate(offsets):
            raw[:, :, off:off + 2] = scales[:, :, k:k + 1].view(np.uint8)
        raw = raw.reshape(rows, blocks_per_row * type_size)
        w.add_tensor(qt.name, raw, raw_dtype=qt)
        deq = gguf.quants.dequantize(raw, qt).astype(np.float32)
        assert deq.shape == (rows, block_size * blocks_per_row)
        w.add_tensor(f"{qt.name}.deq", deq)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Reads a GGUF file with gguf-py (the reference implementation) for test_export_gguf.cpp.

Every tensor is dequantized with gguf.quants.dequantize and written, as F32 under its GGUF name,
to a safetensors file; the file's metadata holds each tensor's ggml type ("type:<name>") and the
scalar and string metadata keys of the GGUF file ("kv:<key>", printed with str(); arrays as
their length, "len:<key>").

usage: gguf_readback.py INPUT.gguf OUTPUT.safetensors
Exits with 3 when gguf or numpy is missing, so the test can skip.
"""
import json
import struct
import sys

try:
    import numpy as np
    import gguf
except ImportError as e:  # the C++ side skips on exit status 3
    print(f"missing python package: {e}", file=sys.stderr)
    sys.exit(3)


def field_value(field):
    types = field.types
    if types and types[0] == gguf.GGUFValueType.ARRAY:
        return None, len(field.data)
    if types and types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8"), None
    return field.parts[field.data[0]].tolist()[0], None


def main() -> None:
    src, out = sys.argv[1], sys.argv[2]
    reader = gguf.GGUFReader(src)
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value, length = field_value(field)
        if length is not None:
            meta[f"len:{name}"] = str(length)
        else:
            meta[f"kv:{name}"] = str(value)

    header = {}
    blobs = []
    offset = 0
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        # gguf-py reports ne (innermost first); safetensors wants row-major shapes.
        shape = [int(d) for d in reversed(t.shape.tolist())]
        values = np.ascontiguousarray(values.reshape(shape))
        data = values.tobytes()
        header[t.name] = {"dtype": "F32", "shape": shape,
                          "data_offsets": [offset, offset + len(data)]}
        meta[f"type:{t.name}"] = t.tensor_type.name
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = meta
    text = json.dumps(header).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data in blobs:
            f.write(data)


if __name__ == "__main__":
    main()

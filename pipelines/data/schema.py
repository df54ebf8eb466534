"""The Parquet schema of an ingested split: one row per image (docs/contracts.md, "Dataset schema")."""
from __future__ import annotations

import pyarrow as pa

RLE = pa.struct([("size", pa.list_(pa.int32(), 2)), ("counts", pa.string())])

SHARD_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("file_name", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("image", pa.binary()),                         # the encoded bytes (JPEG or PNG), RGB
    ("boxes", pa.list_(pa.list_(pa.float32(), 4))),  # xyxy, absolute pixels
    ("category_ids", pa.list_(pa.int64())),          # the original COCO ids
    ("labels", pa.list_(pa.int64())),                # contiguous 1..K
    ("iscrowd", pa.list_(pa.uint8())),
    ("area", pa.list_(pa.float32())),
    ("segmentation", pa.list_(RLE)),                 # compressed COCO RLE
])

# Transient columns between decoding and the shard writer; never written to shards.
QUARANTINE = "_quarantine"
CONVERTED = "_converted"
DECODED_SCHEMA = SHARD_SCHEMA.append(pa.field(QUARANTINE, pa.string())).append(pa.field(CONVERTED, pa.string()))

"""Read W&B's run files (`run-<id>.wandb`) back: what `wandb sync` would upload.

wandb no longer ships a Python reader for them. The file is a leveldb log (32 KiB blocks of records, each
with a CRC-32, a length and a FULL/FIRST/MIDDLE/LAST type) after a 7-byte W&B header; each record is a
`wandb_internal_pb2.Record`, parsed here with wandb's own protobuf schema, checksums verified.
"""

import json
import struct
import zlib
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B run file"
    pos, parts = 7, []
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # a block's trailer
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding to the block's end
            pos += room
            continue
        chunk = data[pos + 7:pos + 7 + length]
        assert len(chunk) == length and zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}@{pos}: corrupt"
        pos += 7 + length
        parts = [chunk] if kind in (FULL, FIRST) else parts + [chunk]
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            yield record


def runs(root: Path) -> dict[str, list[dict]]:
    """Every run file under `root`, by run id (a resumed run has a file per session, oldest first): its run
    record's fields, and its history rows as {key: value} with `_step`."""
    out: dict[str, list[dict]] = {}
    for path in sorted(root.rglob("run-*.wandb")):
        session = {"history": []}
        for r in records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run" and "id" not in session:
                session.update(id=r.run.run_id, project=r.run.project, name=r.run.display_name,
                               group=r.run.run_group, job_type=r.run.job_type, tags=list(r.run.tags),
                               config={i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "history":
                session["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                           for i in r.history.item})
        out.setdefault(session["id"], []).append(session)
    return out

"""MindRecord files of token rows and their `.db` index, byte-identical to MindSpore's FileWriter.

Written a batch at a time."""

import json
import os
from pathlib import Path

import numpy as np

SCHEMA = {"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}}


# Packed rows (data.packing) carry each token's conversation: 1, 2, ... in the row, 0 for padding.
PACKED_SCHEMA = {**SCHEMA, "segment_ids": {"type": "int32", "shape": [-1]}}


class MindRecordWriter:
    """A MindRecord file (+ `.db`) of SCHEMA rows (PACKED_SCHEMA with segment ids), written a batch of
    equal-length rows at a time.

    MindSpore's FileWriter creates the file and its header. The rows go to the C++ shard writer that
    FileWriter.write_raw_data ends in, as the very blobs it would build, but a batch is serialised at
    once with numpy: FileWriter checks and serialises each row in Python, which costs more than all the
    rest of preprocessing (benchmarks/README.md). The file is byte-identical to FileWriter's
    (tests/test_data.py checks it); the private attributes used are MindSpore 2.9's. At commit the shard
    writer finishes the file and write_index writes the `.db` index, in place of MindSpore's index
    generator, which holds about 1.4 KB per row in memory.
    """

    def __init__(self, path, description="belle_baichuan2", schema=SCHEMA):
        from mindspore.mindrecord import FileWriter

        self.file = FileWriter(str(path), shard_num=1, overwrite=True)
        self.file.add_schema(schema, description)
        # what FileWriter.write_raw_data does before its first rows
        self.file._writer.open(self.file._paths, True)
        self.file._writer.set_shard_header(self.file._header)
        self.blob_fields = self.file._header.blob_fields  # their order in a row's blob

    def write(self, input_ids, labels, segment_ids=None):
        """Append rows: input_ids, labels (and segment_ids, for PACKED_SCHEMA) are int32 arrays [rows, width]."""
        columns = {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids}
        parts = []
        for field in self.blob_fields:
            column = np.ascontiguousarray(columns[field])
            if column.dtype != np.int32 or column.ndim != 2:
                raise ValueError(f"{field}: expected int32 rows [rows, width], got {column.dtype} {column.shape}")
            # a row's blob, as FileWriter builds it: per field its byte length (8 bytes big-endian), its bytes
            parts += [np.full((len(column), 1), column.shape[1] * 4, ">u8").view(np.uint8), column.view(np.uint8)]
        if len(input_ids):
            blobs = np.concatenate(parts, axis=1)
            self.file._writer._writer.write_raw_data({}, [row.tobytes() for row in blobs], False, False)

    def commit(self):
        self.file._flush = True  # what FileWriter.commit does, but for the index
        self.file._writer.commit()
        write_index(self.file._paths[0])


# MindSpore's ShardIndexGenerator's SQL (shard_index_generator.cc), for a schema without index fields
_INDEX_TABLE = ("CREATE TABLE INDEXES("
                "  ROW_ID               INT  NOT NULL, PAGE_ID_RAW          INT  NOT NULL"
                ", PAGE_OFFSET_RAW      INT  NOT NULL, PAGE_OFFSET_RAW_END  INT  NOT NULL"
                ", ROW_GROUP_ID         INT  NOT NULL, PAGE_ID_BLOB         INT  NOT NULL"
                ", PAGE_OFFSET_BLOB     INT  NOT NULL, PAGE_OFFSET_BLOB_END INT  NOT NULL"
                ", PRIMARY KEY(ROW_ID));")


_INDEX_ROW = ("INSERT INTO INDEXES (ROW_ID,ROW_GROUP_ID,PAGE_ID_RAW,PAGE_OFFSET_RAW,PAGE_OFFSET_RAW_END,"
              "PAGE_ID_BLOB,PAGE_OFFSET_BLOB,PAGE_OFFSET_BLOB_END) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


def write_index(path):
    """Write `path`.db, the index MindDataset reads, for a finished single-shard MindRecord file whose
    schema has no index fields (SCHEMA): the tables, rows and statements of MindSpore's ShardIndexGenerator
    (its SQL dump is the same, tested; the unused bytes of the SQLite pages differ, MindSpore's SQLite
    being another build), a row at a time. MindSpore's generator builds every row of a raw-data page in
    memory first, about 1.4 KB each, and with these rows a page holds up to 2.5 million of them."""
    import sqlite3

    path = Path(path)
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    if header.get("index_fields") or len(header["shard_addresses"]) != 1:
        raise ValueError(f"{path}: write_index writes the index of one shard without index fields")
    db_path = Path(f"{path}.db")
    if db_path.exists():
        raise FileExistsError(f"{db_path}: the index exists already")  # (as MindSpore's generator refuses)
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        # no fsync: the index is a temporary until atomic_outputs renames it (lorapipe fsyncs no output)
        db.execute("PRAGMA synchronous = OFF;")
        db.execute("DROP TABLE IF EXISTS INDEXES;")
        db.execute(_INDEX_TABLE)
        db.execute("DROP TABLE IF EXISTS SHARD_NAME;")
        db.execute("CREATE TABLE SHARD_NAME(NAME TEXT NOT NULL);")
        db.execute("INSERT INTO SHARD_NAME (NAME) VALUES (?);", (path.name,))
        db.execute("BEGIN TRANSACTION;")
        db.executemany(_INDEX_ROW, _index_rows(path, header))
        db.execute("END TRANSACTION;")
    finally:
        db.close()


def _index_rows(path, header):
    """(ROW_ID, ROW_GROUP_ID, PAGE_ID_RAW, PAGE_OFFSET_RAW, PAGE_OFFSET_RAW_END, PAGE_ID_BLOB,
    PAGE_OFFSET_BLOB, PAGE_OFFSET_BLOB_END) of every row, in the generator's order: per raw-data page, per
    row group, the rows of its blob page, each row's raw data (per schema: an 8-byte length, the bytes)
    and blob (an 8-byte length, the bytes) one after the other."""
    pages = sorted(header["page"], key=lambda page: page["page_id"])
    blob_pages = {page["page_type_id"]: page for page in pages if page["page_type"] == "BLOB_DATA"}
    schemas = len(header["schema"])
    start, page_size = header["header_size"], header["page_size"]
    fd = os.open(path, os.O_RDONLY)
    try:
        def length(page, offset):
            return int.from_bytes(os.pread(fd, 8, start + page_size * page + offset), "little")

        for raw in (page for page in pages if page["page_type"] == "RAW_DATA"):
            for group in raw["row_group_ids"]:
                blob = blob_pages[group["id"]]
                raw_at, blob_at = group["offset"], 0
                for row in range(blob["start_row_id"], blob["end_row_id"]):
                    raw_end = raw_at
                    for _ in range(schemas):
                        raw_end += 8 + length(raw["page_id"], raw_end)
                    blob_end = blob_at + 8 + length(blob["page_id"], blob_at)
                    yield row, blob["page_type_id"], raw["page_id"], raw_at, raw_end, blob["page_id"], blob_at, blob_end
                    raw_at, blob_at = raw_end, blob_end
    finally:
        os.close(fd)


def write_mindrecord(path, rows, description="belle_baichuan2", chunk=4096):
    """Write (input_ids, labels, ...) rows of one length to `path` (+ `path`.db), `chunk` rows at a time."""
    writer = MindRecordWriter(path, description)
    rows = list(rows)
    for start in range(0, len(rows), chunk):
        chunk = rows[start:start + chunk]
        writer.write(np.stack([r[0] for r in chunk]), np.stack([r[1] for r in chunk]))
    writer.commit()

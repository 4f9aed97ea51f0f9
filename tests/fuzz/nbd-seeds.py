#!/usr/bin/python3
"""Write the seed sessions of fuzz-nbd-handshake and fuzz-nbd-requests (tests/fuzz/corpus/).

Each seed is what a client sends: a few well-formed sessions, so the fuzzer starts from inputs
that reach every option and command. Run it again after changing a seed:
    tests/fuzz/nbd-seeds.py tests/fuzz/corpus
"""
import os
import struct
import sys

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
OPT = dict(EXPORT_NAME=1, ABORT=2, LIST=3, STARTTLS=5, INFO=6, GO=7, STRUCTURED_REPLY=8,
           LIST_META_CONTEXT=9, SET_META_CONTEXT=10)
CMD = dict(READ=0, WRITE=1, DISC=2, FLUSH=3, TRIM=4, CACHE=5, WRITE_ZEROES=6, BLOCK_STATUS=7)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16


def s32(text):
    b = text.encode()
    return struct.pack(">I", len(b)) + b


def option(name, data=b""):
    return struct.pack(">QII", IHAVEOPT, OPT[name], len(data)) + data


def meta(export, *queries):
    return s32(export) + struct.pack(">I", len(queries)) + b"".join(s32(q) for q in queries)


def go(export, *infos):
    return s32(export) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def req(cmd, offset=0, length=0, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, CMD[cmd], cookie, offset, length) + payload


FLAGS = struct.pack(">I", 3)  # fixed newstyle, no zeroes

HANDSHAKE = {
    "list-abort": FLAGS + option("LIST") + option("ABORT"),
    "info-go": FLAGS + option("STRUCTURED_REPLY") + option("LIST_META_CONTEXT", meta("e", "qemu:"))
    + option("SET_META_CONTEXT", meta("e", "base:allocation", "qemu:dirty-bitmap:b0"))
    + option("INFO", go("e", 1, 2, 3)) + option("GO", go("e", 3))
    + req("READ", 0, 4096) + req("BLOCK_STATUS", 0, 1 << 20, cookie=2) + req("DISC"),
    "export-name": FLAGS + option("EXPORT_NAME", b"ro") + req("READ", 512, 512) + req("DISC"),
    "refusals": FLAGS + option("STARTTLS") + struct.pack(">QII", IHAVEOPT, 99, 3) + b"abc"
    + option("GO", go("nope")) + option("SET_META_CONTEXT", meta("e", "base:allocation")),
    "old-flags": struct.pack(">I", 0) + option("LIST"),
    "cbtd-identity": FLAGS + option("STRUCTURED_REPLY")
    + option("LIST_META_CONTEXT", meta("e", "cbtd:", "cbtd:bitmap-identity:b0"))
    + option("SET_META_CONTEXT", meta("e", "cbtd:bitmap-identity:b0", "qemu:dirty-bitmap:b0"))
    + option("GO", go("e")) + req("BLOCK_STATUS", 0, 1 << 20) + req("DISC"),
}

REQUESTS = {
    "structured": b"\0" + req("READ", 0, 4096) + req("WRITE", 4096, 512, cookie=2, payload=b"x" * 512)
    + req("WRITE_ZEROES", 65536, 65536, NO_HOLE, 3) + req("TRIM", 131072, 65536, cookie=4)
    + req("FLUSH", cookie=5) + req("BLOCK_STATUS", 0, 1 << 20, cookie=6)
    + req("BLOCK_STATUS", 4096, 8192, REQ_ONE, 7) + req("CACHE", 0, 4096, cookie=8)
    + req("READ", 0, 65536, DF, 9) + req("WRITE_ZEROES", 0, 4096, FAST_ZERO, 10) + req("DISC"),
    "simple": b"\1" + req("READ", 0, 1024) + req("WRITE", 0, 8, FUA, 2, b"12345678")
    + req("BLOCK_STATUS", 0, 4096, cookie=3) + req("DISC"),
    "read-only": b"\2" + req("WRITE", 0, 4, cookie=1, payload=b"abcd") + req("READ", (1 << 20) - 512, 1024, cookie=2)
    + req("BLOCK_STATUS", 0, 1 << 20, cookie=3) + req("TRIM", 0, 4096, cookie=4) + req("DISC"),
    "bad-magic": b"\0" + struct.pack(">IHHQQI", 0x12345678, 0, 0, 1, 0, 512),
    "unknown-command": b"\0" + struct.pack(">IHHQQI", REQUEST_MAGIC, 0x8000, 42, 1, 0, 512) + req("DISC"),
}


def main():
    root = sys.argv[1]
    for sub, seeds in (("nbd-handshake", HANDSHAKE), ("nbd-requests", REQUESTS)):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(root, sub, name), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()

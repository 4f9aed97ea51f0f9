"""Writers whose writes carry their own sequence numbers, to check a point-in-time view.

Each writer has its own NBD connection and its own blocks (every n-th block of the disk, from
its index on), sends one write at a time, and fills a block with a pattern naming the writer and
the write's sequence number. A writer's writes therefore reach the disk in sequence order, and a
point-in-time view holds, for every writer, exactly a prefix of its writes: its first c_w writes
for some cut c_w. cut_of() reads c_w off a view (the highest sequence number of w in it), and
image_at() rebuilds the disk from the initial content and every writer's first c_w writes: a
view equals it byte for byte only if it is a consistent instant (no later write of a writer
present while an earlier one is missing, no old data where a write it holds had landed).
"""
import struct
import threading
import time

import nbd


def pattern(w, seq, block):
    return struct.pack('<II', w + 1, seq) * (block // 8)


def decode(data, writers, block):
    """(writer, seq) of a block written by a writer, else None."""
    w, seq = struct.unpack_from('<II', data)
    if w == 0 or w > writers or data != pattern(w - 1, seq, block):
        return None
    return w - 1, seq


class Writer(threading.Thread):
    """Writes its own blocks in a fixed pseudo-random order, logging (seq, block, sent, acked)."""

    def __init__(self, uri, w, writers, size, block, pause=0.0):
        super().__init__(daemon=True)
        self.uri, self.w, self.n, self.size, self.block = uri, w, writers, size, block
        self.pause = pause
        self.log = []
        self.stop = threading.Event()
        self.error = None

    def run(self):
        h = nbd.NBD()
        h.connect_uri(self.uri)
        try:
            blocks = list(range(self.w, self.size // self.block, self.n))
            seq = 0
            while not self.stop.is_set():
                seq += 1
                b = blocks[(seq * 7919) % len(blocks)]
                sent = time.monotonic()
                h.pwrite(pattern(self.w, seq, self.block), b * self.block)
                self.log.append((seq, b, sent, time.monotonic()))
                if self.pause:
                    time.sleep(self.pause)
        except Exception as e:  # reported by the test
            self.error = e
        finally:
            h.shutdown()


def stop_all(writer_list):
    """Stops @writer_list and waits for each; returns the first error a writer met, or None."""
    for wr in writer_list:
        wr.stop.set()
    for wr in writer_list:
        wr.join()
    return next((wr.error for wr in writer_list if wr.error), None)


def cut_of(view, writers, block):
    cut = [0] * writers
    for off in range(0, len(view), block):
        ws = decode(view[off:off + block], writers, block)
        if ws:
            cut[ws[0]] = max(cut[ws[0]], ws[1])
    return cut


def image_at(initial, writer_list, cut, block):
    img = bytearray(initial)
    for wr in writer_list:
        for seq, b, _, _ in list(wr.log):
            if seq <= cut[wr.w]:
                img[b * block:(b + 1) * block] = pattern(wr.w, seq, block)
    return bytes(img)

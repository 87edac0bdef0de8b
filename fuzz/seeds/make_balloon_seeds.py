#!/usr/bin/env python3
"""Writes the seed inputs of the balloon_queues fuzz target (see fuzz_targets/virtio_harness.rs
for the input format): a driver set up with 8-entry queues whose rings lie at n * 0x1000
(descriptors), + 0x200 (available) and + 0x400 (used), one chain made available on each."""
import struct
from pathlib import Path

OUT = Path(__file__).parent / "balloon_queues"
MEM = 0x10000


def desc(addr, length, flags=0, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def seed(all_features, chains, avail_idx=1):
    """chains: for each queue, a list of descriptors of the chain at head 0, plus data writes."""
    mem = bytearray(MEM)
    for q, (descs, writes) in enumerate(chains):
        base = q * 0x1000
        for i, d in enumerate(descs):
            mem[base + 16 * i : base + 16 * i + 16] = d
        mem[base + 0x200 : base + 0x206] = struct.pack("<HHH", 0, avail_idx, 0)
        for at, data in writes:
            mem[at : at + len(data)] = data
    ops = [bytes([3, 1 if all_features else 0, 3, 0x00, 0x02, 0x04])]
    ops += [bytes([4, q, 0, 0, 0, 0]) for q in range(4)]
    ops.append(bytes([5, 0, 0, 0, 0, 0]))
    # Trailing zero pages of memory need not be in the input.
    return struct.pack("<H", len(ops)) + b"".join(ops) + bytes(mem).rstrip(b"\0")


pfns = struct.pack("<III", 0x9, 0xA, 0x9)
stats = struct.pack("<HQ", 4, 1 << 20) + struct.pack("<HQ", 5, 1 << 24)
well_formed = [
    ([desc(0x0800, len(pfns))], [(0x0800, pfns)]),  # inflate
    ([desc(0x1800, 4)], [(0x1800, struct.pack("<I", 0xA))]),  # deflate
    ([desc(0x2800, len(stats))], [(0x2800, stats)]),  # stats
    ([desc(0xC000, 0x1000, 2, 1), desc(0xE000, 0x2000, 2)], []),  # report: two ranges
]
seeds = {
    "well_formed": seed(True, well_formed),
    "no_features": seed(False, well_formed),
    # Inflate through an indirect descriptor (never offered): the device needs a reset.
    "indirect": seed(True, [([desc(0x0800, 16, 4)], [(0x0800, desc(0x0900, 8))])] + well_formed[1:]),
    # An available index far ahead of the ring.
    "avail_index": seed(True, well_formed, avail_idx=0x8000),
    # A PFN outside RAM and a partial one.
    "bad_pfns": seed(True, [([desc(0x0800, 6)], [(0x0800, struct.pack("<IH", 0x999, 1))])] + well_formed[1:]),
}
OUT.mkdir(exist_ok=True)
for name, data in seeds.items():
    (OUT / name).write_bytes(data)

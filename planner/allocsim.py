"""A simulation of PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp), standard library only.

Given the allocation trace of a training step (each request's size and when it is freed, as
planner/train/exact.py records it), replay it through the allocator's policy and report peak
reserved memory: what max_memory_reserved() would say. Single stream, no CUDA graphs, no cap.

The policy, both modes:
  - requests are rounded up to 512 B; at most 1 MiB goes to the small pool, the rest to the large;
  - best fit: the smallest free block of the pool that is large enough, lowest address on a tie;
  - a block larger than the request is split when the rest is at least 512 B (small pool, and every
    pool under expandable segments) or more than 1 MiB (large pool); otherwise the whole block is
    handed out (and counted as allocated);
  - a freed block merges with free neighbours of the same segment.
Default mode: with no fitting free block, a new segment is cudaMalloc'd: 2 MiB for the small pool,
20 MiB for requests under 10 MiB, else the request rounded up to 2 MiB.
expandable_segments:True: one growing segment per pool; with no fitting free block, the lowest
unmapped address range (joined with a free block just below it) that is large enough is mapped in
pages (2 MiB small pool, 20 MiB large pool), so freed holes stay reserved but the end grows; best
fit passes over the free tail (the block that can grow) when a larger free block fits.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

KB, MB = 1024, 1024 * 1024
MIN_BLOCK = 512
SMALL_SIZE = 1 * MB  # requests of at most this go to the small pool
SMALL_BUFFER = 2 * MB
LARGE_BUFFER = 20 * MB
MIN_LARGE_ALLOC = 10 * MB
ROUND_LARGE = 2 * MB
VIRTUAL = 1 << 50  # address space of an expandable segment (never exhausted here)


def round_size(n: int) -> int:
    return MIN_BLOCK if n < MIN_BLOCK else -(-n // MIN_BLOCK) * MIN_BLOCK


def allocation_size(size: int) -> int:
    """Default mode: the segment cudaMalloc'd for a request no cached block can hold."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclass(eq=False)
class Block:
    addr: int
    size: int
    segment: int
    small: bool
    allocated: bool = False
    mapped: bool = True
    prev: Block | None = None
    next: Block | None = None

    def key(self):
        return (self.size, self.addr)


def _split(block: Block, size: int) -> Block:
    """Cut block after its first `size` bytes; returns the rest (same segment, pool and mapping), linked after it."""
    rest = Block(block.addr + size, block.size - size, block.segment, block.small, mapped=block.mapped,
                 prev=block, next=block.next)
    if block.next is not None:
        block.next.prev = rest
    block.next = rest
    block.size = size
    return rest


def _growable(b: Block) -> int:
    return b.size + (b.next.size if b.next is not None and not b.next.mapped else 0)


@dataclass
class Pool:
    small: bool
    free: list = field(default_factory=list)  # sorted (size, addr, block) of free mapped blocks
    unmapped: list = field(default_factory=list)  # sorted (addr, block), expandable mode
    page: int = 0

    def add(self, b: Block) -> None:
        bisect.insort(self.free, (b.size, b.addr, id(b), b))

    def remove(self, b: Block) -> None:
        i = bisect.bisect_left(self.free, (b.size, b.addr, id(b)))
        assert self.free[i][3] is b
        del self.free[i]

    def best_fit(self, size: int, expandable: bool) -> Block | None:
        i = bisect.bisect_left(self.free, (size, -1, -1))
        if i >= len(self.free):
            return None
        if expandable:
            # get_free_block's expandable tweak: while the next block in size order could grow less than
            # this one (the free tail, followed by unmapped space, can grow the most), take the next
            while i + 1 < len(self.free) and _growable(self.free[i + 1][3]) < _growable(self.free[i][3]):
                i += 1
        return self.free[i][3]

    def add_unmapped(self, b: Block) -> None:
        bisect.insort(self.unmapped, (b.addr, id(b), b))

    def remove_unmapped(self, b: Block) -> None:
        i = bisect.bisect_left(self.unmapped, (b.addr, id(b)))
        assert self.unmapped[i][2] is b
        del self.unmapped[i]


class OutOfMemory(Exception):
    """The simulated allocator could not serve a request under its cap (torch.OutOfMemoryError)."""


class Allocator:
    """cap: torch.cuda.set_per_process_memory_fraction's limit in bytes (None: no limit). With no cached
    block to reuse, a request may grow reserved memory only while reserved + its segment size
    (allocation_size, even under expandable segments) stays within the cap; otherwise every cached
    block is released (empty_cache) and the check is retried once before OutOfMemory."""

    def __init__(self, expandable: bool, cap: int | None = None):
        self.expandable = expandable
        self.cap = cap
        self.pools = {True: Pool(small=True, page=SMALL_BUFFER), False: Pool(small=False, page=LARGE_BUFFER)}
        self.reserved = self.allocated = 0
        self.peak_reserved = self.peak_allocated = 0
        self._next_addr = 0
        self._segments = 0
        self._base: dict[int, int] = {}  # segment -> its first address (pages are aligned to it)
        if expandable:
            for pool in self.pools.values():
                b = Block(self._new_range(VIRTUAL), VIRTUAL, self._new_segment(), pool.small, mapped=False)
                pool.add_unmapped(b)

    def _new_range(self, size: int) -> int:
        addr = self._next_addr
        self._next_addr += size + (1 << 40)  # segments never touch
        self._base[self._segments + 1] = addr
        return addr

    def _new_segment(self) -> int:
        self._segments += 1
        return self._segments

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache(): default mode frees every segment with nothing allocated in it;
        expandable segments unmap every whole page inside a free block."""
        for pool in self.pools.values():
            for _, _, _, b in list(pool.free):
                if not self.expandable:
                    if b.prev is None and b.next is None:
                        pool.remove(b)
                        self.reserved -= b.size
                    continue
                base = self._base[b.segment]
                lo = base + -(-(b.addr - base) // pool.page) * pool.page
                hi = base + (b.addr + b.size - base) // pool.page * pool.page
                if hi <= lo:
                    continue
                pool.remove(b)
                parts = [(b.addr, lo - b.addr, True), (lo, hi - lo, False), (hi, b.addr + b.size - hi, True)]
                prev, nxt = b.prev, b.next
                blocks = []
                for addr, size, mapped in parts:
                    if size:
                        blocks.append(Block(addr, size, b.segment, b.small, mapped=mapped))
                for x, y in zip(blocks, blocks[1:]):
                    x.next, y.prev = y, x
                blocks[0].prev, blocks[-1].next = prev, nxt
                if prev is not None:
                    prev.next = blocks[0]
                if nxt is not None:
                    nxt.prev = blocks[-1]
                for x in blocks:
                    if x.mapped:
                        pool.add(x)
                    else:
                        self.reserved -= x.size
                        pool.add_unmapped(x)
                        for nb in (x.prev, x.next):  # unmapped neighbours merge
                            if nb is not None and not nb.mapped and not nb.allocated:
                                pool.remove_unmapped(nb)
                                pool.remove_unmapped(x)
                                self._merge(x, nb)
                                pool.add_unmapped(x)

    # ------------------------------------------------------------------ malloc / free
    def malloc(self, nbytes: int) -> Block:
        size = round_size(nbytes)
        pool = self.pools[size <= SMALL_SIZE]
        block = pool.best_fit(size, self.expandable)
        if block is not None:
            pool.remove(block)
            return self._hand_out(pool, block, size)
        if self.cap is not None and self.reserved + allocation_size(size) > self.cap:
            self.empty_cache()
            if self.reserved + allocation_size(size) > self.cap:
                raise OutOfMemory(f"{size} B with {self.reserved} B reserved under a cap of {self.cap} B")
            block = pool.best_fit(size, self.expandable)  # emptying can merge pages into a fitting block
            if block is not None:
                pool.remove(block)
                return self._hand_out(pool, block, size)
        if self.expandable:
            block = self._extend(pool, size)
        else:
            seg = allocation_size(size)
            block = Block(self._new_range(seg), seg, self._new_segment(), pool.small)
            self.reserved += seg
        return self._hand_out(pool, block, size)

    def _hand_out(self, pool: Pool, block: Block, size: int) -> Block:
        remaining = block.size - size
        if (remaining >= MIN_BLOCK) if (pool.small or self.expandable) else (remaining > SMALL_SIZE):
            pool.add(_split(block, size))
        block.allocated = True
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return block

    def free(self, block: Block) -> None:
        pool = self.pools[block.small]
        block.allocated = False
        self.allocated -= block.size
        for nb in (block.prev, block.next):
            if nb is not None and not nb.allocated and nb.mapped:
                pool.remove(nb)
                self._merge(block, nb)
        pool.add(block)

    def _merge(self, block: Block, nb: Block) -> None:
        """Absorb the free neighbour nb into block (nb is prev or next of block)."""
        if nb is block.prev:
            block.addr = nb.addr
            block.prev = nb.prev
            if nb.prev is not None:
                nb.prev.next = block
        else:
            block.next = nb.next
            if nb.next is not None:
                nb.next.prev = block
        block.size += nb.size

    # ------------------------------------------------------------------ expandable segments
    def _extend(self, pool: Pool, size: int) -> Block:
        """try_allocate_expandable_block: the lowest unmapped range (with a free block just below it)
        holding size bytes; map pages until the free block there is large enough."""
        def free_run(b):
            total = 0
            while total < size and b is not None and not b.allocated:
                total += b.size
                b = b.next
            return total >= size

        candidate = None
        for _, _, u in pool.unmapped:
            c = u.prev if (u.prev is not None and not u.prev.allocated and u.prev.mapped) else u
            if free_run(c):
                candidate = c
                break
        assert candidate is not None
        if not candidate.mapped:
            candidate = self._map(pool, candidate, min(candidate.size, size))
        while candidate.size < size:
            nxt = candidate.next
            assert nxt is not None and not nxt.mapped
            candidate = self._map(pool, nxt, min(size - candidate.size, nxt.size))
        pool.remove(candidate)
        return candidate

    def _map(self, pool: Pool, u: Block, nbytes: int) -> Block:
        """Map the first nbytes of unmapped block u, rounded up to whole pages; the mapped part becomes a
        free block merged with a free mapped block just below it. Returns that free block."""
        pages = -(-nbytes // pool.page) * pool.page
        pages = min(pages, u.size)
        pool.remove_unmapped(u)
        if pages < u.size:
            pool.add_unmapped(_split(u, pages))
        u.mapped = True
        self.reserved += pages
        for nb in (u.prev, u.next):  # free mapped neighbours (a page empty_cache left) merge
            if nb is not None and not nb.allocated and nb.mapped:
                pool.remove(nb)
                self._merge(u, nb)
        pool.add(u)
        return u


def replay(sizes: dict, events: list, expandable: bool, skip=frozenset(), empty_cache_at=(),
           reset_peak_at: int | None = None, cap: int | None = None) -> Allocator:
    """Replay an exact-mode event log (serial >= 0: allocate sizes[serial]; -serial-1: free it);
    serials in skip are not on the allocator (host or managed memory). empty_cache_at: event indices
    before which torch.cuda.empty_cache() runs; reset_peak_at: the index before which the peaks are
    reset to the current values (torch.cuda.reset_peak_memory_stats) and the cap, if any, takes effect
    (the harness caps the allocator after the model is loaded)."""
    a = Allocator(expandable, cap if not reset_peak_at else None)
    live: dict[int, Block] = {}
    empties = set(empty_cache_at)
    for i, ev in enumerate(events):
        if i in empties:
            a.empty_cache()
        if i == reset_peak_at:
            a.peak_reserved, a.peak_allocated = a.reserved, a.allocated
            a.cap = cap
        if ev >= 0:
            if ev in skip:
                continue
            if ev in live:  # resized in place: the tracker logs a free then an alloc
                a.free(live.pop(ev))
            live[ev] = a.malloc(sizes[ev])
        else:
            s = -ev - 1
            b = live.pop(s, None)
            if b is not None:
                a.free(b)
    return a


def smallest_budget(sizes: dict, events: list, expandable: bool, skip=frozenset(), empty_cache_at=(),
                    reset_peak_at: int | None = None, resolution: int = 2 * MB) -> int:
    """The smallest allocator cap (bytes) under which the replay runs without OutOfMemory, to `resolution`:
    a bisection between the uncapped run's peak allocated (never enough less than that) and its peak
    reserved (always enough)."""
    free = replay(sizes, events, expandable, skip, empty_cache_at, reset_peak_at)
    lo, hi = free.peak_allocated - 1, free.peak_reserved
    while hi - lo > resolution:
        mid = (lo + hi) // 2
        try:
            replay(sizes, events, expandable, skip, empty_cache_at, reset_peak_at, cap=mid)
            hi = mid
        except OutOfMemory:
            lo = mid
    return hi

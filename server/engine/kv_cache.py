"""The paged KV cache's bookkeeping: a pool of fixed-size pages, reference counts, prefix
caching by chained hashes of full pages, and LRU eviction of cached free pages.

The tensors themselves live in the runner; this module only decides which page holds what.

Invariants (checked by :meth:`KVCacheManager.check_integrity`):
- every page is either free (ref count 0, in the LRU free queue) or owned (ref count > 0,
  not in the queue), never both;
- a page's ref count equals the number of block tables that list it;
- a hashed page holds exactly the committed, causally computed K/V of the tokens its hash
  covers, and the hash map points only at pages whose hash it records.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Sequence


@dataclass
class PageTable:
    """One request's pages, in position order, plus the chain hashes of its full pages."""

    pages: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # hashes[i] covers pages[i] (full, committed)


class KVCacheManager:
    """Owns the page pool's bookkeeping (see the module docstring for its invariants, which
    ``check_integrity`` verifies). Callers own their ``PageTable``s; every page a table lists
    is released exactly once, by ``free`` or ``truncate``. Plain Python, no tensors."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError("num_pages and page_size must be >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_pages
        self.page_hash: list[int | None] = [None] * num_pages
        # the keys a hashed page covers: token ids, or stand-ins for them (image pads carry the
        # image's digest, see server.engine.images)
        self.page_tokens: list[tuple[Hashable, ...] | None] = [None] * num_pages
        self.hash_to_page: dict[int, int] = {}
        self.free_queue: OrderedDict[int, None] = OrderedDict((p, None) for p in range(num_pages))
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found

    # ------------------------------------------------------------------ pool
    @property
    def num_free_pages(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_pages / self.num_pages

    def pages_needed(self, table: PageTable, num_tokens: int) -> int:
        """How many new pages ``table`` needs to hold ``num_tokens`` tokens."""
        return max(0, -(-num_tokens // self.page_size) - len(table.pages))

    def _take_free_page(self) -> int:
        page, _ = self.free_queue.popitem(last=False)  # least recently used first
        old = self.page_hash[page]
        if old is not None:
            if self.hash_to_page.get(old) == page:
                del self.hash_to_page[old]
            self.page_hash[page] = None
            self.page_tokens[page] = None
        self.ref_counts[page] = 1
        return page

    def _release(self, page: int) -> None:
        assert self.ref_counts[page] > 0, f"page {page} released twice"
        self.ref_counts[page] -= 1
        if self.ref_counts[page] == 0:
            self.free_queue[page] = None  # most recently used end

    # -------------------------------------------------------------- requests
    def allocate(self, table: PageTable, num_tokens: int) -> bool:
        """Grow ``table`` to hold ``num_tokens`` tokens. All or nothing: returns False (and
        changes nothing) when the pool has too few free pages."""
        need = self.pages_needed(table, num_tokens)
        if need > self.num_free_pages:
            return False
        for _ in range(need):
            table.pages.append(self._take_free_page())
        return True

    def free(self, table: PageTable) -> None:
        """Release every page of ``table`` (tail first, so a request's last pages are
        evicted before its shared prefix)."""
        for page in reversed(table.pages):
            self._release(page)
        table.pages.clear()
        table.hashes.clear()

    def truncate(self, table: PageTable, num_tokens: int) -> None:
        """Release the pages past the first ``num_tokens`` tokens."""
        keep = -(-num_tokens // self.page_size)
        while len(table.pages) > keep:
            page = table.pages.pop()
            if len(table.hashes) > len(table.pages):
                table.hashes.pop()
            self._release(page)

    # --------------------------------------------------------- prefix cache
    @staticmethod
    def _chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
        return hash((parent, tokens))

    def match_prefix(self, table: PageTable, token_ids: Sequence[Hashable]) -> int:
        """Attach cached pages covering a prefix of ``token_ids`` to the empty ``table``.
        Returns the number of tokens covered. The last token is never covered, so at least
        one token is always computed (its logits are needed)."""
        assert not table.pages, "prefix matching needs an empty page table"
        if not self.enable_prefix_caching:
            return 0
        usable = (len(token_ids) - 1) // self.page_size
        self.prefix_queries += len(token_ids)
        parent: int | None = None
        for i in range(usable):
            tokens = tuple(token_ids[i * self.page_size : (i + 1) * self.page_size])
            h = self._chain_hash(parent, tokens)
            page = self.hash_to_page.get(h)
            if page is None or self.page_tokens[page] != tokens:
                break
            if self.ref_counts[page] == 0:
                del self.free_queue[page]
            self.ref_counts[page] += 1
            table.pages.append(page)
            table.hashes.append(h)
            parent = h
        hit = len(table.pages) * self.page_size
        self.prefix_hits += hit
        return hit

    def cache_full_pages(self, table: PageTable, token_ids: Sequence[Hashable], num_computed: int) -> None:
        """Register the hashes of pages that are now full of committed K/V
        (the first ``num_computed`` tokens of ``token_ids`` are in the cache)."""
        if not self.enable_prefix_caching:
            return
        full = min(num_computed // self.page_size, len(table.pages))
        while len(table.hashes) < full:
            i = len(table.hashes)
            parent = table.hashes[-1] if table.hashes else None
            tokens = tuple(token_ids[i * self.page_size : (i + 1) * self.page_size])
            h = self._chain_hash(parent, tokens)
            page = table.pages[i]
            table.hashes.append(h)
            if h not in self.hash_to_page and self.page_hash[page] is None:
                self.hash_to_page[h] = page
                self.page_hash[page] = h
                self.page_tokens[page] = tokens

    # ------------------------------------------------------------ integrity
    def check_integrity(self, tables: list[PageTable]) -> None:
        """Raise AssertionError unless every page is free or owned exactly as recorded."""
        owners = [0] * self.num_pages
        for table in tables:
            assert len(set(table.pages)) == len(table.pages), "a page appears twice in one table"
            for page in table.pages:
                owners[page] += 1
        for page in range(self.num_pages):
            in_free = page in self.free_queue
            assert owners[page] == self.ref_counts[page], (
                f"page {page}: ref count {self.ref_counts[page]} but {owners[page]} owners"
            )
            assert in_free == (owners[page] == 0), f"page {page}: free={in_free} with {owners[page]} owners"
        for h, page in self.hash_to_page.items():
            assert self.page_hash[page] == h, f"hash map points at page {page} which records another hash"
        assert len(self.free_queue) + sum(1 for c in self.ref_counts if c > 0) == self.num_pages

"""The host history of one compressed-cache layer, for multi-turn re-selection (DESIGN 2.4).

With ``keep_history=True`` (default) every token's K/V is also copied to the host, off the
critical path: into pinned memory on a side stream, a layer's prompt once, decode tokens a block
at a time, so a new turn can select again from the whole conversation. The cost is host memory
(dense); ``TCACache.host_kv_bytes`` reports it.
"""

from __future__ import annotations

import torch

from ... import ops
from ...core.transfer import PINNED, is_pinned

# Host copies go in pieces of at most this size: PyTorch keeps freed pinned blocks for reuse by
# requests of the same power-of-two size only, so pieces of one size let any later prompt reuse
# what an earlier one pinned (whole-layer copies of another length would pin new memory, slowly).
# Small pieces (a turn's new tokens, a block of decoded ones) share pinned slabs (``PINNED``).
PIECE_BYTES = 16 * 2**20
# Every turn and every decoded block adds a small piece (under PIECE_BYTES // 8), and a new turn
# copies each piece on its own: once this many small ones follow each other, they become one.
SMALL_PIECES = 16


class HostHistory:
    """Every token's K/V of one layer on the host, copied off the critical path.

    On CUDA each copy goes to pinned host memory with ``non_blocking`` on a side stream that waits
    for the data with an event: the Python thread never waits for it. Decode tokens gather in a
    device staging block, one buffer for the whole history, and go over ``block`` at a time; the
    model's stream waits for that copy before it writes the block again (a block's copy, every
    ``block`` tokens). A CUDA graph's decode step writes the block at a device index (``stage``)
    and counts the token on the host after replaying (``advance``). A new turn reads it on the device
    with ``keys_then`` (every key, copied back; ``prefetch_keys`` starts that copy a layer early)
    and ``values_then`` (only the rows it attends to, read in place), a caller on the host with
    ``tensors()`` (the host waits).
    """

    def __init__(self, block: int):
        self.block = block
        self.chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.done: torch.cuda.Event | None = None  # the last copy's completion
        self.staging: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, G, block, d) each
        self.staged = 0
        self.token_bytes = 0  # set with the staging block
        self.nbytes = 0
        self.value_max: torch.Tensor | None = None  # (B, G) float32: max |V| over every token so far
        self.prefetched: tuple | None = None  # (keys, their copy's event, (history length, buffer length))
        self.read: torch.cuda.Event | None = None  # the device's last read of the pinned blocks in place

    def add(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Append (B, G, n, d) states: a prompt goes over at once, single tokens through the staging block."""
        if key.shape[2] > 1 or key.device.type != "cuda":
            self._flush()
            self.nbytes += 2 * key.numel() * key.element_size()
            self._copy(key, value)
            return
        self.stage(key, value, self.staged)
        self.advance()

    def stage(self, key: torch.Tensor, value: torch.Tensor, index: int | torch.Tensor) -> None:
        """Write one token's (B, G, 1, d) states at slot ``index`` of the staging block (a host int,
        or a one-element int64 device tensor: a CUDA graph replays it); ``advance`` counts it."""
        if self.staging is None:
            shape = (*key.shape[:2], self.block, key.shape[-1])
            self.staging = (key.new_empty(shape), value.new_empty(shape))
            self.token_bytes = 2 * key.numel() * key.element_size()  # one staged token's keys and values
        if isinstance(index, int):
            self.staging[0][:, :, index : index + 1] = key
            self.staging[1][:, :, index : index + 1] = value
        else:
            self.staging[0].index_copy_(2, index, key)
            self.staging[1].index_copy_(2, index, value)

    def advance(self) -> None:
        """Count the token just staged; a full block goes over."""
        self.nbytes += self.token_bytes
        self.staged += 1
        if self.staged == self.block:
            self._flush()

    def _flush(self) -> None:
        if self.staged:
            key, value = self.staging
            self._copy(key[:, :, : self.staged], value[:, :, : self.staged])
            self.staged = 0
            if self.done is not None:  # the next write to the block waits for this copy (device only)
                torch.cuda.current_stream(key.device).wait_event(self.done)

    def _copy(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Copy (B, G, n, d) states to the host in pieces of at most ``PIECE_BYTES`` each, and
        track their largest |value| (the error bound's, for a new turn that reads a few rows)."""
        self._coalesce()
        peak = torch.linalg.vector_norm(value, float("inf"), dim=(-1, -2)).float()  # (B, G)
        self.value_max = peak if self.value_max is None else torch.maximum(self.value_max, peak)
        per_token = key[:, :, :1].numel() * key.element_size()
        step = max(1, PIECE_BYTES // per_token)
        pieces = [(key[:, :, i : i + step], value[:, :, i : i + step]) for i in range(0, key.shape[2], step)]
        if key.device.type != "cuda":
            self.chunks += [
                tuple(t.to("cpu", memory_format=torch.contiguous_format, copy=True) for t in p)
                for p in pieces
            ]
            return
        stream = _side_stream(key.device)
        stream.wait_stream(torch.cuda.current_stream(key.device))
        with torch.cuda.stream(stream):
            for piece in pieces:
                host = tuple(PINNED.empty(tuple(t.shape), t.dtype) for t in piece)
                for target, source in zip(host, piece, strict=True):
                    target.copy_(source, non_blocking=True)
                self.chunks.append(host)
            for source in (key, value):
                source.record_stream(stream)  # its memory is not reused before the copies are done
            self.done = torch.cuda.Event()
            self.done.record(stream)

    def _coalesce(self) -> None:
        """Join the last run of small pieces into one piece once ``SMALL_PIECES`` of them have piled
        up, if the copies into them and the device's reads of them are done (it never waits)."""
        run = 0
        while run < len(self.chunks) and self.chunks[-1 - run][0].nbytes < PIECE_BYTES // 8:
            run += 1
        if run < SMALL_PIECES or not all(event is None or event.query() for event in (self.done, self.read)):
            return
        pieces = self.chunks[-run:]
        self.chunks[-run:] = [tuple(_joined([piece[i] for piece in pieces]) for i in (0, 1))]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The history as host (B, G, length, d) keys and values (waits for the copies)."""
        self._flush()
        if self.done is not None:
            self.done.synchronize()
        keys, values = zip(*self.chunks, strict=True)
        return torch.cat(keys, 2), torch.cat(values, 2)

    @property
    def length(self) -> int:
        """Tokens on the host (the staged ones go over first: ``_flush``)."""
        return sum(chunk[0].shape[2] for chunk in self.chunks)

    def prefetch_keys(self, new_tokens: int, like: torch.Tensor) -> None:
        """Start copying the history's keys to ``like``'s device (CUDA only; elsewhere nothing to
        do), into a buffer with room for ``new_tokens`` more: a new turn calls this for its next
        layer, so that layer's copy runs on the side stream while this one computes."""
        self._flush()
        if like.device.type != "cuda" or not self.chunks:
            return
        past = self.length
        keys = like.new_empty(*self.chunks[0][0].shape[:2], past + new_tokens, like.shape[-1])
        stream = _side_stream(like.device)
        stream.wait_stream(torch.cuda.current_stream(like.device))  # the buffer's memory is free there
        with torch.cuda.stream(stream):
            start = 0
            for chunk, _ in self.chunks:
                keys[:, :, start : start + chunk.shape[2]].copy_(chunk, non_blocking=True)
                start += chunk.shape[2]
            done = torch.cuda.Event()
            done.record(stream)
        keys.record_stream(stream)  # dropped unread, its memory still waits for the copy
        self.prefetched = (keys, done, (past, past + new_tokens))

    def keys_then(self, key: torch.Tensor) -> torch.Tensor:
        """The history's keys followed by ``key`` (B, G, n, d): (B, G, length + n, d) on its device
        (a new turn selects from all of them). On CUDA the model's stream waits for the copy on the
        device (``prefetch_keys``, made now if no call made it); the host waits for nothing."""
        self._flush()
        if key.device.type != "cuda":
            return torch.cat([chunk[0] for chunk in self.chunks] + [key], 2)
        past = self.length
        if self.prefetched is None or self.prefetched[2] != (past, past + key.shape[2]):  # none, or stale
            self.prefetch_keys(key.shape[2], key)
        keys, done, _ = self.prefetched
        self.prefetched = None
        torch.cuda.current_stream(key.device).wait_event(done)
        keys[:, :, past:] = key
        return keys

    def values_then(self, value: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The history's values at ``rows`` (B, G, R) positions, followed by ``value`` (B, G, n, d):
        (B, G, length + n, d) on its device, where only the rows named hold values (NaN on the CPU,
        whatever memory held on a GPU: a new turn reads no other row). On a GPU the device reads
        those rows in place from the pinned history (``ops.read_host_rows``), after its copies."""
        self._flush()
        past = self.length
        shape = (*value.shape[:2], past + value.shape[2], value.shape[3])
        if value.device.type != "cuda":
            out = value.new_full(shape, float("nan"))
            ops.read_host_rows([chunk[1] for chunk in self.chunks], rows, out)
        else:
            out, stream = value.new_empty(shape), torch.cuda.current_stream(value.device)
            if self.done is not None:
                stream.wait_event(self.done)
            ops.read_host_rows([chunk[1] for chunk in self.chunks], rows, out)
            self.read = stream.record_event()
        out[:, :, past:] = value
        return out

    def __del__(self) -> None:
        # A kernel reading the pinned blocks in place is invisible to PyTorch's host allocator: the
        # blocks must not go back to it (to be pinned and written by someone else) before that read.
        if self.read is not None:
            self.read.synchronize()


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """(B, G, n_i, d) host parts as one (B, G, sum n_i, d) tensor, pinned when they are."""
    shape = (*parts[0].shape[:2], sum(part.shape[2] for part in parts), parts[0].shape[3])
    pinned = is_pinned(parts[0])
    out = PINNED.empty(shape, parts[0].dtype) if pinned else parts[0].new_empty(shape)
    return torch.cat(parts, 2, out=out)


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]

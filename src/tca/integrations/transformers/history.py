"""The host history of one compressed-cache layer, for multi-turn re-selection (DESIGN 2.4).

With ``keep_history=True`` (default) every token's K/V is also copied to the host, off the
critical path: into pinned memory on a side stream, a layer's prompt once, decode tokens a block
at a time, so a new turn can select again from the whole conversation. The cost is host memory
(dense); ``TCACache.host_kv_bytes`` reports it.
"""

from __future__ import annotations

import torch

# Host copies go in pieces of at most this size: PyTorch keeps freed pinned blocks for reuse by
# requests of the same power-of-two size only, so pieces of one size let any later prompt reuse
# what an earlier one pinned (whole-layer copies of another length would pin new memory, slowly).
PIECE_BYTES = 16 * 2**20


class HostHistory:
    """Every token's K/V of one layer on the host, copied off the critical path.

    On CUDA each copy goes to pinned host memory with ``non_blocking`` on a side stream that waits
    for the data with an event: the Python thread never waits for it. Decode tokens gather in a
    device staging block, one buffer for the whole history, and go over ``block`` at a time; the
    model's stream waits for that copy before it writes the block again (a block's copy, every
    ``block`` tokens). A CUDA graph's decode step writes the block at a device index (``stage``)
    and counts the token on the host after replaying (``advance``). A new turn reads it with
    ``joined_on_device`` (the device waits for the copies), a caller on the host with ``tensors()``
    (the host waits).
    """

    def __init__(self, block: int):
        self.block = block
        self.chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.done: torch.cuda.Event | None = None  # the last copy's completion
        self.staging: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, G, block, d) each
        self.staged = 0
        self.token_bytes = 0  # set with the staging block
        self.nbytes = 0

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
        """Copy (B, G, n, d) states to the host in pieces of at most ``PIECE_BYTES`` each."""
        per_token = key[:, :, :1].numel() * key.element_size()
        step = max(1, PIECE_BYTES // per_token)
        pieces = [(key[:, :, i : i + step], value[:, :, i : i + step]) for i in range(0, key.shape[2], step)]
        if key.device.type != "cuda":
            self.chunks += [(k.to("cpu", copy=True), v.to("cpu", copy=True)) for k, v in pieces]
            return
        stream = _side_stream(key.device)
        stream.wait_stream(torch.cuda.current_stream(key.device))
        with torch.cuda.stream(stream):
            for piece in pieces:
                host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in piece)
                for target, source in zip(host, piece, strict=True):
                    target.copy_(source, non_blocking=True)
                self.chunks.append(host)
            for source in (key, value):
                source.record_stream(stream)  # its memory is not reused before the copies are done
            self.done = torch.cuda.Event()
            self.done.record(stream)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The history as host (B, G, length, d) keys and values (waits for the copies)."""
        self._flush()
        if self.done is not None:
            self.done.synchronize()
        keys, values = zip(*self.chunks, strict=True)
        return torch.cat(keys, 2), torch.cat(values, 2)

    def joined_on_device(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The history followed by ``key``, ``value`` (B, G, n, d), as (B, G, length + n, d) tensors on
        their device (a new turn selects from all of it). Each chunk goes straight from its pinned
        block into its place, after its copy to the host (the model's stream waits for that on the
        device; the host waits for nothing): no host-side join, no second pinned buffer."""
        self._flush()
        if self.done is not None and key.device.type == "cuda":
            torch.cuda.current_stream(key.device).wait_event(self.done)
        joined = []
        for part, new in ((0, key), (1, value)):
            past = sum(chunk[part].shape[2] for chunk in self.chunks)
            out = new.new_empty(*new.shape[:2], past + new.shape[2], new.shape[3])
            start = 0
            for chunk in self.chunks:
                length = chunk[part].shape[2]
                out[:, :, start : start + length].copy_(chunk[part], non_blocking=True)
                start += length
            out[:, :, past:] = new
            joined.append(out)
        return joined[0], joined[1]


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]

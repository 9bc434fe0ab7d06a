"""KV cache for the decoder: preallocated, and a rolling buffer under a sliding window (the
"rolling buffer cache" of Mistral 7B, Jiang et al., arXiv:2310.06825, §2).

Every sequence of a batch shares one token clock: token t of the (left-padded) batch is token t
of each row. The cache keeps, per layer, K (after RoPE) and V in buffers [B, Hkv, S, D]:

- S = the sliding window W when the model has one (and the run may outgrow it): token t goes
  to slot t mod W, overwriting token t - W, which no later query can see anyway (query t sees
  keys j with t - W < j <= t). Memory is bounded by W however long the conversation.
- S = the run's total length otherwise (no window, or a run shorter than the window).

A decode query at token t sees the slots written so far (at most S of them) minus the slots
holding left padding; that is exactly the keys t - W < j <= t that are real tokens, the same
rule the reference applies with its full-length mask.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_tokens: int,
        sliding_window: int | None,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        """max_tokens: the most tokens this run will ever hold (prompt + generated, all turns)."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.capacity = max_tokens if sliding_window is None else min(sliding_window, max_tokens)
        shape = (batch_size, num_kv_heads, self.capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # slot_is_real[b, s]: slot s holds a real (not padding) token of row b.
        self.slot_is_real = torch.zeros(batch_size, self.capacity, dtype=torch.bool, device=device)
        # RoPE position of the next token of each row (= real tokens seen so far).
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.num_tokens = 0  # tokens written so far (the shared clock); a host int: no device sync
        # A decode step's state lives in tensors updated in place, never in Python ints that the
        # layers read: a compiled decode step (`Idefics2.compile_decode`) then sees the same
        # graph every step instead of specialising on the slot number and recompiling.
        self.decoding = False  # this step is one token after earlier ones (decode attention)
        self._decode_slot = torch.zeros(1, dtype=torch.long, device=device)  # where its K/V go
        self._decode_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)

    @property
    def filled_slots(self) -> int:
        """Slots holding a token (real or padding) before the current step."""
        return min(self.num_tokens, self.capacity)

    # ----------------------------------------------------------- one model step
    def begin_step(self, num_new: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Announce `num_new` new tokens. token_mask [B, num_new] (1 = real, 0 = left padding);
        None = all real (every decode step, and prompts without padding).

        Returns their RoPE position ids [B, num_new] (padding gets 0, as the reference does).
        """
        if self.num_tokens + num_new > self.max_tokens:
            raise ValueError(
                f"the KV cache holds at most {self.max_tokens} tokens; {self.num_tokens} are in it and "
                f"{num_new} more were given"
            )
        token_mask = None if token_mask is None else token_mask.to(torch.bool)
        self._num_new = num_new
        self._new_real = token_mask
        self.decoding = num_new == 1 and self.num_tokens > 0
        if num_new == 1:
            # One token: one slot, updated in place (no new slot list, no copy of the realness
            # mask: only chunked prefill reads the pre-step state, through `past`).
            slot = self.num_tokens % self.capacity
            self.slot_is_real[:, slot] = True if token_mask is None else token_mask[:, 0]
            self._slot_is_real_after = self.slot_is_real
            self._decode_slot.fill_(slot)
            self._slots = self._decode_slot
            self._decode_seqlens.fill_(min(self.num_tokens + 1, self.capacity))
            if token_mask is None:
                return self.next_position[:, None].clone()
            return self.next_position[:, None] * token_mask  # padding (mask 0) gets position 0
        if token_mask is None:
            offsets = torch.arange(num_new, device=self.next_position.device)
            positions = self.next_position[:, None] + offsets
            new_real = torch.ones(1, num_new, dtype=torch.bool, device=self.next_position.device)
        else:
            positions = self.next_position[:, None] + token_mask.long().cumsum(dim=1) - 1
            positions = positions.masked_fill(~token_mask, 0)
            new_real = token_mask
        # Only the last `capacity` of the new tokens survive in the buffer.
        kept = min(num_new, self.capacity)
        first_kept = self.num_tokens + num_new - kept
        slots = torch.arange(first_kept, first_kept + kept, device=self.next_position.device) % self.capacity
        self._slots = slots
        # The realness of every slot once this step is written (decode attends with it).
        self._slot_is_real_after = self.slot_is_real.clone()
        self._slot_is_real_after[:, slots] = new_real[:, num_new - kept :]
        return positions

    def past(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values and realness of the tokens already cached, oldest first (before this
        step's write): k, v [B, Hkv, n_past, D], real [B, n_past] bool."""
        n_past = self.filled_slots
        if self.num_tokens > self.capacity:  # the buffer has wrapped: unroll it
            order = torch.arange(self.num_tokens - n_past, self.num_tokens, device=self.slot_is_real.device)
            order = order % self.capacity
            return (self.keys[layer].index_select(2, order), self.values[layer].index_select(2, order),
                    self.slot_is_real.index_select(1, order))
        return self.keys[layer][:, :, :n_past], self.values[layer][:, :, :n_past], self.slot_is_real[:, :n_past]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store this step's k, v [B, Hkv, T, D] (after RoPE) into their slots."""
        kept = self._slots.shape[0]
        self.keys[layer].index_copy_(2, self._slots, k[:, :, self._num_new - kept :])
        self.values[layer].index_copy_(2, self._slots, v[:, :, self._num_new - kept :])

    def decode_visible(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For a one-token step, after `write`: (cache_seqlens [B] int32, key_mask [B, S] bool),
        the slots the new query may see (its own included)."""
        return self._decode_seqlens, self._slot_is_real_after

    def end_step(self) -> None:
        """Commit the step: the slots' realness, the clock and each row's next position."""
        self.slot_is_real = self._slot_is_real_after
        self.next_position += self._num_new if self._new_real is None else self._new_real.sum(dim=1)
        self.num_tokens += self._num_new

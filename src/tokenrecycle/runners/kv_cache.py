"""A key/value cache allocated once per request: tree tokens are written at their slots, the
accepted path is gathered into place, and rejected rows are simply overwritten by the next step."""

from __future__ import annotations

import numpy as np
import torch

MIN_CAPACITY = 256


class KVCache:
    """Keys and values of every layer in two tensors of shape (layers, kv_heads, capacity, head_dim).

    Slots 0..length-1 hold committed tokens; slots after them hold the pending tree of the current
    step until `commit` keeps its accepted path.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self._shape = (layers, kv_heads, 0, head_dim)
        self._dtype = dtype
        self._device = device
        self.keys = torch.empty(self._shape, dtype=dtype, device=device)
        self.values = torch.empty(self._shape, dtype=dtype, device=device)
        self._layer_views()
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def reset(self, capacity: int) -> None:
        """Empty the cache and make room for `capacity` slots (reallocating only to grow)."""
        self.length = 0
        if capacity > self.capacity:
            self._allocate(max(capacity, MIN_CAPACITY), keep=0)

    def reserve(self, slots: int) -> None:
        """Make sure `slots` slots exist; grows geometrically, keeping the committed rows."""
        if slots > self.capacity:
            self._allocate(max(slots, 2 * self.capacity, MIN_CAPACITY), keep=self.length)

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store (kv_heads, n, head_dim) keys and values at slots start..start+n-1 of one layer."""
        n = keys.shape[1]
        self._keys_by_layer[layer].narrow(2, start, n).copy_(keys)
        self._values_by_layer[layer].narrow(2, start, n).copy_(values)

    def write_slots(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store (kv_heads, n, head_dim) keys and values at the slots a device tensor lists (a
        fixed step's: its cache length is on the device, not the host)."""
        self._keys_by_layer[layer].index_copy_(2, slots, keys[None].to(self._dtype))
        self._values_by_layer[layer].index_copy_(2, slots, values[None].to(self._dtype))

    def view(self, layer: int, first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots first..end-1 of one layer, as (1, kv_heads, end - first, head_dim) views."""
        return (
            self._keys_by_layer[layer].narrow(2, first, end - first),
            self._values_by_layer[layer].narrow(2, first, end - first),
        )

    def commit(self, accepted: np.ndarray) -> None:
        """Keep the pending slots `length + accepted` (a root-to-node path) as the next committed rows."""
        start = self.length
        end = start + len(accepted)
        if not np.array_equal(accepted, np.arange(len(accepted))):
            # A path that branches off: gather its rows down into place, every layer at once.
            source = torch.as_tensor(start + accepted, device=self._device)
            self.keys[:, :, start:end] = self.keys.index_select(2, source)
            self.values[:, :, start:end] = self.values.index_select(2, source)
        self.length = end

    def _allocate(self, capacity: int, keep: int) -> None:
        shape = (*self._shape[:2], capacity, self._shape[3])
        # Zeros, not empty memory: a fixed step attends over every slot (masked), and masked
        # garbage can be NaN, which a mask does not cancel.
        keys = torch.zeros(shape, dtype=self._dtype, device=self._device)
        values = torch.zeros(shape, dtype=self._dtype, device=self._device)
        keys[:, :, :keep] = self.keys[:, :, :keep]
        values[:, :, :keep] = self.values[:, :, :keep]
        self.keys, self.values = keys, values
        self._layer_views()

    def _layer_views(self) -> None:
        # (1, kv_heads, capacity, head_dim) views made once: a step then slices them with one call.
        self._keys_by_layer = [layer[None] for layer in self.keys]
        self._values_by_layer = [layer[None] for layer in self.values]

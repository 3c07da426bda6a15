"""A runner with its own decoder loop over a preallocated KV cache, for the Llama family and Gemma3.

It reuses the transformers model's weights and its small modules (embedding, activation, rotary
tables), so it computes what the model computes, but one step is a short list of large kernels:
fused q/k/v and gate/up projections with weights prepacked once, the rotary table precomputed for
the whole cache, tree tokens written straight into their cache slots, and the accepted path
gathered into place instead of concatenating caches. The layers run as one C++ call where the
extension builds (native.py), else as the Python loop below: the same operations either way (on the
CPU both run the extension's fused norm and rotary kernels where it builds).

On a GPU the runner keeps the same layers and cache, and runs a decode step (one token, or a tree
of up to 128) as a fixed-shape step replayed as a CUDA graph (fixed_step.py): one launch instead
of hundreds, where a small model's step is otherwise mostly launch overhead. Prompts and batches
of several slots take the eager path below, on any device. What is CPU-only (oneDNN prepacking,
float32 attention, the C++ loop) is chosen by the device, not assumed.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..errors import InvalidOptionError, UnsupportedModelError
from ..trees import DraftTree, chain_tree, tree_visibility
from .base import DEFAULT_SLOTS, Loop, ModelRunner, RunnerKind, additive_mask
from .fixed_step import (
    STEP_SIZES, StagedInputs, StepGraphs, fixed_bias, fixed_visibility, graphs_wanted, input_length, pack_step, step_size, unpack_step,
)  # fmt: skip
from .hf import MASK_STYLE
from .kv_cache import KVCache
from .linear import Linear, check_quantize, head_linear, make_linear, quant_kernel
from .native import ACTIVATIONS, native_module, native_wanted

# Families whose decoder layer is: [norm] attention [norm] + residual, [norm] MLP [norm] + residual,
# with the names transformers gives their modules. Gemma stores RMSNorm weights as w - 1.
FAST_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma3_text": "gemma"}
TREE_SLOTS = 128  # cache slots kept free for one step's pending tree (more are added if needed)
STATIC_ROPE = {"default", "linear", "llama3", "yarn"}  # tables that do not depend on the sequence length


def fast_unsupported_reason(config) -> str | None:
    """Why the fast runner cannot run this model exactly, or None when it can."""
    if config.model_type not in FAST_FAMILIES:
        return f"architecture '{config.model_type}' has no fast runner"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping is not implemented in the fast runner"
    for params in _rope_parameters(config):
        if params.get("rope_type", "default") not in STATIC_ROPE:
            return f"rope type '{params.get('rope_type')}' changes with the sequence length"
    return None


def _rope_parameters(config) -> list[dict]:
    params = getattr(config, "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) or v is None for v in params.values()):
        return [p for p in params.values() if p]  # one entry per layer type (Gemma3)
    return [params]


@dataclass
class _Segment:
    """One sequence's part of a pass: its tree, written at cache slots start.. of its own cache."""

    cache: KVCache
    tree: DraftTree
    start: int


class RMSNorm:
    """transformers' RMSNorm, computed in float32 like it: Llama scales after casting back, Gemma
    multiplies by (1 + w) before casting. torch's fused rms_norm gives the same float32 result as
    the module's four separate operations. `fused`: the C++ extension, whose kernel adds the
    residual and normalises in one pass on the CPU (as the C++ loop does); None: torch's operations."""

    def __init__(self, module: torch.nn.Module, gemma: bool, fused=None):
        self.eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        self.shape = tuple(module.weight.shape)
        self.gemma = gemma
        self.weight = 1.0 + module.weight.detach().float() if gemma else module.weight.detach()
        self.fused = fused
        self.weight32 = self.weight.float().contiguous() if fused is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_and_norm(x, None)[1]

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, the norm of that sum); residual None adds nothing."""
        if self.fused is not None:
            return self.fused.add_rms_norm(x.contiguous(), residual, self.weight32, self.eps, self.gemma)
        if residual is not None:
            x = x + residual
        if self.gemma:
            return x, F.rms_norm(x.float(), self.shape, self.weight, self.eps).type_as(x)
        return x, self.weight * F.rms_norm(x.float(), self.shape, eps=self.eps).to(x.dtype)


@dataclass
class Layer:
    attn_norm: RMSNorm
    qkv: Linear
    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    out: Linear
    post_attn_norm: RMSNorm | None  # Gemma's sandwich norms
    mlp_norm: RMSNorm
    gate_up: Linear
    down: Linear
    post_mlp_norm: RMSNorm | None
    window: int | None  # sliding-window width, None for full attention
    rope: str  # which rotary table


def _layer_from(module: torch.nn.Module, window: int | None, rope: str, gemma: bool, linear=make_linear, fused=None) -> Layer:
    """`linear`: one layer from the projections that read the same input (linear.make_linear);
    `fused`: the C++ extension for the norms (RMSNorm)."""
    attn, mlp = module.self_attn, module.mlp

    def norm(name: str, owner: torch.nn.Module = module) -> RMSNorm | None:
        sub = getattr(owner, name, None)
        return RMSNorm(sub, gemma, fused) if sub is not None else None

    return Layer(
        attn_norm=norm("input_layernorm"),
        qkv=linear([attn.q_proj, attn.k_proj, attn.v_proj]),
        q_norm=norm("q_norm", attn),
        k_norm=norm("k_norm", attn),
        out=linear([attn.o_proj]),
        post_attn_norm=norm("post_attention_layernorm") if gemma else None,
        mlp_norm=norm("pre_feedforward_layernorm" if gemma else "post_attention_layernorm"),
        gate_up=linear([mlp.gate_proj, mlp.up_proj]),
        down=linear([mlp.down_proj]),
        post_mlp_norm=norm("post_feedforward_layernorm") if gemma else None,
        window=window,
        rope=rope,
    )


class FastRunner(ModelRunner):
    """Same answers as the transformers runner, far fewer and larger operations per step."""

    kind = RunnerKind.FAST
    batches = True

    def __init__(
        self,
        model: PreTrainedModel,
        quantize: str | None = None,
        layers: int | None = None,
        native: bool | None = None,
        max_slots: int = DEFAULT_SLOTS,
        gguf: Path | None = None,
        fixed_steps: bool | None = None,
        graphs: bool | None = None,
    ):
        """`layers`: run only the first N decoder layers, then the final norm and the LM head (an
        early-exit copy of the model that shares its weights: a draft model for free).
        `native`: run the layers as one C++ call on the CPU (None: where it builds, unless
        TOKENRECYCLE_NATIVE=0; False: the Python loop). `max_slots`: sequences held at once, one
        KV cache each. `gguf`: the file the model was loaded from, for quantize="gguf" (its own
        quantised weights). `fixed_steps`: run one slot's steps at fixed shapes (fixed_step.py;
        None: on a GPU, where graphs need them). `graphs`: replay fixed steps as CUDA graphs
        (None: on a GPU; False there measures what the graphs save)."""
        super().__init__(max_slots)
        config = model.config
        reason = fast_unsupported_reason(config)
        if reason:
            raise UnsupportedModelError(reason)
        check_quantize(quantize)
        self.quantize = quantize
        gemma = FAST_FAMILIES[config.model_type] == "gemma"
        decoder = model.model
        self.vocab_size = int(config.vocab_size)
        self.max_context = int(getattr(config, "max_position_embeddings", 2048))
        self.dtype = model.dtype
        self.device = model.device
        self._embed = decoder.embed_tokens
        self._rotary = decoder.rotary_emb
        self._act = decoder.layers[0].mlp.act_fn
        self._scale = float(decoder.layers[0].self_attn.scaling)
        self._num_heads = config.num_attention_heads
        self._num_kv_heads = config.num_key_value_heads
        self._head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if layers is not None and not 1 <= layers <= len(decoder.layers):
            raise InvalidOptionError(f"an early exit needs 1 to {len(decoder.layers)} layers, got {layers}")
        stored = _stored_weights(model, gguf) if quantize == "gguf" else {}
        linear = partial(make_linear, quantize=quantize, gguf=stored)
        self._fixed, self._graphs = _step_modes(self.device, fixed_steps, graphs)
        self._fused = self._fused_kernels(native)
        self._layers = [
            _layer_from(layer, _window(config, i), _rope_key(config, i), gemma, linear, self._fused)
            for i, layer in enumerate(decoder.layers[:layers])
        ]
        self.kernel = quant_kernel(quantize) if quantize else None
        self._windows = sorted({layer.window for layer in self._layers}, key=lambda w: -1 if w is None else w)
        self._rope_keys = sorted({layer.rope for layer in self._layers})
        self._rope_takes_layer_type = "layer_type" in inspect.signature(self._rotary.forward).parameters
        self._norm = RMSNorm(decoder.norm, gemma, self._fused)
        head = model.get_output_embeddings().weight
        self._lm_head = head_linear(head.detach(), quantize, stored.get(id(head)))
        self._softcap = getattr(config, "final_logit_softcapping", None)
        # On CPU, attention runs in float32 whatever the weights: its bf16 kernels are several times
        # slower here, and the keys and values are cached exactly (a bf16 value widens losslessly).
        # A GPU attends in the model's dtype (SDPA's fused kernels).
        self._attention_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self._caches = [
            KVCache(len(self._layers), self._num_kv_heads, self._head_dim, self._attention_dtype, self.device)
            for _ in range(max_slots)
        ]  # empty until a prefill sizes them
        self._rope_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rope_length = 0
        activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
        self._inputs = StagedInputs(input_length(STEP_SIZES[-1]), self.device) if self._fixed else None
        self._decoder, self.loop, self.loop_note = None, Loop.CUDA_GRAPHS if self._graphs else Loop.PYTHON, None
        if native and self.device.type != "cpu":
            raise InvalidOptionError(f"the C++ loop runs on the CPU, not on {self.device}")
        if native is not False and self.device.type == "cpu" and not self._fixed and (native or native_wanted()):
            self._decoder, self.loop_note = self._native_decoder(ACTIVATIONS.get(activation), gemma)
            self.loop = Loop.PYTHON if self._decoder is None else Loop.CPP

    def _fused_kernels(self, native: bool | None):
        """The C++ extension, whose fused norm and rotary kernels both loops use on the CPU (so the
        Python loop gives the C++ loop's bits), or None: torch's operations (another device, no
        build, or TOKENRECYCLE_NATIVE=0 without native=True)."""
        if self.device.type != "cpu" or self._fixed or not (native or native_wanted()):
            return None
        module = native_module()
        return None if isinstance(module, str) else module

    def cache_length(self, slot: int) -> int:
        return self._caches[slot].length

    @property
    def cache_bytes(self) -> int:
        return sum(cache.nbytes for cache in self._caches)

    @torch.inference_mode()
    def prefill(self, slot: int, input_ids: np.ndarray, reserve: int = 0) -> torch.Tensor:
        self.begin(slot, len(input_ids) + reserve)
        logits = self._run([_Segment(self._caches[slot], chain_tree(input_ids), 0)])
        self._caches[slot].length = len(input_ids)
        return logits

    def begin(self, slot: int, tokens: int) -> None:
        self._check_slot(slot)
        capacity = min(tokens, self.max_context) + TREE_SLOTS
        if self._fixed:
            # Fixed steps attend over the whole cache, and each new cache size means new graphs:
            # powers of two keep both few (up to the context window, in whole blocks of 256).
            capacity = min(1 << (capacity - 1).bit_length(), -(-(self.max_context + TREE_SLOTS) // 256) * 256)
        self._caches[slot].reset(capacity)

    @torch.inference_mode()
    def forward_tree(self, slot: int, tree: DraftTree) -> torch.Tensor:
        return self.forward_batch([(slot, tree)])[0]

    @torch.inference_mode()
    def forward_batch(self, items: Sequence[tuple[int, DraftTree]]) -> list[torch.Tensor]:
        """One pass over the trees of several slots: the linear layers see every node of every
        tree at once, attention runs per slot against that slot's own cache."""
        if len({slot for slot, _ in items}) != len(items):
            raise ValueError("a batch holds each slot at most once")
        if self._fixed and len(items) == 1 and step_size(len(items[0][1])) is not None:
            return [self._fixed_step(*items[0])]
        segments = []
        for slot, tree in items:
            self._check_slot(slot)
            cache = self._caches[slot]
            cache.reserve(cache.length + len(tree))
            segments.append(_Segment(cache, tree, cache.length))
        logits = self._run(segments)
        return list(logits.split([len(segment.tree) for segment in segments]))

    @torch.inference_mode()
    def commit(self, slot: int, accepted: np.ndarray) -> None:
        self._check_slot(slot)
        self._caches[slot].commit(np.asarray(accepted))

    # ---- one forward pass ----------------------------------------------------------------
    def _run(self, segments: list[_Segment]) -> torch.Tensor:
        self._ensure_rope(max(segment.cache.capacity for segment in segments))
        ids = torch.as_tensor(np.concatenate([segment.tree.tokens for segment in segments]), device=self.device)
        positions = np.concatenate([segment.start + segment.tree.depths for segment in segments])
        positions = torch.as_tensor(positions, device=self.device)
        rope = {key: (cos[positions][:, None], sin[positions][:, None]) for key, (cos, sin) in self._rope_tables.items()}
        # masks[s][window]: segment s's first visible slot, additive mask and causal flag
        masks = [{window: self._mask(s.tree, s.start, window) for window in self._windows} for s in segments]
        x = self._embed(ids)
        if self._decoder is not None:
            per_mask = [masks[s][window] for s in range(len(segments)) for window in self._windows]
            x = self._decoder.forward(
                x, [s.cache.keys for s in segments], [s.cache.values for s in segments],
                [s.start for s in segments], [len(s.tree) for s in segments],
                [rope[key][0] for key in self._rope_keys], [rope[key][1] for key in self._rope_keys],
                *(list(parts) for parts in zip(*per_mask)),
            )  # fmt: skip
        else:
            x = self._layers_loop(x, rope, partial(self._attend_segments, segments, masks))
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self._lm_head(self._norm(x))
        if self._softcap is not None:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits.float()

    def _layers_loop(self, x: torch.Tensor, rope, attend) -> torch.Tensor:
        """The decoder layers, as the C++ loop runs them: each sublayer's output is added to the
        residual stream by the norm that follows it."""
        pending = None
        for index, layer in enumerate(self._layers):
            x, pending = self._layer(index, layer, x, pending, rope[layer.rope], attend)
        return x if pending is None else x + pending

    def _layer(self, index: int, layer: Layer, x: torch.Tensor, pending, rope, attend) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder layer: the residual stream with `pending` (the last layer's output) added,
        and this layer's output. `attend(index, layer, qkv, rope)` rotates, stores the keys and
        values and attends (per slot for the eager path, over the whole cache for a fixed step)."""
        x, normed = layer.attn_norm.add_and_norm(x, pending)
        h = self._attention(index, layer, normed, rope, attend)
        if layer.post_attn_norm is not None:
            h = layer.post_attn_norm(h)
        x, normed = layer.mlp_norm.add_and_norm(x, h)
        gate, up = layer.gate_up(normed).chunk(2, dim=-1)
        h = layer.down(self._act(gate) * up)
        if layer.post_mlp_norm is not None:
            h = layer.post_mlp_norm(h)
        return x, h

    def _attention(self, index: int, layer: Layer, x: torch.Tensor, rope, attend) -> torch.Tensor:
        n, d = x.shape[0], self._head_dim
        heads, kv_heads = self._num_heads, self._num_kv_heads
        qkv = layer.qkv(x).view(n, heads + 2 * kv_heads, d)
        if layer.q_norm is not None:
            q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
            qkv = torch.cat((layer.q_norm(q), layer.k_norm(k), v), dim=1)
        return layer.out(attend(index, layer, qkv, rope).to(x.dtype))

    def _rotated(self, qkv: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries and keys rotated together (one set of kernels instead of two), and the values."""
        heads, kv_heads = self._num_heads, self._num_kv_heads
        qk, v = qkv.split([heads + kv_heads, kv_heads], dim=1)
        q, k = _rotate(qk, *rope).split([heads, kv_heads], dim=1)
        return q, k, v

    def _attend_segments(self, segments: list[_Segment], masks, index: int, layer: Layer, qkv, rope) -> torch.Tensor:
        """Each slot's rows attend to that slot's own cache (its visible range only)."""
        if self._fused is not None:  # rotation and cache writes in one pass, as in the C++ loop
            caches = [segment.cache for segment in segments]
            q = self._fused.rotate_into_cache(
                qkv, *rope, self._num_heads, [c.keys for c in caches], [c.values for c in caches],
                [segment.start for segment in segments], [len(segment.tree) for segment in segments], index,
            )  # fmt: skip
        else:
            q, k, v = self._rotated(qkv, rope)
        outs, row = [], 0
        for segment, by_window in zip(segments, masks):
            first_key, bias, causal = by_window[layer.window]
            # Each sequence attends to its own cache, on its own rows.
            size, start, cache = len(segment.tree), segment.start, segment.cache
            rows = slice(row, row + size)
            if self._fused is None:
                cache.write(index, start, k[rows].transpose(0, 1), v[rows].transpose(0, 1))
            keys, values = cache.view(index, first_key, start + size)
            query = q[rows].transpose(0, 1)[None].to(self._attention_dtype)
            out = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=bias, is_causal=causal, scale=self._scale, enable_gqa=True
            )
            outs.append(out[0].transpose(0, 1).reshape(size, -1))
            row += size
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    # ---- a fixed-shape step: one slot, a tree padded to a STEP_SIZES size -----------------
    def _fixed_step(self, slot: int, tree: DraftTree) -> torch.Tensor:
        """The tree's logits from a fixed step: replayed as a CUDA graph where there are graphs,
        run as it is elsewhere (the same operations)."""
        self._check_slot(slot)
        size = step_size(len(tree))
        cache = self._caches[slot]
        cache.reserve(cache.length + size)
        self._ensure_rope(cache.capacity)
        self._inputs.write(partial(pack_step, tree, cache.length, size))
        step = partial(self._run_fixed, cache, size)
        if self._graphs is None:
            logits = step()
        else:  # a graph replays on the memory it was captured with: these tensors must be the same
            signature = (cache.keys.data_ptr(), cache.values.data_ptr(), cache.capacity, self._rope_length)
            try:
                logits = self._graphs.run((slot, size), signature, step)
            except RuntimeError as exc:  # a capture this torch refuses: the same step, eagerly
                self._graphs_off(exc)
                logits = step()
        return logits[: len(tree)].clone()  # a graph's output is overwritten by its next replay

    def _graphs_off(self, error: Exception) -> None:
        """Run fixed steps eagerly from now on, and say why in the loop's note (the stats line,
        describe(), the bench report)."""
        lines = str(error).strip().splitlines()
        self._graphs, self.loop = None, Loop.PYTHON
        self.loop_note = f"CUDA graphs off: a capture failed ({type(error).__name__}: {lines[0] if lines else ''})"

    def _run_fixed(self, cache: KVCache, size: int) -> torch.Tensor:
        """Every shape fixed by (cache capacity, size), every input read from the device buffer:
        nothing here touches the host, so it can be captured."""
        tokens, depths, start, ancestors = unpack_step(self._inputs.device_buffer, size)
        positions = start + depths
        slots = start + torch.arange(size, device=self.device)
        rope = {key: (cos[positions][:, None], sin[positions][:, None]) for key, (cos, sin) in self._rope_tables.items()}
        group = self._num_heads // self._num_kv_heads
        biases = {
            window: fixed_bias(fixed_visibility(ancestors, depths, start, cache.capacity, window), self._attention_dtype).repeat(group, 1)
            for window in self._windows
        }  # one row per (query head of a group, node): see _attend_fixed
        x = self._layers_loop(self._embed(tokens), rope, partial(self._attend_fixed, cache, slots, biases))
        return self._logits(x)

    def _attend_fixed(self, cache: KVCache, slots: torch.Tensor, biases, index: int, layer: Layer, qkv, rope) -> torch.Tensor:
        """Write the step's keys and values at their slots, attend over the whole cache. The query
        heads that share a key head are stacked along the query rows (query head h uses key head
        h // group, as transformers' repeat_kv), so SDPA needs no GQA support to pick its fused
        kernels, and the keys are never repeated."""
        q, k, v = self._rotated(qkv, rope)
        n, d = q.shape[0], self._head_dim
        heads, kv_heads = self._num_heads, self._num_kv_heads
        cache.write_slots(index, slots, k.transpose(0, 1), v.transpose(0, 1))
        keys, values = cache.view(index, 0, cache.capacity)
        query = q.transpose(0, 1).reshape(kv_heads, heads // kv_heads * n, d)[None].to(self._attention_dtype)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=biases[layer.window], scale=self._scale)
        return out[0].reshape(heads, n, d).transpose(0, 1).reshape(n, heads * d)

    def _native_decoder(self, activation: int | None, gemma: bool):
        """The C++ decoder over these layers and None, or None and why not in C++."""
        if activation is None:
            return None, "the C++ loop knows only SiLU and tanh-GELU"
        module = native_module()
        if isinstance(module, str):
            return None, module
        linears = [linear.native_parts() for layer in self._layers for linear in (layer.qkv, layer.out, layer.gate_up, layer.down)]
        norms = [
            norm for layer in self._layers
            for norm in (layer.attn_norm, layer.q_norm, layer.k_norm, layer.post_attn_norm, layer.mlp_norm, layer.post_mlp_norm)
        ]  # fmt: skip
        decoder = module.Decoder(
            *(list(parts) for parts in zip(*linears)),
            [None if norm is None else norm.weight for norm in norms],
            [0.0 if norm is None else float(norm.eps) for norm in norms],
            [self._windows.index(layer.window) for layer in self._layers],
            [self._rope_keys.index(layer.rope) for layer in self._layers],
            gemma, self._num_heads, self._num_kv_heads, self._head_dim, self._scale, activation,
        )  # fmt: skip
        return decoder, None

    def _mask(self, tree: DraftTree, start: int, window: int | None) -> tuple[int, torch.Tensor | None, bool]:
        """First visible cache slot, the additive mask over slots first..start+n-1 (None: no mask),
        and whether plain causal attention does the job instead (a prompt on an empty cache)."""
        first_key = 0 if window is None else max(0, start - window + 1)
        n = len(tree)
        if n == 1:
            return first_key, None, False
        if start == 0 and (window is None or window >= n) and np.array_equal(tree.parents, np.arange(-1, n - 1)):
            return 0, None, True  # no (n, n) mask to build for a long prompt
        visible = tree_visibility(tree, start, window, first_key)
        return first_key, additive_mask(visible, self._attention_dtype, self.device), False

    def _ensure_rope(self, length: int) -> None:
        """Rotary cos/sin for positions 0..length-1, from the model's own rotary module."""
        if length <= self._rope_length:
            return
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        for key in self._rope_keys:
            args = (key,) if self._rope_takes_layer_type else ()
            cos, sin = self._rotary(probe, positions, *args)
            half = sin.shape[-1] // 2
            signed_sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
            self._rope_tables[key] = (cos[0], signed_sin)
        self._rope_length = length


def _step_modes(device: torch.device, fixed_steps: bool | None, graphs: bool | None) -> tuple[bool, StepGraphs | None]:
    """Whether one slot's steps run at fixed shapes, and the graphs that replay them: both by
    default on a GPU, neither on the CPU (whose eager steps, sliced to the visible keys and run by
    the C++ loop, are faster there)."""
    cuda = device.type == "cuda"
    if graphs and not cuda:
        raise InvalidOptionError(f"CUDA graphs need a CUDA device, not {device}")
    if graphs and fixed_steps is False:
        raise InvalidOptionError("CUDA graphs replay fixed steps: graphs=True needs fixed_steps")
    fixed = cuda if fixed_steps is None else fixed_steps
    use_graphs = fixed and (cuda and graphs_wanted() if graphs is None else graphs)
    return fixed, StepGraphs(device) if use_graphs else None


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as transformers applies it, x * cos + rotate_half(x) * sin, with the sign of
    rotate_half folded into the sine table so the rotation is a single roll (bit-identical)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _stored_weights(model: PreTrainedModel, gguf: Path | None) -> dict:
    """{id of a weight: its QuantWeight as the GGUF stores it} for quantize="gguf"."""
    from .gguf_weights import read_gguf_weights

    if gguf is None:
        raise InvalidOptionError("quantize=gguf needs the GGUF file the model was loaded from")
    params = dict(model.named_parameters(remove_duplicate=False))
    return {id(params[name]): weight for name, weight in read_gguf_weights(gguf, model).items()}


def _window(config, index: int) -> int | None:
    """Sliding-window width of one layer, as transformers applies it (see MASK_STYLE)."""
    if MASK_STYLE[config.model_type] == "by_layer_type":
        return config.sliding_window if config.layer_types[index] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


def _rope_key(config, index: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    return layer_types[index] if config.model_type == "gemma3_text" else "default"

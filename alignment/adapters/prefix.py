"""Prefix tuning (Li & Liang 2021; seed 004's menu): n learned key/value pairs in front of every
self-attention layer of the language model, through PEFT's `PrefixEncoder`.

PEFT hands the prefix to the model as a filled KV cache (`past_key_values`), which does not survive
here: the families call the model with `use_cache=False`, transformers drops any cache passed to a
checkpointed layer, and generation brings its own cache. So the prefix is put in place inside each
self-attention module, by hooks, which run within checkpointed layers too:

- a pre-hook on each targeted `self_attn` hands it a cache (`_PrefixedCache`) whose `update` returns
  `cat(prefix, keys)`: keys and values `[B, kv_heads, T, d]` -> `[B, kv_heads, n+S, d]` (S = cached +
  new tokens; the real cache, when there is one, keeps only the real tokens), and widens the 4-D
  attention mask `[B, 1, T, S]` by n columns that every query attends (none: a causal mask is built);
- a pre-hook on the decoder's `rotary_emb` shifts every position by n (M-RoPE's `[3, B, T]` too),
  so the real tokens sit at n, n+1, ... behind the prefix, as in PEFT, where the prefix fills cache
  slots 0..n-1. The prefix keys are position-free: stored as they are used (post-RoPE in PEFT's cache).
  A query's score against them depends on its absolute position, so rows with padding and no
  positions given (a left-padded forward) count real tokens only, as generation does (`cumsum(mask) - 1`,
  a pre-hook on the decoder); without a prefix RoPE is relative and this changes nothing.

Mllama's cross-attention layers get no prefix (they attend the image); the hidden states, logits and
labels keep their length, so nothing downstream changes. Given the same prefix tensors this equals
PEFT's prefix tuning on a Llama text model (tests/test_adapters_prefix.py checks it).

Settings: n = `num_virtual_tokens`; `prefix_projection` turns PEFT's reparameterisation MLP on (read
with getattr: LoraSpec has no such field yet, and a saved adapter's weights say whether it has one),
e = `dim` its width. Parameters (PEFT's layout): without reparameterisation `embedding [n, L*2*kv_heads*d]`, key of layer i
in chunk 2i and value in chunk 2i+1 of the last dim (L targeted layers); with `prefix_projection`
`embedding [n, c]` and the MLP `Linear(c, e) -> tanh -> Linear(e, L*2*c)` with c = kv_heads*d and
e = `dim` (each layer runs the encoder and keeps its own 2c columns). Trainable parameters: n*L*2*c, or
n*c + c*e + e + e*L*2*c + L*2*c.

Initialisation (without the MLP): the base's own keys and values of n vocabulary tokens sampled at
random (PEFT's prompt-tuning `SAMPLE_VOCAB`; Li & Liang's "real words" init), so a fresh prefix is
the base reading those n tokens first. With the MLP: PEFT's random init. A prefix is never the
identity (its keys take softmax mass from the real ones even when zero); the bare base is the
adapter switched off (`active = None`, the reference model).

Only eager and SDPA attention are supported (flash attention takes a 2-D mask this does not widen).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from alignment.adapters.base import OwnAdapters

ATTENTION = ("eager", "sdpa")


def _refuse(message: str):
    from alignment.errors import ConfigError

    return ConfigError(f"lora.method: {message}")


def text_decoder(model: nn.Module) -> nn.Module:
    """The language model's decoder (the module holding `layers`): `language_model` (Mllama, LLaVA,
    Qwen-VL), `text_model` (Idefics3), or a causal LM's `model`."""
    core = model.model if hasattr(model, "model") else model
    for attr in ("language_model", "text_model"):
        if isinstance(getattr(core, attr, None), nn.Module):
            core = getattr(core, attr)
            break
    if not isinstance(getattr(core, "layers", None), nn.ModuleList):
        raise _refuse(f"{type(model).__name__} has no text decoder with `layers` to wrap")
    return core


def self_attention_sites(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> self-attention module of each decoder layer that has one, in layer order."""
    decoder = text_decoder(model)
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(layer.self_attn)]: layer.self_attn for layer in decoder.layers if hasattr(layer, "self_attn")}


def _kv_shape(module: nn.Module) -> tuple[int, int]:
    """(kv_heads, head_dim) of a self-attention module."""
    head_dim = getattr(module, "head_dim", None)
    k_proj = getattr(module, "k_proj", None)
    if head_dim is None or not isinstance(k_proj, nn.Linear):
        raise _refuse(f"prefix_tuning cannot wrap {type(module).__name__} (no head_dim / k_proj)")
    return k_proj.out_features // head_dim, head_dim


def _cache_argument(module: nn.Module) -> str:
    params = inspect.signature(type(module).forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise _refuse(f"prefix_tuning cannot wrap {type(module).__name__}: its forward takes no KV cache")


class _PrefixedCache:
    """A layer's cache (or None) whose `update` returns the prefix in front of the cached + new states;
    everything else is the real cache's."""

    def __init__(self, cache, key: torch.Tensor, value: torch.Tensor):
        self.cache, self.key, self.value = cache, key, value  # key, value [kv_heads, n, d]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.cache is not None:
            key_states, value_states = self.cache.update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.key is None:  # capturing: record the states, add nothing
            return key_states, value_states
        batch = key_states.shape[0]
        key = self.key.to(key_states.dtype).expand(batch, -1, -1, -1)
        value = self.value.to(value_states.dtype).expand(batch, -1, -1, -1)
        return torch.cat([key, key_states], dim=2), torch.cat([value, value_states], dim=2)

    def __getattr__(self, name):
        cache = self.__dict__.get("cache")
        if cache is None:
            raise AttributeError(name)
        return getattr(cache, name)


class _Recorder(_PrefixedCache):
    def __init__(self, cache, store: list):
        super().__init__(cache, None, None)
        self.store = store

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.store.append((key_states[0], value_states[0]))  # [kv_heads, T, d]
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def widen_mask(mask: torch.Tensor | None, n: int, queries: int, past: int, implementation: str,
               dtype: torch.dtype, device) -> torch.Tensor | None:
    """The layer's 4-D mask `[B, 1, T, S]` with n leading columns every query attends (True / 0.0);
    None (SDPA's causal shortcut) becomes an explicit causal mask over prefix + past + T keys (a single
    query attends everything: stays None)."""
    if mask is None:
        if queries == 1:
            return None
        keys = torch.arange(past + queries, device=device)
        allowed = keys[None, :] <= (past + torch.arange(queries, device=device))[:, None]  # [T, S]
        allowed = torch.cat([allowed.new_ones(queries, n), allowed], dim=1)[None, None]
        if implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    if mask.dim() != 4:
        raise ValueError(f"prefix_tuning needs a 4-D attention mask (eager or sdpa attention), got {tuple(mask.shape)}")
    head = mask.new_ones(*mask.shape[:-1], n) if mask.dtype == torch.bool else mask.new_zeros(*mask.shape[:-1], n)
    return torch.cat([head, mask], dim=-1)


class PrefixAdapters(OwnAdapters):
    method = "prefix_tuning"
    peft_type = "VLM_PREFIX_TUNING"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        decoder = text_decoder(model)
        implementation = getattr(decoder.config, "_attn_implementation", None) or "eager"
        if implementation not in ATTENTION:
            raise _refuse(f"prefix_tuning supports {ATTENTION} attention, not {implementation!r}; load the model "
                          "with attn_implementation='sdpa'")
        self.implementation = implementation
        rotary = getattr(decoder, "rotary_emb", None)
        if rotary is None:
            raise _refuse(f"prefix_tuning needs a rotary-position decoder; {type(decoder).__name__} has no rotary_emb")
        self.sites = self_attention_sites(model)
        if not self.sites:
            raise _refuse(f"prefix_tuning: {type(decoder).__name__} has no self-attention layer")
        self._capture: dict[str, list] | None = None  # site -> recorded (key, value) while initialising
        self._index: dict[str, dict[str, int]] = {}  # adapter -> site -> its chunk pair in the encoder
        decoder.register_forward_pre_hook(self._padded_positions, with_kwargs=True)
        rotary.register_forward_pre_hook(self._shift_positions, with_kwargs=True)

    # ---- building ----------------------------------------------------------------
    def add(self, name: str, spec) -> list[str]:
        from peft import PrefixTuningConfig
        from peft.tuners.prefix_tuning import PrefixEncoder

        targets = list(spec.target_modules or self.sites)
        unknown = [t for t in targets if t not in self.sites]
        if unknown:
            raise _refuse(f"prefix_tuning targets self-attention modules only; not {unknown[:3]}")
        targets = [t for t in self.sites if t in targets]  # layer order: layer i owns chunks 2i, 2i+1
        shapes = {_kv_shape(self.sites[t]) for t in targets}
        if len(shapes) != 1:
            raise _refuse(f"prefix_tuning needs one key/value shape over the targeted layers, got {sorted(shapes)}")
        (kv_heads, head_dim), = shapes
        projection = bool(getattr(spec, "prefix_projection", False))
        config = PrefixTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, num_layers=len(targets),
                                    token_dim=kv_heads * head_dim, num_attention_heads=kv_heads,
                                    encoder_hidden_size=spec.dim, prefix_projection=projection,
                                    task_type="CAUSAL_LM")
        encoder = PrefixEncoder(config)
        encoder.to(next(self.model.parameters()).device)
        self.adapters[name] = encoder
        self.configs[name] = {"num_virtual_tokens": spec.num_virtual_tokens, "prefix_projection": projection,
                              "dim": spec.dim, "target_modules": targets}
        self._index[name] = {t: i for i, t in enumerate(targets)}
        for site in targets:
            if site not in self._hooked:
                self.sites[site].register_forward_pre_hook(self._attention_hook(site), with_kwargs=True)
                self._hooked.add(site)
        if not projection:
            self.init_from_tokens(name)
        return targets

    @torch.no_grad()
    def init_from_tokens(self, name: str, ids: torch.Tensor | None = None) -> None:
        """The base's keys and values of tokens `ids [1, n]` (default: n sampled from the vocabulary) at
        positions 0..n-1 as adapter `name`'s prefix: the model then reads as the base with `ids` in front."""
        if self.configs[name]["prefix_projection"]:
            raise ValueError("prefix_tuning: a reparameterised prefix (prefix_projection) keeps PEFT's random init")
        decoder = text_decoder(self.model)
        n = self.configs[name]["num_virtual_tokens"]
        embed = decoder.get_input_embeddings()
        if ids is None:
            ids = torch.randint(embed.num_embeddings, (1, n))
        ids = ids.to(embed.weight.device)
        targets = self.configs[name]["target_modules"]
        self._capture = {site: [] for site in targets}
        training = decoder.training
        try:
            decoder.eval()
            decoder(input_ids=ids, use_cache=False)
        finally:
            decoder.train(training)
            captured, self._capture = self._capture, None
        chunks = [state.transpose(0, 1).flatten(1) for site in targets for state in captured[site][0]]  # [n, td]
        self.adapters[name].embedding.weight.copy_(torch.cat(chunks, dim=1))

    def load_state_of(self, name: str, state: dict[str, torch.Tensor], source: str = "<state>") -> None:
        """As `OwnAdapters.load_state_of`; a state with (or without) the reparameterisation MLP first
        rebuilds adapter `name` to match (the saved weights decide; a loader's spec may not say)."""
        projection = "transform.0.weight" in state
        if projection != self.configs[name]["prefix_projection"]:
            spec = _Spec(num_virtual_tokens=self.configs[name]["num_virtual_tokens"],
                         target_modules=self.configs[name]["target_modules"], prefix_projection=projection,
                         dim=state["transform.0.weight"].shape[0] if projection else self.configs[name]["dim"])
            with torch.random.fork_rng(devices=[]):
                self.add(name, spec)
        super().load_state_of(name, state, source)

    # ---- applying ----------------------------------------------------------------
    def _live(self) -> str | None:
        return self.active if self.active is not None and self.active in self.adapters else None

    def _prefix(self, site: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Adapter `active`'s key and value `[kv_heads, n, d]` at `site` (None: no prefix there)."""
        name = self._live()
        if name is None or site not in self._index[name]:
            return None
        i, encoder = self._index[name][site], self.adapters[name]
        kv_heads, head_dim = _kv_shape(self.sites[site])
        width = kv_heads * head_dim
        # The encoder's own forward (PEFT's), not its weights read directly: under ZeRO-3 a module call
        # is what gathers partitioned parameters. [n, L*2*c] (the MLP's whole output), this layer's 2c.
        tokens = torch.arange(self.configs[name]["num_virtual_tokens"], device=encoder.embedding.weight.device)
        kv = encoder(tokens)[:, 2 * i * width:(2 * i + 2) * width]
        kv = kv.view(-1, 2, kv_heads, head_dim).permute(1, 2, 0, 3)  # [2, kv_heads, n, d]
        return kv[0], kv[1]

    def _attention_hook(self, site: str):
        argument = _cache_argument(self.sites[site])

        def hook(module, args, kwargs):
            if self._capture is not None:  # initialising: record this layer's keys and values
                if site not in self._capture:
                    return None
                prefix, n = None, 0
            else:
                prefix = self._prefix(site)
                if prefix is None:
                    return None
                n = prefix[0].shape[1]
            kwargs = dict(kwargs)
            cache = kwargs.pop("cache", None)
            cache = kwargs.pop("past_key_values", None) if cache is None else cache
            if prefix is None:
                kwargs[argument] = _Recorder(cache, self._capture[site])
                return args, kwargs
            hidden = args[0] if args else kwargs["hidden_states"]
            past = cache.get_seq_length(module.layer_idx) if cache is not None else 0
            kwargs["attention_mask"] = widen_mask(kwargs.get("attention_mask"), n, hidden.shape[1], past,
                                                  self.implementation, hidden.dtype, hidden.device)
            kwargs[argument] = _PrefixedCache(cache, *prefix)
            return args, kwargs
        return hook

    def _padded_positions(self, module, args, kwargs):
        """Rows with padding and no positions given: count real tokens only (`cumsum(mask) - 1`, as
        generation does), since behind a position-free prefix a row's absolute positions matter."""
        if self._live() is None or self._capture is not None or kwargs.get("position_ids") is not None:
            return None
        mask = kwargs.get("attention_mask")
        if not torch.is_tensor(mask) or mask.dim() != 2 or bool(mask.all()):
            return None
        tokens = kwargs.get("inputs_embeds")
        tokens = kwargs.get("input_ids", args[0] if args else None) if tokens is None else tokens
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -tokens.shape[1]:]
        return args, {**kwargs, "position_ids": positions}

    def _shift_positions(self, module, args, kwargs):
        name = self._live()
        if name is None or self._capture is not None:
            return None
        n = self.configs[name]["num_virtual_tokens"]
        if kwargs.get("position_ids") is not None:
            return args, {**kwargs, "position_ids": kwargs["position_ids"] + n}
        if len(args) > 1 and args[1] is not None:
            return (args[0], args[1] + n, *args[2:]), kwargs
        raise ValueError("prefix_tuning: the rotary embedding was called without position ids to shift")


class _Spec:
    """The fields of a `LoraSpec` that `PrefixAdapters.add` reads."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

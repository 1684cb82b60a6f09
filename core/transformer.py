"""Stage 2: a GPT-2-style transformer over codebook indices, with a KV cache for sampling.

One sequence is one window: a prefix token (task / class / start), the window's condition tokens
in raster order (absent for class-only or unconditional models) and the window's image tokens in
raster order. Positions are local to the window (row and column tables), so a model trained on
10x16 windows can be asked for smaller ones. `core.sampler` moves windows over larger grids.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

PREFIX, CONDITION, IMAGE = 0, 1, 2  # rows of the type embedding


@dataclass
class GPTConfig:
    image_vocab: int = 1024  # codebook size of the image VQGAN
    cond_vocab: int = 1024  # prefix and condition ids share one table; the caller sets offsets
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 256
    window_rows: int = 10  # largest window trained; the position tables have this size
    window_cols: int = 16
    dropout: float = 0.0
    bias: bool = True  # biases in linear layers and norms (GPT-2 style); cheap at this size
    # Also add each target's own condition token (from a table of its own) to the input that
    # predicts it. Prepended condition tokens reach a target only through attention learning to
    # find the same row and column, which a small model trained briefly barely did (edges and
    # layouts scored within 0.1 bit of free generation); this gives it a direct path.
    aligned_condition: bool = False

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")


class KVCache:
    """Keys and values of one window's sequence, in fixed buffers [B, nh, max_len, hs] per layer.

    `length` counts the sequence positions filled (prefix + condition + image tokens).
    `GPT.feed_prompt` also records the window shape and the prompt length, so image tokens are
    addressed by their raster index inside the window.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        max_len: int,
        head_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (n_layer, batch, n_head, max_len, head_size)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.layer_keys = list(self.keys.unbind(0))  # views, one per layer
        self.layer_values = list(self.values.unbind(0))
        self.max_len = max_len
        self.length = 0
        self.rows = 0
        self.cols = 0
        self.prompt_length = 0  # prefix + condition tokens
        self.image_positions: torch.Tensor | None = None  # [rows*cols, C] row+col+type embedding
        # [B, rows*cols, C]: row k is what image token k's input gets added (see GPT._aligned)
        self.aligned: torch.Tensor | None = None

    @property
    def image_length(self) -> int:
        """Image tokens held after the prompt."""
        return self.length - self.prompt_length


@dataclass
class CacheFeed:
    """Tokens ready to run through one window's cache: see `GPT.feed_prompt`, `GPT.feed_image`."""

    cache: KVCache
    x: torch.Tensor  # B, T, C: embedded tokens, positions included
    start: int  # sequence position of the first token
    mask: torch.Tensor | None  # T x (start + T) bool (True = may attend); None: causal or T = 1


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.residual_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, C)  # B, T, C
        return self.residual_dropout(self.proj(y))


class MLP(nn.Module):
    """Two linear layers around GELU (tanh approximation, as GPT-2: 3x cheaper than erf on CPU)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer: [prefix, condition crop, image crop] -> next image token logits."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.cond_embed = nn.Embedding(config.cond_vocab, C)  # prefix and condition ids
        self.image_embed = nn.Embedding(config.image_vocab, C)  # codebook indices
        self.row_embed = nn.Embedding(config.window_rows, C)
        self.col_embed = nn.Embedding(config.window_cols, C)
        self.type_embed = nn.Embedding(3, C)  # prefix / condition / image
        self.aligned_embed = (
            nn.Embedding(config.cond_vocab, C) if config.aligned_condition else None
        )
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(C, bias=config.bias)
        self.head = nn.Linear(C, config.image_vocab, bias=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth.
        for name, parameter in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if self.aligned_embed is not None:
            # zero: a model started from one without this path computes exactly what it did
            nn.init.zeros_(self.aligned_embed.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ------------------------------------------------------------------ embeddings

    def _check_window(self, rows: int, cols: int) -> None:
        if not (1 <= rows <= self.config.window_rows and 1 <= cols <= self.config.window_cols):
            raise ValueError(
                f"window {rows}x{cols} tokens is outside what this model was trained for "
                f"(at most {self.config.window_rows}x{self.config.window_cols})"
            )

    def position_table(self, rows: int, cols: int, kind: int) -> torch.Tensor:
        """Row + column + type embedding of every raster index of a rows x cols window: [r*c, C]."""
        index = torch.arange(rows * cols, device=self.row_embed.weight.device)
        rows_of = self.row_embed.weight[index // cols]
        cols_of = self.col_embed.weight[index % cols]
        return rows_of + cols_of + self.type_embed.weight[kind]  # r*c, C

    def _aligned(self, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The aligned condition path for a crop cond [B, r*c]: (first [B, C], shifted [B, r*c, C]).

        The input at image index k predicts image token k + 1, so it gets the aligned embedding
        of condition k + 1 (`shifted[:, k]`; the last row, which predicts nothing, is zero); the
        last prompt position predicts image token 0 and gets that of condition 0 (`first`).
        """
        if self.aligned_embed is None or cond is None or cond.shape[1] == 0:
            return None
        aligned = self.aligned_embed(cond)  # B, r*c, C
        shifted = torch.cat([aligned[:, 1:], torch.zeros_like(aligned[:, :1])], dim=1)
        return aligned[:, 0], shifted

    def _embed(
        self,
        prefix: torch.Tensor,
        cond: torch.Tensor | None,
        image: torch.Tensor | None,
        rows: int,
        cols: int,
    ) -> torch.Tensor:
        """Embeddings of [prefix, cond, image] as one sequence: B, T, C."""
        self._check_window(rows, cols)
        if prefix.dim() != 2 or prefix.shape[1] != 1:
            raise ValueError(f"prefix must have shape [B, 1], got {tuple(prefix.shape)}")
        parts = [self.cond_embed(prefix) + self.position_table(1, 1, PREFIX)]  # B, 1, C
        if cond is not None and cond.shape[1] > 0:
            if cond.shape[1] != rows * cols:
                raise ValueError(
                    f"condition crop has {cond.shape[1]} tokens, a {rows}x{cols} window needs "
                    f"{rows * cols}"
                )
            parts.append(self.cond_embed(cond) + self.position_table(rows, cols, CONDITION))
        aligned = self._aligned(cond)
        if aligned is not None:
            first, _ = aligned
            parts[-1] = torch.cat([parts[-1][:, :-1], parts[-1][:, -1:] + first[:, None]], dim=1)
        if image is not None and image.shape[1] > 0:
            length = image.shape[1]
            if length > rows * cols:
                raise ValueError(f"{length} image tokens do not fit a {rows}x{cols} window")
            table = self.position_table(rows, cols, IMAGE)[:length]
            embedded = self.image_embed(image) + table
            if aligned is not None:
                embedded = embedded + aligned[1][:, :length]
            parts.append(embedded)
        return torch.cat(parts, dim=1)

    # ------------------------------------------------------------------ training

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(
        self,
        prefix: torch.Tensor,
        cond: torch.Tensor | None,
        image: torch.Tensor,
        rows: int,
        cols: int,
    ) -> torch.Tensor:
        """Logits [B, Li, image_vocab]; logits[:, k] predicts image[:, k] from what precedes it.

        prefix [B, 1] and cond [B, rows*cols] (or None) hold cond-vocab ids; image [B, Li] holds
        codebook indices in the window's raster order (Li <= rows*cols).
        """
        length = image.shape[1]
        x = self._embed(prefix, cond, image[:, :-1], rows, cols)  # B, T = 1 + Lc + Li - 1, C
        hidden = self._hidden(x)
        return self.head(hidden[:, -length:])  # B, Li, V

    def loss(
        self,
        prefix: torch.Tensor,
        cond: torch.Tensor | None,
        image: torch.Tensor,
        rows: int,
        cols: int,
    ) -> torch.Tensor:
        """Mean cross-entropy of the image tokens (the prefix and condition are not predicted)."""
        logits = self(prefix, cond, image, rows, cols)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), image.reshape(-1))

    @torch.no_grad()
    def next_token_logits(
        self,
        prefix: torch.Tensor,
        cond: torch.Tensor | None,
        image: torch.Tensor | None,
        rows: int,
        cols: int,
    ) -> torch.Tensor:
        """Logits [B, V] of the image token after `image` [B, t] (t may be 0): no cache."""
        hidden = self._hidden(self._embed(prefix, cond, image, rows, cols))
        return self.head(hidden[:, -1])

    def configure_optimizer(
        self, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)
    ) -> torch.optim.AdamW:
        """AdamW that decays only the linear layers' weight matrices.

        Embeddings are not decayed: a rarely used codebook entry gets few gradient updates, so
        decay, not data, would decide its vector. Norm weights and biases are not decayed either.
        """
        decay, no_decay = [], []
        for module in self.modules():
            for name, parameter in module.named_parameters(recurse=False):
                if isinstance(module, nn.Linear) and name == "weight":
                    decay.append(parameter)
                else:
                    no_decay.append(parameter)
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        logger.debug("optimizer: %d decayed, %d not decayed tensors", len(decay), len(no_decay))
        return torch.optim.AdamW(groups, lr=lr, betas=betas)

    # ------------------------------------------------------------------ cached inference

    def new_cache(self, batch: int, rows: int, cols: int, with_cond: bool) -> KVCache:
        """An empty cache big enough for one rows x cols window."""
        config = self.config
        weight = self.head.weight
        max_len = 1 + (rows * cols if with_cond else 0) + rows * cols
        head_size = config.n_embd // config.n_head
        return KVCache(
            config.n_layer, batch, config.n_head, max_len, head_size, weight.dtype, weight.device
        )

    @torch.inference_mode()
    def feed_prompt(
        self,
        cache: KVCache,
        prefix: torch.Tensor,
        cond: torch.Tensor | None,
        image: torch.Tensor | None,
        rows: int,
        cols: int,
    ) -> CacheFeed:
        """Empty `cache` and make the feed of [prefix, cond, image] for `run_feeds`.

        prefix [B, 1], cond [B, rows*cols] or None, image [B, t] (t may be 0) or None.
        """
        x = self._embed(prefix, cond, image, rows, cols)  # B, T, C
        cache.length = 0
        cache.rows, cache.cols = rows, cols
        cache.prompt_length = 1 + (cond.shape[1] if cond is not None else 0)
        cache.image_positions = self.position_table(rows, cols, IMAGE)
        aligned = self._aligned(cond)
        cache.aligned = None if aligned is None else aligned[1]
        return CacheFeed(cache, x, 0, None)

    @torch.inference_mode()
    def feed_image(self, cache: KVCache, tokens: torch.Tensor, start: int) -> CacheFeed:
        """The feed of image tokens [B, k] at window raster indices start..start+k-1.

        `start` must equal the image tokens the cache holds (cut back first with `truncate`).
        """
        k = tokens.shape[1]
        if start != cache.image_length:
            raise ValueError(
                f"cache holds {cache.image_length} image tokens, cannot feed #{start} next"
            )
        if start + k > cache.rows * cache.cols:
            raise ValueError(
                f"{start + k} image tokens do not fit a {cache.rows}x{cache.cols} window"
            )
        x = F.embedding(tokens, self.image_embed.weight) + cache.image_positions[start : start + k]
        if cache.aligned is not None:
            x = x + cache.aligned[:, start : start + k]
        n = cache.length
        mask = None
        if k > 1:
            # The k new queries sit at the bottom right of a k x (n + k) score matrix: query q
            # may see keys 0..n+q. `is_causal=True` would align the triangle top left instead.
            mask = torch.ones(k, n + k, dtype=torch.bool, device=x.device).tril(diagonal=n)
        return CacheFeed(cache, x, n, mask)

    @torch.inference_mode()
    def run_feeds(self, feeds: list[CacheFeed], all_logits: bool = False) -> list[torch.Tensor]:
        """Run several windows' feeds in one pass; logits [B, V] after each feed's last token.

        The feeds' tokens share every linear layer (one matrix product for all of them, which is
        what makes sampling several windows at once cheap on CPU); attention stays per window,
        over that window's cache. With `all_logits`, each result is [B, T, V].
        """
        x = feeds[0].x if len(feeds) == 1 else torch.cat([feed.x for feed in feeds], dim=1)
        B, T, C = x.shape  # T: all feeds' tokens
        spans = _spans(feeds)
        slots = [_layer_slots(feed, length) for feed, (_, length) in zip(feeds, spans, strict=True)]
        for index, block in enumerate(self.blocks):
            attn, mlp = block.attn, block.mlp
            h = F.layer_norm(x, (C,), block.ln1.weight, block.ln1.bias, block.ln1.eps)
            qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias)
            y = self._attend(qkv.view(B, T, 3, self.config.n_head, -1), feeds, spans, slots, index)
            x = x + F.linear(y, attn.proj.weight, attn.proj.bias)
            h = F.layer_norm(x, (C,), block.ln2.weight, block.ln2.bias, block.ln2.eps)
            h = F.gelu(F.linear(h, mlp.fc.weight, mlp.fc.bias), approximate="tanh")
            x = x + F.linear(h, mlp.proj.weight, mlp.proj.bias)
        for feed, (_, length) in zip(feeds, spans, strict=True):
            feed.cache.length = feed.start + length
        if all_logits:
            hidden = F.layer_norm(x, (C,), self.ln_f.weight, self.ln_f.bias, self.ln_f.eps)
            logits = F.linear(hidden, self.head.weight)  # B, T, V
            return [logits.narrow(1, offset, length) for offset, length in spans]
        last = torch.stack([x[:, offset + length - 1] for offset, length in spans])  # F, B, C
        hidden = F.layer_norm(last, (C,), self.ln_f.weight, self.ln_f.bias, self.ln_f.eps)
        return list(F.linear(hidden, self.head.weight).unbind(0))  # F x [B, V]

    @staticmethod
    def _attend(
        qkv: torch.Tensor,
        feeds: list[CacheFeed],
        spans: list[tuple[int, int]],
        slots: list[tuple],
        index: int,
    ) -> torch.Tensor:
        """Store layer `index`'s new keys / values and attend per window: qkv [B, T, 3, nh, hs]."""
        B, T, _, nh, hs = qkv.shape
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each B, nh, T, hs
        single = len(feeds) == 1
        outputs = []
        for feed, (offset, length), slot in zip(feeds, spans, slots, strict=True):
            new_keys, new_values, keys, values = slot
            if single:
                query, key, value = q, k, v
            else:
                query = q.narrow(2, offset, length)
                key, value = k.narrow(2, offset, length), v.narrow(2, offset, length)
            new_keys[index].copy_(key)
            new_values[index].copy_(value)
            outputs.append(
                F.scaled_dot_product_attention(
                    query,
                    keys[index],
                    values[index],
                    attn_mask=feed.mask,
                    is_causal=feed.mask is None and length > 1,  # a prompt from position 0
                )
            )  # B, nh, length, hs
        y = outputs[0] if single else torch.cat(outputs, dim=2)  # B, nh, T, hs
        return y.transpose(1, 2).reshape(B, T, nh * hs)

    def prefill(
        self,
        cache: KVCache,
        prefix: torch.Tensor,
        cond: torch.Tensor | None,
        image: torch.Tensor | None,
        rows: int,
        cols: int,
    ) -> torch.Tensor:
        """Empty the cache, run [prefix, cond, image] through it; logits [B, V] of what follows."""
        return self.run_feeds([self.feed_prompt(cache, prefix, cond, image, rows, cols)])[0]

    def decode_one(self, cache: KVCache, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Feed image token [B] at window raster index `pos`; logits [B, V] of the next one."""
        return self.run_feeds([self.feed_image(cache, token.unsqueeze(1), pos)])[0]

    def extend(
        self, cache: KVCache, tokens: torch.Tensor, start: int, all_logits: bool = False
    ) -> torch.Tensor:
        """Feed image tokens [B, k] at raster indices start..start+k-1 over the cached ones.

        Returns logits [B, V] after the last token, or [B, k, V] with `all_logits`.
        """
        return self.run_feeds([self.feed_image(cache, tokens, start)], all_logits)[0]

    def truncate(self, cache: KVCache, image_length: int) -> None:
        """Cut the cache back to the prompt plus its first `image_length` image tokens."""
        if not 0 <= image_length <= cache.image_length:
            raise ValueError(
                f"cannot cut back to {image_length} image tokens; the cache holds "
                f"{cache.image_length}"
            )
        cache.length = cache.prompt_length + image_length


def _spans(feeds: list[CacheFeed]) -> list[tuple[int, int]]:
    """(offset, length) of each feed's tokens in the concatenated sequence; checks the room."""
    spans, offset = [], 0
    for feed in feeds:
        length = feed.x.shape[1]
        if feed.start + length > feed.cache.max_len:
            raise ValueError(
                f"cache holds {feed.cache.max_len} positions, {feed.start + length} asked for"
            )
        spans.append((offset, length))
        offset += length
    return spans


def _layer_slots(feed: CacheFeed, length: int) -> tuple:
    """Per layer: where the feed's new keys / values go, and the keys / values to attend over."""
    keys, values, end = feed.cache.keys, feed.cache.values, feed.start + length
    return (
        keys.narrow(3, feed.start, length).unbind(0),  # L x [B, nh, length, hs]
        values.narrow(3, feed.start, length).unbind(0),
        keys.narrow(3, 0, end).unbind(0),  # L x [B, nh, end, hs]
        values.narrow(3, 0, end).unbind(0),
    )

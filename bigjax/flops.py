"""Model FLOPs per token and MFU, by the MaxText convention.

Training FLOPs per token = 6 x (parameters that take part in a matmul for that
token, the unembedding included) + causal attention 6 x layers x context x
(heads x head_dim), which is PaLM's 12 x L x H x Q x T halved because a causal
mask leaves half the score matrix unused (Levanter and Megatron count it whole).
Bidirectional attention (an encoder's, and cross-attention) uses the whole score
matrix and counts the whole 12 x L x H x Q x T.
A MoE layer counts its router and the k experts each token is routed to, not
all E; with expert choice, where each expert takes capacity_factor x S / E of a
group's S tokens, capacity_factor experts per token on average. XLA's own
counted FLOPs are not used: they count a scanned layer once and rematerialised
work twice.
"""
from bigjax.models import routing, stack, transformer

# Dense bf16 peak FLOP/s per chip, from the vendors' sheets (without sparsity).
# Matched as substrings of jax's device_kind in this order: a v5p reports plain
# "TPU v5", so that key comes after the v5 lite ones; the PCIe and NVL cards
# ("NVIDIA H100 PCIe") before the SXM ones' plain names.
PEAK_BF16 = {"tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
             "tpu v5": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12,
             "h100 pcie": 756e12, "h100 nvl": 835e12, "h200 nvl": 835e12, "h100": 989e12,
             "h200": 989e12, "a100": 312e12}


def _layer_matmul_params(cfg: transformer.TransformerConfig, moe: bool,
                         cross_attention: bool) -> int:
  lcfg = cfg.layer_config()
  e, hd, kvd = lcfg.emb_dim, lcfg.num_heads * lcfg.head_dim, lcfg.num_kv_heads * lcfg.head_dim
  attention = e * (2 * hd + 2 * kvd)  # query, out; key, value
  if cross_attention:
    attention *= 2
  mlp = e * cfg.mlp_dim * (3 if cfg.gated_mlp else 2)
  if moe:
    per_token = routing.experts_per_token(cfg.moe.router, cfg.moe.top_k,
                                          cfg.moe.capacity_factor, cfg.moe.num_experts)
    mlp = mlp * per_token + e * cfg.moe.num_experts  # active experts + the router
  return attention + mlp


def _stack(cfg, num_layers: int, cross_attention: bool) -> int:
  return sum(_layer_matmul_params(cfg, stack.is_moe_block(i, cfg.moe_every), cross_attention)
             for i in range(num_layers))


def training_flops_per_token(cfg: transformer.TransformerConfig, seq_len: int) -> float:
  """Forward + backward model FLOPs per (target) token; see the module docstring.
  For an encoder-decoder each target token is charged one encoder token too. A
  classifier (model.num_classes) projects one pooled vector per row onto the
  classes instead of every token onto the vocabulary: each of the row's seq_len
  input tokens is charged 1/seq_len of that head."""
  attn_width = cfg.num_heads * (cfg.head_dim or cfg.emb_dim // cfg.num_heads)
  if cfg.num_classes:
    params = cfg.emb_dim * cfg.num_classes / seq_len
  else:
    params = cfg.emb_dim * cfg.vocab_size  # The unembedding (tied or not).
  params += _stack(cfg, cfg.num_layers, cross_attention=False)
  # The first (or only) stack: causal in a decoder, so half its score matrix
  # counts; bidirectional in an encoder and in an encoder-decoder's encoder, so
  # all of it does.
  attention = 6 * cfg.num_layers * seq_len * attn_width * (1 if cfg.kind == "decoder" else 2)
  if cfg.kind == "encdec":
    decoder_layers = cfg.num_decoder_layers or cfg.num_layers
    params += _stack(cfg, decoder_layers, cross_attention=True)
    attention += 6 * decoder_layers * seq_len * attn_width * 3  # causal self + full cross
  return 6 * params + attention


def peak_flops(device_kind: str) -> float | None:
  """The chip's dense bf16 peak from PEAK_BF16, or None if it is not listed."""
  kind = device_kind.lower()
  for name, peak in PEAK_BF16.items():
    if name in kind:
      return peak
  return None

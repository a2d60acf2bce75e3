"""HF transformers models of a bigjax config's shape, and bigjax weights in them.

For experiments/benchmarks/peer.py (torch and transformers are the `bench` extra).
The architectures bigjax can express exactly:
  gpt2:    GPT2LMHeadModel; bigjax `configs/gpt2.py` (learned positions, LayerNorm,
           tanh GELU, tied embeddings, `model.use_bias`); without bigjax
           biases, HF's are zeroed.
  mixtral: MixtralForCausalLM; bigjax with RMSNorm, rotary positions, SwiGLU
           experts in every block, the dropless top-2 router (softmax, top-2,
           renormalised), an untied output projection.
  llama:   LlamaForCausalLM; the same without experts: a dense SwiGLU MLP, and
           grouped-query heads where model.num_kv_heads < num_heads.
  t5:      T5ForConditionalGeneration; bigjax `configs/t5.py` (encoder-decoder,
           RMSNorm, relative position biases, gated-GELU or ReLU MLP, no
           biases; an untied output projection, or a tied unit-variance table).
           T5 does not scale the scores by 1/sqrt(head_dim): its query weights
           carry that factor (bigjax's model.fold_query_scale, which t5.py sets;
           without it the mapping scales the query weights).
  switch:  SwitchTransformersForConditionalGeneration; the t5 mapping with a ReLU
           MLP and, every model.moe_every-th block, a Switch top-1 MoE routed in
           groups of one sequence (model.moe.group_size = its length), whose
           capacity is HF's expert_capacity.
Conv1D weights (GPT-2) are [in, out]; nn.Linear weights (Mixtral, T5) are [out, in].
"""
import numpy as np
import torch
import transformers

from bigjax import layer_layout
from bigjax.data import tokenizer
from bigjax.models import routing

ARCHS = ("gpt2", "mixtral", "llama", "t5", "switch")
# bigjax's special ids, so that HF's generate() starts, pads and stops as decode does.
SPECIAL_IDS = dict(bos_token_id=tokenizer.BOS_ID, eos_token_id=tokenizer.EOS_ID,
                   pad_token_id=tokenizer.PAD_ID)


def mixtral_like(config):
  """bigjax's expression of Mixtral's block on top of a GPT-2-shaped `config`."""
  config.model.update(norm="rmsnorm", position="rotary", mlp_activation="silu",
                      gated_mlp=True, tie_embeddings=False, moe_every=1, use_bias=False)
  config.model.moe.update(num_experts=8, router="dropless", top_k=2,
                          dropless_impl="sorted_blocks")
  return config


def build(arch: str, config):
  """An HF model of config.model's shape (its norm epsilon too)."""
  m = config.model
  if arch == "gpt2":
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.max_len, n_embd=m.emb_dim,
        n_layer=m.num_layers, n_head=m.num_heads, n_inner=m.mlp_dim,
        activation_function="gelu_new",  # tanh GELU, as jax.nn.gelu's default
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        layer_norm_epsilon=m.norm_eps, **SPECIAL_IDS))
  if arch in ("t5", "switch"):
    problems = {"position='relative'": m.position == "relative",
                "norm='rmsnorm'": m.norm == "rmsnorm", "use_bias=False": not m.use_bias,
                "num_kv_heads 0 or num_heads": m.num_kv_heads in (0, m.num_heads),
                "embed_init='unit' when tied (T5's logits are x * emb_dim**-0.5 . E^T)":
                    m.embed_init == "unit" or not m.tie_embeddings}
    if arch == "switch":
      problems.update({
          "moe_every 1 or 2 (HF's sparse blocks are i % step == 1)": m.moe_every in (1, 2),
          "router='switch_top1'": m.moe.router == "switch_top1",
          "eval_capacity_factor = capacity_factor (HF's Switch has one capacity)":
              m.moe.eval_capacity_factor == m.moe.capacity_factor})
    missing = [need for need, ok in problems.items() if not ok]
    if missing:
      raise ValueError(f"HF's {arch} needs model settings {missing}.")
    decoder_layers = m.num_decoder_layers or m.num_layers
    shape = dict(
        vocab_size=m.vocab_size, d_model=m.emb_dim, d_kv=m.head_dim or m.emb_dim // m.num_heads,
        d_ff=m.mlp_dim, num_layers=m.num_layers, num_decoder_layers=decoder_layers,
        num_heads=m.num_heads, relative_attention_num_buckets=m.relative_buckets,
        relative_attention_max_distance=m.relative_max_distance, dropout_rate=0.0,
        layer_norm_epsilon=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
        decoder_start_token_id=tokenizer.BOS_ID, **SPECIAL_IDS)
    if arch == "t5":
      model = transformers.T5ForConditionalGeneration(transformers.T5Config(
          feed_forward_proj=("gated-" if m.gated_mlp else "") + m.mlp_activation, **shape))
    else:
      moe = m.moe
      model = transformers.SwitchTransformersForConditionalGeneration(
          transformers.SwitchTransformersConfig(
              dense_act_fn=m.mlp_activation, num_experts=moe.num_experts,
              expert_capacity=routing.capacity(moe.group_size, moe.num_experts, 1,
                                               moe.capacity_factor),
              num_sparse_encoder_layers=m.num_layers // m.moe_every,
              num_sparse_decoder_layers=decoder_layers // m.moe_every,
              router_jitter_noise=0.0, router_aux_loss_coef=moe.aux_loss_weight,
              router_z_loss_coef=moe.z_loss_weight, **shape))
    if not m.tie_embeddings:
      # transformers 5 always ties T5's output to its embedding table (an untied
      # config only turns off the emb_dim**-0.5 factor): untie it, as T5.1.1 is.
      model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return model
  if arch == "llama":
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.emb_dim, intermediate_size=m.mlp_dim,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads or m.num_heads, max_position_embeddings=m.max_len,
        rms_norm_eps=m.norm_eps, tie_word_embeddings=False, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}, **SPECIAL_IDS))
  return transformers.MixtralForCausalLM(transformers.MixtralConfig(
      vocab_size=m.vocab_size, hidden_size=m.emb_dim, intermediate_size=m.mlp_dim,
      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
      num_key_value_heads=m.num_kv_heads or m.num_heads, max_position_embeddings=m.max_len,
      num_local_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
      rms_norm_eps=m.norm_eps, tie_word_embeddings=False, hidden_act="silu",
      rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}, **SPECIAL_IDS))


def lr_scheduler(optimizer, optim_cfg, total_steps: int):
  """HF's own learning-rate schedule for bigjax's `config.optim` (linear warmup from
  0, then cosine to lr * end_lr_factor, or constant): the torch side of a
  comparison does not borrow bigjax's optim.schedule. Step it after each update."""
  o = optim_cfg
  if o.schedule == "cosine":
    return transformers.get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, o.warmup_steps, total_steps, min_lr_rate=o.end_lr_factor)
  if o.schedule == "constant":
    return transformers.get_constant_schedule_with_warmup(optimizer, o.warmup_steps)
  raise ValueError(f"optim.schedule={o.schedule!r}: hf_models.lr_scheduler maps "
                   "'cosine' and 'constant'.")


def _size(tree) -> int:
  return (sum(_size(v) for v in tree.values()) if isinstance(tree, dict)
          else int(np.size(tree)))


def _t(x):
  return torch.from_numpy(np.array(x, np.float32))  # A writable copy.


def _blocks(params, stack="decoder"):
  return layer_layout.blocks_of(params[stack])


def _gpt2_state(params) -> dict:
  flat = lambda x: np.asarray(x).reshape(x.shape[0], -1)
  emb = params["embedder"]
  sd = {"transformer.wte.weight": emb["tokens"]["embedding"],
        "transformer.wpe.weight": emb["positions"]["embedding"],
        "transformer.ln_f.weight": params["decoder"]["final_norm"]["scale"],
        "transformer.ln_f.bias": params["decoder"]["final_norm"]["bias"]}
  for i, b in enumerate(_blocks(params)):
    pre, a = f"transformer.h.{i}.", b["attn"]
    sd[pre + "attn.c_attn.weight"] = np.concatenate(
        [flat(a["query"]), flat(a["key"]), flat(a["value"])], axis=1)
    sd[pre + "attn.c_proj.weight"] = np.asarray(a["out"]).reshape(-1, a["out"].shape[-1])
    sd[pre + "mlp.c_fc.weight"], sd[pre + "mlp.c_proj.weight"] = b["ffn"]["wi"], b["ffn"]["wo"]
    if "query_bias" in a:
      sd[pre + "attn.c_attn.bias"] = np.concatenate(
          [np.ravel(a["query_bias"]), np.ravel(a["key_bias"]), np.ravel(a["value_bias"])])
      sd[pre + "attn.c_proj.bias"] = a["out_bias"]
      sd[pre + "mlp.c_fc.bias"], sd[pre + "mlp.c_proj.bias"] = (b["ffn"]["wi_bias"],
                                                              b["ffn"]["wo_bias"])
    for ours, theirs in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
      sd[f"{pre}{theirs}.weight"], sd[f"{pre}{theirs}.bias"] = (b[ours]["scale"],
                                                               b[ours]["bias"])
  return sd


def _mixtral_state(params) -> dict:
  linear = lambda x: np.asarray(x).reshape(x.shape[0], -1).T  # [in, ...] -> [out, in]
  sd = {"model.embed_tokens.weight": params["embedder"]["tokens"]["embedding"],
        "model.norm.weight": params["decoder"]["final_norm"]["scale"],
        "lm_head.weight": np.asarray(params["embedder"]["logits_kernel"]).T}
  for i, b in enumerate(_blocks(params)):
    pre, a, f = f"model.layers.{i}.", b["attn"], b["ffn"]
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      sd[f"{pre}self_attn.{theirs}.weight"] = linear(a[ours])
    sd[pre + "self_attn.o_proj.weight"] = np.asarray(a["out"]).reshape(
        -1, a["out"].shape[-1]).T
    sd[pre + "input_layernorm.weight"] = b["attn_norm"]["scale"]
    sd[pre + "post_attention_layernorm.weight"] = b["ffn_norm"]["scale"]
    if "router" not in f:  # Llama's dense SwiGLU: down(silu(gate x) * up x).
      sd[pre + "mlp.gate_proj.weight"] = np.asarray(f["wi_gate"]).T
      sd[pre + "mlp.up_proj.weight"] = np.asarray(f["wi"]).T
      sd[pre + "mlp.down_proj.weight"] = np.asarray(f["wo"]).T
      continue
    sd[pre + "mlp.gate.weight"] = np.asarray(f["router"]).T
    # [experts, emb, hidden] -> [experts, 2 * hidden (gate, then up), emb].
    sd[pre + "mlp.experts.gate_up_proj"] = np.concatenate(
        [np.swapaxes(f["wi_gate"], 1, 2), np.swapaxes(f["wi"], 1, 2)], axis=1)
    sd[pre + "mlp.experts.down_proj"] = np.swapaxes(f["wo"], 1, 2)
  return sd


def _t5_attention(sd: dict, pre: str, a: dict, fold_query_scale: bool):
  linear = lambda x: np.asarray(x).reshape(x.shape[0], -1).T  # [in, ...] -> [out, in]
  head_dim = a["query"].shape[-1]
  sd[pre + "q.weight"] = linear(a["query"]) * (1.0 if fold_query_scale else head_dim ** -0.5)
  sd[pre + "k.weight"], sd[pre + "v.weight"] = linear(a["key"]), linear(a["value"])
  sd[pre + "o.weight"] = np.asarray(a["out"]).reshape(-1, a["out"].shape[-1]).T


def _t5_ffn(sd: dict, pre: str, f: dict):
  if "wi_gate" in f:  # act(x wi_0) * x wi_1
    sd[pre + "DenseReluDense.wi_0.weight"] = np.asarray(f["wi_gate"]).T
    sd[pre + "DenseReluDense.wi_1.weight"] = np.asarray(f["wi"]).T
  else:
    sd[pre + "DenseReluDense.wi.weight"] = np.asarray(f["wi"]).T
  sd[pre + "DenseReluDense.wo.weight"] = np.asarray(f["wo"]).T


def _switch_ffn(sd: dict, pre: str, f: dict):
  if "router" not in f:
    sd[pre + "mlp.wi.weight"], sd[pre + "mlp.wo.weight"] = (np.asarray(f["wi"]).T,
                                                            np.asarray(f["wo"]).T)
    return
  sd[pre + "mlp.router.classifier.weight"] = np.asarray(f["router"]).T
  for e in range(np.shape(f["wi"])[0]):
    sd[f"{pre}mlp.experts.expert_{e}.wi.weight"] = np.asarray(f["wi"][e]).T
    sd[f"{pre}mlp.experts.expert_{e}.wo.weight"] = np.asarray(f["wo"][e]).T


def _t5_state(params, fold_query_scale: bool, ffn_state=_t5_ffn) -> dict:
  emb = params["embedder"]
  sd = {"shared.weight": emb["tokens"]["embedding"]}
  if "logits_kernel" in emb:
    sd["lm_head.weight"] = np.asarray(emb["logits_kernel"]).T
  for stack in ("encoder", "decoder"):
    sd[f"{stack}.final_layer_norm.weight"] = params[stack]["final_norm"]["scale"]
    sd[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        params[stack]["relative_bias"]["table"])
    for i, b in enumerate(_blocks(params, stack)):
      pre = f"{stack}.block.{i}.layer."
      _t5_attention(sd, pre + "0.SelfAttention.", b["attn"], fold_query_scale)
      sd[pre + "0.layer_norm.weight"] = b["attn_norm"]["scale"]
      ffn = "1."
      if "cross" in b:
        _t5_attention(sd, pre + "1.EncDecAttention.", b["cross"], fold_query_scale)
        sd[pre + "1.layer_norm.weight"] = b["cross_norm"]["scale"]
        ffn = "2."
      ffn_state(sd, pre + ffn, b["ffn"])
      sd[pre + ffn + "layer_norm.weight"] = b["ffn_norm"]["scale"]
  return sd


_STATES = {"gpt2": _gpt2_state, "mixtral": _mixtral_state, "llama": _mixtral_state,
           "t5": _t5_state,
           "switch": lambda params, fold: _t5_state(params, fold, _switch_ffn)}


def load(arch: str, params, model, fold_query_scale: bool | None = None):
  """Copies bigjax parameters (a nested dict of arrays) into `model`; every HF
  tensor must be set, except biases of a bigjax model without them (zeroed).
  t5 and switch need the bigjax model's model.fold_query_scale."""
  if arch in ("t5", "switch"):
    if fold_query_scale is None:
      raise ValueError(f"hf_models.load({arch!r}): pass fold_query_scale, the bigjax "
                       "model's model.fold_query_scale.")
    state = _STATES[arch](params, fold_query_scale)
  else:
    if fold_query_scale:
      raise ValueError(f"HF's {arch} scales its queries in the forward pass: a bigjax "
                       "model with model.fold_query_scale=True does not map onto it.")
    state = _STATES[arch](params)
  ours = {k: _t(v) for k, v in state.items()}
  theirs = {k: v.detach() for k, v in model.named_parameters()}  # Not the buffers.
  tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
  missing = [k for k in theirs if k not in ours and not k.endswith(".bias")
             and not (tied and k == "lm_head.weight")]
  unknown = [k for k in ours if k not in theirs]
  if missing or unknown:
    raise KeyError(f"Unmapped HF tensors {missing}; unknown names {unknown}.")
  # Every bigjax value must have a place: a tensor the mapping leaves out (biases
  # HF's model has no slot for) would make the two compute different functions.
  left_out = _size(params) - sum(v.numel() for v in ours.values())
  if left_out:
    raise ValueError(f"{left_out} bigjax parameter values have no place in HF's {arch} "
                     "(e.g. biases it lacks): the two would compute different functions.")
  for k, v in theirs.items():
    if k not in ours and k.endswith(".bias"):
      ours[k] = torch.zeros_like(v)
    elif k in ours and tuple(ours[k].shape) != tuple(v.shape):
      raise ValueError(f"{k}: bigjax gives {tuple(ours[k].shape)}, HF has {tuple(v.shape)}.")
  model.load_state_dict(ours, strict=False)
  return model

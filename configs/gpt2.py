r"""GPT-2-style decoder LM (learned positions, pre-LayerNorm, GELU, tied
embeddings, dropout 0.1) on the embedded Python-source corpus: pretrain, then
fine-tune on a held-out subset, then generate.

Pretrain (GPT-2 small size needs an accelerator; `runlocal` takes ~15 s on CPU,
`demo`, 4 x 256 with 128-byte windows, ~1.5 minutes):
  python -m bigjax.main --config=configs/gpt2.py:runlocal --workdir=/tmp/gpt2_pre
Fine-tune from it on the first half of the held-out `validation` files, evaluated
on the other half (a fresh optimizer and learning rate; only parameters are read):
  python -m bigjax.main --config=configs/gpt2.py:finetune,runlocal \
      --config.init_from.workdir=/tmp/gpt2_pre --workdir=/tmp/gpt2_ft
Add --config.optim.freeze='^embedder/' to keep the embeddings fixed. Then sample:
  python -m bigjax.generate --workdir=/tmp/gpt2_ft --prompt="def " --max_new_tokens=24

`baby` is nanoGPT's "baby GPT on CPU" recipe (4 layers, 4 heads, width 128,
64-byte context, batch 12, 2,000 steps of AdamW 1e-3 -> 1e-4 cosine after 100
warmup steps, beta2 0.99), the recipe experiments/benchmarks/peer.py trains in
bigjax and in PyTorch (HF transformers' GPT-2) side by side (~3 minutes here):
  python -m bigjax.main --config=configs/gpt2.py:baby --workdir=/tmp/gpt2_baby
"""
from configs import common, lm


def get_config(arg=None):
  arg = common.parse_arg(arg, finetune=False, runlocal=False, demo=False, baby=False)
  config = lm.get_config(",".join(k for k in ("runlocal", "demo") if arg[k]))
  config.model.update(position="learned", norm="layernorm", norm_eps=1e-5,
                      mlp_activation="gelu", gated_mlp=False, tie_embeddings=True,
                      use_bias=True, dropout_rate=0.1)
  if arg.runlocal or arg.demo:
    config.model.dropout_rate = 0.0  # Minutes of training on a large corpus: no overfitting.
  if arg.baby:
    config.update(total_steps=2000, batch_size=12, seq_len=64, log_every=100,
                  eval_every=500, eval_batches=200, checkpoint_every=1000)
    # Unrolled, as for demo and runlocal: at 4 small layers on CPU a scanned stack's
    # step is ~1.4x slower (stacked parameters sliced, gradients stacked, per layer).
    config.model.update(num_layers=4, num_heads=4, emb_dim=128, mlp_dim=512, max_len=64,
                        dropout_rate=0.0, dtype="float32", scan_layers=False)
    config.optim.update(lr=1e-3, warmup_steps=100, end_lr_factor=0.1, b2=0.99,
                        weight_decay=0.1, clip_norm=1.0)
  if arg.runlocal:
    config.total_steps = 60
    config.log_every = config.eval_every = config.checkpoint_every = 30
  if arg.finetune:
    # The stdlib corpus holds ~8% of its files out as `validation`; fine-tuning
    # adapts to the first half of them and is judged on the second half.
    config.data.train_split = "validation[:50%]"
    config.data.eval_split = "validation[50%:]"
    config.total_steps = max(config.total_steps // 4, 10)
    # Files differ a lot (26-27 a half): judge the whole half, not its first files.
    config.eval_batches = 64 if arg.runlocal else 100_000
    config.optim.update(lr=config.optim.lr / 3, warmup_steps=0, schedule="linear",
                        end_lr_factor=0.0)
  return config

r"""GShard-style MoE decoder LM: top-2 routing over 8 experts in every other block.

Run (CPU, ~1 minute):
  python -m bigjax.main --config=configs/lm_moe.py:runlocal --workdir=/tmp/moe_local
The demo model (`make demo`, 1 min 29 s on 2 CPU cores once set up; README):
  python -m bigjax.main --config=configs/lm_moe.py:demo --workdir=/tmp/bigjax_demo
Expert parallelism on 8 devices, e.g. 4 expert shards x 2 data shards:
  ... --config.mesh.expert=4 --config.mesh.data=2
Other routers: --config.model.moe.router=switch_top1 | dropless (+ .top_k=2).
Encoder-decoder with MoE in both stacks: the `encdec` arg.
"""
from configs import common, lm


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, demo=False, encdec=False)
  base_arg = ",".join(k for k in ("runlocal", "demo") if arg[k])
  config = lm.get_config(base_arg)
  config.model.moe_every = 2
  config.model.moe = common.moe_config(group_size=min(256, config.seq_len))
  if arg.demo:  # 2 blocks, the second MoE; 25.3k tokens/s on 2 CPU cores (README).
    config.total_steps = 900
    config.eval_every = 300
    config.checkpoint_every = 300
    config.model.update(num_layers=2, mlp_dim=512)  # top-2 of 512 = the dense 1024.
    config.optim.update(lr=2e-3, warmup_steps=50)
  if arg.encdec:
    config.model.kind = "encdec"
    config.task = "reverse"  # Output each corpus chunk backwards.
    config.sample_tokens = 0  # A next-byte sample is the decoder-only task's.
  return config

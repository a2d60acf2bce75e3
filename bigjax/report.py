"""What a finished run shows a person: a loss-curve PNG and a text summary
(the MoE router metrics among it)."""
import io
import os

from etils import epath

from bigjax import metrics as metrics_lib


def plot_loss_curve(workdir: str) -> str:
  """Writes WORKDIR/loss_curve.png from metrics.jsonl; returns its path."""
  import matplotlib
  matplotlib.use("Agg")  # Files only: no display on servers and in CI.
  import matplotlib.pyplot as plt

  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), float)]
  evals = [(r["step"], r["eval_loss"]) for r in rows if isinstance(r.get("eval_loss"), float)]
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  if train:
    ax.plot(*zip(*train), label="train loss")
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title(os.path.basename(os.path.normpath(workdir)))
  ax.grid(alpha=0.3)
  ax.legend()
  path = epath.Path(workdir) / "loss_curve.png"
  fig.tight_layout()
  png = io.BytesIO()  # matplotlib writes local files only; epath also buckets.
  fig.savefig(png, format="png")
  plt.close(fig)
  path.write_bytes(png.getvalue())
  return str(path)


def router_metrics_lines(workdir: str) -> list[str]:
  """The last logged router metrics of each MoE layer, one line per layer (none
  for a dense model)."""
  rows = [r for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if any(k.startswith("moe/") for k in r)]
  if not rows:
    return []
  last = rows[-1]
  layers = sorted({k.rsplit("/", 1)[0] for k in last if k.startswith("moe/")
                   and "/load/" not in k})
  lines = [f"Router metrics at step {last['step']}:"]
  for layer in layers:
    by_expert = {k: last[k] for k in last if k.startswith(layer + "/load/")}
    # Keys end in expert_<e>: sorted by number, or expert_10 would come before expert_2.
    load = [by_expert[k] for k in sorted(by_expert, key=lambda k: int(k.rsplit("_", 1)[1]))]
    lines.append(f"  {layer[4:]}: aux={last[layer + '/aux_loss']:.3f} "
                 f"z_loss={last[layer + '/z_loss']:.3f} dropped={last[layer + '/dropped']:.3f} "
                 f"entropy={last[layer + '/router_entropy']:.3f} "
                 f"load=[{' '.join(f'{x:.2f}' for x in load)}]")
  return lines

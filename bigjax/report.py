"""What a finished run shows a person: a loss-curve PNG and a text summary."""
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

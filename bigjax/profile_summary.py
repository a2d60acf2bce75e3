r"""Where a profiled program's time goes: its XLA ops from a jax.profiler trace, by kind.

  python -m bigjax.profile_summary WORKDIR/profile --steps=2 [--hlo=module.txt]

reads the newest *.xplane.pb under the folder (config.profile_steps writes one, and
this summary of it as summary.txt; --steps is the number of steps in its window) and prints the time of each kind of op
per step and the ops that took longest, each with the JAX operation it came from. An XLA op is a profiler event that carries an
`hlo_op` stat: on a GPU the kernels on the device's streams, on the CPU the thunks on
the host's threads. When any device plane has such events only device planes count, so
the host's launches of GPU kernels are not counted twice.

Time is each event's self time: an op's events nested inside another op's on the same
line (a CPU while loop's body inside the loop's own thunk) count for the inner op
only. The kinds (matmul, attention, collective, ...) come from the optimized HLO
(`jitted.lower(...).compile().as_text()`, or --hlo): a fusion that contains a dot is a
matmul (a dot's epilogue rides along with it), a cuDNN attention custom call is
attention. Without the HLO every op's kind is "?" and its source unknown. On a CPU ops run on several threads
at once, so op time per step can exceed the step's wall time.
"""
import argparse
import collections
import dataclasses
import glob
import os
import re
from typing import Iterable, Mapping, Optional

MATMUL_OPCODES = frozenset({"dot", "convolution", "ragged-dot"})
COLLECTIVE_OPCODES = frozenset({
    "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
    "collective-permute", "collective-broadcast"})
MOVE_OPCODES = frozenset({"copy", "transpose", "copy-start", "copy-done", "gather", "scatter",
                          "dynamic-slice", "dynamic-update-slice", "concatenate", "pad"})
CONTROL_OPCODES = frozenset({"while", "conditional", "call", "async-start", "async-done"})
_ATTENTION_TARGETS = ("fmha", "flash", "attention")
_MATMUL_TARGETS = ("gemm", "matmul", "cublas")

# `%name = shape opcode(operands), attributes`; the shape may be a tuple, "ROOT " may lead.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?\s([a-z][a-z0-9\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+) (?:\(.*\) -> .*)?\{\s*$")
_CALLS = re.compile(r"\b(?:calls|to_apply)=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_SOURCE = re.compile(r'op_name="(?:jit\([^)]*\)/)?([^"]*)"')


@dataclasses.dataclass(frozen=True)
class OpInfo:
  """What the optimized HLO says of one instruction: its kind, and the JAX operation it
  came from (its metadata's op_name, e.g. "transpose(jvp())/while/body/dot_general")."""
  kind: str
  source: str


@dataclasses.dataclass(frozen=True)
class OpTime:
  """One XLA op's executions in the trace: how many, and their summed self time."""
  module: str
  name: str
  count: int
  self_ns: float


def _base_kind(opcode: str, target: str) -> str:
  if opcode in MATMUL_OPCODES:
    return "matmul"
  if opcode.split("-start")[0].split("-done")[0] in COLLECTIVE_OPCODES:
    return "collective"
  if opcode == "custom-call":
    lowered = target.lower()
    if any(t in lowered for t in _ATTENTION_TARGETS):
      return "attention"
    if any(t in lowered for t in _MATMUL_TARGETS):
      return "matmul"
    return "custom-call"
  if opcode in MOVE_OPCODES:
    return "copy/move"
  if opcode in CONTROL_OPCODES:
    return "control"
  return "elementwise/reduce"


def describe_ops(hlo_text: str) -> dict[str, OpInfo]:
  """Instruction name -> OpInfo, for every instruction of an optimized HLO module's text.

  A fusion (or any op that calls computations) takes the weightiest kind found in
  what it calls: attention, then matmul, then collective, then a data move."""
  own, sources, calls, current = {}, {}, collections.defaultdict(list), None
  callees_of = {}  # computation -> the computations its instructions call
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and " = " not in line:
      current = header.group(1)
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, opcode, rest = m.groups()
    target, source = _TARGET.search(rest), _SOURCE.search(rest)
    own[name] = (_base_kind(opcode, target.group(1) if target else ""), current)
    sources[name] = source.group(1) if source else ""
    calls[name] = _CALLS.findall(rest)
    callees_of.setdefault(current, []).extend(calls[name])
  kinds_in = collections.defaultdict(set)  # computation -> kinds of its own instructions
  for kind, computation in own.values():
    kinds_in[computation].add(kind)

  def reachable_kinds(computation, seen):
    if computation in seen:
      return set()
    seen.add(computation)
    found = set(kinds_in[computation])
    for callee in callees_of.get(computation, ()):
      found |= reachable_kinds(callee, seen)
    return found

  order = ("attention", "matmul", "collective", "copy/move")
  result = {}
  for name, (kind, _) in own.items():
    if calls[name] and kind != "control":
      inner = set().union(*(reachable_kinds(c, set()) for c in calls[name]))
      kind = next((k for k in order if k in inner), kind)
    result[name] = OpInfo(kind, sources[name])
  return result


def module_name(hlo_text: str) -> str:
  """The module an optimized HLO text holds ("jit_train_step"): the traced ops'
  `hlo_module`, which picks them out of a trace of several programs."""
  m = re.match(r"\s*HloModule ([\w.\-]+)", hlo_text)
  if not m:
    raise ValueError("Not an HLO module's text: it should begin with 'HloModule NAME'.")
  return m.group(1)


def _self_times(events: list[tuple[int, int, str, str]]) -> Iterable[tuple[str, str, int]]:
  """(start, duration, module, op) events of one line -> (module, op, self time) each."""
  events = sorted(events, key=lambda e: (e[0], -e[1]))
  self_ns = [e[1] for e in events]
  open_events = []  # Indices of the events that enclose the current one, innermost last.
  for i, (start, duration, _, _) in enumerate(events):
    while open_events and events[open_events[-1]][0] + events[open_events[-1]][1] <= start:
      open_events.pop()
    if open_events:
      self_ns[open_events[-1]] -= duration
    open_events.append(i)
  for (_, _, module, op), t in zip(events, self_ns):
    yield module, op, t


def op_times(xplane_path: str) -> list[OpTime]:
  """Every XLA op's count and self time in a trace, longest first."""
  from jax.profiler import ProfileData  # (jax imports only when a trace is read)
  data = ProfileData.from_file(xplane_path)
  lines_by_plane = {}
  for plane in data.planes:
    lines = []
    for line in plane.lines:
      events = []
      for event in line.events:
        stats = dict(event.stats)
        if "hlo_op" in stats:
          events.append((event.start_ns, event.duration_ns, str(stats.get("hlo_module", "")),
                         str(stats["hlo_op"])))
      if events:
        lines.append(events)
    if lines:
      lines_by_plane[plane.name] = lines
  device = {p: l for p, l in lines_by_plane.items() if p.startswith("/device:")}
  counts, totals = collections.Counter(), collections.Counter()
  for lines in (device or lines_by_plane).values():
    for events in lines:
      for module, op, t in _self_times(events):
        counts[module, op] += 1
        totals[module, op] += t
  return sorted((OpTime(m, o, counts[m, o], totals[m, o]) for m, o in counts),
                key=lambda op: -op.self_ns)


OPS_HEADER = (f"  {'op':32s} {'kind':18s} {'runs/step':>9s} {'ms/step':>8s} {'share':>6s}"
              "  from")


def summary(ops: list[OpTime], infos: Optional[Mapping[str, OpInfo]] = None, steps: int = 1,
            top: int = 15, module: Optional[str] = None) -> str:
  """A table of time per step by kind of op, then the `top` longest ops (under OPS_HEADER).

  module: only that HLO module's ops (default: the module with the most time; in a
  multi-process job that can be one that waits for the other processes, so name
  the program: module_name(its HLO text)). Control-flow ops (a while loop's own thunk) count
  only their self time, which is their overhead, under "control"."""
  if not ops:
    return "No XLA op events in the trace."
  by_module = collections.Counter()
  for op in ops:
    by_module[op.module] += op.self_ns
  if module is not None and module not in by_module:
    return (f"No op of {module} in the trace; its modules: "
            + ", ".join(m for m, _ in by_module.most_common()) + ".")
  module = module or by_module.most_common(1)[0][0]
  ops = [op for op in ops if op.module == module]
  unknown = OpInfo("?", "")
  kind_of = lambda op: (infos or {}).get(op.name, unknown).kind
  total = sum(op.self_ns for op in ops)
  by_kind = collections.Counter()
  for op in ops:
    by_kind[kind_of(op)] += op.self_ns
  ms = lambda ns: ns / steps / 1e6
  out = [f"{module}: {ms(total):.2f} ms of XLA ops per step ({steps} step(s) traced)",
         f"  {'kind':20s} {'ms/step':>9s} {'share':>6s}"]
  out += [f"  {k:20s} {ms(t):9.2f} {t / total:6.1%}" for k, t in by_kind.most_common()]
  out.append(OPS_HEADER)
  for op in ops[:top]:
    source = (infos or {}).get(op.name, unknown).source
    out.append(f"  {op.name[:32]:32s} {kind_of(op):18s} {op.count / steps:9.1f} "
               f"{ms(op.self_ns):8.2f} {op.self_ns / total:6.1%}  "
               f"{'...' + source[-45:] if len(source) > 48 else source}")
  return "\n".join(out)


def summarize(path: str, hlo_text: Optional[str] = None, steps: int = 1, top: int = 15) -> str:
  """summary() of the newest trace under path. With the traced program's optimized HLO
  text: each op's kind and source, and that program's ops alone."""
  infos = module = None
  if hlo_text is not None:
    infos, module = describe_ops(hlo_text), module_name(hlo_text)
  return summary(op_times(newest_trace(path)), infos, steps, top, module)


def newest_trace(path: str) -> str:
  """path itself if it is a file, else the newest *.xplane.pb under it."""
  if os.path.isfile(path):
    return path
  traces = glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True)
  if not traces:
    raise FileNotFoundError(f"No *.xplane.pb under {path}: profile a run with "
                            "config.profile_steps=(start, stop) first.")
  return max(traces, key=os.path.getmtime)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("path", help="a *.xplane.pb, or a folder holding one (WORKDIR/profile)")
  parser.add_argument("--steps", type=int, default=1, help="steps in the traced window")
  parser.add_argument("--hlo", help="the optimized HLO text of the traced program, for kinds")
  parser.add_argument("--top", type=int, default=15)
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps={args.steps}: the number of traced steps, at least 1")
  hlo_text = None
  if args.hlo:
    with open(args.hlo) as f:
      hlo_text = f.read()
  print(summarize(args.path, hlo_text, args.steps, args.top))


if __name__ == "__main__":
  main()

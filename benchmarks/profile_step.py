"""Where a train step's time goes: JAX (jax.profiler) beside PyTorch (torch.profiler), by part.

  python benchmarks/profile_step.py CONFIG [key=value ...] [--steps N] [--top K] [--no-torch]
  python benchmarks/profile_step.py configs/bench.yaml model.position_encoding=rope

JAX: the step is compiled as benchmarks/train_step.py compiles it and traced for --steps steps.
Every executed HLO instruction (on XLA:CPU a thunk: a fusion, a dot, a copy, a loop) gets its
share of wall time: XLA:CPU runs independent instructions on several threads at once, so each
moment is split among the instructions running in it (a loop's own time excludes its body's).
Its op_name's named scopes (the model's attention / mlp / norm / embed / lm_head, the loss,
the step's optimizer) decide its part of the step: attention core (QK^T, softmax, masks, PV,
RoPE), the q/k/v/o projections, the MLP (with its residual add), norms, embedding, LM head +
loss, optimizer, or "other" (no scope: copies, loop control, parameter slicing). Time in no
instruction at all is the step's wall time minus the sum of the parts.

PyTorch: transformers' Llama twin (train_step.llama_twin) runs the same step under
torch.profiler. Forward hooks open a profiler range per module (q_proj, self_attn, mlp, the
norms, ...), so each forward operator belongs to its innermost module's part (the decoder
layer's residual adds fall to "other"); each backward
operator belongs to the part of the forward operator that created its autograd node (matched by
sequence number). Times are operators' self CPU time on the calling thread.

Each part is split into matmul (dot/convolution fusions; aten mm/bmm/addmm) and the rest.
Both sides print seconds per step; the last line is one JSON object. Profilers slow a step a
little, so compare the two columns of one run, never numbers across runs or with
train_step.py's.
"""

import argparse
import collections
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time

from stepaudio_jax.launch import prefer_cpu_without_accelerators

prefer_cpu_without_accelerators()  # before jax: no TPU-runtime errors on a CPU-only host

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from train_step import compile_step, host_batch, llama_step, torch_skip_reason

from stepaudio_jax.tasks.registry import load_config

PARTS = ("attention core", "q/k/v/o projections", "mlp", "norms", "embedding",
         "lm head + loss", "optimizer + clipping", "other")
TORCH_MATMULS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("config")
  p.add_argument("overrides", nargs="*", help="section.key=value")
  p.add_argument("--steps", type=int, default=3, help="profiled steps (times are per step)")
  p.add_argument("--top", type=int, default=12, help="instructions/operators listed")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch profile")
  return p.parse_args(argv)


# --- JAX: HLO instruction -> part ------------------------------------------------------------

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^=]*? ([a-z][\w\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TABLE_ROW = re.compile(r'^(\d+) (?:"(.*)"|\{(.*)\})$')


def _source_tables(hlo_text: str) -> dict[str, tuple[str, str, int]]:
  """stack frame id -> (file, function, line) from the module's FileNames, FunctionNames,
  FileLocations and StackFrames tables (the frame an instruction names is its innermost)."""
  tables, current = collections.defaultdict(dict), None
  for raw in hlo_text.splitlines():
    if raw in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = raw
      continue
    m = _TABLE_ROW.match(raw) if current else None
    if not m:
      current = None
      continue
    quoted, fields = m.group(2), m.group(3)
    tables[current][m.group(1)] = quoted if quoted is not None else dict(
        f.split("=") for f in fields.split())
  frames = {}
  for frame, row in tables["StackFrames"].items():
    loc = tables["FileLocations"].get(row["file_location_id"], {})
    frames[frame] = (tables["FileNames"].get(loc.get("file_name_id"), ""),
                     tables["FunctionNames"].get(loc.get("function_name_id"), ""),
                     int(loc.get("line", 0)))
  return frames


def hlo_instructions(hlo_text: str) -> dict[str, dict]:
  """name -> {opcode, file, function, line, scopes, matmul} for the optimized module's
  instructions (scopes: the names in its op_name, transforms unwrapped: "transpose(jvp(mlp))"
  gives transpose, jvp, mlp); a fusion is a matmul when its fused
  computation holds a dot or convolution."""
  frames = _source_tables(hlo_text)
  opcodes_in, current, instructions = collections.defaultdict(set), None, {}
  for raw in hlo_text.splitlines():
    if m := _COMPUTATION.match(raw):
      current = m.group(1)
      continue
    if not (m := _INSTRUCTION.match(raw)):
      continue
    name, opcode = m.groups()
    opcodes_in[current].add(opcode)
    frame, calls, op_name = _FRAME.search(raw), _CALLS.search(raw), _OP_NAME.search(raw)
    operands = raw[m.end():].split(")", 1)[0]
    path, function, line = frames.get(frame.group(1) if frame else "", ("", "", 0))
    instructions[name] = {"opcode": opcode, "file": path, "function": function, "line": line,
                          "calls": calls.group(1) if calls else None,
                          "operands": re.findall(r"%([\w.\-]+)", operands),
                          "scopes": set(re.findall(r"[\w.\-]+", op_name.group(1)))
                                    if op_name else set()}
  dots = {"dot", "convolution"}
  for info in instructions.values():
    info["matmul"] = info["opcode"] in dots or bool(opcodes_in.get(info["calls"], set()) & dots)
  return instructions


def jax_part(scopes: set[str], function: str) -> str:
  """The part of the step an instruction belongs to, from the named scopes of its op_name
  (the model's: attention, mlp, norm, embed, lm_head; the loss's; the step's optimizer) and
  the function that emitted it (`project` inside attention = a q/k/v/o projection)."""
  for scope, part in (("norm", "norms"), ("embed", "embedding"), ("lm_head", "lm head + loss"),
                      ("loss", "lm head + loss"), ("optimizer", "optimizer + clipping"),
                      ("mlp", "mlp")):
    if scope in scopes:
      return part
  if "attention" in scopes:
    return "q/k/v/o projections" if function == "project" else "attention core"
  return "other"


def _leaf_segments(events: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
  """One thread's events as (start, end, name) pieces during which that event is the innermost
  one running (a loop's time outside its body's instructions stays the loop's)."""
  pieces, open_events = [], []  # open_events: [end, name, cursor]

  def close(until):
    while open_events and open_events[-1][0] <= until:
      end, name, cursor = open_events.pop()
      if end > cursor:
        pieces.append((cursor, end, name))
      if open_events:
        open_events[-1][2] = max(open_events[-1][2], end)

  for start, duration, name in sorted(events, key=lambda e: (e[0], -e[1])):
    close(start)
    if open_events:
      parent = open_events[-1]
      if start > parent[2]:
        pieces.append((parent[2], start, parent[1]))
      parent[2] = start
    open_events.append([start + duration, name, start])
  close(float("inf"))
  return pieces


UNTRACED = "(no instruction traced)"


def wall_times(threads: list[list[tuple[int, int, str]]], instructions: dict[str, dict]
               ) -> dict[str, float]:
  """Seconds of wall time per instruction, from each thread's (start_ns, duration_ns, name)
  instruction events.

  XLA:CPU runs independent instructions on several threads at once, so each moment is shared
  equally among the instructions running in it. A dot may also run asynchronously on the
  thread pool after its trace event has ended; a stretch in which no instruction is traced
  goes to the matmul operands of the instruction that starts when it ends (the one that waited
  for them), else to UNTRACED. The values add up to the traced span.
  """
  edges = []
  for events in threads:
    for start, end, name in _leaf_segments(events):
      edges += [(start, 1, name), (end, -1, name)]
  edges.sort(key=lambda e: (e[0], e[1]))
  total, running, last = collections.defaultdict(float), collections.Counter(), None
  for time_ns, change, name in edges:
    if last is not None and time_ns > last:
      if running:
        share = (time_ns - last) / sum(running.values())
        for active, count in running.items():
          total[active] += share * count
      else:
        waited = [o for o in instructions[name]["operands"]
                  if instructions.get(o, {}).get("matmul")] or [UNTRACED]
        for operand in waited:
          total[operand] += (time_ns - last) / len(waited)
    running[name] += change
    if running[name] == 0:
      del running[name]
    last = time_ns
  return {name: ns * 1e-9 for name, ns in total.items()}


def traced_instructions(xplane_path: str, names) -> list[list[tuple[int, int, str]]]:
  """Per thread of an xplane trace, its events named after an HLO instruction."""
  from jax.profiler import ProfileData

  return [[(e.start_ns, e.duration_ns, e.name) for e in line.events if e.name in names]
          for plane in ProfileData.from_file(xplane_path).planes for line in plane.lines]


def profile_jax(cfg, batch: dict, steps: int) -> dict:
  compiled, state, device_batch = compile_step(cfg, batch)
  instructions = hlo_instructions(compiled.as_text())
  carry = {"state": state}

  def run():
    carry["state"], metrics = compiled(carry["state"], device_batch)
    jax.block_until_ready(metrics)

  for _ in range(2):
    run()
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    walls = []
    for _ in range(steps):
      start = time.perf_counter()
      run()
      walls.append(time.perf_counter() - start)
    jax.profiler.stop_trace()
    (xplane,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    seconds = wall_times(traced_instructions(xplane, instructions), instructions)
  parts = {p: {"matmul": 0.0, "rest": 0.0} for p in PARTS}
  rows = []
  for name, s in seconds.items():
    info = instructions.get(name, {"scopes": set(), "function": "", "matmul": False,
                                   "file": "", "opcode": "-"})
    part = jax_part(info["scopes"], info["function"])
    parts[part]["matmul" if info["matmul"] else "rest"] += s / steps
    where = f"{os.path.basename(info['file'])}:{info['line']}" if info["file"] else "-"
    rows.append((s / steps, name, info["opcode"], where, part))
  rows.sort(reverse=True)
  return {"wall": statistics.fmean(walls), "parts": parts, "top": rows}


# --- PyTorch: operator -> part ---------------------------------------------------------------


def torch_module_parts(model) -> dict:
  """module -> part for the Llama twin's modules (the innermost enclosing module decides)."""
  parts = {model.model.embed_tokens: "embedding", model.model.norm: "norms",
           model.lm_head: "lm head + loss", model.model.rotary_emb: "attention core"}
  for layer in model.model.layers:
    parts[layer] = "other"
    parts[layer.self_attn] = "attention core"
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      parts[getattr(layer.self_attn, proj)] = "q/k/v/o projections"
    parts[layer.mlp] = "mlp"
    parts[layer.input_layernorm] = parts[layer.post_attention_layernorm] = "norms"
  return parts


def profile_torch(cfg, batch: dict, steps: int) -> dict:
  from torch.autograd.profiler import record_function
  from torch.profiler import ProfilerActivity, profile

  model, run = llama_step(cfg, batch, part=lambda name: record_function(f"part::{name}"))
  open_ranges = []
  for module, part in torch_module_parts(model).items():
    def enter(_module, _args, part=part):
      open_ranges.append(record_function(f"part::{part}"))
      open_ranges[-1].__enter__()

    def leave(_module, _args, _out):
      open_ranges.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)
  for _ in range(2):
    run()
  walls = []
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      start = time.perf_counter()
      run()
      walls.append(time.perf_counter() - start)
  return {"wall": statistics.fmean(walls), **_torch_parts(prof.events(), steps)}


def _torch_parts(events, steps: int) -> dict:
  def enclosing_part(event):
    while event is not None:
      if event.name.startswith("part::"):
        return event.name[len("part::"):]
      event = event.cpu_parent
    return None

  def top_level(event):
    while event.cpu_parent is not None and not event.cpu_parent.name.startswith("part::"):
      event = event.cpu_parent
    return event

  part_of_sequence = {}
  for e in events:
    if e.sequence_nr >= 0 and not e.name.startswith("autograd::") and enclosing_part(e):
      part_of_sequence.setdefault(e.sequence_nr, enclosing_part(e))
  parts = {p: {"matmul": 0.0, "rest": 0.0} for p in PARTS}
  by_operator = collections.defaultdict(float)
  for e in events:
    if e.name.startswith("part::") or e.self_cpu_time_total <= 0:
      continue
    part = enclosing_part(e)
    if part is None:
      root = top_level(e)
      backward = root.name.startswith("autograd::engine::evaluate_function")
      part = part_of_sequence.get(root.sequence_nr, "other") if backward else "other"
    seconds = e.self_cpu_time_total * 1e-6 / steps
    parts[part]["matmul" if e.name in TORCH_MATMULS else "rest"] += seconds
    by_operator[(e.name, part)] += seconds
  rows = sorted(((s, name, part) for (name, part), s in by_operator.items()), reverse=True)
  return {"parts": parts, "top": rows}


# --- report ----------------------------------------------------------------------------------


def print_report(r: dict, top: int) -> None:
  jax_parts, torch_parts = r["jax"]["parts"], (r.get("torch") or {}).get("parts")
  header = f"{'part of the step':<24} {'JAX matmul':>10} {'JAX rest':>9} {'JAX sum':>8}"
  if torch_parts:
    header += f"  {'torch matmul':>12} {'torch rest':>10} {'torch sum':>9}  {'JAX/torch':>9}"
  print(header)
  sums = collections.Counter()
  for part in PARTS:
    j = jax_parts[part]
    line = f"{part:<24} {j['matmul']:>10.3f} {j['rest']:>9.3f} {j['matmul'] + j['rest']:>8.3f}"
    sums.update({"jm": j["matmul"], "jr": j["rest"]})
    if torch_parts:
      t = torch_parts[part]
      tsum = t["matmul"] + t["rest"]
      ratio = (j["matmul"] + j["rest"]) / tsum if tsum else float("nan")
      line += f"  {t['matmul']:>12.3f} {t['rest']:>10.3f} {tsum:>9.3f}  {ratio:>9.2f}"
      sums.update({"tm": t["matmul"], "tr": t["rest"]})
    print(line)
  jax_sum = sums["jm"] + sums["jr"]
  line = f"{'sum of parts':<24} {sums['jm']:>10.3f} {sums['jr']:>9.3f} {jax_sum:>8.3f}"
  if torch_parts:
    line += (f"  {sums['tm']:>12.3f} {sums['tr']:>10.3f} {sums['tm'] + sums['tr']:>9.3f}  "
             f"{(sums['jm'] + sums['jr']) / (sums['tm'] + sums['tr']):>9.2f}")
  print(line)
  idle = r["jax"]["wall"] - sums["jm"] - sums["jr"]
  line = f"{'in no instruction/op':<24} {'':>10} {'':>9} {idle:>8.3f}"
  if torch_parts:
    line += f"  {'':>12} {'':>10} {r['torch']['wall'] - sums['tm'] - sums['tr']:>9.3f}"
  print(line)
  line = f"{'step wall time':<24} {'':>10} {'':>9} {r['jax']['wall']:>8.3f}"
  if torch_parts:
    ratio = r["jax"]["wall"] / r["torch"]["wall"]
    line += f"  {'':>12} {'':>10} {r['torch']['wall']:>9.3f}  {ratio:>9.2f}"
  print(line + "   (seconds per step, mean of the profiled steps)")
  print(f"\nJAX: top {top} HLO instructions by self time (s/step, instruction, opcode, line, part)")
  for s, name, opcode, where, part in r["jax"]["top"][:top]:
    print(f"  {s:7.3f}  {name:<28} {opcode:<12} {where:<22} {part}")
  if torch_parts:
    print(f"\nPyTorch: top {top} operators by self time (s/step, operator, part)")
    for s, name, part in r["torch"]["top"][:top]:
      print(f"  {s:7.3f}  {name:<48} {part}")


def main(argv=None) -> None:
  args = parse_args(argv)
  cfg = load_config(args.config, args.overrides, num_devices=1)
  batch = host_batch(cfg)
  result = {"config": os.path.splitext(os.path.basename(args.config))[0],
            "overrides": list(args.overrides), "steps": args.steps,
            "jax_version": jax.__version__, "jax": profile_jax(cfg, batch, args.steps)}
  skipped = torch_skip_reason(cfg, args.no_torch)
  result["torch_skipped"] = skipped
  if not skipped:
    import torch

    result["torch_version"] = torch.__version__
    result["torch"] = profile_torch(cfg, batch, args.steps)
  print_report(result, args.top)
  for side in ("jax", "torch"):
    if side in result:
      result[side]["top"] = result[side]["top"][:args.top]
  print(json.dumps(result))


if __name__ == "__main__":
  main()

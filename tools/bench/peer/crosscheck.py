"""The numerical cross-check: the same initial weights, the same data and K
optimizer steps in pipewright (`pipeline-run --init-from ... --save ...`)
and in PyTorch, in float32 and in float64.

What it reports, for pipewright against PyTorch float32 and, as the scale of
float32 rounding, PyTorch float32 against PyTorch float64:
- loss: the largest relative difference of a step's training loss;
- update: the largest, over parameter tensors, of ||Δa − Δb|| / ||Δb||,
  where Δ is the change of the tensor over the K steps (comparing the
  parameters themselves would hide a wrong update behind the unchanged
  initial values).
Two implementations of the same model differ by rounding only, so
pipewright should be as far from the float64 result as PyTorch's float32 is:
the check passes when pipewright vs PyTorch fp64 is within TOLERANCE times
PyTorch fp32 vs fp64 (floored at FLOOR, for runs where that happens to be
tiny), for the loss and for the update alike. Deliberately wrong twins fail
it by far (peer.py --break-twin; docs/performance.md: the exact GELU for
the tanh one, 1e-6 for layernorm's ε, no weight decay on the embeddings, no
causal mask give 120 to 49 000 times the float32 figure on the loss).
"""
import json
import os
import re

import torch

import files
import models

TOLERANCE = 10.0
FLOOR = {"loss": 1e-7, "update": 1e-4}


def no_dropout_graph(graph, directory):
    """`graph` itself when it has no dropout, else a copy with every dropout
    at p = 0 (the masks of the two implementations differ by design)."""
    with open(graph) as f:
        text = f.read()
    new, n = re.subn(r"(dropout\(\w+, p=)[0-9.eE+-]+\)", r"\g<1>0)", text)
    if n == 0:
        return graph
    path = os.path.join(directory, "nodrop_" + os.path.basename(graph))
    with open(path, "w") as f:
        f.write(new)
    return path


def torch_run(kind, graph, init, data, spec, steps, dtype):
    """K steps in PyTorch from `init`: (losses, {name: final tensor})."""
    model = models.build(kind, graph).to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in init.items()}, strict=True)
    opt = models.make_optimizer(model, spec["optim"])
    x, y = data
    if x.is_floating_point():
        x = x.to(dtype)
    losses = [models.train_step(model, opt, *files.batch_of(x, y, s, spec["batch"]), spec["micro"])
              for s in range(steps)]
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def compare(losses_a, params_a, losses_b, params_b, init):
    """(max relative loss difference, max relative update difference, tensor)."""
    dl = max(abs(a - b) / abs(b) for a, b in zip(losses_a, losses_b))
    du, worst = 0.0, ""
    for name, p0 in init.items():
        da = params_a[name].double() - p0.double()
        db = params_b[name].double() - p0.double()
        r = float((da - db).norm() / db.norm()) if db.norm() > 0 else float((da - db).norm())
        if r >= du:
            du, worst = r, name
    return dl, du, worst


def run(kind, spec, data_spec, read_data, run_pw, directory, steps):
    """The cross-check of one model: a dict of the figures and the command."""
    graph = no_dropout_graph(spec["graph"], directory)
    torch.manual_seed(1)
    init = {k: v.detach().clone() for k, v in models.build(kind, graph).state_dict().items()}
    init_path = os.path.join(directory, "init.safetensors")
    final_path = os.path.join(directory, "final.safetensors")
    files.save_safetensors(init_path, init)
    cmd, metrics = run_pw(graph, 1, 1, spec["micro"], steps,
                          ["--init-from", init_path, "--save", final_path])
    pw_losses = [m["loss"] for m in metrics]
    pw_params = files.load_safetensors(final_path)
    data = read_data(data_spec)
    t32 = torch_run(kind, graph, init, data, spec, steps, torch.float32)
    t64 = torch_run(kind, graph, init, data, spec, steps, torch.float64)
    return {
        "graph": graph, "steps": steps, "command": cmd,
        "losses": {"pipewright": pw_losses, "torch32": t32[0], "torch64": t64[0]},
        "pw_vs_t32": compare(pw_losses, pw_params, t32[0], t32[1], init),
        "pw_vs_t64": compare(pw_losses, pw_params, t64[0], t64[1], init),
        "t32_vs_t64": compare(t32[0], t32[1], t64[0], t64[1], init),
    }


def passed(r):
    """Whether pipewright is within TOLERANCE x float32 rounding of float64."""
    (pl, pu, _), (tl, tu, _) = r["pw_vs_t64"], r["t32_vs_t64"]
    return (pl <= TOLERANCE * max(tl, FLOOR["loss"]) and
            pu <= TOLERANCE * max(tu, FLOOR["update"]))


def report(name, r):
    lines = ["cross-check %s (%s, %d steps from the same weights and data, 1 thread): %s"
             % (name, r["graph"], r["steps"], "same model (within %g x float32 rounding)" % TOLERANCE
                if passed(r) else "MISMATCH: pipewright is further from float64 than %g x "
                "PyTorch's float32 rounding" % TOLERANCE)]
    for key, label in (("pw_vs_t32", "pipewright vs PyTorch fp32"),
                       ("pw_vs_t64", "pipewright vs PyTorch fp64"),
                       ("t32_vs_t64", "PyTorch fp32 vs fp64     ")):
        dl, du, worst = r[key]
        lines.append("  %s  loss %.2e  update %.2e (%s)" % (label, dl, du, worst))
    lines.append("  losses pipewright %s" % json.dumps([round(v, 6) for v in r["losses"]["pipewright"]]))
    lines.append("  losses PyTorch    %s" % json.dumps([round(v, 6) for v in r["losses"]["torch32"]]))
    return "\n".join(lines)

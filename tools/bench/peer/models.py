"""PyTorch twins of the pipewright graphs the peer benchmark trains.

The sizes are read from the graph file itself (so a changed width or block
count follows), and the graph is checked to be the architecture the twin
implements; anything else is refused with the line that is missing. Module
and parameter names are the graph's (fc1.weight, h.0.attn.c_attn.weight,
...), so a pipewright checkpoint loads with `load_state_dict` and the other
way round.

- MLP: a chain of `linear` + `relu`, a `linear` head, softmax cross-entropy
  averaged over the batch (tools/bench/peer/mlp.graph).
- GPT: examples/tiny_gpt.graph and tiny_gpt_quick.graph (docs/transformer.md):
  token + learned position embeddings, dropout, pre-norm blocks
  (layernorm ε 1e-5 → c_attn → causal attention → c_proj → dropout →
  residual; layernorm → c_fc → tanh GELU → c_proj → dropout → residual),
  ln_f, a head tied to wte, cross-entropy averaged over every position.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


def _graph_text(path):
    with open(path) as f:
        return "\n".join(line.split("#", 1)[0] for line in f)


def _ops(text):
    return set(re.findall(r"=\s*([a-z_]+)\(", text))


class GraphMismatch(ValueError):
    pass


def _require(path, text, patterns):
    for p in patterns:
        if not re.search(p, text):
            raise GraphMismatch("%s: the PyTorch twin does not cover this graph: no line "
                                "matches /%s/" % (path, p))


# ------------------------------------------------------------------ MLP

def read_mlp(path):
    """{'input': width, 'layers': [(scope, out), ...]} of an MLP graph: every
    linear but the last is followed by a relu that feeds the next one."""
    text = _graph_text(path)
    if _ops(text) != {"linear", "relu", "softmax_cross_entropy"}:
        raise GraphMismatch("%s: an MLP graph has only linear, relu and softmax_cross_entropy "
                            "nodes, this one has %s" % (path, sorted(_ops(text))))
    m = re.search(r"^\s*input\s+(\w+)\s*:\s*f32\[(\d+)\]", text, re.M)
    if not m:
        raise GraphMismatch("%s: no 'input NAME : f32[N]' line" % path)
    prev, width, layers = m.group(1), int(m.group(2)), []
    lin = re.findall(r"^\s*(\w+)\s*=\s*linear\((\w+),\s*out=(\d+)\)(?:\s+as\s+([\w.]+))?\s*$",
                     text, re.M)
    for name, src, out, scope in lin:
        if src != prev:
            raise GraphMismatch("%s: linear %s reads %s, not %s: not a chain" % (path, name, src, prev))
        layers.append((scope or name, int(out)))
        relu = re.search(r"^\s*(\w+)\s*=\s*relu\(%s\)" % name, text, re.M)
        prev = relu.group(1) if relu else None
    return {"input": width, "layers": layers}


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.names, width = [], cfg["input"]
        for scope, out in cfg["layers"]:
            setattr(self, scope, nn.Linear(width, out))
            self.names.append(scope)
            width = out

    def loss(self, x, y):
        for name in self.names[:-1]:
            x = F.relu(getattr(self, name)(x))
        return F.cross_entropy(getattr(self, self.names[-1])(x), y)


# ------------------------------------------------------------------ GPT

GPT_LINES = [
    r"embedding\(tokens, vocab=\d+, dim=\d+\) as wte",
    r"pos_embedding\(tok, max=\d+\) as wpe",
    r"repeat \d+ as h \(x = x0\)",
    r"a\s*=\s*layernorm\(x\) as ln_1",
    r"qkv\s*=\s*linear\(a, out=\d+\) as attn.c_attn",
    r"att\s*=\s*causal_attention\(qkv, heads=\d+\)",
    r"o\s*=\s*linear\(att, out=\d+\) as attn.c_proj",
    r"m\s*=\s*layernorm\(x1\) as ln_2",
    r"fc\s*=\s*linear\(m, out=\d+\) as mlp.c_fc",
    r"g\s*=\s*gelu\(fc\)",
    r"pr\s*=\s*linear\(g, out=\d+\) as mlp.c_proj",
    r"hf\s*=\s*layernorm\(h\) as ln_f",
    r"logits\s*=\s*linear\(hf, out=\d+, bias=false, weight=wte.weight\) as lm_head",
]
GPT_OPS = {"embedding", "pos_embedding", "dropout", "layernorm", "linear", "causal_attention",
           "add", "gelu", "softmax_cross_entropy"}


def read_gpt(path):
    """The sizes of a tiny_gpt-shaped graph: context T, vocab V, width D,
    position table rows, blocks, heads, MLP width and dropout p (0 or the one
    p of its three dropouts: embeddings, attention output, MLP output)."""
    text = _graph_text(path)
    _require(path, text, GPT_LINES)
    if not _ops(text) <= GPT_OPS:
        raise GraphMismatch("%s: ops %s are not in the PyTorch twin" % (path, sorted(_ops(text) - GPT_OPS)))
    num = lambda p: int(re.search(p, text).group(1))
    ps = [float(p) for p in re.findall(r"dropout\(\w+, p=([0-9.eE+-]+)\)", text)]
    if ps:
        _require(path, text, [r"x0\s*=\s*dropout\(pos,", r"od\s*=\s*dropout\(o,",
                              r"pd\s*=\s*dropout\(pr,", r"x1\s*=\s*add\(x, od\)",
                              r"x2\s*=\s*add\(x1, pd\)"])
        if len(ps) != 3 or len(set(ps)) != 1:
            raise GraphMismatch("%s: the twin takes three dropouts of one p, not %s" % (path, ps))
    else:
        _require(path, text, [r"x1\s*=\s*add\(x, o\)", r"x2\s*=\s*add\(x1, pr\)"])
    return {
        "T": num(r"input\s+\w+\s*:\s*i32\[(\d+)\]"),
        "vocab": num(r"vocab=(\d+)"), "dim": num(r"dim=(\d+)"),
        "max": num(r"pos_embedding\(tok, max=(\d+)\)"), "blocks": num(r"repeat (\d+) as h"),
        "heads": num(r"heads=(\d+)"), "ff": num(r"linear\(m, out=(\d+)\) as mlp.c_fc"),
        "dropout": ps[0] if ps else 0.0,
    }


def causal_attention(qkv, heads, impl):
    """q, k, v side by side in the last dimension, each split into `heads`
    heads of D/H columns; position t attends to positions <= t."""
    b, t, d3 = qkv.shape
    q, k, v = (z.view(b, t, heads, d3 // 3 // heads).transpose(1, 2) for z in qkv.split(d3 // 3, 2))
    if impl == "sdpa":
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:  # nanoGPT's explicit version
        s = (q @ k.transpose(-2, -1)) * (1.0 / (q.shape[-1] ** 0.5))
        mask = torch.ones(t, t, dtype=torch.bool, device=qkv.device).tril()
        y = s.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    return y.transpose(1, 2).reshape(b, t, d3 // 3)


class _Pair(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        for name, mod in (a, b):
            setattr(self, name, mod)


class Block(nn.Module):
    def __init__(self, c, attn):
        super().__init__()
        d = c["dim"]
        self.ln_1, self.ln_2 = nn.LayerNorm(d, eps=1e-5), nn.LayerNorm(d, eps=1e-5)
        self.attn = _Pair(("c_attn", nn.Linear(d, 3 * d)), ("c_proj", nn.Linear(d, d)))
        self.mlp = _Pair(("c_fc", nn.Linear(d, c["ff"])), ("c_proj", nn.Linear(c["ff"], d)))
        self.drop, self.heads, self.impl = nn.Dropout(c["dropout"]), c["heads"], attn

    def forward(self, x):
        o = self.attn.c_proj(causal_attention(self.attn.c_attn(self.ln_1(x)), self.heads, self.impl))
        x1 = x + self.drop(o)
        pr = self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x1)), approximate="tanh"))
        return x1 + self.drop(pr)


class GPT(nn.Module):
    def __init__(self, c, attn="sdpa"):
        super().__init__()
        self.wte = nn.Embedding(c["vocab"], c["dim"])
        self.wpe = nn.Embedding(c["max"], c["dim"])
        nn.init.normal_(self.wte.weight, std=0.02)  # GPT-2's, as pipewright
        nn.init.normal_(self.wpe.weight, std=0.01)
        self.drop = nn.Dropout(c["dropout"])
        self.h = nn.ModuleList(Block(c, attn) for _ in range(c["blocks"]))
        self.ln_f = nn.LayerNorm(c["dim"], eps=1e-5)

    def loss(self, tokens, labels):
        t = tokens.shape[1]
        x = self.drop(self.wte(tokens) + self.wpe.weight[:t])
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # the tied head
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


# ------------------------------------------------------------ training

def build(kind, graph, attn="sdpa"):
    return MLP(read_mlp(graph)) if kind == "mlp" else GPT(read_gpt(graph), attn)


def make_optimizer(model, o, impl="default"):
    """pipewright's optimizer in torch.optim: weight decay on the tensors of
    2 or more dimensions (linear weights and embeddings), none on biases and
    layernorm (docs/api.md, "Optimizers"). impl: "default" (PyTorch's
    choice: the per-tensor loop on the CPU), "foreach" or "fused"."""
    params = [p for p in model.parameters()]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kw = {} if impl == "default" else {impl: True}
    if o["name"] == "sgd":
        return torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"], **kw)
    return torch.optim.AdamW(groups, lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"], **kw)


def train_step(model, opt, x, y, micro_batches):
    """One optimizer step over the global batch (x, y) in `micro_batches`
    equal micro-batches, gradients accumulated: the mean loss of the whole
    batch, as pipewright (each micro-batch's mean loss / M)."""
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for xm, ym in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
        loss = model.loss(xm, ym) / micro_batches
        loss.backward()
        total += loss.detach()
    opt.step()
    return float(total)

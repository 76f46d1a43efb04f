"""PyTorch twins of the pipewright graphs the peer benchmark trains.

The sizes are read from the graph file itself (graphs.py: a changed width or
block count follows, a changed architecture is refused). Module
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
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphs import read_gpt, read_mlp

# A deliberate error for showing that the cross-check fails (peer.py
# --break-twin): "gelu" (the exact GELU), "causal" (no causal mask), "eps"
# (layernorm ε 1e-6), "decay" (no weight decay on the embeddings). None: the
# twin as it should be.
FAULT = None
FAULTS = ("gelu", "causal", "eps", "decay")


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

def causal_attention(qkv, heads, impl):
    """q, k, v side by side in the last dimension, each split into `heads`
    heads of D/H columns; position t attends to positions <= t."""
    b, t, d3 = qkv.shape
    q, k, v = (z.view(b, t, heads, d3 // 3 // heads).transpose(1, 2) for z in qkv.split(d3 // 3, 2))
    causal = FAULT != "causal"
    if impl == "sdpa":
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:  # nanoGPT's explicit version
        s = (q @ k.transpose(-2, -1)) * (1.0 / (q.shape[-1] ** 0.5))
        mask = torch.ones(t, t, dtype=torch.bool, device=qkv.device)
        mask = mask.tril() if causal else mask
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
        d, eps = c["dim"], 1e-6 if FAULT == "eps" else 1e-5
        self.ln_1, self.ln_2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.attn = _Pair(("c_attn", nn.Linear(d, 3 * d)), ("c_proj", nn.Linear(d, d)))
        self.mlp = _Pair(("c_fc", nn.Linear(d, c["ff"])), ("c_proj", nn.Linear(c["ff"], d)))
        self.drop, self.heads, self.impl = nn.Dropout(c["dropout"]), c["heads"], attn

    def forward(self, x):
        o = self.attn.c_proj(causal_attention(self.attn.c_attn(self.ln_1(x)), self.heads, self.impl))
        x1 = x + self.drop(o)
        gelu = "none" if FAULT == "gelu" else "tanh"
        pr = self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x1)), approximate=gelu))
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
    def decayed(name, p):
        return p.dim() >= 2 and not (FAULT == "decay" and name.startswith(("wte.", "wpe.")))
    params = list(model.named_parameters())
    groups = [{"params": [p for n, p in params if decayed(n, p)], "weight_decay": o["weight_decay"]},
              {"params": [p for n, p in params if not decayed(n, p)], "weight_decay": 0.0}]
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

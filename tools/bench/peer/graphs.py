"""The sizes of the graphs the peer benchmark trains, read from the graph
files, and a check that each graph is the architecture its PyTorch twin
(models.py) implements; anything else is refused with the line that is
missing. Standard library only, so the tests can run it without torch
(tests/test_peer_bench.c).
"""
import re


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

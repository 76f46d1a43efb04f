"""The files both sides read: the training data (IDX images for the MLP, a
byte corpus for the GPTs) and safetensors weights.

Both pipewright (`--data idx:...`, `--data text:...`, `--init-from`,
`--save`) and PyTorch read the very same files, so the two see the same
samples in the same order and, for the cross-check, the same weights. The
readers follow docs/api.md ("Data files and scaling") and the safetensors
layout; only the standard library and torch are used (no numpy).
"""
import ctypes
import json
import os
import random
import struct

FORTUNES = "/usr/share/games/fortunes"


# ------------------------------------------------------------------ IDX

def write_idx_mlp(directory, n, dim, classes, seed):
    """n uint8 images of `dim` random pixels and their uint8 labels in IDX files
    (big-endian dimensions); returns the `--data` spec. The label of an image
    is the class c whose pixels (those with index ≡ c mod classes) sum
    highest, so the task is learnable and the loss falls. pipewright scales
    a pixel b to (float)b / 255.0f; read_idx_mlp does the same in float32."""
    rng = random.Random(seed)
    px = rng.randbytes(n * dim)
    images = os.path.join(directory, "images.idx")
    labels = os.path.join(directory, "labels.idx")
    with open(images, "wb") as f:
        f.write(struct.pack(">BBBBII", 0, 0, 0x08, 2, n, dim))
        f.write(px)
    label = bytearray()
    for i in range(n):
        img = px[i * dim:(i + 1) * dim]
        sums = [sum(img[c::classes]) for c in range(classes)]
        label.append(sums.index(max(sums)))
    with open(labels, "wb") as f:
        f.write(struct.pack(">BBBBI", 0, 0, 0x08, 1, n))
        f.write(bytes(label))
    return "idx:%s,%s" % (images, labels)


def _read_idx_u8(path, ndim):
    with open(path, "rb") as f:
        raw = f.read()
    zero, kind, nd = struct.unpack(">HBB", raw[:4])
    if zero != 0 or kind != 0x08 or nd != ndim:
        raise ValueError("%s: not a uint8 IDX file of %d dimensions" % (path, ndim))
    dims = struct.unpack(">%dI" % nd, raw[4:4 + 4 * nd])
    return raw[4 + 4 * nd:], dims


def read_idx_mlp(spec):
    """The (images f32 [n, dim], labels i64 [n]) of write_idx_mlp's spec."""
    import torch
    images, labels = spec[len("idx:"):].split(",")
    px, (n, dim) = _read_idx_u8(images, 2)
    lb, _ = _read_idx_u8(labels, 1)
    x = torch.frombuffer(bytearray(px), dtype=torch.uint8).reshape(n, dim).float() / 255.0
    y = torch.frombuffer(bytearray(lb), dtype=torch.uint8).long()
    return x, y


# ----------------------------------------------------------------- text

def write_corpus(directory, train_windows, context):
    """A byte corpus whose training split holds `train_windows` windows of
    `context` + 1 bytes (docs/api.md: the last floor(len / 10) bytes are held
    out, so the held-out split, which pipeline-run evaluates after each
    epoch, stays a ninth of the training split). The text of the `fortunes`
    package when it is installed, else seeded random letters; returns the
    `--data` spec."""
    need = train_windows * context + 1
    length = need + need // 9 + 10
    while length - length // 10 < need:
        length += 1
    text = _fortunes(length) or bytes(random.Random(1).choice(b"abcdefghij klmnop\n")
                                      for _ in range(length))
    path = os.path.join(directory, "corpus.txt")
    with open(path, "wb") as f:
        f.write(text[:length])
    return "text:" + path


def _fortunes(length):
    if not os.path.isdir(FORTUNES):
        return None
    out = bytearray()
    for name in sorted(os.listdir(FORTUNES)):
        p = os.path.join(FORTUNES, name)
        if os.path.isfile(p) and not name.endswith(".dat"):
            with open(p, "rb") as f:
                out += f.read()
        if len(out) >= length:
            return bytes(out[:length])
    return None


def read_corpus(spec, context):
    """The training split's windows as (inputs, labels), both i64 [n, T]:
    window k is bytes [k·T, k·T + T], the input its first T bytes and the
    labels its last T (docs/api.md)."""
    import torch
    with open(spec[len("text:"):], "rb") as f:
        raw = f.read()
    train = raw[:len(raw) - len(raw) // 10]
    n = (len(train) - 1) // context
    b = torch.frombuffer(bytearray(train), dtype=torch.uint8).long()
    idx = torch.arange(n).unsqueeze(1) * context + torch.arange(context + 1)
    w = b[idx]
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def batch_of(x, y, step, batch):
    """The samples of optimizer step `step` (from 0): pipeline-run without
    --shuffle takes floor(n / B) full batches per epoch in file order."""
    per_epoch = x.shape[0] // batch
    s = (step % per_epoch) * batch
    return x[s:s + batch], y[s:s + batch]


# ---------------------------------------------------------- safetensors

def save_safetensors(path, tensors):
    """Write {name: float32 tensor} as safetensors (little-endian F32)."""
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().float().contiguous().cpu()
        n = t.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + n]}
        blobs.append(ctypes.string_at(t.data_ptr(), n))
        off += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def load_safetensors(path):
    """{name: float32 tensor} of a safetensors file of F32 tensors."""
    import torch
    with open(path, "rb") as f:
        raw = f.read()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise ValueError("%s: %s is %s, not F32" % (path, name, info["dtype"]))
        a, b = info["data_offsets"]
        data = bytearray(raw[8 + hlen + a:8 + hlen + b])
        out[name] = torch.frombuffer(data, dtype=torch.float32).reshape(info["shape"])
    return out

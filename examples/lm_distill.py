"""Distil a causal language model through a cached top-k teacher, with the fused LM-head loss.

The text is the Python standard library's own source, split by file into training and held-out
files; a byte-level BPE (the `tokenizers` library) is trained on the training files only. A
teacher LM (pre-norm decoder on FusedMultiheadAttention) is trained on all the training text.
A smaller student gets a short budget: one pass over the first `steps x batch` training windows.
For those tokens the teacher's top-k log-probabilities at the distillation temperature are
cached once (int32 ids + float16 log-probs, a few percent of a dense float16 cache), and the
student learns from the cache plus the next tokens through fused_linear_distill_loss, which
takes the student's final hidden states and LM head weight, so the (tokens x vocab) logits
never exist. The same student trained from scratch (cross entropy, same steps, batches and
initial weights) is the baseline; all three are evaluated on the held-out files at the end.

Needs `pip install tokenizers` (or the package's `examples` extra). About two minutes on 2 CPU
cores; `--tiny` takes seconds:

    python examples/lm_distill.py [--seed 0] [--tiny]

Test run: --tiny
"""
import argparse
import math
import sysconfig
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from reuse_core.nn import FusedMultiheadAttention
from reuse_core.ops import SparseTeacher, fused_linear_distill_loss

try:
    from tokenizers import ByteLevelBPETokenizer
except ImportError:
    raise SystemExit("examples/lm_distill.py needs the tokenizers library: pip install tokenizers") from None

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class Size:
    train_chars: int      # the files are taken (in hash order) up to this many characters
    heldout_chars: int
    vocab: int
    topk: int
    length: int           # tokens per training window
    batch: int
    teacher: tuple        # (width, heads, layers)
    student: tuple
    teacher_steps: int
    steps: int            # of each student


SIZES = {
    "default": Size(1_600_000, 200_000, 4096, 32, 128, 16, (192, 4, 3), (96, 4, 2), 200, 100),
    "tiny": Size(40_000, 10_000, 1024, 8, 32, 8, (32, 2, 1), (16, 2, 1), 20, 10),
}


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = FusedMultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, is_causal=True)[0]
        return x + self.mlp(self.norm2(x))


class LM(nn.Module):
    def __init__(self, vocab, length, dim, heads, layers):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def hidden(self, tokens):
        """The final (normed) hidden states, (B, L, dim): what the LM head and the fused loss take."""
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, tokens):
        return self.head(self.hidden(tokens))


def stdlib_files(size):
    """(training, held-out) texts: the standard library's *.py files, split by a hash of the path.
    Going through the files in hash order makes the character caps sample the whole library rather
    than its first packages alphabetically."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py"))
    # third-party packages live under the stdlib folder too; a few huge generated files would swamp a sample
    paths = [p for p in paths if "-packages/" not in p and (root / p).stat().st_size <= 100_000]
    paths.sort(key=lambda p: (zlib.crc32(p.encode()), p))
    split = {True: [], False: []}
    budget = {True: size.heldout_chars, False: size.train_chars}
    for p in paths:
        held = zlib.crc32(p.encode()) % 10 == 0  # every file is on one side of the split only
        if budget[held] > 0:
            text = (root / p).read_bytes().decode("utf-8", errors="replace")
            split[held].append(text)
            budget[held] -= len(text)
    return split[False], split[True]


def windows(tokenizer, texts, length):
    """The texts as one token stream (EOS between files), cut into (N, length + 1) windows: inputs
    are [:, :-1], next-token labels [:, 1:]."""
    eos = tokenizer.token_to_id(EOS)
    stream = [i for enc in tokenizer.encode_batch(texts) for i in [*enc.ids, eos]]
    n = (len(stream) - 1) // length
    return torch.tensor(stream[: n * length + 1]).unfold(0, length + 1, length)


def train(model, steps, batches, loss_of, desc):
    """AdamW with a short warmup and cosine decay; ``batches`` yields window indices."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * s / steps)))
    start, losses = time.time(), []
    for _ in tqdm(range(steps), desc=desc, disable=None, leave=False):
        loss = loss_of(model, next(batches))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    tail = losses[-max(1, steps // 10):]
    print(f"{desc}: {steps} steps, final training loss {sum(tail) / len(tail):.3f}, {time.time() - start:.1f} s")


def batch_order(n, batch, seed):
    """Endless seeded epochs of window indices: the same order for every model given the same seed."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(n, generator=gen).split(batch)[: n // batch]


@torch.no_grad()
def perplexity(model, data, batch):
    total, count = 0.0, 0
    for w in data.split(batch):
        logits = model(w[:, :-1])
        total += nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    return math.exp(total / count)


def main():
    parser = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny run in seconds (for the tests; vocab 1024)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batch order (default 0)")
    parser.add_argument("--steps", type=int, help="training steps of each student (default 100; --tiny 10)")
    parser.add_argument("--teacher-steps", type=int, help="training steps of the teacher (default 200; --tiny 20)")
    parser.add_argument("--topk", type=int, help="teacher ids cached per token (default 32; --tiny 8)")
    parser.add_argument("--temperature", type=float, default=1.0, help="distillation temperature T (default 1)")
    parser.add_argument("--kd-weight", type=float, default=0.8, help="weight of T^2 * KL (default 0.8)")
    parser.add_argument("--ce-weight", type=float, default=0.2, help="weight of the next-token CE (default 0.2)")
    args = parser.parse_args()
    size = SIZES["tiny" if args.tiny else "default"]
    steps = args.steps or size.steps
    teacher_steps = args.teacher_steps or size.teacher_steps
    k, T = args.topk or size.topk, args.temperature
    start = time.time()

    train_texts, heldout_texts = stdlib_files(size)
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(train_texts, vocab_size=size.vocab, special_tokens=[EOS], show_progress=False)
    V = tokenizer.get_vocab_size()
    train_w, heldout_w = windows(tokenizer, train_texts, size.length), windows(tokenizer, heldout_texts, size.length)
    print(f"data: {len(train_texts)} training files ({train_w.shape[0] * size.length:,} tokens), {len(heldout_texts)} "
          f"held-out files ({heldout_w.shape[0] * size.length:,} tokens), byte-level BPE of {V} tokens")

    def lm(dims):
        torch.manual_seed(args.seed)  # the two students start from the same weights
        return LM(V, size.length, *dims)

    def ce_loss(model, idx):
        w = train_w[idx]
        return nn.functional.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten())

    teacher = lm(size.teacher)
    train(teacher, teacher_steps, batch_order(len(train_w), size.batch, args.seed + 1), ce_loss, "teacher")

    # The students' windows: one pass at their budget. The teacher's distribution on them at
    # temperature T over the full vocabulary, top-k kept, is computed once.
    n_student = min(len(train_w), steps * size.batch)
    teacher.eval()
    ids = torch.empty(n_student, size.length, k, dtype=torch.int32)
    logprobs = torch.empty(*ids.shape, dtype=torch.float16)
    with torch.no_grad():
        for rows in torch.arange(n_student).split(64):
            top = torch.log_softmax(teacher(train_w[rows, :-1]) / T, dim=-1).topk(k, dim=-1)
            ids[rows], logprobs[rows] = top.indices.int(), top.values.half()
    cache_bytes = ids.numel() * ids.element_size() + logprobs.numel() * logprobs.element_size()
    dense_bytes = n_student * size.length * V * 2
    print(f"cache: top-{k} of {V} ids at T={T:g} for {n_student * size.length:,} tokens: {cache_bytes:,} bytes, "
          f"{100 * cache_bytes / dense_bytes:.2f}% of the dense float16 cache ({dense_bytes:,} bytes)")

    def kd_loss(model, idx):
        w = train_w[idx]
        return fused_linear_distill_loss(
            model.hidden(w[:, :-1]), model.head.weight, SparseTeacher(ids[idx], logprobs[idx], tail="bucket"),
            w[:, 1:], student_bias=model.head.bias, temperature=T, kd_weight=args.kd_weight,
            ce_weight=args.ce_weight, reduction="batchmean")

    distilled, scratch = lm(size.student), lm(size.student)
    train(distilled, steps, batch_order(n_student, size.batch, args.seed + 2), kd_loss, "distilled student")
    train(scratch, steps, batch_order(n_student, size.batch, args.seed + 2), ce_loss, "scratch student")

    ppl = {name: perplexity(m.eval(), heldout_w, 64)
           for name, m in [("teacher", teacher), ("distilled student", distilled), ("scratch student", scratch)]}
    n_teacher, n_student_params = (sum(p.numel() for p in m.parameters()) for m in (teacher, scratch))
    print(f"parameters: teacher {n_teacher:,}, student {n_student_params:,}")
    for name, value in ppl.items():
        print(f"held-out perplexity, {name}: {value:.2f}")
    print(f"wall time: {time.time() - start:.1f} s")
    if not all(math.isfinite(v) for v in ppl.values()):
        raise SystemExit("a perplexity is not finite")
    beats = ppl["distilled student"] < ppl["scratch student"]
    print(f"distilled student beats scratch: {'yes' if beats else 'no'}")


if __name__ == "__main__":
    main()

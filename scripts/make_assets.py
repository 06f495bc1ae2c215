"""Regenerate the assets finetune ships: the sample dataset, the tokenizer and the tiny model.

    python scripts/make_assets.py [--steps N] [--out src/finetune/assets]

Everything is built from the docstrings of Python's standard library, the one license-clean text
that every machine with Python has:

* `sample.jsonl`: Alpaca-format questions about the standard library, answered from its docstrings.
* `sample_chat.jsonl`: the first of those records, grouped into chat conversations.
* `preference_sample.jsonl`: preference pairs, a question about a function or class answered by
  its own docstring (chosen) and by another one's (rejected).
* `tiny/tokenizer.model`: a SentencePiece BPE tokenizer with Llama-2's conventions.
* `tiny/`: a 5M-parameter Llama pretrained on the raw docstrings, in Hugging Face format.

The model never sees the instruction format during pretraining, so that fine-tuning it on
`sample.jsonl` visibly teaches it something.

The output is deterministic for a given Python version (the docstrings differ between versions) and
machine (CPU kernels may round differently elsewhere). The shipped assets were generated with
Python 3.11 (3.11.7) and torch 2.13 on a 2-core x86-64 CPU.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import math
import os
import random
import re
import sysconfig
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F

from finetune.config import model_preset
from finetune.hf_format import save_hf
from finetune.model import Llama, count_parameters

SEED = 0
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "finetune" / "assets"

# Directories of the standard library that are not part of its documented API (or not Python).
SKIP_DIRS = {
    "__pycache__",
    "__phello__",
    "idlelib",
    "lib-dynload",
    "lib2to3",
    "pydoc_data",
    "site-packages",
    "test",
    "tests",
    "turtledemo",
}

# --------------------------------------------------------------------------------------------
# Docstrings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Doc:
    """One documented public object of the standard library."""

    module: str  # "json.decoder"
    qualname: str  # "JSONDecoder.decode"; "" for the module itself
    kind: str  # "module", "class", "function" or "method"
    signature: str  # "def decode(self, s, _w=WHITESPACE.match)"; "" for a module
    text: str  # the docstring, dedented by ast.get_docstring

    @property
    def name(self) -> str:
        return f"{self.module}.{self.qualname}" if self.qualname else self.module

    @property
    def header(self) -> str:
        """A pydoc-like first line that ties the docstring to the object's full name."""
        if self.kind == "module":
            return f"module {self.module}"
        parent, short = self.name.rsplit(".", 1)
        # "def dumps(obj)" -> "def json.dumps(obj)"; "class JSONEncoder" -> "class json.JSONEncoder"
        return self.signature.replace(f" {short}", f" {parent}.{short}", 1)

    @property
    def document(self) -> str:
        """The text the tokenizer and the model are trained on."""
        return f"{self.header}\n\n{self.text}"


def is_public(name: str) -> bool:
    return not name.startswith("_")


def stdlib_files(stdlib: Path) -> Iterator[tuple[Path, str]]:
    """(path, module name) of every public module, in sorted order so that the output is stable."""
    for dirpath, dirnames, filenames in os.walk(stdlib):
        here = Path(dirpath)
        # Pruning in place stops os.walk from descending; sorting fixes the order it descends in.
        # Only packages hold importable modules (this also skips e.g. config-3.11-x86_64-linux-gnu).
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in SKIP_DIRS and is_public(d) and (here / d / "__init__.py").is_file()
        )
        package = here.relative_to(stdlib).parts
        for filename in sorted(filenames):
            stem = filename.removesuffix(".py")
            if not filename.endswith(".py") or not (is_public(stem) or stem == "__init__"):
                continue
            parts = package if stem == "__init__" else (*package, stem)
            if parts:
                yield here / filename, ".".join(parts)


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in [*node.bases, *node.keywords])
        return f"class {node.name}({bases})" if bases else f"class {node.name}"
    keyword = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    return f"{keyword} {node.name}({ast.unparse(node.args)}){returns}"


def is_overload(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(ast.unparse(d).split(".")[-1] == "overload" for d in node.decorator_list)


def module_docs(tree: ast.Module, module: str) -> Iterator[Doc]:
    """The module's docstring, then those of its public top-level functions, classes and methods.

    Only the top level and class bodies count: nested functions are implementation details.
    """
    if text := ast.get_docstring(tree):
        yield Doc(module, "", "module", "", text)
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if not is_public(node.name):
            continue
        if isinstance(node, ast.ClassDef):
            if text := ast.get_docstring(node):
                yield Doc(module, node.name, "class", signature(node), text)
            for child in node.body:
                if (
                    isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and is_public(child.name)
                    and not is_overload(child)
                    and (text := ast.get_docstring(child))
                ):
                    qualname = f"{node.name}.{child.name}"
                    yield Doc(module, qualname, "method", signature(child), text)
        elif not is_overload(node) and (text := ast.get_docstring(node)):
            yield Doc(module, node.name, "function", signature(node), text)


def collect_docstrings(stdlib: Path) -> list[Doc]:
    """Every public docstring of the standard library, in a stable order."""
    docs: list[Doc] = []
    seen: set[str] = set()
    for path, module in stdlib_files(stdlib):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except SyntaxError:  # none in 3.11 outside the skipped tests, but a file may be broken
            continue
        for doc in module_docs(tree, module):
            # A name defined twice (e.g. per platform) keeps its first definition.
            if doc.name not in seen:
                seen.add(doc.name)
                docs.append(doc)
    return docs


# --------------------------------------------------------------------------------------------
# Sample dataset
# --------------------------------------------------------------------------------------------

MAX_ANSWER_WORDS = 60
MAX_ONE_LINER_WORDS = 25
MAX_SIGNATURE_CHARS = 200
# Records per task, each a seeded sample of the docstrings that suit it (about 5000, 900, 1100).
N_EXPLAIN, N_WHICH_MODULE, N_ONE_LINER = 2000, 600, 600

# A sentence ends at . ! or ? followed by whitespace and something that starts a new sentence,
# unless the full stop is an abbreviation's ("the system's release, e.g. '2.2.0'").
SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\bcf\.)\s+(?=[A-Z0-9`'\"(])")
# A docstring that starts with a call spells out a signature ("fork() -> (pid, master_fd)").
CALL = re.compile(r"^[\w.]+\(")
# A list run into the paragraph ("Arguments: - hdr: the header type - str: ...").
BULLET = re.compile(r":\s+[-*] ")


def first_paragraph(text: str) -> str:
    """The text up to the first blank line, on one line, ending in a full stop.

    Many docstrings leave the full stop out ("Ask for a directory, and return the file name");
    a paragraph that ends in a colon or the like introduces a list and is left as it is.
    """
    paragraph = " ".join(text.split("\n\n", 1)[0].split())
    return paragraph + "." if re.search(r"[\w)`'\"]$", paragraph) else paragraph


def sentences(paragraph: str) -> list[str]:
    return SENTENCE_END.split(paragraph)


def is_prose(sentence: str) -> bool:
    """Whether a sentence reads as an answer: not a doctest, header or C-style signature line."""
    return (
        len(sentence.split()) >= 3
        and sentence.endswith((".", "!", "?"))
        and ">>>" not in sentence
        and not CALL.match(sentence)
        and not BULLET.search(sentence)
    )


def summary(doc: Doc, max_words: int = MAX_ANSWER_WORDS) -> str | None:
    """As many whole sentences of the first paragraph as fit in `max_words` words (at least one)."""
    taken: list[str] = []
    words = 0
    for sentence in sentences(first_paragraph(doc.text)):
        n = len(sentence.split())
        if taken and words + n > max_words:
            break
        taken.append(sentence)
        words += n
    if not taken or words > max_words or not is_prose(taken[0]):
        return None
    return " ".join(taken)


def one_liner(doc: Doc) -> str | None:
    first = sentences(first_paragraph(doc.text))[0]
    ok = is_prose(first) and len(first.split()) <= MAX_ONE_LINER_WORDS
    return first if ok else None


def explain_record(doc: Doc, answer: str) -> dict[str, str]:
    question = {
        "module": f"What is the Python module `{doc.name}` for?",
        "class": f"What is the Python class `{doc.name}` for?",
        "function": f"What does the Python function `{doc.name}` do?",
        "method": f"What does the Python method `{doc.name}` do?",
    }[doc.kind]
    return {"instruction": question, "input": "", "output": answer}


def which_module_record(doc: Doc, docstring_line: str) -> dict[str, str]:
    # The docstring's first line is in the input, so that the question is answerable.
    code = f'{doc.signature}:\n    """{docstring_line}"""'
    return {
        "instruction": "Which standard library module defines the function below?",
        "input": code,
        "output": doc.module,
    }


def one_liner_record(doc: Doc, docstring_line: str) -> dict[str, str]:
    return {
        "instruction": "Write a one-line docstring for this function.",
        "input": doc.signature,
        "output": docstring_line,
    }


def build_dataset(docs: list[Doc], rng: random.Random) -> list[dict[str, str]]:
    """Instruction records whose answers are the docstrings' own words, shuffled."""
    explained = [(d, s) for d in docs if (s := summary(d))]
    functions = [
        (d, line)
        for d in docs
        if d.kind == "function"
        and len(d.signature) <= MAX_SIGNATURE_CHARS
        and (line := one_liner(d))
    ]
    # "Which module" is only fair for a function name that exactly one module defines.
    name_counts = Counter(d.qualname for d in docs if d.kind == "function")
    unique = [(d, line) for d, line in functions if name_counts[d.qualname] == 1]

    records = [explain_record(d, s) for d, s in rng.sample(explained, N_EXPLAIN)]
    records += [which_module_record(d, x) for d, x in rng.sample(unique, N_WHICH_MODULE)]
    records += [one_liner_record(d, x) for d, x in rng.sample(functions, N_ONE_LINER)]
    rng.shuffle(records)
    return records


# Chat conversations made of sample.jsonl's records, 1 to MAX_CHAT_TURNS records each.
N_CHATS, MAX_CHAT_TURNS = 300, 3
CHAT_SYSTEM_PROMPT = "You answer questions about Python's standard library in a sentence or two."


def chat_user_message(record: dict[str, str]) -> str:
    """An Alpaca record's instruction as a user would ask it, with its input below."""
    if not record["input"]:
        return record["instruction"]
    return f"{record['instruction']}\n\n{record['input']}"


def build_chat_dataset(records: list[dict[str, str]], rng: random.Random) -> list[dict]:
    """OpenAI-style conversations, each of 1 to MAX_CHAT_TURNS consecutive records as turns.

    Every other conversation starts with a system prompt, so that both layouts of Llama-2's chat
    format occur. The records are taken in file order: `records` is shuffled already.
    """
    conversations = []
    start = 0
    for index in range(N_CHATS):
        n_turns = rng.randint(1, MAX_CHAT_TURNS)
        turns = records[start : start + n_turns]
        start += n_turns
        messages = [{"role": "system", "content": CHAT_SYSTEM_PROMPT}] if index % 2 == 0 else []
        for record in turns:
            messages.append({"role": "user", "content": chat_user_message(record)})
            messages.append({"role": "assistant", "content": record["output"]})
        conversations.append({"messages": messages})
    return conversations


# Preference pairs of preference_sample.jsonl, made of sample.jsonl's "what does ... do" records.
N_PREFERENCES = 200


def build_preference_dataset(records: list[dict[str, str]], rng: random.Random) -> list[dict]:
    """{prompt, chosen, rejected}: a question about a function or class, its docstring's answer
    chosen over the same words in a shuffled order: a corrupted docstring, which a model that
    has read docstrings can learn to tell from the real one."""
    explained = [
        r for r in records if r["instruction"].startswith("What ") and len(r["output"].split()) > 3
    ]
    pairs = []
    for record in explained[:N_PREFERENCES]:
        words = record["output"].split()
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        pairs.append(
            {
                "prompt": record["instruction"],
                "chosen": record["output"],
                "rejected": " ".join(shuffled),
            }
        )
    return pairs


def write_jsonl(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

VOCAB_SIZE = 4096
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def training_lines(docs: list[Doc]) -> list[str]:
    """The documents split into lines.

    SentencePiece then never sees a newline, so "\\n" gets no piece of its own and is always
    encoded as its byte, which never merges with the text around it: finetune's tokenizer relies on
    that to encode a text that follows a newline (`Tokenizer.encode_continuation`).
    """
    return [line for doc in docs for line in doc.document.splitlines() if line.strip()]


def train_tokenizer(docs: list[Doc], path: Path) -> spm.SentencePieceProcessor:
    """A BPE tokenizer with Llama-2's settings, trained on the docstrings."""
    spm.set_random_generator_seed(SEED)
    # Written to memory: a model_prefix would be stored in the model, and a temporary one differs
    # from run to run.
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(training_lines(docs)),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        # Llama-2's conventions.
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        byte_fallback=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        character_coverage=0.9999,
        allow_whitespace_only_pieces=True,
        # Determinism: every line, in order, on one thread.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        max_sentence_length=16384,  # keep long lines rather than drop them
        minloglevel=2,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(path))
    check_tokenizer(sp)
    return sp


def check_tokenizer(sp: spm.SentencePieceProcessor) -> None:
    """The properties finetune's Tokenizer depends on."""
    assert sp.GetPieceSize() == VOCAB_SIZE
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (UNK_ID, BOS_ID, EOS_ID, -1)
    newline = sp.Encode("\n")
    assert sp.IdToPiece(newline[-1]) == "<0x0A>", [sp.IdToPiece(i) for i in newline]
    assert all(sp.IsByte(i) or sp.IdToPiece(i) == "▁" for i in newline), newline
    for text in ("Hello", "    indented", "\nagain", "123 + 4.5", "é ✓ 漢字"):
        ids = sp.Encode("\n" + text)
        assert ids[: len(newline)] == newline, (text, ids)
        assert sp.Decode(ids) == "\n" + text, (text, sp.Decode(ids))


# --------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------

TINY = model_preset("tiny")  # conf/model/tiny.yaml is the one place the architecture lives
assert TINY.vocab_size == VOCAB_SIZE
SEQ_LEN = 256
BATCH_SIZE = 8  # small batches and more steps learn more in the same time than the reverse
DEFAULT_STEPS = 800  # about 4 epochs; 4-5 minutes on 2 cores
PEAK_LR, MIN_LR, WARMUP_STEPS = 2e-3, 2e-4, 50
WEIGHT_DECAY = 0.1
HELD_OUT_FRACTION = 0.02
LOG_EVERY = 50


def pack(docs: list[Doc], sp: spm.SentencePieceProcessor, rng: random.Random) -> torch.Tensor:
    """(windows, SEQ_LEN + 1) token ids: the documents in random order, each after a BOS."""
    order = list(docs)
    rng.shuffle(order)  # so that a window mixes modules rather than a module's neighbours
    ids = [t for doc in order for t in [BOS_ID, *sp.Encode(doc.document)]]
    n = len(ids) // (SEQ_LEN + 1)
    return torch.tensor(ids[: n * (SEQ_LEN + 1)]).view(n, SEQ_LEN + 1)


def lr_at(step: int, total: int) -> float:
    """Linear warmup, then cosine decay to MIN_LR."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return MIN_LR + (PEAK_LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: Llama) -> torch.optim.AdamW:
    # Weight decay on matrices only: decaying the norms' gains towards 0 would only hurt.
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": matrices, "weight_decay": WEIGHT_DECAY},
        {"params": vectors, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=PEAK_LR, betas=(0.9, 0.95))


def loss_on(model: Llama, windows: torch.Tensor) -> torch.Tensor:
    x, y = windows[:, :-1], windows[:, 1:]
    # bf16 autocast: the CPU's bf16 matmuls are several times faster than fp32 ones.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model: Llama, windows: torch.Tensor) -> float:
    model.eval()
    losses = [loss_on(model, batch).item() for batch in windows.split(BATCH_SIZE)]
    model.train()
    return sum(losses) / len(losses)


def batches(n_windows: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Window indices for each step: epochs of seeded permutations."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < BATCH_SIZE:
            order = torch.cat([order, torch.randperm(n_windows, generator=generator)])
        yield order[:BATCH_SIZE]
        order = order[BATCH_SIZE:]


def pretrain(docs: list[Doc], sp: spm.SentencePieceProcessor, steps: int) -> Llama:
    """Train TINY from scratch on the docstrings; returns it with fp32 weights."""
    torch.manual_seed(SEED)
    windows = pack(docs, sp, random.Random(SEED))
    n_held_out = max(1, int(len(windows) * HELD_OUT_FRACTION))
    train, held_out = windows[n_held_out:], windows[:n_held_out]
    print(
        f"pretraining on {train.numel():,} tokens ({len(train)} windows of {SEQ_LEN + 1}), "
        f"{n_held_out} windows held out; {steps} steps of {BATCH_SIZE} "
        f"= {steps * BATCH_SIZE / len(train):.1f} epochs"
    )

    model = Llama(TINY)
    generator = torch.Generator().manual_seed(SEED)
    model.init_weights(generator)
    print(f"model: {count_parameters(model):,} parameters")
    optimizer = make_optimizer(model)

    start = time.perf_counter()
    for step, index in enumerate(batches(len(train), steps, generator)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps)
        loss = loss_on(model, train[index])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % LOG_EVERY == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            print(
                f"step {step:5d}  loss {loss.item():.3f}  lr {lr_at(step, steps):.2e}  "
                f"{elapsed:6.0f}s"
            )
    print(f"held-out loss {evaluate(model, held_out):.3f}; {time.perf_counter() - start:.0f}s")
    return model


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="pretraining steps")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the assets directory")
    parser.add_argument(
        "--data-only", action="store_true", help="write the datasets, not the tokenizer and model"
    )
    args = parser.parse_args()
    # Pinned, because the number of threads can change how the CPU kernels round.
    torch.set_num_threads(2)

    docs = collect_docstrings(Path(sysconfig.get_paths()["stdlib"]))
    print(f"{len(docs)} docstrings, {sum(len(d.text) for d in docs):,} characters")

    records = build_dataset(docs, random.Random(SEED))
    write_jsonl(records, args.out / "sample.jsonl")
    print(f"sample.jsonl: {len(records)} records")
    chats = build_chat_dataset(records, random.Random(SEED))
    write_jsonl(chats, args.out / "sample_chat.jsonl")
    print(f"sample_chat.jsonl: {len(chats)} conversations")
    preferences = build_preference_dataset(records, random.Random(SEED))
    write_jsonl(preferences, args.out / "preference_sample.jsonl")
    print(f"preference_sample.jsonl: {len(preferences)} pairs")
    if args.data_only:
        return

    tiny_dir = args.out / "tiny"
    sp = train_tokenizer(docs, tiny_dir / "tokenizer.model")
    print(f"tokenizer.model: {sp.GetPieceSize()} pieces")

    model = pretrain(docs, sp, args.steps)
    save_hf(
        model,
        tiny_dir,
        tokenizer=tiny_dir / "tokenizer.model",
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        dtype=torch.bfloat16,
    )
    print(f"saved {tiny_dir}")


if __name__ == "__main__":
    main()

"""Offline training data for the draft head: text that every installation has, and the target's
own answers to chat prompts built from it. Nothing is downloaded.

    docs    docstrings of Python standard-library modules (``tinyserve.quant.calib.module_docs``)
            and the long descriptions (READMEs) of tinyserve's installed dependencies
    code    source files of standard-library modules
    chat    ChatML conversations: a user prompt built from templates (general topics, stdlib
            names, "summarise / rewrite this text" over docstring paragraphs) and the target's
            greedy answer (self-distillation: the head learns the distribution it must predict,
            on the kind of text a chat model writes)

Held-out data is disjoint by construction: other stdlib modules, other topics, other prompts.
Everything is a deterministic function of the Python version, the installed dependencies, the
seed and the target (``describe`` hashes the texts so a record says what was used).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import random
from importlib import metadata

from ..quant.calib import HELDOUT_MODULES, module_docs

DOC_MODULES = (
    "argparse", "collections", "contextlib", "dataclasses", "functools", "itertools", "json",
    "logging", "pathlib", "random", "re", "string", "threading", "typing", "os", "subprocess",
    "datetime", "inspect", "ast", "enum", "unittest.case", "urllib.parse", "http.client",
    "email.message", "configparser", "tempfile", "uuid", "optparse", "textwrap",
)
CODE_MODULES = ("textwrap", "heapq", "shlex", "graphlib", "colorsys", "bisect", "fnmatch",
                "glob", "copy", "pprint", "dataclasses", "contextlib", "functools", "tempfile")
HELDOUT_CODE_MODULES = ("calendar", "statistics", "fractions")
DEPENDENCIES = ("torch", "numpy", "safetensors", "gguf", "tokenizers", "jinja2", "matplotlib",
                "tqdm")

# Chat prompt material. The bench's prompts (tinyserve.bench.speculative) are none of these.
TOPICS = (
    "photosynthesis", "the water cycle", "black holes", "volcanoes", "the Roman Empire",
    "machine learning", "the immune system", "climate change", "the stock market", "gravity",
    "the human heart", "renewable energy", "the printing press", "DNA", "earthquakes",
    "the internet", "electric cars", "vaccines", "the moon landing", "coffee", "honey bees",
    "the Great Wall of China", "inflation", "sleep", "meditation", "chess", "jazz music",
    "the Olympic Games", "rainforests", "the French Revolution", "compound interest",
    "solar panels", "the periodic table", "antibiotics", "time zones", "recycling", "glaciers",
    "the speed of light", "bread baking", "public libraries", "the Silk Road", "tides",
    "cloud computing", "password security", "healthy breakfasts", "learning a language",
    "the pyramids of Giza", "rain", "electricity", "friendship", "museums", "the ocean floor",
    "birds migrating", "dinosaurs", "the Renaissance", "bicycles", "weather forecasts",
    "teamwork", "volunteering", "composting",
)
QUESTION_TEMPLATES = (
    "What is {x}?", "Explain {x} to a ten-year-old.", "Give me three interesting facts about {x}.",
    "Write a short paragraph about {x}.", "How does {x} work?",
    "What are the advantages and disadvantages of {x}?", "Why is {x} important?",
    "Write a short poem about {x}.", "Describe {x} in two sentences.",
    "What should a beginner know about {x}?", "Tell me a short story that involves {x}.",
    "List some common misconceptions about {x}.",
)
PY_TEMPLATES = (
    "What does {name} in Python's {mod} module do?", "Show a short example of using {mod}.{name}.",
    "When would I use {mod}.{name} in Python?", "Write a Python function that uses {mod}.{name}.",
)
TEXT_TEMPLATES = (
    "Summarize the following text in one or two sentences:\n\n{text}",
    "Rewrite the following text in simpler words:\n\n{text}",
    "Copy the following text, fixing any spelling or grammar mistakes:\n\n{text}",
    "Explain what this documentation says:\n\n{text}",
)


def _stdlib_source(name: str) -> str:
    return inspect.getsource(importlib.import_module(name))


def dependency_docs() -> list[str]:
    """Long descriptions (READMEs) of tinyserve's installed dependencies, sorted by name."""
    out = []
    for dist in DEPENDENCIES:
        try:
            meta = metadata.metadata(dist)
        except metadata.PackageNotFoundError:
            continue
        body = meta.get_payload() or meta.get("Description") or ""
        if body.strip():
            out.append(f"{dist}\n\n{body.strip()}")
    return out


def texts(split: str) -> dict[str, list[str]]:
    """{"docs": [...], "code": [...]} for ``split`` "train" or "heldout"."""
    if split == "train":
        return {"docs": [e for m in DOC_MODULES for e in module_docs(m)] + dependency_docs(),
                "code": [_stdlib_source(m) for m in CODE_MODULES]}
    if split == "heldout":
        return {"docs": [e for m in HELDOUT_MODULES for e in module_docs(m)],
                "code": [_stdlib_source(m) for m in HELDOUT_CODE_MODULES]}
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def chat_prompts(n: int, split: str, seed: int = 0) -> list[str]:
    """``n`` user prompts: half general questions, a quarter about stdlib names, a quarter
    "summarise / rewrite this text" over a docstring paragraph. Train and held-out prompts are
    disjoint: every fifth topic is held out, and names and paragraphs come from the split's
    own modules (the held-out ones are those of the held-out docs)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    names, paragraphs = [], []
    for m in DOC_MODULES if split == "train" else HELDOUT_MODULES:
        for entry in module_docs(m):
            head, _, body = entry.partition("\n")
            if head.startswith(("def ", "class ")) and "." not in head.split("(")[0]:
                names.append((m, head.split()[1].split("(")[0]))
            para = body.strip().split("\n\n")[0]
            if 200 <= len(para) <= 700:
                paragraphs.append(para)
    topics = [t for i, t in enumerate(TOPICS) if (i % 5 == 4) == (split == "heldout")]
    rng = random.Random(f"{seed}-{split}")
    out = []
    for i in range(n):
        kind = (0, 0, 1, 2)[i % 4]
        if kind == 0:
            out.append(rng.choice(QUESTION_TEMPLATES).format(x=rng.choice(topics)))
        elif kind == 1:
            mod, name = rng.choice(names)
            out.append(rng.choice(PY_TEMPLATES).format(mod=mod, name=name))
        else:
            out.append(rng.choice(TEXT_TEMPLATES).format(text=rng.choice(paragraphs)))
    return out


def describe(parts: dict[str, list[str]]) -> dict:
    """Character counts and a sha256 per part, for the training record."""
    return {k: {"items": len(v), "chars": sum(map(len, v)),
                "sha256": hashlib.sha256("\x00".join(v).encode()).hexdigest()}
            for k, v in parts.items()}

#!/usr/bin/env python3
"""Fails if the modules of a crate import each other in a cycle.

Reads every `crate::a::b` and `super::b` path in a crate's non-test code (comments and
`#[cfg(test)]` modules left out) and builds the graph of its modules down to `--depth` levels
(default 1: the crate's top-level modules): `a` depends on `b` when code in `a` (or below it)
names `b` and `b` is neither `a` nor inside it. Deeper, the files of one module split along its
seams may refer to each other. Prints each cycle (strongly connected set of more than one
module) and exits 1 if there is one.

    scripts/module-cycles.py [--depth N] forkvm/src [forkvm-devices/src ...]
"""
import re
import sys
from pathlib import Path

PATH = re.compile(r"\bcrate((?:::[a-z_][a-z0-9_]*)+)")
SUPER = re.compile(r"\bsuper((?:::[a-z_][a-z0-9_]*)+)")
USE_GROUP = re.compile(r"\buse\s+crate::\{([^;]*)\};", re.S)


def module_of(src: Path, file: Path) -> tuple:
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts.pop()
    return tuple(parts)


def code_without_tests(text: str) -> str:
    out, skip_depth, depth, pending = [], None, 0, False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("//"):
            continue
        if stripped.startswith("#[cfg(test)]"):
            pending = True
            continue
        if skip_depth is None and pending and stripped.startswith(("mod ", "pub mod ", "pub(crate) mod ")):
            pending = False
            if stripped.endswith(";"):
                continue
            skip_depth = depth
            depth += line.count("{") - line.count("}")
            continue
        if pending and not stripped.startswith("#["):
            pending = False
            if skip_depth is None and stripped.endswith(";"):
                continue
        before = depth
        depth += line.count("{") - line.count("}")
        if skip_depth is not None:
            if depth <= skip_depth:
                skip_depth = None
            continue
        out.append(line.split("//")[0])
    return "\n".join(out)


def targets(code: str, module: tuple, is_mod_file: bool):
    # `super` is the parent of a file's module (of the module itself for a mod.rs).
    parent = module[:-1]
    for match in SUPER.findall(code):
        yield parent + tuple(match.strip(":").split("::"))
    for group in USE_GROUP.findall(code):
        for item in re.split(r",(?![^{]*\})", group):
            name = item.strip().split("::")[0].split(" ")[0].strip("{} ")
            if name and name != "self":
                yield (name,)
    for match in PATH.findall(code):
        yield tuple(match.strip(":").split("::"))


def sccs(nodes, edges):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            out.append(group)

    sys.setrecursionlimit(10000)
    for v in nodes:
        if v not in index:
            visit(v)
    return out


def check(src: Path, depth: int) -> int:
    modules = {}
    for file in sorted(src.rglob("*.rs")):
        if "bin" in file.relative_to(src).parts:
            continue
        modules[module_of(src, file)] = (
            code_without_tests(file.read_text()),
            file.stem in ("mod", "lib"),
        )
    known = set(modules)
    edges = {}
    for module, (code, is_mod_file) in modules.items():
        for target in targets(code, module, is_mod_file):
            # The longest known module the path names.
            while target and target not in known:
                target = target[:-1]
            if not target or target[: len(module)] == module or module[: len(target)] == target:
                continue
            # Compare at the level where the two paths part: siblings under a common parent.
            common = 0
            while common < min(len(module), len(target)) and module[common] == target[common]:
                common += 1
            if common >= depth:
                continue
            a, b = module[: common + 1], target[: common + 1]
            edges.setdefault(a, set()).add(b)
    nodes = set(edges) | {b for bs in edges.values() for b in bs}
    bad = [sorted(g) for g in sccs(sorted(nodes), edges) if len(g) > 1]
    for group in bad:
        names = ", ".join("::".join(m) for m in group)
        print(f"{src}: modules import each other in a cycle: {names}")
        for a in group:
            for b in sorted(edges.get(a, ())):
                if b in group:
                    print(f"    {'::'.join(a)} -> {'::'.join(b)}")
    return 1 if bad else 0


if __name__ == "__main__":
    args, depth = sys.argv[1:], 1
    if args[:1] == ["--depth"]:
        depth, args = int(args[1]), args[2:]
    sys.exit(max([check(Path(arg), depth) for arg in args] or [0]))

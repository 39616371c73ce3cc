#!/usr/bin/env python3
"""Layout checks of the crate's source tree (src/), run by scripts/test.sh:

  1. The modules' imports form a DAG: no module reaches itself through `use` declarations or
     `crate::` / `super::` / `self::` paths; and no import runs up a floor of the table in
     the Layout section of src/lib.rs's crate doc (every top-level module has its floor).
  2. No file in src/ is longer than MAX_FILE_LINES lines.
  3. No function is longer than MAX_FN_LINES lines, counted from the line of its `fn` to the
     line of its closing brace (WAIVED lists the ones left to another change, each with why).

    scripts/check-layout.py            # every check; exit status 1 if one fails
    scripts/check-layout.py --edges    # also print, per module, the modules it imports from

How the graph is read. The modules are found from src/lib.rs by following `mod name;` (with
`#[path]`); items under `#[cfg(test)]` (test modules, test helpers, their files) are left out
of the graph and of the function check, and kept in the file-length check. Comments and string
literals are blanked first. A path is resolved in the module it appears in: `crate::`,
`super::`, `self::`, a child module, or a name a `use` bound. The longest prefix that is a
module is the target, followed through imports and re-exports (`pub use`) to the module that
defines the item, so `crate::vault::VaultClient` is an edge to `vault::client`, not to `vault`.
Naming a module (`use crate::tls;`) is no edge, what is then reached through it
(`tls::upstream::connector`) is. An edge to the module itself is not one; a parent declaring
`mod child;` is not one either, while a parent using an item of its child is, like a child
using one of its parent: both at once are a cycle. Inline non-test modules count as part of
their file's module.
"""

import argparse
import re
import sys
from pathlib import Path

MAX_FILE_LINES = 500
MAX_FN_LINES = 70

# (file, function name): why it is longer than MAX_FN_LINES for now.
WAIVED = {}

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
KEYWORDS = {"crate", "super", "self"}


# ------------------------------------------------------------------------------------ lexing
def blank(text):
    """The text with comments, string and char literals replaced by spaces (newlines kept)."""
    out = []
    i, n = 0, len(text)

    def keep_lines(s):
        return "".join("\n" if c == "\n" else " " for c in s)

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(keep_lines(text[i:j]))
            i = j
        elif (m := re.match(r'b?r(#*)"', text[i:])) and not (i and re.match(r"\w", text[i - 1])):
            end = '"' + m.group(1)
            j = text.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            out.append(keep_lines(text[i:j]))
            i = j
        elif c == '"' or (text.startswith('b"', i) and not (i and re.match(r"\w", text[i - 1]))):
            j = i + (2 if c == "b" else 1)
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(keep_lines(text[i:j + 1]))
            i = j + 1
        elif c == "'":
            # A char literal ('x', '\n', '\u{1F600}', b'x' is caught by the '), or a lifetime.
            m = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\.|[^\\'\n])'", text[i:])
            if m:
                out.append(" " * m.end())
                i += m.end()
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def item_end(text, start):
    """Index just past the item starting at `start`: its `;`, or the brace closing its body."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == ";" and depth == 0:
            return i + 1
        elif c == "{" and depth == 0:
            return match_brace(text, i) + 1
        i += 1
    return len(text)


def match_pair(text, open_at, opening, closing):
    """Index of the `closing` that closes the `opening` at `open_at`."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == opening:
            depth += 1
        elif text[i] == closing:
            depth -= 1
            if depth == 0:
                return i
    return len(text) - 1


def match_brace(text, open_at):
    """Index of the `}` closing the `{` at `open_at`."""
    return match_pair(text, open_at, "{", "}")


def strip_cfg_test(text):
    """`text` (already blanked) without the items under `#[cfg(test)]` (newlines kept)."""
    pattern = re.compile(r"#\[cfg\(test\)\]")
    while m := pattern.search(text):
        i = m.end()
        # Further attributes of the same item.
        while a := re.match(r"\s*#\[", text[i:]):
            i = match_pair(text, i + a.end() - 1, "[", "]") + 1
        end = item_end(text, i)
        gone = text[m.start():end]
        text = text[:m.start()] + "".join("\n" if c == "\n" else " " for c in gone) + text[end:]
    return text


# ------------------------------------------------------------------------------- the modules
class Module:
    def __init__(self, path, file, test):
        self.path = path  # tuple of segments; () is the crate root
        self.file = file
        self.test = test
        self.code = ""  # blanked, without cfg(test) items
        self.children = set()
        self.imports = {}  # name bound by a `use` -> absolute path (tuple)

    @property
    def name(self):
        return "::".join(self.path) or "crate"


def module_dir(file):
    """The directory a file's `mod x;` children live in."""
    if file.name in ("lib.rs", "main.rs", "mod.rs"):
        return file.parent
    return file.parent / file.stem


def discover():
    modules = {}

    def visit(path, file, test):
        module = Module(path, file, test)
        modules[path] = module
        raw = blank(file.read_text())
        module.code = strip_cfg_test(raw)
        decl = re.compile(
            r"((?:#\[[^\]]*\]\s*)*)(?:pub(?:\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;")
        for m in decl.finditer(raw):
            attrs, name = m.group(1), m.group(2)
            child_test = test or "cfg(test)" in attrs
            original = file.read_text()
            at = re.search(r'#\[path\s*=\s*"([^"]+)"\]', original[m.start():m.end()])
            if at:
                child = file.parent / at.group(1)
            else:
                child = module_dir(file) / f"{name}.rs"
                if not child.exists():
                    child = module_dir(file) / name / "mod.rs"
            module.children.add(name)
            visit(path + (name,), child, child_test)

    visit((), SRC / "lib.rs", False)
    return modules


def expand_use(tree):
    """`a::{b, c::{self, d as e}}` -> [(("a","b"), "b"), (("a","c"), "c"), (("a","c","d"), "e")]."""
    tokens = re.findall(IDENT + r"|::|\{|\}|,|\*", tree)
    pos = 0

    def parse(prefix):
        nonlocal pos
        out = []
        segs = list(prefix)
        while pos < len(tokens):
            t = tokens[pos]
            if t == "{":
                pos += 1
                while pos < len(tokens) and tokens[pos] != "}":
                    out += parse(tuple(segs))
                    if pos < len(tokens) and tokens[pos] == ",":
                        pos += 1
                pos += 1
                return out
            if t in (",", "}"):
                break
            if t == "::":
                pos += 1
                continue
            if t == "*":
                pos += 1
                return out  # glob: binds nothing we follow
            if t == "as":
                alias = tokens[pos + 1]
                pos += 2
                if alias != "_":
                    out.append((tuple(segs), alias))
                return out
            pos += 1
            if t == "self" and segs:
                continue
            segs.append(t)
        if segs and segs[-1] != "self":
            out.append((tuple(segs), segs[-1]))
        elif len(segs) > 1:
            out.append((tuple(segs[:-1]), segs[-2]))
        return out

    result = []
    while pos < len(tokens):
        result += parse(())
        if pos < len(tokens) and tokens[pos] == ",":
            pos += 1
        elif pos < len(tokens):
            pos += 1
    return result


USE = re.compile(r"(?<![\w:])use\s+([^;]+);")


def absolute(module, segs, modules):
    """The crate-absolute form of a path written in `module`, or None for another crate's."""
    if not segs:
        return None
    first, rest = segs[0], list(segs[1:])
    if first == "crate":
        return tuple(rest)
    if first == "self":
        return module.path + tuple(rest)
    if first == "super":
        base = list(module.path)
        base.pop()
        while rest and rest[0] == "super":
            base.pop()
            rest.pop(0)
        return tuple(base) + tuple(rest)
    if first in module.children:
        return module.path + tuple(segs)
    if first in module.imports:
        return module.imports[first] + tuple(rest)
    return None


def defining_module(path, modules, seen=None):
    """The module that defines what the absolute `path` names, through imports."""
    seen = seen or set()
    k = len(path)
    while k and path[:k] not in modules:
        k -= 1
    home = modules.get(path[:k])
    if home is None:
        return None
    rest = path[k:]
    if not rest:
        return None  # the module itself, named to reach into it: not an item of its own
    if rest[0] in home.imports and (home.path, rest[0]) not in seen:
        seen.add((home.path, rest[0]))
        target = home.imports[rest[0]] + rest[1:]
        return defining_module(target, modules, seen) or home.path
    return home.path


def edges(modules):
    """Module path -> set of module paths it uses items of."""
    graph = {}
    live = {p: m for p, m in modules.items() if not m.test}
    for m in live.values():
        uses = [t for u in USE.finditer(m.code) for t in expand_use(u.group(1))]
        # Twice, so that a `use` may build on a name another `use` bound.
        for _ in range(2):
            for segs, name in uses:
                target = absolute(m, segs, modules)
                if target is not None:
                    m.imports[name] = target
    for m in live.values():
        out = set()
        written = [s for u in USE.finditer(m.code) for s, _ in expand_use(u.group(1))]
        body = USE.sub(" ", m.code)
        written += [tuple(p.split("::")) for p in re.findall(
            r"(?<![\w:])(" + IDENT + r"(?:::" + IDENT + r")+)", body)]
        for segs in written:
            target = absolute(m, segs, modules)
            if target is None:
                continue
            home = defining_module(target, modules)
            if home is not None and home != m.path and home in live:
                out.add(home)
        graph[m.path] = out
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


# ------------------------------------------------------------------------------ the floors
def floors():
    """Top-level module -> floor, from the table in the Layout section of src/lib.rs's crate
    doc: lines `floor N  name  what it is`, further names of that floor on the lines below
    (indented like the first name), descriptions continued further right."""
    table, floor, inside = {}, None, False
    for line in (SRC / "lib.rs").read_text().splitlines():
        if not line.startswith("//!"):
            continue
        body = line[3:]
        if body.strip().startswith("```"):
            if inside:
                break
            inside = floor is None
            continue
        if not inside or not body.strip():
            continue
        m = re.match(r" floor (\d+)(\s+)(\S+)", body)
        if m:
            floor, name = int(m.group(1)), m.group(3)
        elif len(body) - len(body.lstrip()) <= len(" floor 0  "):
            name = body.split()[0]
        else:
            continue  # a description goes on
        if not name.endswith(".rs"):
            table[name] = floor
    return table


def floor_problems(graph, modules):
    """Imports that run up a floor, and modules missing from the table (or names in it that
    are no module)."""
    table = floors()
    tops = {p[0] for p in graph if p}
    problems = [f"src/lib.rs Layout: {name} is not a module"
                for name in sorted(set(table) - tops)]
    problems += [f"src/lib.rs Layout: module {name} has no floor"
                 for name in sorted(tops - set(table))]
    for source in sorted(graph):
        for target in sorted(graph[source]):
            a, b = source[0], target[0]
            if a != b and a in table and b in table and table[b] > table[a]:
                problems.append(
                    f"{modules[source].name} (floor {table[a]}) imports "
                    f"{modules[target].name} (floor {table[b]}): up a floor"
                )
    return problems


# ----------------------------------------------------------------------------- the lengths
def long_files():
    for file in sorted(SRC.rglob("*.rs")):
        lines = len(file.read_text().splitlines())
        if lines > MAX_FILE_LINES:
            yield file.relative_to(ROOT), lines


def long_functions(modules):
    """(file, line, name, lines) of every non-test function longer than MAX_FN_LINES."""
    files = {m.file: m.code for m in modules.values() if not m.test}
    main = SRC / "main.rs"
    if main.exists():
        files[main] = strip_cfg_test(blank(main.read_text()))
    for file, code in sorted(files.items()):
        for m in re.finditer(r"(?<![\w])fn\s+(" + IDENT + r")", code):
            end = item_end(code, m.end())
            if code[end - 1] != "}":
                continue  # a declaration without a body
            first = code.count("\n", 0, m.start()) + 1
            last = code.count("\n", 0, end - 1) + 1
            if last - first + 1 > MAX_FN_LINES:
                yield file.relative_to(ROOT), first, m.group(1), last - first + 1


# ------------------------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", action="store_true", help="print the import edges per module")
    args = parser.parse_args()

    modules = discover()
    graph = edges(modules)
    failed = False

    if args.edges:
        print("use crate:: edges (module -> the modules it imports from):")
        for path in sorted(graph, key=lambda p: "::".join(p)):
            if path:
                targets = ", ".join(sorted(modules[t].name for t in graph[path]))
                print(f"  {modules[path].name} -> {targets or '(nothing)'}")

    found = cycles(graph)
    for component in found:
        failed = True
        members = set(component)
        print("import cycle among: " + ", ".join(modules[p].name for p in component))
        for p in component:
            inner = sorted(modules[t].name for t in graph[p] if t in members)
            print(f"    {modules[p].name} -> {', '.join(inner)}")
    if not found:
        print(f"imports: {len(graph) - 1} modules, no cycle")

    upwards = floor_problems(graph, modules)
    for problem in upwards:
        failed = True
        print(problem)
    if not upwards:
        print("floors: every import stays on its floor or goes down (src/lib.rs, Layout)")

    files = list(long_files())
    for file, lines in files:
        failed = True
        print(f"{file}: {lines} lines (at most {MAX_FILE_LINES})")
    if not files:
        print(f"files: none over {MAX_FILE_LINES} lines")

    waived_seen = set()
    too_long = 0
    for file, line, name, lines in long_functions(modules):
        key = (str(file), name)
        if key in WAIVED:
            waived_seen.add(key)
            print(f"{file}:{line}: fn {name}: {lines} lines, waived: {WAIVED[key]}")
            continue
        failed = True
        too_long += 1
        print(f"{file}:{line}: fn {name}: {lines} lines (at most {MAX_FN_LINES})")
    for key in sorted(set(WAIVED) - waived_seen):
        print(f"note: {key[0]} fn {key[1]} is no longer over {MAX_FN_LINES} lines: "
              "drop its entry from WAIVED")
    if not too_long:
        print(f"functions: none over {MAX_FN_LINES} lines (test code excluded)")

    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Teaching with diti: a student copy of the project with chosen functions blanked, and the experiment of
each assignment of ASSIGNMENTS.md with the figure it prints.

    python assign.py --list                                          # the blankable functions, by assignment
    python assign.py --assignment 3 --out ../diti-a3                 # a copy with assignment 3's functions blanked
    python assign.py --blank diti.cumulative_mask diffusion.q_sample --out ../diti-student
    python assign.py --check 3                                       # assignment 3's experiment and its figure

A blanked function keeps its decorators, signature and docstring; its body becomes
`raise NotImplementedError("assignment: diti.cumulative_mask, see ASSIGNMENTS.md §3")`. Functions are found by
name (module.function or module.Class.method) with `ast`: the reference source carries no markers, and every
other byte of a file is copied as it is. Which assignment a function belongs to is read from the `Blanks:` line
of each section of ASSIGNMENTS.md. The student grades a solution with `python -m pytest -k <function name>`; the
experiments behind --check live in assignment_checks.py.
"""
import argparse
import ast
import difflib
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import train
from config import UserError

ROOT = Path(__file__).resolve().parent
SKIP_DIRS = {".git", "runs", "__pycache__", ".pytest_cache", ".diti_cache", ".benchmarks", ".venv", "venv"}


# ----------------------------------------------------------------------------------------------------------
# The assignments and the functions they blank, as ASSIGNMENTS.md states them

def read_assignments(path=ROOT / "ASSIGNMENTS.md"):
    """{n: (title, [function names])} from the sections '## n. Title' and their line '**Blanks:** `a.b`, ...'."""
    if not Path(path).exists():
        return {}
    out, n = {}, None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        heading = re.match(r"## (\d+)\. (.+)", line)
        if heading:
            n = int(heading.group(1))
            out[n] = (heading.group(2).strip(), [])
        elif n is not None and line.startswith("**Blanks:**"):
            out[n][1].extend(re.findall(r"`([\w.]+)`", line))
    return out


def assignment_of(assignments):
    """function name -> assignment number."""
    return {name: n for n, (_, names) in assignments.items() for name in names}


def grading_tests(names):
    """The pytest -k expression that selects the tests of these functions (named after them)."""
    return " or ".join(dict.fromkeys(name.split(".")[-1] for name in names))


# ----------------------------------------------------------------------------------------------------------
# Finding functions by name

def source_modules(root=ROOT):
    """The project's modules: the .py files at the top of root, {module name: path}."""
    return {p.stem: p for p in sorted(Path(root).glob("*.py"))}


def definitions(tree, module):
    """{'module.function': node, 'module.Class.method': node} for a module's top-level definitions."""
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[f"{module}.{node.name}"] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found[f"{module}.{node.name}.{item.name}"] = item
    return found


def all_functions(root=ROOT):
    """Every blankable name of the project, sorted."""
    return sorted(name for module, path in source_modules(root).items()
                  for name in definitions(ast.parse(path.read_text(encoding="utf-8")), module))


def check_names(names, root=ROOT):
    """Raise UserError naming the close names for the first name that is not a function of the project."""
    known = all_functions(root)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f"close names: {', '.join(close)}" if close else "see python assign.py --list"
            raise UserError(f"unknown function '{name}' (give module.function or module.Class.method); {hint}")


# ----------------------------------------------------------------------------------------------------------
# Blanking: replace a body by one raise, by line ranges, keeping everything else byte for byte

def docstring_of(node):
    """The docstring statement of a function, or None."""
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first
    return None


def blank_source(text, nodes, message_of):
    """text with each function's body replaced by `raise NotImplementedError(message_of(name))`, keeping its
    decorators, signature and docstring. The lines replaced run from the first statement after the docstring
    (with the comment lines just above it) to the function's last line. nodes: {name: its ast node in text}."""
    lines = text.split("\n")
    for name, node in sorted(nodes.items(), key=lambda item: -item[1].lineno):     # bottom up: numbers hold
        raise_line = f"raise NotImplementedError(\"{message_of(name)}\")"
        doc = docstring_of(node)
        code = node.body[1:] if doc else node.body
        if not code:                                           # only a docstring: add the raise after it
            lines.insert(doc.end_lineno, lines[doc.lineno - 1][:doc.col_offset] + raise_line)
            continue
        stmt = code[0]
        before = lines[stmt.lineno - 1].encode("utf-8")[:stmt.col_offset].decode("utf-8")   # offsets are bytes
        if stmt.lineno == node.lineno:                         # `def f(x): return x` keeps `def f(x): `
            lines[node.lineno - 1] = before + raise_line
            continue
        first, last = stmt.lineno, node.end_lineno
        while first - 1 > (doc.end_lineno if doc else node.lineno) and lines[first - 2].strip()[:1] in ("#", ""):
            first -= 1
        ending = "\r" if lines[last - 1].endswith("\r") else ""
        lines[first - 1:last] = [before + raise_line + ending]                # `before` is the indentation
    return "\n".join(lines)


def blank_files(root, names, message_of):
    """{path relative to root: new text} for the files holding the named functions."""
    by_module = {}
    for name in names:
        by_module.setdefault(name.split(".")[0], []).append(name)
    out = {}
    for module, members in by_module.items():
        path = source_modules(root)[module]
        text = path.read_bytes().decode("utf-8")
        found = definitions(ast.parse(text), module)
        new = blank_source(text, {name: found[name] for name in members}, message_of)
        ast.parse(new)                                         # the copy must still be valid Python
        out[path.relative_to(root).as_posix()] = new
    return out


# ----------------------------------------------------------------------------------------------------------
# The student copy

def project_files(root=ROOT, exclude=None):
    """The files of the project, relative to root: what git tracks plus untracked files it does not ignore
    (so not runs/ or caches), or, outside a git checkout, a walk that skips SKIP_DIRS, *.pyc and *.tmp*."""
    exclude = Path(exclude).resolve() if exclude else None
    try:
        listed = subprocess.run(["git", "-C", str(root), "ls-files", "-co", "--exclude-standard", "-z"],
                                capture_output=True, check=True).stdout.decode().split("\0")
        files = [Path(f) for f in listed if f and (Path(root) / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = [p.relative_to(root) for p in Path(root).rglob("*")
                 if p.is_file() and not SKIP_DIRS & set(p.relative_to(root).parts[:-1])
                 and p.suffix != ".pyc" and ".tmp" not in p.name]
    if exclude is not None:
        files = [f for f in files if exclude not in (Path(root) / f).resolve().parents]
    return sorted(files)


def make_copy(names, out, root=ROOT):
    """Copy the project to out with the named functions blanked. Returns the blanked files' paths."""
    names = list(dict.fromkeys(names))
    check_names(names, root)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: choose a new folder for the copy")
    numbers = assignment_of(read_assignments(Path(root) / "ASSIGNMENTS.md"))

    def message(name):
        where = f"ASSIGNMENTS.md §{numbers[name]}" if name in numbers else "ASSIGNMENTS.md"
        return f"assignment: {name}, see {where}"

    blanked = blank_files(root, names, message)
    for rel in project_files(root, exclude=out):
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel.as_posix() in blanked:
            target.write_bytes(blanked[rel.as_posix()].encode("utf-8"))
            shutil.copymode(Path(root) / rel, target)
        else:
            shutil.copy2(Path(root) / rel, target)
    return sorted(blanked)


# ----------------------------------------------------------------------------------------------------------
# The command line

def list_assignments(root=ROOT):
    """One block per assignment: its functions and the command that grades them."""
    rows = []
    for n, (title, names) in sorted(read_assignments(Path(root) / "ASSIGNMENTS.md").items()):
        rows += [f"§{n} {title}", f"    blanks: {', '.join(names)}",
                 f"    grade:  python -m pytest -q -k \"{grading_tests(names)}\"",
                 f"    figure: python assign.py --check {n}"]
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description="Student copies with blanked functions, and the assignments' checks.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="the blankable functions of each assignment")
    what.add_argument("--blank", nargs="+", metavar="NAME", help="module.function or module.Class.method")
    what.add_argument("--assignment", nargs="+", type=int, metavar="N", help="blank every function of these")
    what.add_argument("--check", type=int, metavar="N",
                      help="run assignment N's experiment, print its figure (0: train the DDPM 4, 6, 7 share)")
    p.add_argument("--out", help="the folder for the copy (new or empty)")
    p.add_argument("--seed", type=int, default=0, help="--check: the seed of the experiment")
    p.add_argument("--fresh", action="store_true", help="--check: retrain the models it would reuse")

    def one_line_error(message):                     # argparse would print its usage, then exit 2 itself
        raise UserError(f"{message}: see python assign.py --help")
    p.error = one_line_error
    a = p.parse_args(argv)
    assignments = read_assignments()
    if a.list:
        print(list_assignments())
        return
    if a.check is not None:
        import torch
        from assignment_checks import CHECKS
        if a.check not in CHECKS:
            raise UserError(f"no check for assignment {a.check}: choose one of {', '.join(map(str, CHECKS))}")
        torch.set_num_threads(1)          # reproducible numbers, and the fastest on a busy 2-core machine
        start, cpu = time.time(), time.process_time()
        CHECKS[a.check](a.seed, a.fresh)
        print(f"[assignment {a.check}, seed {a.seed}: {time.time() - start:.0f} s, "
              f"{time.process_time() - cpu:.0f} s CPU]")
        return
    if not a.out:
        raise UserError("say where the copy goes: --out <new folder>")
    if a.assignment:
        unknown = [n for n in a.assignment if n not in assignments]
        if unknown:
            raise UserError(f"no assignment {unknown[0]} in ASSIGNMENTS.md: choose from {sorted(assignments)}")
        names = [name for n in a.assignment for name in assignments[n][1]]
    else:
        names = a.blank
    blanked = make_copy(names, a.out)
    print(f"copied the project to {a.out}; blanked {len(names)} function(s) in {', '.join(blanked)}")
    print(f"grade with: cd {a.out} && python -m pytest -q -k \"{grading_tests(names)}\"")


def cli(argv=None):
    """main() as a command: a bad name or folder is one line on stderr and exit code 2 (train.py's handling)."""
    return train.cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())

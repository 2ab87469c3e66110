"""assign.py (issue 10, teaching with it): student copies with blanked functions, graded by the project's own
tests, and ASSIGNMENTS.md kept true to the code."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import assign
import assignment_checks

ROOT = Path(assign.__file__).resolve().parent


def pytest_in(folder, expression, *files):
    """Run pytest -k expression on files in folder, in a fresh process; (return code, output with -rA lines)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-k", expression, *files], cwd=folder,
                          capture_output=True, text=True, env=env, timeout=600)
    return done.returncode, done.stdout + done.stderr


def test_blanked_functions_fail_their_tests_with_the_assignment_message_and_the_rest_still_passes(tmp_path):
    copy = tmp_path / "student"
    assign.make_copy(["diti.cumulative_mask", "diffusion.q_sample"], copy)
    expression = "cumulative_mask or q_sample or uniform_partition or average_precision_hand_worked"
    files = ("tests/test_diti.py", "tests/test_diffusion.py", "tests/test_metrics.py")
    code, out = pytest_in(copy, expression, *files)
    assert code == 1, out
    assert "FAILED tests/test_diti.py::test_cumulative_mask_hand_worked" in out
    assert "FAILED tests/test_diffusion.py::test_q_sample_statistics" in out
    assert "NotImplementedError: assignment: diti.cumulative_mask, see ASSIGNMENTS.md §3" in out
    assert "NotImplementedError: assignment: diffusion.q_sample, see ASSIGNMENTS.md §1" in out
    assert "PASSED tests/test_metrics.py::test_average_precision_hand_worked" in out     # touches neither
    assert "PASSED tests/test_diti.py::test_uniform_partition[8-4-ends0]" in out         # same file, untouched
    code, out = pytest_in(ROOT, expression, *files)                                     # the reference passes
    assert code == 0 and " passed" in out and "failed" not in out, out


def test_a_blanked_copy_keeps_signature_docstring_and_every_other_byte(tmp_path):
    assign.make_copy(["diti.cumulative_mask", "diti.Partition.subset_of_t"], tmp_path / "s")
    ref, new = (ROOT / "diti.py").read_text(), (tmp_path / "s" / "diti.py").read_text()
    funcs = assign.definitions(ast.parse(ref), "diti")
    blanked = assign.definitions(ast.parse(new), "diti")
    for name in ("diti.cumulative_mask", "diti.Partition.subset_of_t"):
        before, after = funcs[name], blanked[name]
        assert ast.dump(before.args) == ast.dump(after.args) and ast.get_docstring(before) == ast.get_docstring(after)
        assert [ast.dump(d) for d in after.decorator_list] == [ast.dump(d) for d in before.decorator_list]
        assert isinstance(after.body[-1], ast.Raise) and len(after.body) == 2
    # everything outside the two bodies is the reference, line for line
    cut = [(funcs[n].body[0].end_lineno + 1, funcs[n].end_lineno) for n in ("diti.Partition.subset_of_t",
                                                                            "diti.cumulative_mask")]
    ref_lines, new_lines = ref.split("\n"), new.split("\n")
    kept = [line for i, line in enumerate(ref_lines, 1) if not any(a <= i <= b for a, b in cut)]
    assert [line for line in new_lines if "NotImplementedError" not in line] == kept
    assert (tmp_path / "s" / "README.md").read_bytes() == (ROOT / "README.md").read_bytes()
    assert (tmp_path / "s" / "ASSIGNMENTS.md").exists() and (tmp_path / "s" / "tests" / "conftest.py").exists()


def test_blank_source_handles_decorators_one_liners_comments_and_docstring_only_bodies():
    text = ('import functools\n\n\n@functools.lru_cache()\ndef f(x,\n      y=1):\n    """Doc."""\n'
            '    # the formula\n    z = x + y\n    return z  # done\n\n\nclass C:\n    def g(self): return 1\n\n'
            '    def h(self):\n        """Only a docstring."""\n\n\nTAIL = 1\n')
    defs = assign.definitions(ast.parse(text), "m")
    new = assign.blank_source(text, {n: defs[n] for n in ("m.f", "m.C.g", "m.C.h")}, lambda n: f"assignment: {n}")
    assert new == ('import functools\n\n\n@functools.lru_cache()\ndef f(x,\n      y=1):\n    """Doc."""\n'
                   '    raise NotImplementedError("assignment: m.f")\n\n\nclass C:\n'
                   '    def g(self): raise NotImplementedError("assignment: m.C.g")\n\n'
                   '    def h(self):\n        """Only a docstring."""\n'
                   '        raise NotImplementedError("assignment: m.C.h")\n\n\nTAIL = 1\n')


def test_unknown_name_is_one_line_with_the_close_names_and_exit_2(tmp_path, capsys):
    assert assign.cli(["--blank", "diti.cumulativ_mask", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown function 'diti.cumulativ_mask'" in err
    assert "close names: diti.cumulative_mask" in err
    assert not (tmp_path / "s").exists()
    assert assign.cli(["--assignment", "99", "--out", str(tmp_path / "s")]) == 2
    assert "no assignment 99" in capsys.readouterr().err


def test_the_copy_leaves_out_runs_caches_and_git(tmp_path):
    project = tmp_path / "project"                                      # not a git checkout: the walk
    for rel in ("m.py", "README.md", "tests/test_m.py", "runs/dm/ckpt.pt", "__pycache__/m.cpython-311.pyc",
                ".git/HEAD", ".pytest_cache/x", "tests/__pycache__/t.pyc", "ckpt.pt.tmp123"):
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text("def f():\n    return 1\n" if rel == "m.py" else "x")
    assign.make_copy(["m.f"], tmp_path / "copy", root=project)
    copied = sorted(p.relative_to(tmp_path / "copy").as_posix() for p in (tmp_path / "copy").rglob("*") if p.is_file())
    assert copied == ["README.md", "m.py", "tests/test_m.py"]
    in_git = [p.as_posix() for p in assign.project_files(ROOT)]              # the real project: what git lists
    assert {"assign.py", "ASSIGNMENTS.md", "tests/test_assign.py", "README.md"} <= set(in_git)
    assert not [p for p in in_git if p.startswith("runs/") or "__pycache__" in p]


def test_every_assignment_blanks_real_functions_each_graded_by_a_test_named_after_it():
    assignments = assign.read_assignments()
    assert 6 <= len(assignments) <= 8 and sorted(assignments) == list(range(1, len(assignments) + 1))
    known = set(assign.all_functions())
    tests = {}                                         # test name -> names used in its body
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                tests[node.name] = {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node)
                                    if isinstance(n, (ast.Name, ast.Attribute))}
    for n, (title, names) in assignments.items():
        assert names, f"§{n} {title} blanks nothing"
        for name in names:
            assert name in known, f"§{n} blanks {name}, which is not a function of the project"
            short = name.split(".")[-1]
            assert any(short in test and short in used for test, used in tests.items()), \
                f"no test named after {short} calls it: `pytest -k {short}` would not grade §{n}"
        assert assign.grading_tests(names) in assign.list_assignments()


def test_the_figures_of_the_deterministic_checks_are_those_assignments_md_states(capsys):
    stated = (ROOT / "ASSIGNMENTS.md").read_text(encoding="utf-8")
    assignment_checks.check_masks(0, False)
    assignment_checks.check_schedule(0, False)
    lines = capsys.readouterr().out.splitlines()
    for line in lines[:lines.index(next(l for l in lines if l.startswith("abar_0"))) + 1]:
        assert line.strip() in stated, f"ASSIGNMENTS.md does not state the figure line: {line}"

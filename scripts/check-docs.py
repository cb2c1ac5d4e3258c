"""The docs check: every snippet in README.md and docs/*.md runs in CI as written.

Run from the repository root after the release build (scripts/test.sh does, after test-ffi.sh):

    python3 scripts/check-docs.py

What each fenced block of a page must be:
- ```sh: run with bash (errexit, pipefail), every block of a page in one shell, in order, from
  the repository root, as a user following the page in one terminal would;
- ```python: run with python3 from the repository root, with PYTHONPATH=examples/python (as
  docs/FFI.md says to);
- ```rust: README.md's are compiled as doctests (runtime/src/lib.rs includes the README);
  anywhere else is an error;
- ```c, ```cmake, ```toml: preceded by `<!-- excerpt of PATH -->`: every line of the block is
  in PATH, in order (PATH is a program or manifest that CI builds or loads);
- a block preceded by `<!-- not run by the docs check: REASON -->` is skipped, its reason said;
- a block with no language, or ```text, is a figure: not checked.
Nothing may be left written into the source tree (checked with git status). The deployment
store of the commands goes to a scratch folder ($KEEL_STORE).
"""

import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
SKIP = re.compile(r"<!-- not run by the docs check: (.+?) -->")
EXCERPT = re.compile(r"<!-- excerpt of (\S+) -->")


def blocks(page):
    """(line number, language, text, the comment line before it) of each fenced block."""
    lines = (ROOT / page).read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1).split(",")[0]
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        before = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        yield start + 1, lang, "\n".join(lines[start + 1 : j]) + "\n", before
        i = j + 1


def is_excerpt(text, path):
    """Whether every non-blank line of `text` is in the file `path`, in order."""
    source = iter(line.strip() for line in (ROOT / path).read_text().splitlines())
    return all(any(s == want for s in source) for want in (l.strip() for l in text.splitlines()) if want)


def run(cmd, stdin_text, env, label):
    started = time.monotonic()
    p = subprocess.run(cmd, input=stdin_text, text=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise SystemExit(f"docs check: {label} failed (exit {p.returncode})")
    return time.monotonic() - started


def main():
    status_before = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    scratch = tempfile.mkdtemp(prefix="keel-docs-")
    env = dict(os.environ, KEEL_STORE=os.path.join(scratch, "store"))
    failures = []
    for page in PAGES:
        shell = []
        for line, lang, text, before in blocks(page):
            where = f"{page}:{line} ({lang or 'figure'})"
            skip = SKIP.search(before)
            if lang in ("", "text"):
                continue
            if skip:
                print(f"{where}: not run: {skip.group(1)}")
            elif lang == "sh":
                shell.append(f"# {where}\n{text}")
            elif lang == "python":
                took = run(["python3", "-"], text, dict(env, PYTHONPATH="examples/python"), where)
                print(f"{where}: ran ({took:.1f} s)")
            elif lang == "rust":
                if page != "README.md":
                    failures.append(f"{where}: Rust snippets belong in README.md (compiled as doctests)")
                else:
                    print(f"{where}: compiled as a doctest (cargo test -p keel --doc)")
            elif lang in ("c", "cmake", "toml"):
                m = EXCERPT.search(before)
                if not m:
                    failures.append(f"{where}: a {lang} block needs <!-- excerpt of PATH --> before it")
                elif not is_excerpt(text, m.group(1)):
                    failures.append(f"{where}: not an excerpt of {m.group(1)} (a line differs or is out of order)")
                else:
                    print(f"{where}: an excerpt of {m.group(1)}")
            else:
                failures.append(f"{where}: no rule for ```{lang} blocks")
        if shell:
            took = run(["bash", "-euo", "pipefail", "-s"], "\n".join(shell), env, f"{page}'s sh blocks")
            print(f"{page}: {len(shell)} sh blocks ran in one shell ({took:.1f} s)")
    status_after = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    if status_after != status_before:
        failures.append(f"the snippets wrote into the source tree:\n{status_after}")
    if failures:
        raise SystemExit("docs check failed:\n" + "\n".join(failures))
    print("docs check: every snippet runs as written")


if __name__ == "__main__":
    main()
